"""OTLP/HTTP bodies of several chunks are the stored zstd frames one after the other, never recompressed.

The zstd format (RFC 8878, section 3.1) makes a stream of concatenated frames decode to the concatenation of
their contents, and concatenated protobuf messages parse as one message whose repeated fields
(`resource_logs`) are concatenated: such a body is one valid ExportLogsServiceRequest. Checked here with the
decoders receivers use: libzstd's streaming API (`ZSTD_decompressStream`, through ctypes, what a C receiver and
zstd's own tools use), the `zstd` command line tool, and python-zstandard's stream reader across frames. The
OpenTelemetry Collector (confighttp) decodes with klauspost/compress's streaming `zstd.Decoder`, which reads
frame after frame until the end of the body (`Decoder.Read` -> `nextBlockSync`, `frameDec.reset`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import shutil
import subprocess

import pytest
import zstandard
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from edgeagent.codec import ChunkCodec
from edgeagent.otlp import ChunkEncoder
from edgeagent.records import Batch, Record


class _Buffer(ctypes.Structure):  # ZSTD_inBuffer and ZSTD_outBuffer have the same layout
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


def libzstd_stream_decode(data: bytes) -> bytes:
    """Decode with libzstd's streaming API, in 64 KiB output steps, to the end of the input."""
    name = ctypes.util.find_library("zstd")
    if name is None:
        pytest.skip("libzstd is not installed")
    lib = ctypes.CDLL(name)
    lib.ZSTD_createDStream.restype = ctypes.c_void_p
    lib.ZSTD_freeDStream.argtypes = [ctypes.c_void_p]
    lib.ZSTD_decompressStream.restype = ctypes.c_size_t
    lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buffer), ctypes.POINTER(_Buffer)]
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    stream = lib.ZSTD_createDStream()
    source = ctypes.create_string_buffer(data, len(data))
    input_buffer = _Buffer(ctypes.cast(source, ctypes.c_void_p), len(data), 0)
    output = ctypes.create_string_buffer(64 * 1024)
    decoded = bytearray()
    try:
        while True:
            output_buffer = _Buffer(ctypes.cast(output, ctypes.c_void_p), len(output), 0)
            hint = lib.ZSTD_decompressStream(stream, ctypes.byref(output_buffer), ctypes.byref(input_buffer))
            assert not lib.ZSTD_isError(hint), "libzstd reported an error"
            decoded += output.raw[: output_buffer.pos]
            if input_buffer.pos == input_buffer.size and output_buffer.pos < output_buffer.size:
                break
    finally:
        lib.ZSTD_freeDStream(stream)
    assert hint == 0, "the stream ended inside a frame"
    return bytes(decoded)


def chunk_payloads(codec: ChunkCodec) -> tuple[list[bytes], list[bytes]]:
    """Three stored chunks (two sources, scope attributes, a big one) and their protobufs."""
    encoder = ChunkEncoder({"device.id": "gw-1"}, "t")
    chunks = [
        [Batch("files", [b"line %d" % i for i in range(3000)], 1, "boot", {"log.file.path": "/var/log/a.log"})],
        [Batch("kmsg", [Record("usb 1-1: new device", 9, "INFO", {"kmsg.sequence": 7})], 2, "boot")],
        [Batch("files", [bytes(range(32, 127)) * 40 for _ in range(500)], 3, "boot", {"log.file.path": "/b"})],
    ]
    requests = [encoder.encode(batches, 10**18, True) for batches in chunks]
    return [codec.compress(r) for r in requests], requests


def test_a_body_of_several_chunks_is_their_frames_as_stored() -> None:
    codec = ChunkCodec()
    payloads, _ = chunk_payloads(codec)
    assert codec.request_body(payloads, "zstd") == b"".join(payloads)


@pytest.mark.parametrize("decoder", ["libzstd-stream", "zstd-cli", "python-zstandard-stream"])
def test_every_streaming_decoder_gets_the_whole_request(decoder: str) -> None:
    codec = ChunkCodec()
    payloads, requests = chunk_payloads(codec)
    body = codec.request_body(payloads, "zstd")
    if decoder == "libzstd-stream":
        decoded = libzstd_stream_decode(body)
    elif decoder == "zstd-cli":
        if shutil.which("zstd") is None:
            pytest.skip("the zstd tool is not installed")
        decoded = subprocess.run(["zstd", "-d", "-c", "-q"], input=body, capture_output=True, check=True).stdout
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
        decoded = reader.read()
    assert decoded == b"".join(requests)
    request = ExportLogsServiceRequest.FromString(decoded)
    assert len(request.resource_logs) == 3
    bodies = [r.body.string_value for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    assert bodies[:2] == ["line 0", "line 1"] and bodies[3000] == "usb 1-1: new device" and len(bodies) == 3501


def test_a_damaged_frame_in_the_body_fails_the_stream_decoders() -> None:
    codec = ChunkCodec()
    payloads, _ = chunk_payloads(codec)
    body = bytearray(codec.request_body(payloads, "zstd"))
    body[len(payloads[0]) + len(payloads[1]) // 2] ^= 0xFF  # inside the second frame (checksummed)
    with pytest.raises(AssertionError):
        libzstd_stream_decode(bytes(body))
    assert subprocess.run(["zstd", "-d", "-c", "-q"], input=bytes(body), capture_output=True).returncode != 0

"""The chunk codec (`edgeagent.codec`): round trip, split, time shift, counting,
bounded decoding of hostile payloads, and OTLP/HTTP content encodings.

Payloads are checked with independent readers too (zstandard's frame parser,
gzip, the official opentelemetry-proto messages), so the codec is not only
consistent with itself."""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from edgeagent import codec
from edgeagent.codec import CannotSplit, ChunkCodec, CorruptChunk, count_records
from edgeagent.otlp import CLOCK_ADJUSTED, CLOCK_ATTRIBUTE, ChunkEncoder
from edgeagent.records import SEVERITY_INFO, Batch, Record
from edgeagent.spool import NewChunk, Spool

BOOT = "11111111-2222-3333-4444-555555555555"
RESOURCE = {"device.id": "gw-test", "host.name": "testhost"}
OFFSET = 1_790_000_000 * 10**9
ENCODER = ChunkEncoder(RESOURCE, "t")


def lines_payload(lines: list[str], source: str = "files", synced: bool = True) -> bytes:
    return ChunkCodec().encode(ENCODER, [Batch(source, [x.encode() for x in lines], 1_000, BOOT)], OFFSET, synced)


def bodies(payload: bytes) -> list[str]:
    return [r["body"] for r in ChunkCodec().records(payload)]


def proto(payload: bytes) -> ExportLogsServiceRequest:
    """Decoded the way a receiver would: standard zstd, then opentelemetry-proto."""
    return ExportLogsServiceRequest.FromString(zstandard.ZstdDecompressor().decompress(payload))


def proto_bodies(request: ExportLogsServiceRequest) -> list[str]:
    return [r.body.string_value for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records]


def declared_size_frame(size: int) -> bytes:
    """A zstd frame header declaring `size` decoded bytes, followed by one raw block of 4 bytes."""
    header = struct.pack("<IB", 0xFD2FB528, 0xE0)  # single segment, 8-byte content size, no checksum
    return header + struct.pack("<Q", size) + (4 << 3 | 0).to_bytes(3, "little") + b"abcd"


# --- round trip and counting ------------------------------------------------------


def test_a_chunk_round_trips_as_one_standard_zstd_frame_with_checksum() -> None:
    batches = [
        Batch("files", [b"first", b"", "ünïcode ✓".encode()], 1_000, BOOT, {"log.file.path": "/var/log/a"}),
        Batch("kmsg", [Record("eth0: link up", SEVERITY_INFO, "INFO", {"kmsg.facility": "kern"}, 5_000)], 2_000, BOOT),
    ]
    request = ENCODER.encode(batches, OFFSET, True)
    payload = ChunkCodec().encode(ENCODER, batches, OFFSET, True)
    params = zstandard.get_frame_parameters(payload)
    assert params.has_checksum and params.content_size == len(request)
    assert ChunkCodec().decode(payload) == request
    assert bodies(payload) == ["first", "", "ünïcode ✓", "eth0: link up"]
    assert proto_bodies(proto(payload)) == bodies(payload)
    assert [r["scope"] for r in ChunkCodec().records(payload)] == ["edgeagent/files"] * 3 + ["edgeagent/kmsg"]
    assert ChunkCodec().count(payload) == 4
    assert ChunkCodec().raw_size(payload) == len(request)


@pytest.mark.parametrize("lines", [10, 3000, 30000])  # a trickle chunk, and bulk ones (BULK_PARAMS)
def test_a_chunk_of_any_size_is_one_frame_with_checksum_and_size_a_standard_reader_decodes(lines: int) -> None:
    text = [f"2026-11-30T09:00:00 gw-7 app[{i % 97}]: request {i} took {i % 1000} ms" for i in range(lines)]
    request = ENCODER.encode([Batch("files", [t.encode() for t in text], 1_000, BOOT)], OFFSET, True)
    payload = ChunkCodec().compress(request)
    assert (len(request) >= codec.BULK_MIN_BYTES) == (lines > 10)
    params = zstandard.get_frame_parameters(payload)
    assert params.has_checksum and params.content_size == len(request)
    assert zstandard.ZstdDecompressor().decompress(payload) == request
    assert proto_bodies(proto(payload)) == text


def test_count_records_matches_the_decoder() -> None:
    encoder = ChunkEncoder(RESOURCE, "t")
    raw = encoder.encode(
        [Batch("a", [b"1", b"2"], 0, BOOT), Batch("b", [Record("3", SEVERITY_INFO)], 0, BOOT)], 0, True
    )
    assert count_records(raw) == 3
    assert count_records(raw + raw) == 6


def test_raw_size_of_a_frame_without_declared_size_is_measured() -> None:
    request = ENCODER.encode([Batch("files", [b"x" * 100] * 50, 0, BOOT)], OFFSET, True)
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(request)
    assert zstandard.frame_content_size(streamed) == -1
    assert ChunkCodec().raw_size(streamed) == len(request)
    assert ChunkCodec().count(streamed) == 50


# --- split --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["files", "kmsg", "syslog"]), st.text(max_size=40)), min_size=2, max_size=60))
def test_split_loses_and_duplicates_nothing_and_keeps_the_order(records: list[tuple[str, str]]) -> None:
    batches = [Batch(source, [text.encode()], i, BOOT) for i, (source, text) in enumerate(records)]
    payload = ChunkCodec().encode(ENCODER, batches, OFFSET, True)
    first, second = ChunkCodec().split(payload)
    assert first.records >= 1 and second.records >= 1
    assert first.records + second.records == len(records)
    for part in (first, second):
        assert ChunkCodec().count(part.payload) == part.records
        assert zstandard.get_frame_parameters(part.payload).has_checksum
    # The encoder groups records by source (one scope each, in arrival order): that is the chunk's order.
    in_chunk = bodies(payload)
    assert sorted(in_chunk) == sorted(text for _, text in records)
    assert bodies(first.payload) + bodies(second.payload) == in_chunk
    assert proto_bodies(proto(first.payload)) + proto_bodies(proto(second.payload)) == in_chunk
    whole = ChunkCodec().records(payload)
    halves = ChunkCodec().records(first.payload) + ChunkCodec().records(second.payload)
    assert halves == whole  # times, scopes, resource and attributes too


def test_split_to_fit_halves_until_every_part_fits_and_keeps_every_record_in_order() -> None:
    lines = [f"line {i} " + "y" * 200 for i in range(100)]
    payload = lines_payload(lines)
    limit = ChunkCodec().raw_size(payload) // 5
    parts = ChunkCodec().split_to_fit(payload, limit)
    assert len(parts) >= 5
    assert all(ChunkCodec().raw_size(p.payload) <= limit for p in parts)
    assert [ChunkCodec().count(p.payload) for p in parts] == [p.records for p in parts]
    assert [line for p in parts for line in bodies(p.payload)] == lines


def test_split_to_fit_keeps_an_oversized_single_record_as_its_own_part() -> None:
    payload = lines_payload(["small", "x" * 5000, "small too"])
    parts = ChunkCodec().split_to_fit(payload, 1000)
    assert [bodies(p.payload) for p in parts] == [["small"], ["x" * 5000], ["small too"]]


def test_a_one_record_chunk_cannot_split() -> None:
    payload = lines_payload(["alone " * 1000])
    with pytest.raises(CannotSplit):
        ChunkCodec().split(payload)
    with pytest.raises(CannotSplit):
        ChunkCodec().split_to_fit(payload, 10)


# --- time shift ---------------------------------------------------------------------


def test_shift_moves_every_wall_time_marks_adjusted_and_keeps_the_records() -> None:
    batches = [
        Batch("files", [b"a", b"b"], 1_000, BOOT),
        Batch("kmsg", [Record("k", SEVERITY_INFO, "INFO", None, 500)], 2_000, BOOT),
    ]
    payload = ChunkCodec().encode(ENCODER, batches, 0, False)  # encoded before the clock was set
    delta = OFFSET
    shifted = ChunkCodec().shift(payload, delta)
    before, after = ChunkCodec().records(payload), ChunkCodec().records(shifted)
    assert [r["body"] for r in after] == ["a", "b", "k"]
    assert all(r["attributes"][CLOCK_ATTRIBUTE] == "unsynced" for r in before)
    assert all(r["attributes"][CLOCK_ATTRIBUTE] == CLOCK_ADJUSTED for r in after)
    for old, new in zip(before, after, strict=True):
        assert new["observed_time_unix_nano"] == old["observed_time_unix_nano"] + delta
        if "time_unix_nano" in old:
            assert new["time_unix_nano"] == old["time_unix_nano"] + delta
    assert after[2]["time_unix_nano"] == 500 + delta
    assert zstandard.get_frame_parameters(shifted).has_checksum
    assert proto_bodies(proto(shifted)) == ["a", "b", "k"]


# --- bounded decoding of hostile and damaged payloads ----------------------------------


def test_a_zstd_bomb_is_refused_without_decoding_it() -> None:
    payload = zstandard.ZstdCompressor().compress(bytes(8 * 1024**2))  # 8 MiB of zeros in a few hundred bytes
    assert len(payload) < 2048
    with pytest.raises(CorruptChunk, match="more than"):
        ChunkCodec().decode(payload, max_size=1024**2)
    with pytest.raises(CorruptChunk):
        ChunkCodec().records(payload, max_size=1024**2)


def test_a_bomb_without_declared_size_stops_at_the_bound() -> None:
    compressor = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    zeros = bytes(1024**2)
    payload = b"".join(compressor.compress(zeros) for _ in range(codec.MAX_DECODED_BYTES // len(zeros) + 8))
    payload += compressor.flush()
    assert zstandard.frame_content_size(payload) == -1
    for call in (ChunkCodec().decode, ChunkCodec().count, ChunkCodec().records, ChunkCodec().raw_size):
        with pytest.raises(CorruptChunk):
            call(payload)


def test_a_header_declaring_a_terabyte_allocates_nothing() -> None:
    payload = declared_size_frame(2**40)
    assert zstandard.frame_content_size(payload) == 2**40
    with pytest.raises(CorruptChunk, match="more than"):
        ChunkCodec().decode(payload)
    with pytest.raises(CorruptChunk):
        ChunkCodec().shift(payload, 1)
    with pytest.raises(CorruptChunk):
        ChunkCodec().split(payload)


def damaged_payloads() -> dict[str, bytes]:
    good = lines_payload(["one", "two", "three"])
    return {
        "empty": b"",
        "random bytes": os.urandom(300),
        "not zstd": b"hello, this is plain text and no zstd frame at all",
        "truncated frame": good[: len(good) // 2],
        "checksum mismatch": good[:-4] + bytes(4),
        "header lies about the size": declared_size_frame(100),
        "zstd around invalid protobuf": zstandard.ZstdCompressor().compress(b"\x0a\xff\xff\xff\xff\x0f garbage"),
    }


@pytest.mark.parametrize("name", list(damaged_payloads()))
def test_garbage_raises_corrupt_chunk_from_every_operation(name: str) -> None:
    payload = damaged_payloads()[name]
    c = ChunkCodec()
    operations = [c.records, c.count, lambda p: c.shift(p, 10), c.split]
    if name == "zstd around invalid protobuf":
        # A valid frame: it decodes, and split_to_fit leaves it whole (sent as is, the receiver decides).
        with pytest.raises(CannotSplit):
            c.split_to_fit(payload, 1)
    else:
        operations += [c.decode, lambda p: c.split_to_fit(p, 1), lambda p: c.request_body([p, p], "gzip")]
    for operation in operations:
        with pytest.raises(CorruptChunk):
            operation(payload)


# --- OTLP/HTTP content encodings ------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_request_body_coalesces_chunks_in_order_per_content_encoding(compression: str) -> None:
    payloads = [lines_payload([f"{n}.{i}" for i in range(3)], source=f"s{n}") for n in range(3)]
    expected = [f"{n}.{i}" for n in range(3) for i in range(3)]
    body = ChunkCodec().request_body(payloads, compression)
    if compression == "zstd":
        assert body == b"".join(payloads)  # the frames as stored, not recompressed
    raw = {
        # Several chunks are several frames, decoded as one stream (see tests/test_multiframe.py).
        "zstd": lambda b: zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b), read_across_frames=True).read(),
        "gzip": gzip.decompress,
        "none": lambda b: b,
    }[compression](body)
    assert raw == b"".join(ChunkCodec().decode(p) for p in payloads)
    assert proto_bodies(ExportLogsServiceRequest.FromString(raw)) == expected
    assert codec.content_encoding(compression) == {"zstd": "zstd", "gzip": "gzip", "none": None}[compression]


def test_a_single_zstd_chunk_is_sent_as_stored() -> None:
    payload = lines_payload(["only"])
    assert ChunkCodec().request_body([payload], "zstd") is payload
    assert gzip.decompress(ChunkCodec().request_body([payload], "gzip")) == ChunkCodec().decode(payload)


def test_request_body_names_the_damaged_payload() -> None:
    good = lines_payload(["fine"])
    with pytest.raises(CorruptChunk) as raised:
        ChunkCodec().request_body([good, good, b"garbage", good], "zstd")
    assert raised.value.index == 2


# --- the spool's salvage asks the codec -------------------------------------------------


def test_a_salvage_keeps_only_chunks_the_codec_can_decode(tmp_path: Path) -> None:
    """The spool never decompresses: `Spool.open(check_payload=...)` gets the codec's
    bounded decode, so a chunk whose CRC32 matches but whose payload is not a chunk (or
    claims a terabyte) is counted as lost, not copied and not a MemoryError at start-up."""
    path = tmp_path / "spool.db"
    spool = Spool.open(path)
    good = lines_payload(["kept"])
    spool.append(
        [
            NewChunk(good, 1, 4, 9, BOOT, 0, True),
            NewChunk(b"not a zstd frame", 3, 16, 9, BOOT, 0, True),
            NewChunk(declared_size_frame(2**40), 2, 16, 9, BOOT, 0, True),
        ]
    )
    spool.close()
    path.rename(tmp_path / "spool.db.corrupt-20260101T000000.000000000")
    salvaged = Spool.open(path, check_payload=ChunkCodec().decode)
    assert [bodies(c.payload) for c in salvaged.oldest(10)] == [["kept"]]
    counters = salvaged.counters()
    assert counters["salvage_lost_chunks"] == 2 and counters["salvage_lost_records"] == 5
    (lost,) = salvaged.take_losses()
    assert lost.attributes is not None and lost.attributes["edgeagent.loss.records"] == 5
    salvaged.close()

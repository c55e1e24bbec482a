"""The chunk codec: the one owner of the chunk wire format, end to end.

A chunk payload is one zstd frame (level `ZSTD_LEVEL`, bulk chunks with a
smaller long-match table, see `BULK_PARAMS`; with a content checksum and the
decoded size in its header) holding one OTLP logs v1
`ExportLogsServiceRequest` protobuf. This module owns everything done to such
a payload: encoding batches into one (`ChunkCodec.encode`), decoding it
(`decode`, `records`, `count`), splitting it (`split`, `split_to_fit`),
moving its wall times (`shift`) and turning payloads into an OTLP/HTTP request
body per content encoding (`request_body`, `content_encoding`). The protobuf
itself is written and walked by `edgeagent.otlp`; nothing else in the agent
imports `zstandard` (the spool stores and returns bytes).

Guarantees:
- Round trip: `records(encode(...))` yields every record encoded, in order.
- Bounded decoding: a payload is never decoded to more than `max_size` bytes
  (`MAX_DECODED_BYTES` by default), whatever its frame header claims, so a
  corrupt or hostile payload (a zstd bomb, a header declaring terabytes)
  cannot exhaust memory. Every undecodable payload (not zstd, damaged frame,
  over the bound, invalid protobuf) raises `CorruptChunk`, never anything else
  of zstd's or protobuf's.
- Splitting loses and duplicates nothing: the parts hold exactly the records
  of the whole, in order, each part decodes and counts its own records, and a
  one-record chunk is never split (`CannotSplit`).
- `shift` changes only the wall times (and the `edgeagent.clock` marker):
  record count, order and bodies stay.

Thread safety: zstd contexts are not thread-safe, so each thread uses its own
`ChunkCodec` (they are cheap); the module-level functions hold no state.
`BackgroundCompressor` compresses on a thread of its own (the batcher's), or
inline where the process has one CPU to run on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import zstandard

from edgeagent import otlp
from edgeagent.errors import CannotSplit, CorruptChunk
from edgeagent.otlp import ChunkEncoder, DecodeError, iter_fields
from edgeagent.records import Batch

log = logging.getLogger(__name__)

ZSTD_LEVEL = 3
# Chunks of BULK_MIN_BYTES and more (a file read in bulk: 256 KiB of text make about 290 KiB of protobuf) use
# level 3's parameters for large inputs (zstd's default row; zstd still fits the window to each input) with a
# table of 2^13 long matches instead of 2^16: it stays in the CPU's caches. Measured on the bench corpus,
# 64 KiB to 2 MiB chunks: 5-12 % less compression CPU and equal or fewer bytes (256 KiB: 0.2455 x raw instead of
# 0.2467; 128 KiB: 0.2549 instead of 0.2633, where level 3's own table for inputs under 256 KiB is greedier).
# Smaller chunks (a trickle) keep level 3's parameters for their size: there the smaller table cost bytes.
BULK_MIN_BYTES = 64 * 1024
BULK_PARAMS = zstandard.ZstdCompressionParameters.from_level(
    ZSTD_LEVEL, chain_log=13, write_checksum=1, write_content_size=1
)
# Far above any chunk the batcher builds (its defaults: 256 KiB of text, 20,000 records,
# a few MiB of protobuf) and small enough for a device with 128 MiB of RAM to survive.
MAX_DECODED_BYTES = 64 * 1024**2
GZIP_LEVEL = 6
CONTENT_TYPE = "application/x-protobuf"
PAYLOAD_ENCODING = "zstd"  # how a stored chunk payload is compressed (MQTT's content-encoding)
# `[otlp_http].compression` -> the request's Content-Encoding (None: no header).
CONTENT_ENCODINGS: dict[str, str | None] = {"zstd": "zstd", "gzip": "gzip", "none": None}


class ChunkPart(NamedTuple):
    """One part of a split chunk, as `Spool.split` stores it."""

    payload: bytes
    records: int


def content_encoding(compression: str) -> str | None:
    """The Content-Encoding header value for `[otlp_http].compression`."""
    return CONTENT_ENCODINGS[compression]


def count_records(request: bytes) -> int:
    """LogRecords in an ExportLogsServiceRequest protobuf, without decoding them."""
    n = 0
    for f, w, s, e in iter_fields(request):
        if f == 1 and w == 2:
            for f2, w2, s2, e2 in iter_fields(request, s, e):
                if f2 == 2 and w2 == 2:
                    n += sum(1 for f3, w3, _, _ in iter_fields(request, s2, e2) if f3 == 2 and w3 == 2)
    return n


class BackgroundCompressor:
    """Compresses chunk protobufs on a thread of its own, beside the event loop.

    zstd releases the GIL while it compresses, so this runs on a second core
    while the loop reads, splits and encodes the next chunk (compression is a
    third of the agent's CPU under load). The thread starts at the first
    `submit` and otherwise waits without waking up; it uses a `ChunkCodec` of
    its own (zstd contexts are not thread-safe). Results come back in
    submission order: one worker.

    Where the process may run on one CPU only (its affinity, read at the first
    `submit`: a single-core device, `taskset`, a cpuset), there is no second
    core to run on: the thread would only add GIL hand-overs and context
    switches: +0.06 to +0.09 CPU s and +0.06 to +0.11 s wall per million lines
    (BENCHMARKS.md, "One CPU"). `submit` then compresses at once, on the calling
    thread, and returns a future that is already done."""

    def __init__(self, thread_start: Callable[[], None] | None = None) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._inline: bool | None = None  # decided at the first submit
        self._thread_start = thread_start  # run first in the thread (the agent's: it takes no signals)
        self._codec = ChunkCodec()  # used by the worker thread only (or the caller's, inline)

    def submit(self, requests: list[bytes]) -> Future[list[bytes]]:
        """The chunk payloads of `requests`, compressed on the worker thread (or at once: see above)."""
        if self._inline is None:
            self._inline = usable_cpus() < 2
            if self._inline:
                log.info("one CPU to run on: chunks are compressed on the event loop's thread")
        if self._inline:
            done: Future[list[bytes]] = Future()
            done.set_result(self._compress(requests))
            return done
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="edgeagent-compress", initializer=self._thread_start
            )
        return self._executor.submit(self._compress, requests)

    def _compress(self, requests: list[bytes]) -> list[bytes]:
        return [self._codec.compress(request) for request in requests]


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity; the CPU count where
    the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ChunkCodec:
    """Encodes, decodes, splits and shifts chunk payloads. One per thread."""

    def __init__(self) -> None:
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        self._bulk_cctx = zstandard.ZstdCompressor(compression_params=BULK_PARAMS)
        self._dctx = zstandard.ZstdDecompressor()

    # --- encoding -------------------------------------------------------------------

    def encode(
        self, encoder: ChunkEncoder, batches: Iterable[Batch], clock_offset_ns: int, clock_synced: bool
    ) -> bytes:
        """The chunk payload holding `batches` (wall times by `clock_offset_ns`)."""
        return self.compress(encoder.encode(batches, clock_offset_ns, clock_synced))

    def compress(self, request: bytes) -> bytes:
        """A chunk payload for an ExportLogsServiceRequest protobuf."""
        return (self._bulk_cctx if len(request) >= BULK_MIN_BYTES else self._cctx).compress(request)

    # --- decoding -------------------------------------------------------------------

    def decode(self, payload: bytes, max_size: int = MAX_DECODED_BYTES) -> bytes:
        """The protobuf inside `payload`, at most `max_size` bytes; `CorruptChunk` otherwise."""
        size = self.decoded_size(payload)
        if size > max_size:
            raise CorruptChunk(f"the payload decodes to {size} bytes, more than the {max_size} allowed")
        try:
            if size >= 0:
                return self._dctx.decompress(payload)
            # No size in the header: zstd stops (and fails) once max_size bytes are out.
            return self._dctx.decompress(payload, max_output_size=max_size)
        except zstandard.ZstdError as e:
            raise CorruptChunk(f"not a valid zstd frame: {e}") from None

    def decoded_size(self, payload: bytes) -> int:
        """The decoded size the frame header declares (-1: not declared), read
        without decoding; `CorruptChunk` when there is no zstd frame header."""
        try:
            return zstandard.frame_content_size(payload)
        except zstandard.ZstdError as e:
            raise CorruptChunk(f"not a zstd frame: {e}") from None

    def raw_size(self, payload: bytes) -> int:
        """The decoded size, from the header when it says, else by decoding."""
        size = self.decoded_size(payload)
        return size if size >= 0 else len(self.decode(payload))

    def records(self, payload: bytes, max_size: int = MAX_DECODED_BYTES) -> list[dict[str, Any]]:
        """Every record of the chunk as a dict (see `otlp.decode_request`), in order."""
        try:
            return list(otlp.decode_request(self.decode(payload, max_size)))
        except DecodeError as e:
            raise CorruptChunk(f"invalid protobuf: {e}") from None

    def count(self, payload: bytes) -> int:
        """How many records the chunk holds; `CorruptChunk` when it cannot be decoded."""
        try:
            return count_records(self.decode(payload))
        except DecodeError as e:
            raise CorruptChunk(f"invalid protobuf: {e}") from None

    # --- changing a chunk -----------------------------------------------------------

    def shift(self, payload: bytes, delta_ns: int) -> bytes:
        """The chunk with every wall time moved by `delta_ns` and `unsynced`
        clock markers turned `adjusted` (see `otlp.shift_times`)."""
        try:
            return self.compress(otlp.shift_times(self.decode(payload), delta_ns))
        except DecodeError as e:
            raise CorruptChunk(f"invalid protobuf: {e}") from None

    def split(self, payload: bytes) -> tuple[ChunkPart, ChunkPart]:
        """The chunk as two parts of about half the records each, in order.
        `CannotSplit` for a single record, `CorruptChunk` when undecodable."""
        first, second = self._split_request(self.decode(payload))
        return self._part(first), self._part(second)

    def split_to_fit(self, payload: bytes, max_raw: int) -> list[ChunkPart]:
        """The chunk halved until every part decodes to at most `max_raw` bytes,
        in order (a single record larger than that stays a part of its own, and
        so does a part whose protobuf cannot be walked: the receiver decides).
        `CannotSplit` when that leaves the chunk whole, `CorruptChunk` when its
        zstd frame cannot be decoded."""
        pending = [self.decode(payload)]
        parts: list[bytes] = []
        while pending:
            request = pending.pop()
            if len(request) <= max_raw:
                parts.append(request)
                continue
            try:
                first, second = self._split_request(request)
            except (CannotSplit, CorruptChunk):  # the receiver decides about what cannot be split
                parts.append(request)
                continue
            pending += [second, first]
        if len(parts) < 2:
            raise CannotSplit(f"no part of the chunk can be split below {max_raw} bytes")
        return [self._part(part) for part in parts]

    def _split_request(self, request: bytes) -> tuple[bytes, bytes]:
        try:
            return otlp.split_request(request)
        except DecodeError as e:
            raise CorruptChunk(f"invalid protobuf: {e}") from None
        except ValueError as e:  # fewer than two records
            raise CannotSplit(str(e)) from None

    def _part(self, request: bytes) -> ChunkPart:
        return ChunkPart(self.compress(request), count_records(request))

    # --- OTLP/HTTP request bodies ---------------------------------------------------

    def request_body(self, payloads: Sequence[bytes], compression: str) -> bytes:
        """One request body of the chunks' records, in order, compressed per
        `[otlp_http].compression` ("zstd", "gzip" or "none"). `CorruptChunk`
        carries the `index` of a payload that cannot be decoded.

        zstd: the chunks' frames as stored, one after the other, never
        recompressed (that was 22 % of the agent's CPU in OTLP mode). A zstd
        stream of several frames decodes to their contents concatenated (RFC
        8878, 3.1), and concatenated ExportLogsServiceRequest messages are one
        request whose `resource_logs` are concatenated. Every streaming decoder
        reads all the frames: libzstd's `ZSTD_decompressStream` and the `zstd`
        tool, and the OpenTelemetry Collector's (confighttp: klauspost/compress
        `zstd.Decoder`, frame after frame until the end of the body); see
        tests/test_multiframe.py. A one-shot decoder that stops after the first
        frame (python-zstandard's `decompress()`) would see only the first
        chunk: docs/otlp_http.md says so. Each frame keeps its checksum, and a
        payload without a zstd frame header is refused here."""
        if compression == "zstd":
            if len(payloads) == 1:
                return payloads[0]
            for index, payload in enumerate(payloads):
                try:
                    self.decoded_size(payload)
                except CorruptChunk as e:
                    raise CorruptChunk(str(e), index) from None
            return b"".join(payloads)
        parts = []
        for index, payload in enumerate(payloads):
            try:
                parts.append(self.decode(payload))
            except CorruptChunk as e:
                raise CorruptChunk(str(e), index) from None
        raw = b"".join(parts)
        if compression == "gzip":
            import gzip  # only OTLP/HTTP with gzip: not imported at every start (about 1 ms)

            return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
        return raw

"""The wire format: OTLP logs v1 `ExportLogsServiceRequest` protobuf.

A small direct encoder for the few fields edgeagent emits, plus a walker that
decodes, splits and time-shifts what it encoded.

Where attributes go: the device's in the Resource; a batch's common attributes
(`log.file.path` of a file, a syslog listener's address) in the
InstrumentationScope of a ScopeLogs of their own, written once per chunk
rather than once per record (they were 0.55 x the raw text of a file's lines);
a record's own attributes (kernel facility, severity details) on the record.
A record's effective attributes are its scope's plus its own, which is what
`decode_request` returns. Building protobuf message
objects record by record costs about twice as much CPU as writing the bytes
here; tests decode every form this module emits with the official
opentelemetry-proto messages.

Field numbers (opentelemetry/proto/logs/v1/logs.proto, common/v1/common.proto):
  ExportLogsServiceRequest.resource_logs=1
  ResourceLogs: resource=1 scope_logs=2      Resource: attributes=1
  ScopeLogs: scope=1 log_records=2           InstrumentationScope: name=1 version=2 attributes=3
  LogRecord: time_unix_nano=1 (fixed64) severity_number=2 severity_text=3 body=5
             attributes=6 observed_time_unix_nano=11 (fixed64)
  KeyValue: key=1 value=2    AnyValue: string=1 bool=2 int=3 double=4 kvlist=6 bytes=7
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any

from edgeagent.errors import DecodeError
from edgeagent.records import AttrValue, Batch, Record

_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_unpack_q = struct.Struct("<Q").unpack_from
_unpack_d = struct.Struct("<d").unpack_from

# Records whose wall time could not be established carry this attribute. Its
# two values have the same length so a correction at upload patches bytes in
# place instead of re-encoding the chunk.
CLOCK_ATTRIBUTE = "edgeagent.clock"
CLOCK_UNSYNCED = "unsynced"
CLOCK_ADJUSTED = "adjusted"
assert len(CLOCK_UNSYNCED) == len(CLOCK_ADJUSTED)


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Varints of the lengths most fields have (record bodies, attributes), made once. 2048 of them cost about
# 0.1 MiB of RSS for as long as the agent runs; the 16384 of all two-byte varints cost 0.9 MiB.
_VARINT = [varint(i) for i in range(2048)]


def _v(n: int) -> bytes:
    if n < 2048:
        return _VARINT[n]
    if n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    return varint(n)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + _v(len(payload)) + payload


def encode_any(value: AttrValue) -> bytes:
    """AnyValue message bytes."""
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _len_field(b"\x3a", value)
    return _len_field(b"\x0a", str(value).encode())


def encode_key_value(key: str, value: AttrValue) -> bytes:
    """KeyValue message bytes (without its own tag)."""
    return _len_field(b"\x0a", key.encode()) + _len_field(b"\x12", encode_any(value))


def encode_attributes(attributes: dict[str, AttrValue] | None, tag: bytes) -> bytes:
    """Repeated KeyValue fields with `tag` (0x0a in Resource, 0x32 in LogRecord)."""
    if not attributes:
        return b""
    return b"".join(_len_field(tag, encode_key_value(k, v)) for k, v in attributes.items())


def encode_resource(attributes: dict[str, AttrValue]) -> bytes:
    return encode_attributes(attributes, b"\x0a")


class ChunkEncoder:
    """Encodes batches into one `ExportLogsServiceRequest` (uncompressed)."""

    def __init__(self, resource: dict[str, AttrValue], version: str) -> None:
        self._resource_field = _len_field(b"\x0a", encode_resource(resource))
        self._version = version.encode()
        self._scopes: dict[tuple[str, bytes], bytes] = {}
        # Encoded attribute fields of values that repeat record after record
        # (facility names, levels, flags): most of a kernel record's encoding cost.
        self._attribute_fields: dict[tuple[str, type, AttrValue], bytes] = {}
        self._line_framing: dict[int, _LineFraming] = {}  # by the length of the common fields

    def _scope(self, source: str, attributes: bytes) -> bytes:
        """The ScopeLogs' `scope` field: name, version and the batches' common attributes."""
        key = (source, attributes)
        scope = self._scopes.get(key)
        if scope is None:
            if len(self._scopes) > 256:
                self._scopes.clear()
            inner = _len_field(b"\x0a", f"edgeagent/{source}".encode()) + _len_field(b"\x12", self._version)
            scope = self._scopes[key] = _len_field(b"\x0a", inner + attributes)
        return scope

    def encode(self, batches: Iterable[Batch], clock_offset_ns: int, clock_synced: bool) -> bytes:
        """Wall time of every record = its monotonic time + `clock_offset_ns`.

        Batches are grouped into one ScopeLogs per source and set of common
        attributes (scope attributes), in arrival order. When the clock is not
        synced, records carry `edgeagent.clock=unsynced`.
        """
        marker = b"" if clock_synced else _len_field(b"\x32", encode_key_value(CLOCK_ATTRIBUTE, CLOCK_UNSYNCED))
        by_scope: dict[tuple[str, bytes], tuple[list[bytes], list[int]]] = {}
        for batch in batches:
            if not batch.records:
                continue
            parts, size = by_scope.setdefault((batch.source, encode_attributes(batch.attributes, b"\x1a")), ([], [0]))
            common = b"\x59" + _pack_q(max(0, batch.observed_mono_ns + clock_offset_ns)) + marker
            first = batch.records[0]
            if isinstance(first, bytes):
                framing = self._line_framing.get(len(common))
                if framing is None:
                    framing = self._line_framing[len(common)] = _LineFraming(len(common))
                size[0] += framing.encode(batch.records, common, parts)  # type: ignore[arg-type]
            else:
                for record in batch.records:
                    if isinstance(record, bytes):
                        record = Record(record)
                    field = _len_field(b"\x12", self._encode_record(record, common, clock_offset_ns))
                    parts.append(field)
                    size[0] += len(field)
        # One join at the end: the chunk's bytes are copied once, not once per
        # level of nesting. Lengths are summed as the parts are made.
        out = [b"\x0a", b"", self._resource_field]
        total = len(self._resource_field)
        for (source, attributes), (parts, size) in by_scope.items():
            scope = self._scope(source, attributes)
            scope_logs_len = len(scope) + size[0]
            head = b"\x12" + _v(scope_logs_len)
            out += (head, scope)
            out += parts
            total += len(head) + scope_logs_len
        out[1] = _v(total)
        return b"".join(out)

    def _encode_record(self, record: Record, common: bytes, clock_offset_ns: int) -> bytes:
        parts = []
        if record.time_mono_ns:
            parts.append(b"\x09" + _pack_q(max(0, record.time_mono_ns + clock_offset_ns)))
        if record.severity:
            parts.append(b"\x10" + _v(record.severity))
        if record.severity_text:
            parts.append(_len_field(b"\x1a", record.severity_text.encode()))
        body = record.body if isinstance(record.body, bytes) else record.body.encode("utf-8", "replace")
        parts.append(_len_field(b"\x2a", _len_field(b"\x0a", body)))
        parts.append(common)
        if record.attributes:
            cache = self._attribute_fields
            for key, value in record.attributes.items():
                cacheable = isinstance(value, (str, bool)) or (isinstance(value, int) and -1024 < value < 1024)
                if not cacheable:
                    parts.append(_len_field(b"\x32", encode_key_value(key, value)))
                    continue
                cache_key = (key, type(value), value)
                field = cache.get(cache_key)
                if field is None:
                    if len(cache) > 4096:
                        cache.clear()
                    field = cache[cache_key] = _len_field(b"\x32", encode_key_value(key, value))
                parts.append(field)
        return b"".join(parts)


class _LineFraming:
    """The bulk path: records differing only by their body text, for one length
    of the common fields (observed time, clock marker).

    Each record is [tag + length, common fields, body tags + lengths, line]:
    the first and third depend only on the line's length and are made once per
    length the agent meets (kept across chunks, at most `MAX_LENGTHS`); per
    batch, each length's whole prefix (the first three) is put together once,
    then looked up and interleaved with the lines by C-level map and slice
    assignment: no Python bytecode runs per line, and only lengths never seen
    before cost a Python step.
    """

    MAX_LENGTHS = 2048  # distinct line lengths remembered (about 0.5 MiB at most)

    def __init__(self, common_len: int) -> None:
        self.common_len = common_len
        self.heads: dict[int, bytes] = {}  # length -> record tag and length
        self.tails: dict[int, bytes] = {}  # length -> body tags and lengths

    def encode(self, lines: list[bytes], common: bytes, out: list[bytes]) -> int:
        """Append the record fields of `lines` to `out`; returns their size in bytes."""
        lengths = list(map(len, lines))
        distinct = set(lengths)
        new = distinct.difference(self.heads)
        if new:
            self._learn(new)
        heads, tails = self.heads, self.tails
        prefixes = {n: heads[n] + common + tails[n] for n in distinct}
        fields: list[bytes] = [common] * (2 * len(lines))
        fields[0::2] = map(prefixes.__getitem__, lengths)  # type: ignore[call-overload]
        fields[1::2] = lines
        # Joined here, its length is the size (a copy more, cheaper than summing a size per line).
        records = b"".join(fields)
        out.append(records)
        return len(records)

    def _learn(self, lengths: set[int]) -> None:
        if len(self.heads) + len(lengths) > self.MAX_LENGTHS:
            self.heads.clear()
            self.tails.clear()
        for n in lengths:
            any_len = 1 + len(_v(n)) + n
            tail = b"\x2a" + _v(any_len) + b"\x0a" + _v(n)
            self.heads[n] = b"\x12" + _v(self.common_len + len(tail) + n)
            self.tails[n] = tail


# --- decoding -----------------------------------------------------------------


def _read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def iter_fields(
    buf: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value start, value end or varint value).

    For wire type 0 the last item is the decoded varint; for the others it is
    the end offset of the value bytes.
    """
    pos = start
    end = len(buf) if end is None else end
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            yield field_no, wire, pos, value
        elif wire == 1:
            if pos + 8 > end:
                raise DecodeError("truncated fixed64")
            yield field_no, wire, pos, pos + 8
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise DecodeError("length-delimited field runs past its message")
            yield field_no, wire, pos, pos + length
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise DecodeError("truncated fixed32")
            yield field_no, wire, pos, pos + 4
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wire}")


def _decode_any(buf: bytes, start: int, end: int) -> Any:
    value: Any = None
    for f, w, s, e in iter_fields(buf, start, end):
        if f == 1 and w == 2:
            value = bytes(buf[s:e]).decode("utf-8", "replace")
        elif f == 2 and w == 0:
            value = bool(e)
        elif f == 3 and w == 0:
            value = e - (1 << 64) if e >= 1 << 63 else e
        elif f == 4 and w == 1:
            value = _unpack_d(buf, s)[0]
        elif f == 7 and w == 2:
            value = bytes(buf[s:e]).hex()
        elif f == 6 and w == 2:
            value = _decode_kvlist(buf, s, e)
    return value


def _decode_kvlist(buf: bytes, start: int, end: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f, w, s, e in iter_fields(buf, start, end):
        if f == 1 and w == 2:
            key, value = _decode_key_value(buf, s, e)
            out[key] = value
    return out


def _decode_key_value(buf: bytes, start: int, end: int) -> tuple[str, Any]:
    key = ""
    value: Any = None
    for f, w, s, e in iter_fields(buf, start, end):
        if f == 1 and w == 2:
            key = bytes(buf[s:e]).decode("utf-8", "replace")
        elif f == 2 and w == 2:
            value = _decode_any(buf, s, e)
    return key, value


def decode_log_record(buf: bytes, start: int, end: int) -> dict[str, Any]:
    out: dict[str, Any] = {"attributes": {}}
    for f, w, s, e in iter_fields(buf, start, end):
        if f == 1 and w == 1:
            out["time_unix_nano"] = _unpack_q(buf, s)[0]
        elif f == 11 and w == 1:
            out["observed_time_unix_nano"] = _unpack_q(buf, s)[0]
        elif f == 2 and w == 0:
            out["severity_number"] = e
        elif f == 3 and w == 2:
            out["severity_text"] = bytes(buf[s:e]).decode("utf-8", "replace")
        elif f == 5 and w == 2:
            out["body"] = _decode_any(buf, s, e)
        elif f == 6 and w == 2:
            key, value = _decode_key_value(buf, s, e)
            out["attributes"][key] = value
    return out


def decode_request(buf: bytes) -> Iterator[dict[str, Any]]:
    """Yield every log record of a request as a dict, with `resource`, `scope` and `scope_attributes`;
    its `attributes` are the effective ones: the scope's, overridden by the record's own."""
    for f, w, s, e in iter_fields(buf):
        if f != 1 or w != 2:
            continue
        resource: dict[str, Any] = {}
        for f2, w2, s2, e2 in iter_fields(buf, s, e):
            if f2 == 1 and w2 == 2:
                resource = _decode_kvlist(buf, s2, e2)
            elif f2 == 2 and w2 == 2:
                scope = ""
                scope_attributes: dict[str, Any] = {}
                for f3, w3, s3, e3 in iter_fields(buf, s2, e2):
                    if f3 == 1 and w3 == 2:
                        for f4, w4, s4, e4 in iter_fields(buf, s3, e3):
                            if f4 == 1 and w4 == 2:
                                scope = bytes(buf[s4:e4]).decode("utf-8", "replace")
                            elif f4 == 3 and w4 == 2:
                                key, value = _decode_key_value(buf, s4, e4)
                                scope_attributes[key] = value
                    elif f3 == 2 and w3 == 2:
                        record = decode_log_record(buf, s3, e3)
                        record["attributes"] = {**scope_attributes, **record["attributes"]}
                        record["resource"] = resource
                        record["scope"] = scope
                        record["scope_attributes"] = scope_attributes
                        yield record


def shift_times(buf: bytes, delta_ns: int) -> bytes:
    """Return `buf` with every record's wall times moved by `delta_ns`.

    Called only by `UploaderContext.corrected` (guarantee 7), which stores the
    result with its new offset so that nothing shifts the same times twice. Records marked
    `edgeagent.clock=unsynced` are re-marked `adjusted`. Fixed64 times and
    equal-length markers are patched in place, so no length changes.
    """
    out = bytearray(buf)
    unsynced = CLOCK_UNSYNCED.encode()
    adjusted = CLOCK_ADJUSTED.encode()
    for f, w, s, e in iter_fields(buf):
        if f != 1 or w != 2:
            continue
        for f2, w2, s2, e2 in iter_fields(buf, s, e):
            if f2 != 2 or w2 != 2:
                continue
            for f3, w3, s3, e3 in iter_fields(buf, s2, e2):
                if f3 != 2 or w3 != 2:
                    continue
                for f4, w4, s4, e4 in iter_fields(buf, s3, e3):
                    if w4 == 1 and f4 in (1, 11):
                        t = _unpack_q(buf, s4)[0]
                        if t:
                            out[s4:e4] = _pack_q(max(0, t + delta_ns))
                    elif f4 == 6 and w4 == 2:
                        key, value = _decode_key_value(buf, s4, e4)
                        if key == CLOCK_ATTRIBUTE and value == CLOCK_UNSYNCED:
                            at = buf.rfind(unsynced, s4, e4)
                            out[at : at + len(adjusted)] = adjusted
    return bytes(out)


def split_request(buf: bytes) -> tuple[bytes, bytes]:
    """Split a request into two of about half the records each, same resource
    and scopes. Used when a receiver refuses a message as too large."""
    records: list[tuple[bytes, bytes, bytes]] = []  # (resource field, scope field, record field)
    for f, w, s, e in iter_fields(buf):
        if f != 1 or w != 2:
            continue
        resource_field = b""
        for f2, w2, s2, e2 in iter_fields(buf, s, e):
            if f2 == 1 and w2 == 2:
                resource_field = _len_field(b"\x0a", bytes(buf[s2:e2]))
            elif f2 == 2 and w2 == 2:
                scope_field = b""
                for f3, w3, s3, e3 in iter_fields(buf, s2, e2):
                    if f3 == 1 and w3 == 2:
                        scope_field = _len_field(b"\x0a", bytes(buf[s3:e3]))
                    elif f3 == 2 and w3 == 2:
                        records.append((resource_field, scope_field, _len_field(b"\x12", bytes(buf[s3:e3]))))
    if len(records) < 2:
        raise ValueError("a request with fewer than two records cannot be split")
    half = len(records) // 2
    return _assemble(records[:half]), _assemble(records[half:])


def _assemble(records: list[tuple[bytes, bytes, bytes]]) -> bytes:
    out = []
    i = 0
    while i < len(records):
        resource_field = records[i][0]
        scopes = []
        while i < len(records) and records[i][0] == resource_field:
            scope_field = records[i][1]
            parts = [scope_field]
            while i < len(records) and records[i][0] == resource_field and records[i][1] == scope_field:
                parts.append(records[i][2])
                i += 1
            scopes.append(_len_field(b"\x12", b"".join(parts)))
        out.append(_len_field(b"\x0a", resource_field + b"".join(scopes)))
    return b"".join(out)

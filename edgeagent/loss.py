"""Loss records: the one builder of the records the agent ships about data it lost (guarantee 5).

Every loss the agent cannot prevent is counted (by whoever saw it, in the spool's counters), logged, and
shipped as a record built here by `record()`, so every kind carries the same attribute names:

- `edgeagent.loss.reason`: the kind, one of `KINDS` (docs/losses.md has the table: when, attributes);
- `edgeagent.loss.records`, `.chunks`, `.bytes`: how much was lost, each only when it is known;
- `edgeagent.loss.source`: the source that lost it (absent when the spool or a receiver did);
- `edgeagent.loss.detail`: the receiver's reason, for refusals (cut to 500 characters);
- kind-specific attributes after those (sequence numbers, the file path, the listener, ...).

A loss record has severity WARN and a body that says what happened in words. A line cut to the size
limit is not a loss record of its own: the record itself is marked (`truncated()`), so the part that
was kept and the fact that the rest is missing travel together.
"""

from __future__ import annotations

from edgeagent.records import SEVERITY_WARN, Attributes, Record

REASON = "edgeagent.loss.reason"
RECORDS = "edgeagent.loss.records"
CHUNKS = "edgeagent.loss.chunks"
BYTES = "edgeagent.loss.bytes"
SOURCE = "edgeagent.loss.source"
DETAIL = "edgeagent.loss.detail"
OLDEST_UNIX_NANO = "edgeagent.loss.oldest_unix_nano"  # spool_full: creation times of the evicted chunks
NEWEST_UNIX_NANO = "edgeagent.loss.newest_unix_nano"
FIRST_SEQUENCE = "edgeagent.loss.first_sequence"  # kmsg_overwritten: the kernel's sequence numbers lost
LAST_SEQUENCE = "edgeagent.loss.last_sequence"
CAUSE = "edgeagent.loss.cause"  # kmsg_overwritten: start, restart, reopen or read
LINE_TRUNCATED = "edgeagent.line.truncated"
LINE_ORIGINAL_BYTES = "edgeagent.line.original_bytes"

SPOOL_FULL = "spool_full"
SPOOL_CORRUPT = "spool_corrupt"
REJECTED = "rejected"
PARTIALLY_REJECTED = "partially_rejected"
KMSG_OVERWRITTEN = "kmsg_overwritten"
SYSLOG_DROPPED = "syslog_dropped"
JOURNAL_CURSOR_GONE = "journal_cursor_gone"
FILE_TRUNCATED = "file_truncated"
FILE_ROTATED_AWAY = "file_rotated_away"
KINDS = (
    SPOOL_FULL,
    SPOOL_CORRUPT,
    REJECTED,
    PARTIALLY_REJECTED,
    KMSG_OVERWRITTEN,
    SYSLOG_DROPPED,
    JOURNAL_CURSOR_GONE,
    FILE_TRUNCATED,
    FILE_ROTATED_AWAY,
)
_DETAIL_MAX = 500

# Shared by every cut line whose full length is unknown: never modified.
TRUNCATED_ATTRS: Attributes = {LINE_TRUNCATED: True}


def record(
    kind: str,
    text: str,
    *,
    records: int | None = None,
    chunks: int | None = None,
    byte_count: int | None = None,
    source: str | None = None,
    detail: str | None = None,
    extra: Attributes | None = None,
    time_mono_ns: int = 0,
) -> Record:
    """The record about one loss of `kind`; quantities that are None are unknown and left out."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(KINDS)}")
    attributes: Attributes = {REASON: kind}
    for name, value in ((RECORDS, records), (CHUNKS, chunks), (BYTES, byte_count), (SOURCE, source)):
        if value is not None:
            attributes[name] = value
    if detail is not None:
        attributes[DETAIL] = detail[:_DETAIL_MAX]
    if extra:
        attributes.update(extra)
    return Record(text, SEVERITY_WARN, "WARN", attributes, time_mono_ns)


def truncated(original_bytes: int | None = None) -> Attributes:
    """The marks of a record whose body was cut; `original_bytes` is the full length when known."""
    if original_bytes is None or original_bytes < 0:
        return TRUNCATED_ATTRS
    return {LINE_TRUNCATED: True, LINE_ORIGINAL_BYTES: original_bytes}

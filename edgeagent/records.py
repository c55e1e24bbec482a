"""The record types every source emits and the batcher consumes.

A `Record` is one log line or kernel message. Sources hand records over in a
`Batch`: records read together from one source, sharing what is written once
(source name, boot, observation time, common attributes) and carrying the source
position reached after them. The position travels with the records so the
spool can commit both in one transaction (design guarantee 1).

Two shapes of record are accepted in `Batch.records`, both meaning "a record":
- `Record` objects, for sources with per-record severity, time or attributes;
- plain `bytes` (UTF-8 text without the trailing newline), for the bulk case of
  lines that differ only by their body. This is the file source's fast path: it
  saves a Python object per line, which is most of the per-line cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

AttrValue = str | bool | int | float
Attributes = dict[str, AttrValue]

# OpenTelemetry SeverityNumber values (logs data model).
SEVERITY_UNSPECIFIED = 0
SEVERITY_TRACE = 1
SEVERITY_DEBUG = 5
SEVERITY_INFO = 9
SEVERITY_INFO2 = 10
SEVERITY_WARN = 13
SEVERITY_ERROR = 17
SEVERITY_FATAL = 21

# syslog level (0 emerg .. 7 debug) -> (SeverityNumber, SeverityText).
SYSLOG_SEVERITY: tuple[tuple[int, str], ...] = (
    (SEVERITY_FATAL, "EMERG"),
    (SEVERITY_FATAL, "ALERT"),
    (SEVERITY_FATAL, "CRIT"),
    (SEVERITY_ERROR, "ERR"),
    (SEVERITY_WARN, "WARNING"),
    (SEVERITY_INFO2, "NOTICE"),
    (SEVERITY_INFO, "INFO"),
    (SEVERITY_DEBUG, "DEBUG"),
)

SYSLOG_LEVEL_NAMES: dict[str, int] = {
    "emerg": 0,
    "alert": 1,
    "crit": 2,
    "err": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}


@dataclass(slots=True)
class Record:
    """One log record.

    `time_mono_ns` is the event time on the monotonic clock (CLOCK_MONOTONIC)
    of the batch's boot, when the source knows it (the kernel's timestamp); 0
    means the event time is unknown and receivers use the observed time.
    Wall time is never stored here: it is derived from the boot's clock offset
    when the chunk is encoded, and corrected at upload (guarantee 7).
    """

    body: str | bytes
    severity: int = SEVERITY_UNSPECIFIED
    severity_text: str = ""
    attributes: Attributes | None = None
    time_mono_ns: int = 0


@dataclass(slots=True)
class Batch:
    """Records read together from one source.

    `position` is `(key, value)`: the source's resume point after these
    records, stored in the same transaction as they are. `key` names the
    stream ("kmsg", "file:<dev>:<ino>:<fingerprint>"); `value` is an opaque
    string only the source interprets. A batch may carry no records and only a
    position (records read but filtered out still advance the position).

    `observed_mono_ns` is CLOCK_MONOTONIC when the batch was read; `boot_id`
    names the boot whose monotonic clock the times refer to.
    """

    source: str
    records: list[Record] | list[bytes]
    observed_mono_ns: int
    boot_id: str
    attributes: Attributes = field(default_factory=dict)
    position: tuple[str, str] | None = None
    raw_bytes: int = -1  # bytes of body text; computed when -1

    def body_bytes(self) -> int:
        if self.raw_bytes < 0:
            total = 0
            for r in self.records:
                if isinstance(r, bytes):
                    total += len(r)
                else:
                    body = r.body
                    total += len(body) if isinstance(body, bytes) else len(body.encode())
            self.raw_bytes = total
        return self.raw_bytes


def syslog_severity(level: int) -> tuple[int, str]:
    """Map a syslog level 0-7 to (SeverityNumber, SeverityText)."""
    if 0 <= level < len(SYSLOG_SEVERITY):
        return SYSLOG_SEVERITY[level]
    return SEVERITY_UNSPECIFIED, ""

"""Syslog message parsing: RFC 5424, RFC 3164 and their common variants, into `Record`s.

Owns the mapping of one syslog message (the bytes of one datagram or one TCP
frame, without framing) to a record: body, severity, event time and
attributes. It never raises on bad input: a message it cannot read is kept
whole as the body and marked `syslog.malformed` (guarantee 6).

Accepted shapes (`format = "auto"` tries them in this order):
- RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD...]|- MSG`,
  NILVALUE `-` for any header field; a UTF-8 BOM before MSG is dropped.
- RFC 3164 / BSD: `<PRI>Mmm dd hh:mm:ss HOSTNAME TAG[PID]: MSG`, with the
  variants seen in the field: no HOSTNAME (what glibc's syslog() and
  `logger --socket` send to /dev/log), a year or fractional seconds after the
  date, an RFC 3339 timestamp instead of the BSD one (rsyslog's forward
  format), no timestamp at all, no PRI at all (facility and severity unknown),
  and OpenWrt logd's forward format (`<PRI>Mmm dd hh:mm:ss [HOSTNAME] [PREFIX: ]
  TAG: MSG`, kernel lines as `kernel: ...`).

BSD timestamps carry no year and no zone: they are read as local time in the
latest year that does not put them more than a day in the future. Timestamps become the record's event time
through the current clock offset (`wall_to_mono_ns`), so records are stamped
with the sender's time; a message without a timestamp has none and receivers
use the observed time.

Attribute names (OpenTelemetry semantic conventions where one exists, the
`syslog.` namespace otherwise) are listed in docs/syslog.md.
"""

from __future__ import annotations

import calendar
import re
import time
from datetime import datetime

from edgeagent.records import Attributes, Record, syslog_severity
from edgeagent.sources.kmsg import FACILITY_NAMES

ATTR_FACILITY = "syslog.facility"
ATTR_LEVEL = "syslog.level"
ATTR_HOSTNAME = "host.name"
ATTR_APP_NAME = "syslog.app_name"
ATTR_PID = "process.pid"
ATTR_PROC_ID = "syslog.proc_id"
ATTR_MSG_ID = "syslog.msg_id"
ATTR_SD_PREFIX = "syslog.sd."
ATTR_MALFORMED = "syslog.malformed"

FORMATS = ("auto", "rfc5424", "rfc3164")

_PRI_RE = re.compile(r"<(\d{1,3})>")
_MONTH_NAMES = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
_MONTHS = {name: i for i, name in enumerate(_MONTH_NAMES.split("|"), 1)}
_BSD_TIME_RE = re.compile(
    rf"({_MONTH_NAMES}) +(\d{{1,2}}) (?:(\d{{4}}) )?(\d\d):(\d\d):(\d\d)(?:\.(\d{{1,9}}))?(?: |$)"
)
_ISO_TIME_RE = re.compile(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?)(?: |$)")
# TAG[PID]: and the spaces after it (rsyslog's forward format puts two)
_TAG_RE = re.compile(r"([^\s\[\]:]{1,64})(?:\[([^\]\s]{0,32})\])?:(?: +|$)")
_SD_ESCAPE_RE = re.compile(r'\\([\\"\]])')


class _Malformed(ValueError):
    pass


def wall_to_mono_ns(wall_ns: int, offset_ns: int) -> int:
    """The monotonic instant whose wall time is `wall_ns` (0 means unknown, so it is never returned)."""
    return wall_ns - offset_ns or 1


def parse_message(data: bytes, fmt: str, offset_ns: int, now: float | None = None) -> Record:
    """One syslog message (no framing, trailing newline allowed) as a Record.

    `fmt` is one of FORMATS; `offset_ns` is CLOCK_REALTIME - CLOCK_MONOTONIC,
    used to turn the message's timestamp into the record's event time; `now`
    (seconds since the epoch) picks the year of BSD timestamps.
    """
    text = data.decode("utf-8", "replace").rstrip("\r\n\x00")
    attrs: Attributes = {}
    level = -1
    rest = text
    m = _PRI_RE.match(text)
    if m and int(m.group(1)) <= 191:
        pri = int(m.group(1))
        level = pri & 7
        attrs[ATTR_FACILITY] = FACILITY_NAMES[pri >> 3]
        attrs[ATTR_LEVEL] = level
        rest = text[m.end() :]
    wall_ns = 0
    try:
        if fmt == "rfc5424" or (fmt == "auto" and rest.startswith("1 ")):
            if m is None:
                raise _Malformed("no <PRI> at the start")
            body, wall_ns = _parse_5424(rest, attrs)
        else:
            body, wall_ns = _parse_3164(rest, attrs, time.time() if now is None else now)
    except _Malformed as e:
        attrs = {key: attrs[key] for key in (ATTR_FACILITY, ATTR_LEVEL) if key in attrs}
        attrs[ATTR_MALFORMED] = str(e)
        body = text
    severity, severity_text = syslog_severity(level)
    return Record(body, severity, severity_text, attrs, wall_to_mono_ns(wall_ns, offset_ns) if wall_ns else 0)


# --- RFC 5424 -----------------------------------------------------------------------------------


def _parse_5424(rest: str, attrs: Attributes) -> tuple[str, int]:
    parts = rest.split(" ", 6)
    if len(parts) < 7:
        raise _Malformed("RFC 5424 header needs VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA")
    _, timestamp, hostname, app, procid, msgid, tail = parts
    wall_ns = 0
    if timestamp != "-":
        wall_ns = _iso_ns(timestamp)
        if not wall_ns:
            raise _Malformed(f"RFC 5424 TIMESTAMP {timestamp[:40]!r} is not RFC 3339")
    _set(attrs, ATTR_HOSTNAME, hostname)
    _set(attrs, ATTR_APP_NAME, app)
    _set_procid(attrs, procid)
    _set(attrs, ATTR_MSG_ID, msgid)
    if tail.startswith("-"):
        message = tail[1:]
    elif tail.startswith("["):
        message = _parse_sd(tail, attrs)
    else:
        raise _Malformed("RFC 5424 STRUCTURED-DATA must be '-' or start with '['")
    if message.startswith(" "):
        message = message[1:]
    elif message:
        raise _Malformed("RFC 5424 MSG must be separated from STRUCTURED-DATA by a space")
    return message.removeprefix("\ufeff"), wall_ns


def _parse_sd(tail: str, attrs: Attributes) -> str:
    """Read SD-ELEMENTs into attributes; returns what follows them."""
    pos = 0
    n = len(tail)
    while pos < n and tail[pos] == "[":
        end_id = pos + 1
        while end_id < n and tail[end_id] not in " ]":
            end_id += 1
        sd_id = tail[pos + 1 : end_id]
        if not sd_id or end_id >= n:
            raise _Malformed("RFC 5424 SD-ELEMENT without SD-ID or ']'")
        pos = end_id
        params = 0
        while pos < n and tail[pos] == " ":
            eq = tail.find('="', pos)
            if eq < 0:
                raise _Malformed(f"RFC 5424 SD-PARAM in [{sd_id}] without '=\"'")
            name = tail[pos + 1 : eq]
            value, pos = _sd_value(tail, eq + 2, sd_id)
            key = f"{ATTR_SD_PREFIX}{sd_id}.{name}"
            old = attrs.get(key)
            attrs[key] = value if old is None else f"{old},{value}"  # repeated PARAM-NAMEs are all kept
            params += 1
        if pos >= n or tail[pos] != "]":
            raise _Malformed(f"RFC 5424 SD-ELEMENT [{sd_id}] is not closed by ']'")
        if not params:
            attrs[ATTR_SD_PREFIX + sd_id] = True
        pos += 1
    return tail[pos:]


def _sd_value(tail: str, start: int, sd_id: str) -> tuple[str, int]:
    """A PARAM-VALUE from `start` (after the opening quote) to its closing quote, unescaped."""
    pos = start
    while True:
        quote = tail.find('"', pos)
        if quote < 0:
            raise _Malformed(f"RFC 5424 PARAM-VALUE in [{sd_id}] is not closed by '\"'")
        backslashes = 0
        while tail[quote - 1 - backslashes] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            raw = tail[start:quote]
            return (_SD_ESCAPE_RE.sub(r"\1", raw) if "\\" in raw else raw), quote + 1
        pos = quote + 1


# --- RFC 3164 and variants ----------------------------------------------------------------------


def _parse_3164(rest: str, attrs: Attributes, now: float) -> tuple[str, int]:
    wall_ns = 0
    m = _BSD_TIME_RE.match(rest)
    if m:
        wall_ns = _bsd_ns(m, now)
    else:
        m = _ISO_TIME_RE.match(rest)
        if m:
            wall_ns = _iso_ns(m.group(1))
    if m:
        rest = rest[m.end() :]
    tag = _TAG_RE.match(rest)
    if tag is None:
        host, sep, after = rest.partition(" ")
        tag = _TAG_RE.match(after) if sep else None
        if tag is not None and wall_ns:  # a HOSTNAME only stands between a timestamp and a TAG
            attrs[ATTR_HOSTNAME] = host
            rest = after
        else:
            tag = None
    if tag is not None:
        attrs[ATTR_APP_NAME] = tag.group(1)
        if tag.group(2):
            _set_procid(attrs, tag.group(2))
        rest = rest[tag.end() :]
    return rest, wall_ns


def _bsd_ns(m: re.Match[str], now: float) -> int:
    month, day = _MONTHS[m.group(1)], int(m.group(2))
    hour, minute, second = int(m.group(4)), int(m.group(5)), int(m.group(6))
    fraction = int((m.group(7) or "0").ljust(9, "0")[:9])
    if m.group(3):
        years = [int(m.group(3))]
    else:
        year = time.localtime(now).tm_year
        years = [year + 1, year, year - 1]  # no year given: the latest that is not in the future
    best = None
    for year in years:
        try:
            t = time.mktime((year, month, day, hour, minute, second, 0, 0, -1))
        except (OverflowError, ValueError):
            continue
        best = t
        if t <= now + 86400:  # a day of clock skew between sender and agent
            break
    if best is None or not 1 <= day <= 31:
        return 0
    return int(best) * 1_000_000_000 + fraction


def _iso_ns(text: str) -> int:
    """RFC 3339 time as ns since the epoch (0 if unreadable). Without a zone: local time."""
    head, dot, rest = text.partition(".")
    fraction = 0
    if dot:
        digits = re.match(r"\d+", rest)
        if digits is None:
            return 0
        fraction = int(digits.group(0)[:9].ljust(9, "0"))
        text = head + rest[digits.end() :]
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0
    seconds = calendar.timegm(dt.utctimetuple()) if dt.tzinfo is not None else int(time.mktime(dt.timetuple()))
    return seconds * 1_000_000_000 + fraction


def _set(attrs: Attributes, key: str, value: str) -> None:
    if value != "-":
        attrs[key] = value


def _set_procid(attrs: Attributes, procid: str) -> None:
    if procid.isascii() and procid.isdigit() and len(procid) <= 10:
        attrs[ATTR_PID] = int(procid)
    else:
        _set(attrs, ATTR_PROC_ID, procid)

"""The kernel log source: reads /dev/kmsg, never duplicates, never silently loses.

Owns the "kmsg" source: opening and reading the kernel's structured log device,
parsing its records (`prio,seq,usec,flags[,caller=...];message` followed by
` KEY=VALUE` dictionary lines, with `\\xNN` escapes), the `[kmsg].min_priority`
filter, the stored position and gap accounting.

How /dev/kmsg behaves (Documentation/ABI/testing/dev-kmsg): every open file has
its own read position, which starts at the oldest record still in the ring
buffer; one `read()` returns exactly one record (a buffer smaller than the
record gives EINVAL, so the buffer is the kernel's own maximum, 8 KiB, or
more); when records were overwritten before this reader got to them, `read()`
fails once with EPIPE and the next one returns the oldest record still there.
Sequence numbers start at 0 at every boot and never repeat within a boot.

Position and exactly-once (guarantee 1): the position is `(boot_id, next
sequence)` under the key "kmsg", handed to the batcher with the records read up
to it, so the spool commits both in one transaction. On start the source reads
the stored position: on the same boot it skips records below the stored
sequence (the device cannot seek to a sequence, so it reads past them); on a
new boot, or with no position, every record in the ring buffer is new.

Gaps are data (guarantee 5): whenever the first record read is above the
sequence expected next — after EPIPE, after a restart during which the ring
buffer wrapped, or because this boot's first records were overwritten before
the agent ever ran — a WARN record names the boot, the missing sequence range
and the count, reading continues with the oldest surviving record, and the loss
is counted (`kmsg_lost`).

Time (guarantee 7): each record keeps the kernel timestamp as its monotonic
time and the batch carries the boot id; the batcher derives the wall time from
the boot's clock offset and corrects it at upload once the clock is synced.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
from collections.abc import Callable
from typing import Any, Protocol

from edgeagent import loss
from edgeagent.clock import monotonic_ns
from edgeagent.config import Config
from edgeagent.errors import MalformedRecord
from edgeagent.pipeline import SourceContext
from edgeagent.records import Attributes, Batch, Record, syslog_severity

log = logging.getLogger(__name__)

POSITION_KEY = "kmsg"
# The boot the stored position belonged to when a new boot was detected; the
# pstore source uses it to date the crash log the previous boot left behind.
PREVIOUS_BOOT_KEY = "kmsg.previous_boot"

# The kernel formats a record into a buffer of CONSOLE_EXT_LOG_MAX (8 KiB);
# twice that leaves room for future kernels at no cost (one read per record).
READ_SIZE = 16 * 1024
# Records handled per readability callback before yielding to the loop, so a
# full ring buffer at start-up cannot starve the other sources or the uploader.
READS_PER_WAKEUP = 512

RETRY_INITIAL = 1.0
RETRY_MAX = 60.0

# Attribute names (documented in docs/kmsg.md).
ATTR_BOOT_ID = "boot.id"
ATTR_SEQUENCE = "kmsg.sequence"
ATTR_FACILITY = "kmsg.facility"
ATTR_LEVEL = "kmsg.level"
ATTR_CONTINUATION = "kmsg.continuation"
ATTR_CALLER = "kmsg.caller"
ATTR_DICT_PREFIX = "kmsg.dict."
ATTR_MALFORMED = "kmsg.malformed"

FACILITY_NAMES = (
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
)

_GAP_WHEN = {
    "start": "before edgeagent first read this boot's log",
    "restart": "while edgeagent was not running",
    "reopen": "while the device could not be read",
    "read": "faster than edgeagent read them",
}

_ESCAPE_RE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def _unescape(raw: bytes) -> str:
    """Text of a message or dictionary value: the kernel escapes non-printable
    bytes (and the backslash itself) as \\xNN; invalid UTF-8 becomes U+FFFD."""
    if b"\\x" in raw:
        raw = _ESCAPE_RE.sub(lambda m: bytes((int(m.group(1), 16),)), raw)
    return raw.decode("utf-8", "replace")


def parse_record(data: bytes) -> tuple[int, int, Record]:
    """Parse one /dev/kmsg record into (sequence, syslog level, Record).

    The Record carries the message as its body, the mapped severity, the
    kernel timestamp as `time_mono_ns`, and attributes for sequence, facility,
    level, continuation, caller id and dictionary entries. Raises
    `MalformedRecord` when the header cannot be read.
    """
    header, sep, rest = data.partition(b";")
    if not sep:
        raise MalformedRecord("no ';' ends the header")
    fields = header.split(b",")
    if len(fields) < 3:
        raise MalformedRecord(f"header has {len(fields)} fields, expected prio,seq,usec,flags")
    try:
        prio = int(fields[0])
        seq = int(fields[1])
        usec = int(fields[2])
    except ValueError:
        raise MalformedRecord("prio, seq and usec must be decimal numbers") from None
    if prio < 0 or seq < 0 or usec < 0:
        raise MalformedRecord("prio, seq and usec must not be negative")
    level = prio & 7
    facility = prio >> 3
    attributes: Attributes = {
        ATTR_SEQUENCE: seq,
        ATTR_FACILITY: FACILITY_NAMES[facility] if facility < len(FACILITY_NAMES) else str(facility),
        ATTR_LEVEL: level,
    }
    if len(fields) > 3:
        # 'c' marks a fragment continued by the next record (and '+' on old
        # kernels one that continues the previous); '-' is a whole record.
        flags = fields[3]
        if b"c" in flags or b"+" in flags:
            attributes[ATTR_CONTINUATION] = True
        # Later fields are optional and new kernels may add more; unknown ones
        # are ignored as the ABI document asks.
        for extra in fields[4:]:
            if extra.startswith(b"caller="):
                attributes[ATTR_CALLER] = extra[7:].decode("ascii", "replace")
    message, _, dictionary = rest.partition(b"\n")
    if dictionary:
        for line in dictionary.split(b"\n"):
            if not line.startswith(b" "):
                continue  # the trailing empty line; anything else is not a dictionary entry
            key, eq, value = line[1:].partition(b"=")
            if eq and key:
                attributes[ATTR_DICT_PREFIX + key.decode("ascii", "replace")] = _unescape(value)
    severity, severity_text = syslog_severity(level)
    # A time of 0 means "unknown" to the encoder; the first records of a boot
    # really are stamped 0, so they get the first nanosecond instead.
    return seq, level, Record(_unescape(message), severity, severity_text, attributes, usec * 1000 or 1)


def sequence_of(data: bytes) -> int:
    """The sequence number of a raw record, without parsing the rest (used to
    skip records that were already stored)."""
    try:
        return int(data.split(b",", 2)[1])
    except (IndexError, ValueError):
        raise MalformedRecord("no sequence number in the header") from None


def format_position(boot_id: str, next_seq: int) -> str:
    return f"{boot_id}:{next_seq}"


def parse_position(value: str) -> tuple[str, int] | None:
    """(boot_id, next sequence) from a stored position, None if unreadable."""
    boot, sep, seq = value.rpartition(":")
    if not sep or not boot or not seq.isdigit():
        return None
    return boot, int(seq)


def open_error_message(path: str, error: OSError) -> str:
    """What to tell the operator when the device cannot be opened or read."""
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot read the kernel log {path}: {error.strerror}. Reading it needs root or the CAP_SYSLOG "
            "capability when kernel.dmesg_restrict = 1 (see `sysctl kernel.dmesg_restrict`), and read permission "
            f"on {path}; run edgeagent as root, grant CAP_SYSLOG (systemd: AmbientCapabilities=CAP_SYSLOG), "
            "or set [kmsg].enabled = false. Retrying."
        )
    if error.errno == errno.ENOENT:
        return (
            f"the kernel log device {path} does not exist: this system (often a container) does not expose it; "
            "pass the device in (docker: --device /dev/kmsg) or set [kmsg].enabled = false. Retrying."
        )
    return f"reading the kernel log {path} failed: {error.strerror or error}. Retrying."


class KmsgDevice(Protocol):
    """What the source needs from the device: a descriptor to wait on and
    record-at-a-time reads that raise like os.read (BlockingIOError when no
    record is ready, BrokenPipeError after records were overwritten)."""

    def fileno(self) -> int: ...

    def read(self) -> bytes: ...

    def close(self) -> None: ...


class DevKmsg:
    """The real /dev/kmsg, opened non-blocking for reading."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def read(self) -> bytes:
        return os.read(self._fd, READ_SIZE)

    def close(self) -> None:
        os.close(self._fd)


class _DeviceFailed(Exception):
    """Opening or reading the device failed; `opened` if it had been open."""

    def __init__(self, error: OSError, opened: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.opened = opened


class KmsgSource:
    """The `pipeline.Source` for /dev/kmsg. `open_device` replaces the real
    device in tests that need what the kernel cannot be made to do on demand."""

    name = "kmsg"
    config_section = "kmsg"  # registered in edgeagent/sources/__init__.py

    def __init__(self, config: Config, open_device: Callable[[str], KmsgDevice] | None = None) -> None:
        self.config = config
        self.path = config.kmsg.path
        self.min_priority = config.kmsg.min_priority
        self._open_device = open_device or DevKmsg
        self._ctx: SourceContext | None = None
        self._device: KmsgDevice | None = None
        self._failed: asyncio.Future[None] | None = None
        self._boot_id = ""
        self._batch_attributes: Attributes = {}
        self._next_seq = 0  # the sequence expected next; everything below is stored or counted lost
        self._unsequenced = 0  # malformed records without a readable sequence since the last sequence read
        # Why a record above the expected sequence is found, for the gap record:
        # "start" (this boot's first records were gone before edgeagent first
        # read them), "restart" (gone while edgeagent was stopped), "reopen"
        # (gone while the device could not be read), "read" (EPIPE while reading).
        self._gap_cause = "start"
        self._state = "starting"
        self._error: str | None = None
        self._records = 0
        self._filtered = 0
        self._skipped = 0
        self._malformed = 0
        self._gaps = 0
        self._lost = 0

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "error": self._error,
            "path": self.path,
            "boot_id": self._boot_id,
            "next_sequence": self._next_seq,
            "records": self._records,
            "filtered": self._filtered,
            "skipped_stored": self._skipped,
            "malformed": self._malformed,
            "gaps": self._gaps,
            "lost": self._lost,
        }

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        resumed_in_memory = self._boot_id == ctx.boot_id and self._state != "starting"
        self._boot_id = ctx.boot_id
        self._batch_attributes = {ATTR_BOOT_ID: self._boot_id}
        resume = self._resume_point(ctx)
        if not resumed_in_memory or resume > self._next_seq:
            # When this instance is run again (a supervisor restart), what it
            # read may still wait in the batcher, ahead of the committed position.
            self._next_seq = resume
            self._unsequenced = 0
        delay = RETRY_INITIAL
        try:
            while True:
                try:
                    await self._read_until_failure()
                except _DeviceFailed as failed:
                    if failed.opened:
                        delay = RETRY_INITIAL  # it worked for a while: a new failure starts a new backoff
                    self._report_error(failed.error)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
        finally:
            self._close()
            self._state = "stopped" if self._state == "running" else self._state

    def _resume_point(self, ctx: SourceContext) -> int:
        stored = ctx.positions(POSITION_KEY).get(POSITION_KEY)
        position = parse_position(stored) if stored is not None else None
        if stored is not None and position is None:
            log.error("kmsg: stored position %r is unreadable; reading the whole ring buffer", stored)
        if position is not None and position[0] == self._boot_id:
            log.info("kmsg: boot %s, resuming at sequence %d", self._boot_id, position[1])
            self._gap_cause = "restart"
            return position[1]
        if position is not None:
            # Kept for the pstore source, which dates the crash log of the boot before this one.
            ctx.emit_nowait(
                Batch(self.name, [], monotonic_ns(), self._boot_id, position=(PREVIOUS_BOOT_KEY, position[0]))
            )
        log.info("kmsg: new boot %s, reading the whole ring buffer", self._boot_id)
        return 0  # sequences restart at 0 each boot: every record of this boot is new

    async def _read_until_failure(self) -> None:
        try:
            self._device = self._open_device(self.path)
        except OSError as e:
            raise _DeviceFailed(e, opened=False) from None
        loop = asyncio.get_running_loop()
        if self._failed is not None:
            self._gap_cause = "reopen"
        self._failed = loop.create_future()
        try:
            loop.add_reader(self._device.fileno(), self._on_readable)
        except OSError:  # epoll refuses regular files
            self._close()
            not_a_device = OSError(errno.ENODEV, "not a device that can be waited on; it must be /dev/kmsg")
            raise _DeviceFailed(not_a_device, opened=False) from None
        if self._error is not None:
            log.info("kmsg: %s is readable again", self.path)
        self._state, self._error = "running", None
        try:
            await self._failed
        finally:
            self._close()

    def _close(self) -> None:
        if self._device is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._device.fileno())
            except RuntimeError:
                pass  # the loop is already closed
            self._device.close()
            self._device = None

    def _report_error(self, error: OSError) -> None:
        message = open_error_message(self.path, error)
        if message != self._error:
            log.error("kmsg: %s", message)
        self._state, self._error = "error", message

    def _on_readable(self) -> None:
        """Read what the kernel has (up to READS_PER_WAKEUP records) and hand
        it to the batcher with the position after it."""
        device = self._device
        ctx = self._ctx
        if device is None or ctx is None:
            return
        if not ctx.accepting:  # the spool cannot commit: read nothing more until it can
            ctx.pause_reader(device.fileno(), self._on_readable, lambda: self._device is device)
            return
        records: list[Record] = []
        start_seq = self._next_seq
        malformed = 0
        for _ in range(READS_PER_WAKEUP):
            try:
                data = device.read()
            except BlockingIOError:
                break
            except BrokenPipeError:
                self._gap_cause = "read"
                continue
            except OSError as e:
                if self._failed is not None and not self._failed.done():
                    self._failed.set_exception(_DeviceFailed(e, opened=True))
                break
            if not data:
                # /dev/kmsg never ends; a file that does is not the kernel log,
                # and reading it on would spin.
                if self._failed is not None and not self._failed.done():
                    eof = OSError(errno.ENODATA, "end of file: not a kernel log device")
                    self._failed.set_exception(_DeviceFailed(eof, opened=True))
                break
            if not self._take(data, records):
                malformed += 1
        if malformed:
            self._malformed += malformed
            ctx.count({"kmsg_malformed": malformed})
        if records or self._next_seq != start_seq:
            ctx.emit_nowait(
                Batch(
                    self.name,
                    records,
                    monotonic_ns(),
                    self._boot_id,
                    self._batch_attributes,
                    (POSITION_KEY, format_position(self._boot_id, self._next_seq)),
                )
            )

    def _take(self, data: bytes, records: list[Record]) -> bool:
        """Handle one raw record; False if it was malformed."""
        try:
            seq = sequence_of(data)
        except Exception:
            seq = -1
        if 0 <= seq < self._next_seq:
            # Already stored before a restart (or re-read after reopening).
            self._skipped += 1
            return True
        try:
            seq, level, record = parse_record(data)
        except Exception as e:
            # Kept, not dropped: the raw text is shipped and marked so nothing
            # is lost silently. Anything the parser raises counts, so one odd
            # record can never make this callback fail on every wakeup.
            log.warning("kmsg: malformed record (%s): %r", e, data[:200])
            records.append(Record(data.decode("utf-8", "replace").rstrip("\n"), attributes={ATTR_MALFORMED: str(e)}))
            if seq >= 0:
                self._advance(seq, records, monotonic_ns())  # it had its sequence number: no gap
            else:
                self._unsequenced += 1  # it took a sequence number too, but which one is unknown
            return False
        self._advance(seq, records, record.time_mono_ns)
        if level > self.min_priority:
            self._filtered += 1
            return True
        self._records += 1
        records.append(record)
        return True

    def _advance(self, seq: int, records: list[Record], time_mono_ns: int) -> None:
        """Record `seq` was read (and shipped): a gap before it is reported, less the malformed records
        without a readable sequence number read since the last one (they were not lost)."""
        missing = seq - self._next_seq - self._unsequenced
        if missing > 0:
            records.append(self._gap_record(self._next_seq, seq - 1, time_mono_ns, missing))
        self._unsequenced = 0
        self._gap_cause = "read"
        self._next_seq = seq + 1

    def _gap_record(self, first: int, last: int, time_mono_ns: int, count: int) -> Record:
        cause = self._gap_cause
        when = _GAP_WHEN[cause]
        self._gaps += 1
        self._lost += count
        if self._ctx is not None:
            self._ctx.count({"kmsg_lost": count, "kmsg_gaps": 1})
        message = (
            f"kmsg: {count} kernel log records (sequence {first}..{last}) of boot {self._boot_id} were overwritten "
            f"in the kernel ring buffer {when}"
        )
        log.warning("%s", message)
        return loss.record(
            loss.KMSG_OVERWRITTEN,
            message,
            records=count,
            source=self.name,
            extra={loss.FIRST_SEQUENCE: first, loss.LAST_SEQUENCE: last, loss.CAUSE: cause},
            time_mono_ns=time_mono_ns,
        )

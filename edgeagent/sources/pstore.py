"""The pstore source: the kernel log a crashed boot left behind, collected once.

Owns reading `[kmsg].pstore_dir` (default /sys/fs/pstore) at start-up. When a
kernel panics or oopses, pstore (ramoops in reserved RAM, EFI variables, a
flash partition) keeps the tail of its log across the reboot, where it shows
up as `dmesg-<backend>-<id>` files (lines like `<6>[   12.345678] text`, under
a header like `Panic#1 Part1`) and `console-ramoops-<id>` (the console output,
`[   12.345678] text`). These are the lines users miss most: the kernel log of
the boot that crashed, which never reached the ring buffer of this boot.

Every file is shipped once: the source stores a position per file identity
(name, mtime, size and a hash of the first bytes) with its records, so a
restart, a reload or the next boot does not collect it again. With
`[kmsg].pstore_clear` the file is removed once that position is committed,
freeing the backend's space for the next crash.

The records belong to the previous boot. Its id is known when the kmsg source
stored a position in it; then the kernel timestamps keep their meaning
(wall time from that boot's clock offset). Otherwise the boot is "unknown",
the records carry no event time (the receiver uses the observed time) and the
kernel timestamp is kept as the attribute `kmsg.uptime_ns`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from edgeagent.clock import monotonic_ns
from edgeagent.config import Config
from edgeagent.pipeline import SourceContext
from edgeagent.records import SEVERITY_WARN, Attributes, Batch, Record, syslog_severity
from edgeagent.sources.kmsg import ATTR_BOOT_ID, ATTR_LEVEL, POSITION_KEY, PREVIOUS_BOOT_KEY, parse_position

log = logging.getLogger(__name__)

POSITION_PREFIX = "pstore:"
PATTERNS = ("dmesg-*", "console-ramoops*")
# Enough of the start of a file to tell two dumps with equal name, size and mtime apart.
IDENTITY_BYTES = 4096
# How many flush intervals to wait for the positions to be committed before
# removing files (pstore_clear); what is not removed then is removed next start.
CLEAR_WAIT_INTERVALS = 30

ATTR_FILE = "edgeagent.pstore.file"
ATTR_DUMP = "edgeagent.pstore.dump"
ATTR_UPTIME = "kmsg.uptime_ns"
UNKNOWN_BOOT = "unknown"

# `<prio>` (dmesg dumps only) then `[seconds.micros]` (when printk.time is on). Compiled by `parse_dump`, on
# the first boot after a crash, not at every start of an agent that reads the kernel log.
_LINE_PATTERN = rb"^(?:<(\d{1,3})>)?(?:\[\s*(\d+)\.(\d{1,9})\]\s?)?(.*)$"
_DUMP_HEADER_PATTERN = rb"^(?:Panic|Oops|Emergency|Shutdown|Halt|Poweroff|Restart|Unknown)#\d+ Part\d+$"


def list_dumps(directory: Path) -> list[Path]:
    """The crash dumps in `directory`, sorted; none when it does not exist.
    Raises OSError when it cannot be listed: `Path.glob` would swallow EACCES
    (an agent without CAP_DAC_READ_SEARCH on a 0750 /sys/fs/pstore) and the
    crash log of the last boot would be missed without a word."""
    import fnmatch

    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    paths = {directory / n for n in names if any(fnmatch.fnmatchcase(n, p) for p in PATTERNS)}
    return sorted(p for p in paths if p.is_file())


def file_identity(path: Path) -> str:
    """The position key of one pstore file. Backends reuse names after a
    clear (dmesg-ramoops-0 again), so the key also holds what tells two dumps apart."""
    st = path.stat()
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(IDENTITY_BYTES)).hexdigest()[:16]
    return f"{POSITION_PREFIX}{path.name}:{st.st_mtime_ns}:{st.st_size}:{digest}"


def parse_dump(data: bytes) -> tuple[str, list[tuple[int, int, str]]]:
    """(dump header such as "Panic#1 Part1" or "", [(level or -1, uptime ns or -1, text)])."""
    header = ""
    lines: list[tuple[int, int, str]] = []
    line_re, dump_header_re = re.compile(_LINE_PATTERN, re.DOTALL), re.compile(_DUMP_HEADER_PATTERN)
    for raw in data.splitlines():
        if not raw.strip():
            continue
        if not lines and not header and dump_header_re.match(raw):
            header = raw.decode("ascii")
            continue
        m = line_re.match(raw)
        assert m is not None  # every group is optional, so any line matches
        prio, seconds, fraction, text = m.groups()
        level = int(prio) & 7 if prio is not None else -1
        uptime = -1
        if seconds is not None:
            uptime = int(seconds) * 10**9 + int(fraction.ljust(9, b"0"))
        lines.append((level, uptime, text.decode("utf-8", "replace")))
    return header, lines


class PstoreSource:
    """The `pipeline.Source` that collects pstore files once, at start-up."""

    name = "pstore"
    config_section = "kmsg"  # registered in edgeagent/sources/__init__.py

    def __init__(self, config: Config) -> None:
        self.directory = Path(config.kmsg.pstore_dir)
        self.clear = config.kmsg.pstore_clear
        self.flush_interval = config.spool.flush_interval
        self._state = "starting"
        self._error: str | None = None
        self._files = 0
        self._records = 0
        self._cleared = 0
        self._previous_boot = ""

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "error": self._error,
            "directory": str(self.directory),
            "previous_boot": self._previous_boot,
            "collected_files": self._files,
            "records": self._records,
            "cleared_files": self._cleared,
        }

    async def run(self, ctx: SourceContext) -> None:
        self._state = "running"
        try:
            paths = list_dumps(self.directory)
        except OSError as e:
            hint = " (reading pstore needs root or CAP_DAC_READ_SEARCH)" if isinstance(e, PermissionError) else ""
            self._fail(f"cannot list {self.directory}: {e.strerror or e}{hint}")
            return
        collected = ctx.positions(POSITION_PREFIX)
        previous_boot = self._previous_boot_id(ctx)
        self._previous_boot = previous_boot
        to_clear: dict[Path, str] = {}
        for path in paths:
            try:
                key = file_identity(path)
                if key in collected:
                    to_clear[path] = key
                    continue
                data = path.read_bytes()
            except OSError as e:
                self._fail(f"cannot read {path}: {e.strerror or e}")
                continue
            batch = self._batch(path, data, previous_boot, ctx)
            batch.position = (key, "collected")
            await ctx.emit(batch)
            self._files += 1
            self._records += len(batch.records)
            to_clear[path] = key
            log.info("pstore: collected %d lines of boot %s from %s", len(batch.records), previous_boot, path)
        if self.clear and to_clear:
            await self._clear_when_committed(ctx, to_clear)
        self._state = "done" if self._error is None else "error"

    def _fail(self, message: str) -> None:
        log.error("pstore: %s", message)
        self._error = message

    @staticmethod
    def _previous_boot_id(ctx: SourceContext) -> str:
        """The boot before this one, as far as the kmsg source recorded it.
        Until the kmsg source commits in this boot, its stored position still
        names the previous boot; afterwards it has moved that id aside."""
        stored = ctx.positions(POSITION_KEY)
        position = parse_position(stored.get(POSITION_KEY, ""))
        if position is not None and position[0] != ctx.boot_id:
            return position[0]
        previous = stored.get(PREVIOUS_BOOT_KEY)
        if previous and previous != ctx.boot_id:
            return previous
        return UNKNOWN_BOOT

    def _batch(self, path: Path, data: bytes, previous_boot: str, ctx: SourceContext) -> Batch:
        header, lines = parse_dump(data)
        # The previous boot's timestamps mean something only if its clock offset was stored.
        times_known = previous_boot != UNKNOWN_BOOT and ctx.boot_offset(previous_boot) is not None
        records: list[Record] = [
            Record(
                f"pstore: the previous boot ({previous_boot}) left its kernel log in {path.name}"
                + (f" ({header})" if header else ""),
                SEVERITY_WARN,
                "WARN",
            )
        ]
        last_uptime = 0
        for level, uptime, text in lines:
            severity, severity_text = syslog_severity(level)
            attributes: Attributes | None = {ATTR_LEVEL: level} if level >= 0 else None
            time_mono_ns = 0
            if uptime >= 0:
                last_uptime = max(last_uptime, uptime)
                if times_known:
                    time_mono_ns = uptime or 1
                else:
                    attributes = dict(attributes or {})
                    attributes[ATTR_UPTIME] = uptime
            records.append(Record(text, severity, severity_text, attributes, time_mono_ns))
        if times_known:
            # Observed "at the crash": the last kernel timestamp of the dump, on the previous boot's clock.
            records[0].time_mono_ns = last_uptime or 1
            observed, boot = last_uptime, previous_boot
        else:
            observed, boot = monotonic_ns(), ctx.boot_id
        common: Attributes = {ATTR_BOOT_ID: previous_boot, "log.source": "pstore", ATTR_FILE: path.name}
        if header:
            common[ATTR_DUMP] = header
        return Batch(self.name, records, observed, boot, common)

    async def _clear_when_committed(self, ctx: SourceContext, files: dict[Path, str]) -> None:
        """Remove files whose position is committed: only then are their
        records safe in the spool."""
        for _ in range(CLEAR_WAIT_INTERVALS):
            stored = ctx.committed_positions(POSITION_PREFIX)
            for path, key in list(files.items()):
                if key not in stored:
                    continue
                del files[path]
                try:
                    os.unlink(path)
                    self._cleared += 1
                except FileNotFoundError:
                    pass
                except OSError as e:
                    self._fail(f"cannot remove {path} (pstore_clear): {e.strerror or e}")
            if not files:
                return
            await asyncio.sleep(self.flush_interval)

"""The journald source: the systemd journal through a supervised `journalctl -o export --follow` child.

Owns the `[journald]` section: the journalctl command line (directory, units, priority, matches), parsing the
export format (text fields and the binary encoding: name, 64-bit little-endian length, data) with bounded
memory, the mapping of journal fields to OpenTelemetry records, the stored cursor, and the gap record when the
stored cursor is no longer in the journal.

Position and exactly-once (guarantee 1): every batch carries the cursor of its last entry under the key
"journald" ("journald:<directory>" for a directory), so the spool commits records and cursor in one
transaction; the child is started at the stored one (`--cursor`, its own entry dropped: before systemd 255,
`--after-cursor` skips the first entry that matches the filters when the cursor's entry does not). Kill -9
at any point therefore neither loses nor repeats an entry. Cursors are compared by what stays with the entry
(`same_entry`: boot id, timestamps, hash), not as strings: journald's flush to /var/log/journal gives every
entry a new cursor. Following reads every boot in the journal (`--merge`; journalctl's `--follow` alone keeps
to the latest boot since systemd 250), so a reboot loses nothing either.

A stored cursor that is no longer in the journal (vacuumed or rotated away while the agent was stopped) is
detected before following (`journalctl --cursor C` must return C first); reading then starts at the oldest
entry and a WARN record reports the gap (guarantee 5; `journald_gaps`). A journalctl that exits or dies is
restarted from the cursor of the last entry handed over, with backoff. Memory is bounded: one read of 64 KiB
plus at most `max_message_size` per field; longer fields are cut, marked and counted (`journald_truncated`).
Why a child process and not the systemd Python bindings: docs/journald.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from typing import Any

from edgeagent import loss
from edgeagent.children import die_with_parent
from edgeagent.clock import monotonic_ns
from edgeagent.config import Config
from edgeagent.pipeline import SourceContext
from edgeagent.records import Attributes, Batch, Record, syslog_severity
from edgeagent.sources.kmsg import FACILITY_NAMES
from edgeagent.sources.lines import cut_utf8

log = logging.getLogger(__name__)

SOURCE = "journald"
READ_SIZE = 64 * 1024
RETRY_INITIAL, RETRY_MAX = 1.0, 60.0
CHECK_TIMEOUT = 30.0
END_TIMEOUT = 10.0  # for a killed journalctl to be reaped

# Journal field -> attribute name (OpenTelemetry semantic conventions where one exists), and whether the
# value is a number. Other trusted fields (leading "_") are left out; user fields go to `journald.<name>`.
FIELD_ATTRIBUTES: dict[str, tuple[str, bool]] = {
    "_SYSTEMD_UNIT": ("systemd.unit", False),
    "_SYSTEMD_USER_UNIT": ("systemd.user_unit", False),
    "SYSLOG_IDENTIFIER": ("syslog.app_name", False),
    "PRIORITY": ("syslog.level", True),
    "_PID": ("process.pid", True),
    "_UID": ("process.user.id", True),
    "_COMM": ("process.executable.name", False),
    "_EXE": ("process.executable.path", False),
    "_CMDLINE": ("process.command_line", False),
    "_HOSTNAME": ("host.name", False),
    "_MACHINE_ID": ("host.id", False),
    "_TRANSPORT": ("journald.transport", False),
    "CODE_FILE": ("code.filepath", False),
    "CODE_LINE": ("code.lineno", True),
    "CODE_FUNC": ("code.function", False),
}
SKIPPED_FIELDS = frozenset({"MESSAGE", "SYSLOG_RAW", "SYSLOG_TIMESTAMP", "SYSLOG_PID", "SYSLOG_FACILITY"})
ATTR_BOOT_ID = "boot.id"
ATTR_FACILITY = "syslog.facility"
_TRUNCATED_MARK = "__EDGEAGENT_TRUNCATED"


class ExportParser:
    """Incremental parser of journalctl's export format. `feed` returns complete entries as dicts of
    field name -> bytes (the first value of a repeated field wins); fields longer than `max_size` are cut
    and the entry gets `_TRUNCATED_MARK`."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._entry: dict[str, bytes] = {}
        self._skip = 0  # bytes of a cut binary field still to drop
        self._skip_line = False  # drop up to the next newline (a cut text field)

    def feed(self, data: bytes) -> list[dict[str, bytes]]:
        buf = self._buf
        buf += data
        entries: list[dict[str, bytes]] = []
        pos = 0
        while pos < len(buf):
            if self._skip:
                n = min(self._skip, len(buf) - pos)
                self._skip -= n
                pos += n
                continue
            nl = buf.find(b"\n", pos)
            if self._skip_line:
                if nl < 0:
                    pos = len(buf)
                    break
                self._skip_line = False
                pos = nl + 1
                continue
            if nl < 0:
                if len(buf) - pos > self.max_size + 256:  # a text field with no end in sight: cut it
                    self._add_text(bytes(buf[pos : pos + self.max_size + 256]), cut=True)
                    self._skip_line = True
                    pos = len(buf)
                break
            if nl == pos:  # the empty line that ends an entry
                if self._entry:
                    entries.append(self._entry)
                    self._entry = {}
                pos += 1
                continue
            eq = buf.find(b"=", pos, nl)
            if eq >= 0:
                self._add_text(bytes(buf[pos:nl]), cut=False)
                pos = nl + 1
                continue
            step = self._binary(buf, pos, nl)
            if step == pos:
                break
            pos = step
        del buf[:pos]
        return entries

    def _add_text(self, line: bytes, cut: bool) -> None:
        name, _, value = line.partition(b"=")
        self._add(name.decode("ascii", "replace"), value, cut)

    def _binary(self, buf: bytearray, pos: int, nl: int) -> int:
        """A binary field at `pos` (its name ends at `nl`): the position after it, or `pos` if incomplete."""
        start = nl + 1 + 8
        if len(buf) < start:
            return pos
        size = struct.unpack_from("<Q", buf, nl + 1)[0]
        name = bytes(buf[pos:nl]).decode("ascii", "replace")
        if len(buf) >= start + size + 1:
            self._add(name, bytes(buf[start : start + size]), cut=False)
            return start + size + 1
        if size > self.max_size and len(buf) > start + self.max_size:
            self._add(name, bytes(buf[start : start + self.max_size + 1]), cut=True)
            self._skip = size + 1 - (len(buf) - start)
            return len(buf)
        return pos

    def _add(self, name: str, value: bytes, cut: bool) -> None:
        if len(value) > self.max_size or cut:
            value = cut_utf8(value, self.max_size) if len(value) > self.max_size else value
            self._entry[_TRUNCATED_MARK] = b"1"
        self._entry.setdefault(name, value)


def same_entry(cursor: str, other: str) -> bool:
    """Whether two cursors name the same journal entry. Its boot id, monotonic and realtime timestamps and
    the XOR hash of its fields (b=, m=, t=, x=) stay with the entry; its sequence number and the file set's
    id (s=, i=) do not: journald's flush (`journalctl --flush`, systemd-journal-flush.service) copies the
    runtime journal to /var/log/journal under new ones, and journalctl's `--cursor` then finds the copy."""
    if cursor == other:
        return True
    mine, theirs = _cursor_fields(cursor), _cursor_fields(other)
    return all(mine.get(key) == theirs.get(key) is not None for key in ("b", "m", "t", "x"))


def _cursor_fields(cursor: str) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in cursor.split(";"))


async def end_child(proc: asyncio.subprocess.Process) -> None:
    """Kill journalctl and reap it, reading and dropping what it wrote that nobody read. Python 3.11's
    asyncio reports a child's exit (`wait()`) only once its pipes reached EOF, and a pipe whose reader paused
    it (more than twice the stream's limit unread: the agent read late) never does: the cursor check waited
    for good, the source stayed "starting" and read nothing. Bounded: a journalctl that is not gone within
    END_TIMEOUT of SIGKILL is logged and left."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    try:
        async with asyncio.timeout(END_TIMEOUT):
            if proc.stdout is not None:
                while await proc.stdout.read(READ_SIZE):
                    pass
            await proc.wait()
    except TimeoutError:
        log.warning("journald: journalctl (pid %d) did not end within %.0f s of SIGKILL", proc.pid, END_TIMEOUT)


def boot_id_hex(boot_id: str) -> str:
    return boot_id.replace("-", "").lower()


def _uuid(hex32: str) -> str:
    h = hex32.lower()
    if len(h) != 32:
        return h
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def entry_record(entry: dict[str, bytes], boot_hex: str, offset_ns: int) -> Record:
    """One journal entry as a record: MESSAGE as body, PRIORITY as severity, the monotonic timestamp as event
    time for this boot's entries (corrected with the rest of the boot, guarantee 7), the realtime one for
    other boots'; mapped fields as attributes."""
    body = entry.get("MESSAGE", b"").decode("utf-8", "replace").rstrip("\n")
    attrs: Attributes = {}
    level = -1
    for name, raw in entry.items():
        if name.startswith("__") or name in SKIPPED_FIELDS:
            continue
        mapped = FIELD_ATTRIBUTES.get(name)
        if mapped is not None:
            key, numeric = mapped
            value = raw.decode("utf-8", "replace")
            if numeric:
                if not (value.isascii() and value.isdigit() and len(value) <= 18):
                    continue
                attrs[key] = int(value)
            else:
                attrs[key] = value
        elif name == "_BOOT_ID":
            attrs[ATTR_BOOT_ID] = _uuid(raw.decode("ascii", "replace"))
        elif not name.startswith("_"):
            attrs["journald." + name.lower()] = raw.decode("utf-8", "replace")
    if entry.get(_TRUNCATED_MARK):
        attrs.update(loss.truncated())
    if "process.pid" not in attrs and entry.get("SYSLOG_PID", b"").isdigit():
        attrs["process.pid"] = int(entry["SYSLOG_PID"][:18])
    facility = entry.get("SYSLOG_FACILITY", b"")
    if facility.isdigit() and int(facility) < len(FACILITY_NAMES):
        attrs[ATTR_FACILITY] = FACILITY_NAMES[int(facility)]
    level_value = attrs.get("syslog.level")
    if isinstance(level_value, int) and 0 <= level_value <= 7:
        level = level_value
    severity, severity_text = syslog_severity(level)
    return Record(body, severity, severity_text, attrs, _event_time(entry, boot_hex, offset_ns))


def _event_time(entry: dict[str, bytes], boot_hex: str, offset_ns: int) -> int:
    mono = entry.get("__MONOTONIC_TIMESTAMP", b"")
    if entry.get("_BOOT_ID", b"").decode("ascii", "replace").lower() == boot_hex and mono.isdigit():
        return int(mono) * 1000 or 1
    real = entry.get("__REALTIME_TIMESTAMP", b"")
    if real.isdigit():
        return int(real) * 1000 - offset_ns or 1
    return 0


class JournaldSource:
    """The `pipeline.Source` for `[journald]`."""

    name = SOURCE
    config_section = "journald"  # registered in edgeagent/sources/__init__.py

    def __init__(self, config: Config) -> None:
        self.cfg = config.journald
        self.key = f"journald:{self.cfg.directory}" if self.cfg.directory else "journald"
        self._ctx: SourceContext | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._cursor: str | None = None
        self._from_oldest = False
        self._state = "starting"
        self._error: str | None = None
        self._stderr = ""
        self._stats = {"entries": 0, "truncated": 0, "gaps": 0, "restarts": 0}

    def status(self) -> dict[str, Any]:
        return {"state": self._state, "error": self._error, "cursor": self._cursor, **self._stats}

    def command(self, cursor: str | None, follow: bool = True) -> list[str]:
        """journalctl's arguments: following after `cursor` with the filters, or (not `follow`) listing the
        journal from `cursor` on, or from its last entry when `cursor` is None, without filters."""
        cfg = self.cfg
        args = [cfg.journalctl, "-o", "export", "--no-pager"]
        if cfg.directory:
            args += ["--directory", cfg.directory]
        elif cfg.system_only:
            args.append("--system")
        if not follow:
            return [*args, "--cursor", cursor] if cursor else [*args, "--lines=1"]
        # --merge: since systemd 250, --follow implies --boot (the latest boot only), and --after-cursor then
        # skips that boot's first entry too: what a boot logged after the last read, before a reboot, was lost.
        args += ["--follow", "--merge"]
        if cursor:
            # --cursor, not --after-cursor: with filters, journalctl before 255 skips the first entry that
            # matches when the cursor's own entry does not (start_at = "end", changed filters); `_follow` drops
            # the cursor's entry itself. --no-tail too: --follow alone implies --lines=10.
            args += ["--cursor", cursor, "--no-tail"]
        else:
            args.append("--no-tail" if cfg.start_at == "beginning" else "--lines=0")
        for unit in cfg.units:
            args += ["--unit", unit]
        if cfg.min_priority < 7:
            args.append(f"--priority=0..{cfg.min_priority}")
        return args + list(cfg.matches)

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        stored = ctx.positions(self.key).get(self.key)
        # "" is stored with a gap record: the cursor was gone, reading restarts at the oldest entry.
        self._cursor = stored or None
        self._from_oldest = stored == ""
        delay = RETRY_INITIAL
        try:
            while True:
                try:
                    await self._check_cursor(ctx)
                except TimeoutError:
                    self._fail(f"journalctl listed nothing within {CHECK_TIMEOUT:.0f} s; checking the cursor again")
                else:
                    started = time.monotonic()
                    await self._follow(ctx)
                    if time.monotonic() - started > 10 * RETRY_MAX:
                        delay = RETRY_INITIAL
                    self._stats["restarts"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        finally:
            await self._stop_child()
            self._state = "stopped"

    async def _check_cursor(self, ctx: SourceContext) -> None:
        """Before following: a stored cursor that is no longer in the journal is a gap (reading restarts at the
        oldest entry); with no cursor and start_at = "end", the last entry's cursor is stored. Raises
        TimeoutError when journalctl does not answer in time: a slow journal is not a vacuumed one (taking it
        for one reported a gap that was not there and read the whole journal again)."""
        if self._cursor is not None and not same_entry(self._cursor, await self._first_cursor(self._cursor) or ""):
            self._report_gap(self._cursor)
            self._cursor, self._from_oldest = None, True
        elif self._cursor is None and not self._from_oldest and self.cfg.start_at == "end":
            await self._start_at_end(ctx)

    async def _first_cursor(self, cursor: str | None) -> str | None:
        """The cursor of the first entry `journalctl --cursor C` lists (`cursor` None: of the last entry in the
        journal); None if there is none. The child is killed once the first line is read; TimeoutError when
        none came within CHECK_TIMEOUT."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(cursor, follow=False),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        except OSError as e:
            self._fail(f"cannot run {self.cfg.journalctl}: {e}")
            return cursor  # cannot tell: keep the cursor, the follow attempt reports and retries
        assert proc.stdout is not None
        try:
            first = await asyncio.wait_for(proc.stdout.readline(), CHECK_TIMEOUT)
        finally:
            await end_child(proc)
        if not first.startswith(b"__CURSOR="):
            return None
        return first[len(b"__CURSOR=") :].rstrip(b"\n").decode("ascii", "replace")

    async def _follow(self, ctx: SourceContext) -> None:
        """Run journalctl until it exits; hand over every entry with its cursor."""
        args = self.command(self._cursor)
        if self._from_oldest and "--lines=0" in args:
            args[args.index("--lines=0")] = "--no-tail"  # after a gap: from the oldest entry, whatever start_at says
        try:
            self._proc = proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=READ_SIZE,
                preexec_fn=die_with_parent(),
            )
        except OSError as e:
            self._fail(f"cannot run {self.cfg.journalctl}: {e}")
            return
        assert proc.stdout is not None and proc.stderr is not None
        stderr_task = asyncio.create_task(self._read_stderr(proc.stderr))
        self._state, self._error = "running", None
        parser = ExportParser(self.cfg.max_message_size)
        boot_hex = boot_id_hex(ctx.boot_id)
        handed_over = self._cursor  # listed first when it matches the filters: already handed over
        try:
            while data := await proc.stdout.read(READ_SIZE):
                entries = parser.feed(data)
                if entries and handed_over is not None:
                    if same_entry(handed_over, entries[0].get("__CURSOR", b"").decode("ascii", "replace")):
                        entries = entries[1:]
                    handed_over = None
                if entries:
                    await ctx.emit(self._batch(ctx, entries, boot_hex))
        finally:
            await self._stop_child()
            await asyncio.gather(stderr_task, return_exceptions=True)
        self._fail(f"journalctl exited with status {proc.returncode}: {self._stderr or 'no message'}; restarting")

    async def _start_at_end(self, ctx: SourceContext) -> None:
        """First start with start_at = "end": store the cursor of the journal's last entry at once, so entries
        logged from now on are read even if the agent restarts before any of them arrives."""
        self._cursor = await self._first_cursor(None)
        if self._cursor is not None:
            ctx.emit_nowait(Batch(SOURCE, [], monotonic_ns(), ctx.boot_id, position=(self.key, self._cursor)))

    def _batch(self, ctx: SourceContext, entries: list[dict[str, bytes]], boot_hex: str) -> Batch:
        offset = time.time_ns() - monotonic_ns()
        records = [entry_record(entry, boot_hex, offset) for entry in entries]
        truncated = sum(1 for entry in entries if _TRUNCATED_MARK in entry)
        if truncated:
            self._stats["truncated"] += truncated
            ctx.count({"journald_truncated": truncated})
        self._stats["entries"] += len(entries)
        for entry in reversed(entries):
            cursor = entry.get("__CURSOR")
            if cursor:
                self._cursor = cursor.decode("ascii", "replace")
                break
        position = (self.key, self._cursor) if self._cursor else None
        return Batch(SOURCE, records, monotonic_ns(), ctx.boot_id, position=position)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").strip()
            if text:
                self._stderr = text[:500]
                log.warning("journald: journalctl: %s", self._stderr)

    async def _stop_child(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await end_child(proc)

    def _fail(self, message: str) -> None:
        if message != self._error:
            log.error("journald: %s", message)
        self._state, self._error = "error", message

    def _report_gap(self, cursor: str) -> None:
        """The stored cursor is gone: entries after it and before the oldest one left were lost."""
        ctx = self._ctx
        assert ctx is not None
        self._stats["gaps"] += 1
        where = self.cfg.directory or "this machine's journal"
        text = (
            f"journald: the stored cursor is no longer in {where} (vacuumed or rotated away while edgeagent was "
            "not reading); resuming at the oldest entry: entries written after the cursor and removed before "
            "they were read are lost"
        )
        log.warning("%s", text)
        ctx.count({"journald_gaps": 1})
        record = loss.record(loss.JOURNAL_CURSOR_GONE, text, source=SOURCE, extra={"journald.cursor": cursor})
        # Stored with an empty cursor, so a crash before the next entry is committed does not report it twice.
        ctx.emit_nowait(Batch(SOURCE, [record], monotonic_ns(), ctx.boot_id, position=(self.key, "")))

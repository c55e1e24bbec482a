"""Reading tailed files: a block at a time, into records handed to the batcher with the position.

Owns `Tailer` (one open file: its descriptor, names, identity and how far it
was read) and the `Tailing` part of `FileSource`: reading a block when a file
changed, splitting it into lines or multiline records (edgeagent.sources.lines
does the splitting, cutting and encoding repair), and emitting them with the
file's position so the spool commits both in one transaction (guarantee 1).

Invariants: `Tailer.pos` is always the end of the last line emitted. A partial
last line is read again until its newline arrives, or until the writer has been
idle for `partial_line_timeout`, when it is shipped as it is; so a restart
resumes exactly after the last line committed. Inside an over-long line that
was cut (`skip`), the rest of that line is dropped as it arrives. Records of a
file are emitted in file order.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from edgeagent.clock import monotonic_ns
from edgeagent.records import Batch, Record
from edgeagent.sources.files.identity import FINGERPRINT_SIZE, rewritten
from edgeagent.sources.files.state import FileSourceState
from edgeagent.sources.lines import (
    cut_utf8,
    last_line_end,
    marked_records,
    multiline_records,
    split_lines,
    to_utf8,
)

if TYPE_CHECKING:
    from asyncio import TimerHandle

    from edgeagent.sources.files.discovery import Group

BLOCK_SIZE = 256 * 1024  # bytes read per system call; lines are split a block at a time. The size
# of a chunk (`[spool].chunk_max_bytes` by default): a block's lines make one chunk, the batcher cuts nothing


class Tailer:
    """One open file being read."""

    __slots__ = (
        "at",
        "attrs",
        "born",
        "copy_of",
        "detached",
        "dev",
        "eof_release",
        "fd",
        "first_read",
        "fp",
        "fp_len",
        "grew_mono",
        "group",
        "ino",
        "key",
        "lead",
        "path",
        "polled",
        "pos",
        "size",
        "skip",
        "timer",
        "unidentified",
        "verified",
        "wd",
    )

    def __init__(self, group: Group, path: str, fd: int, st: os.stat_result, pos: int, attrs_path: str) -> None:
        self.group = group
        self.path = attrs_path  # the name the file was tailed under: what log.file.path says
        self.at = path  # where the file is now
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.fp = ""
        self.fp_len = 0
        self.key = ""
        self.pos = pos
        self.skip = False
        self.size = st.st_size
        self.grew_mono = time.monotonic()
        self.attrs = group.attributes(attrs_path)
        self.detached = False  # no longer at a path the section matches: read to the end, then let go
        self.eof_release = False  # a finished copy (copytruncate): let go at its end
        self.unidentified = False  # new: read from its start unless it proves to be a copy of a tailed file
        self.copy_of: Tailer | None = None  # the tailed file this one is a copy of (read nothing while it is)
        self.verified = 0  # bytes known equal to `copy_of`'s
        self.lead: bytes | None = None  # the file's first bytes (up to LEAD_SIZE), to find copies quickly
        # When it was opened and when it was first read from, counted in files opened: only a file read from
        # before another one appeared can be the original that one is a copy of.
        self.born = self.first_read = -1
        self.wd = -1
        self.polled = False
        self.timer: TimerHandle | None = None

    @property
    def ident(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    def position_value(self, read_to_end: bool = False) -> str:
        value: dict[str, Any] = {"offset": self.pos, "path": self.path, "fp_len": self.fp_len}
        if self.at != self.path:
            value["at"] = self.at
        if self.skip:
            value["skip"] = True
        if read_to_end:
            value["eof"] = True
        return json.dumps(value)


class Tailing(FileSourceState):
    """Reading blocks into records (a part of `FileSource`)."""

    def _read(self, t: Tailer) -> bool:
        """Read one block of `t`; True when more is probably waiting."""
        size = os.fstat(t.fd).st_size
        seen = t.size
        if size > seen:
            t.grew_mono = time.monotonic()
        t.size = size
        if t.unidentified and not self._identify(t, size):
            return False
        if t.copy_of is not None:
            more = self._follow_original(t, size)
            if t.copy_of is not None:
                return more
        if rewritten(t, size):
            self._truncated(t, seen)
            return True
        if size > t.fp_len and t.fp_len < FINGERPRINT_SIZE and (not t.fp_len or size >= FINGERPRINT_SIZE):
            self._set_fingerprint(t, size)
        if size > t.pos:
            n = min(size - t.pos, t.group.block_size)
            start = t.pos
            data = os.pread(t.fd, n, start)
            if not data:
                return False
            self._stats["bytes_read"] += len(data)
            self._process(t, data, force=False, full=len(data) == t.group.block_size)
            if start + len(data) < size:
                return True
        self._at_end(t, size)
        return False

    def _at_end(self, t: Tailer, size: int) -> None:
        """Everything there is was read: flush a stale partial line, let go of finished rotated files."""
        now = time.monotonic()
        idle = now - t.grew_mono
        cfg = t.group.cfg
        letting_go = t.eof_release or (t.detached and idle >= cfg.rotate_wait)
        if t.pos < size and (letting_go or idle >= cfg.partial_line_timeout):
            data = os.pread(t.fd, size - t.pos, t.pos)
            self._process(t, data, force=True, full=False)
        if t.pos >= size and letting_go:
            self._release(t)
            return
        deadlines = []
        if t.pos < size:
            deadlines.append(t.grew_mono + cfg.partial_line_timeout)
        if t.detached:
            deadlines.append(t.grew_mono + cfg.rotate_wait)
        if deadlines:
            self._arm_timer(t, min(deadlines))

    def _process(self, t: Tailer, data: bytes, force: bool, full: bool) -> None:
        """Emit the complete lines at the start of `data` (read at `t.pos`) and advance.

        `force`: the end of `data` ends a line (the writer went idle, or the file is let go).
        `full`: `data` is a whole block, so a line or record that does not end in it is over-long.
        """
        group = t.group
        if t.skip:  # inside an over-long line that was cut: drop the rest of it
            nl = data.find(b"\n")
            if nl < 0:
                t.pos += len(data)
                if force:
                    t.skip = False
                self._emit(t, [])
                return
            t.skip = False
            t.pos += nl + 1
            data = data[nl + 1 :]
            if not data:
                self._emit(t, [])
                return
        if group.multiline is not None:
            self._process_multiline(t, data, force, full)
            return
        cut = last_line_end(data, force)
        consumed = len(data) if force else cut + 1
        records: list[Any] = []
        truncated: dict[int, int] = {}
        raw_bytes = 0
        if cut >= 0:
            records, raw_bytes = self._lines(t, data, cut, truncated)
        rest = len(data) - consumed
        if rest > group.max_line:
            # No newline within max_line_size: cut the line here and skip what follows of it.
            head = cut_utf8(data[consumed : consumed + group.max_line + 1], group.max_line)
            truncated[len(records)] = -1
            records.append(self._fix_encoding([head], t)[0])
            consumed = len(data)
            t.skip = True
        if consumed <= 0:
            return
        t.pos += consumed
        if truncated:
            records = self._mark_truncated(t, records, truncated)
            raw_bytes = -1
        self._emit(t, records, raw_bytes)

    def _emit(self, t: Tailer, records: list[Any], raw_bytes: int = -1) -> None:
        if t.first_read < 0 and t.pos:
            t.first_read = self._opened
        if not t.key:
            return  # nothing was ever read from the file: there is no position to keep
        if records:
            self._stats["lines"] += len(records)
        ctx = self._require_ctx()
        ctx.emit_nowait(
            Batch(self.name, records, monotonic_ns(), ctx.boot_id, t.attrs, (t.key, t.position_value()), raw_bytes)
        )

    def _process_multiline(self, t: Tailer, data: bytes, force: bool, full: bool) -> None:
        """Group lines into records: a line matching multiline_start begins one, others join it."""
        group = t.group
        assert group.multiline is not None
        cut = last_line_end(data, force)
        if cut < 0:
            if len(data) > group.max_line:
                head = cut_utf8(data[: group.max_line + 1], group.max_line)
                t.pos += len(data)
                t.skip = True
                self._emit(t, self._mark_truncated(t, self._fix_encoding([head], t), {0: -1}))
            return
        records, truncated, consumed = multiline_records(data, cut, group.multiline, group.max_line, force, full)
        if not consumed:
            return
        if group.encoding is not None or not all(r.isascii() for r in records):
            records = self._fix_encoding(records, t)
        t.pos += consumed
        self._emit(t, self._mark_truncated(t, records, truncated) if truncated else records)

    def _lines(self, t: Tailer, data: bytes, end: int, truncated: dict[int, int]) -> tuple[list[bytes], int]:
        """Split the complete lines of `data[:end]` (`end`: see `split_lines`) into line bodies. Also returns
        their total length when it is known without a pass over the lines (-1 otherwise)."""
        lines, raw_bytes = split_lines(data, end, t.group.max_line, truncated)
        if t.group.encoding is not None or not data.isascii():  # (what follows `end` is read again later)
            fixed = self._fix_encoding(lines, t, data[:end])
            if fixed is not lines:
                lines, raw_bytes = fixed, -1
        return lines, raw_bytes

    def _fix_encoding(self, lines: list[bytes], t: Tailer, seg: bytes | None = None) -> list[bytes]:
        """Lines as valid UTF-8: decoded from the section's encoding, invalid bytes replaced (U+FFFD)."""
        fixed, bad = to_utf8(lines, t.group.encoding, seg)
        if bad:
            self._stats["invalid_encoding_lines"] += bad
            self._warn_once(f"utf8:{t.path}", "files: %s has invalid UTF-8; invalid bytes are replaced", t.path)
        return fixed

    def _mark_truncated(self, t: Tailer, lines: list[bytes], truncated: dict[int, int]) -> list[Record]:
        """The slow path: cut lines become records saying so (guarantee 5: no silent loss)."""
        self._stats["truncated_lines"] += len(truncated)
        self._require_ctx().count({"files_truncated_lines": len(truncated)})
        self._warn_once(
            f"long:{t.path}",
            "files: %s has lines longer than max_line_size (%d bytes); they are cut and marked "
            "edgeagent.line.truncated",
            t.path,
            t.group.max_line,
        )
        return marked_records(lines, truncated)

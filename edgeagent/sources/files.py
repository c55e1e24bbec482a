"""The file source: tails the files of every `[[files]]` section through rotation.

Owns everything about local log files: finding them (include/exclude globs,
re-scanned), knowing them (identity = device + inode + a fingerprint of the
first bytes; a new file that starts with what was read from a tailed one is
its copy and is read only where it differs), reading them (large blocks split into lines; multiline, over-long
lines and invalid encodings as slow paths), following them through rotation
(rename+create, copytruncate, deletion, symlinks, and rotation while the agent
was stopped) and storing where it is in each (a spool position per file,
committed with the lines read up to it). docs/files.md states the guarantees.

Positions: key `file:<dev>:<ino>:<fingerprint>`, value JSON
`{"offset": N, "path": P, "fp_len": L}` plus `"at"` (where the file is now, when
it was renamed), `"skip": true` (inside an over-long line that was cut) and
`"eof": true` (written at a clean stop: the file was read to its end, so its
disappearance while the agent is stopped loses nothing it could read).
`offset` is always the end of the last line emitted: a partial last line is
re-read until it is complete (or the writer went idle), so a restart resumes
exactly after the last line committed. Marker positions
`files-section:<hash of include>` record that a section has been scanned
before, which is what `start_at` ("for files never seen before") keys on.

Wake-ups: one inotify descriptor (watching every open file through
/proc/self/fd and the directories the globs can match) on the event loop, a
rescan timer every `rescan_interval`, and per-file timers only while a partial
line or a rotated file is pending. Without inotify, open files are polled every
`poll_interval`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import fnmatch
import glob
import json
import logging
import os
import re
import stat
import time
from typing import Any

from edgeagent.clock import monotonic_ns
from edgeagent.config import Config, ConfigError, FilesConfig
from edgeagent.pipeline import SourceContext
from edgeagent.records import SEVERITY_WARN, Attributes, Batch, Record
from edgeagent.sources import inotify

try:
    # hashlib itself would load OpenSSL (about 3.5 MiB of RSS) for a hash that CPython builds in.
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - Pythons built without the module
    from hashlib import blake2b

log = logging.getLogger(__name__)

POSITION_PREFIX = "file:"
SECTION_PREFIX = "files-section:"
FINGERPRINT_SIZE = 1024  # bytes of a file's start that, with dev+inode, identify it
BLOCK_SIZE = 512 * 1024  # bytes read per system call; lines are split a block at a time
_START_AT_END_LOOKBACK = 64 * 1024
_LEAD_SIZE = 64

# The Kubernetes pod log layout: /var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log.
# A "__" in a group name stands for "." in the attribute name.
KUBERNETES_PATH_REGEX = (
    r"/pods/(?P<k8s__namespace__name>[^_/]+)_(?P<k8s__pod__name>[^_/]+)_(?P<k8s__pod__uid>[^_/]+)"
    r"/(?P<k8s__container__name>[^/]+)/\d+\.log$"
)

_FILE_EVENTS = inotify.IN_MODIFY | inotify.IN_ATTRIB | inotify.IN_MOVE_SELF
_DIR_EVENTS = (
    inotify.IN_CREATE
    | inotify.IN_MOVED_FROM
    | inotify.IN_MOVED_TO
    | inotify.IN_DELETE
    | inotify.IN_DELETE_SELF
    | inotify.IN_MOVE_SELF
    | inotify.IN_ONLYDIR
)
_RESCAN_EVENTS = inotify.IN_ATTRIB | inotify.IN_MOVE_SELF | inotify.IN_DELETE_SELF
_MAGIC = re.compile(r"[*?[]")
_TRUNCATED_ATTRS: Attributes = {"edgeagent.line.truncated": True}


def fingerprint(data: bytes) -> str:
    return blake2b(data, digest_size=8).hexdigest()


def _cut_utf8(line: bytes, limit: int) -> bytes:
    """`line` cut to at most `limit` bytes, not inside a UTF-8 sequence."""
    end = limit
    while end > 0 and (line[end] & 0xC0) == 0x80 and limit - end < 3:
        end -= 1
    return line[:end]


cut_utf8 = _cut_utf8  # public for the syslog and journald sources until the shared line-handling module exists


class _Group:
    """One `[[files]]` section, compiled."""

    def __init__(self, index: int, cfg: FilesConfig, source: str) -> None:
        where = f"{source}: " if source else ""
        self.index = index
        self.cfg = cfg
        self.include = cfg.include
        # A pattern without a "/" matches the file name; one with a "/" the whole path ("*" also matches "/").
        self.exclude_names = tuple(p for p in cfg.exclude if "/" not in p)
        self.exclude_paths = tuple(p for p in cfg.exclude if "/" in p)
        for pattern in self.exclude_paths:
            if not pattern.startswith(("/", "*")):
                raise ConfigError(
                    f"{where}files[{index}].exclude = {pattern!r}: a pattern with a '/' is matched against the "
                    "whole path: expected it to start with '/' or '*' (e.g. '*/old/*'), or a file name pattern "
                    "without '/' (e.g. '*.gz')"
                )
        self.marker = SECTION_PREFIX + fingerprint("\0".join(cfg.include).encode())
        self.max_line = cfg.max_line_size
        if self.max_line < 1:
            raise ConfigError(f"{where}files[{index}].max_line_size = {self.max_line}: expected at least 1 byte")
        # A block always holds a whole line of the maximum size, so a block without a newline is an over-long line.
        self.block_size = max(BLOCK_SIZE, 2 * self.max_line + 2)
        regex = KUBERNETES_PATH_REGEX if cfg.path_attributes == "kubernetes" else cfg.path_attributes
        self.path_re = re.compile(regex) if regex else None
        try:
            self.multiline = re.compile(cfg.multiline_start.encode()) if cfg.multiline_start else None
        except re.error as e:
            raise ConfigError(
                f"{where}files[{index}].multiline_start = {cfg.multiline_start!r}: "
                f"expected a regex usable on bytes ({e})"
            ) from None
        self.encoding: str | None = None
        try:
            encoding_name = codecs.lookup(cfg.encoding).name
        except LookupError:
            raise ConfigError(
                f"{where}files[{index}].encoding = {cfg.encoding!r}: expected a known text encoding"
            ) from None
        if encoding_name != "utf-8":
            if "\n".encode(encoding_name) != b"\n":
                raise ConfigError(
                    f"{where}files[{index}].encoding = {cfg.encoding!r}: expected an ASCII-compatible encoding "
                    "(one byte 0x0a per newline), e.g. utf-8, latin-1, cp1252"
                )
            self.encoding = encoding_name
        self._patterns = [p.split("/") for p in self.include]
        for pattern, parts in zip(self.include, self._patterns, strict=True):
            base = _fixed_dir(parts)
            if not os.path.isdir(base):
                log.warning(
                    "files: %sfiles[%d].include = %r: the directory %s does not exist; nothing matches until it "
                    "is created (looked for every rescan_interval, %gs)",
                    where,
                    index,
                    pattern,
                    base,
                    cfg.rescan_interval,
                )

    def matches(self, path: str) -> bool:
        """Whether `path` is one this section tails (glob semantics: `*` stays within a path component)."""
        parts = path.split("/")
        for pattern, pattern_parts in zip(self.include, self._patterns, strict=True):
            if "**" in pattern:
                hit = fnmatch.fnmatchcase(path, pattern.replace("**/", "*").replace("**", "*"))
            else:
                hit = len(parts) == len(pattern_parts) and all(
                    fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pattern_parts, strict=True)
                )
            if hit:
                return not self.excluded(path)
        return False

    def excluded(self, path: str) -> bool:
        name = path.rpartition("/")[2]
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude_names) or any(
            fnmatch.fnmatchcase(path, p) for p in self.exclude_paths
        )

    def attributes(self, path: str) -> Attributes:
        attrs: Attributes = {"log.file.path": path, "log.file.name": os.path.basename(path)}
        attrs.update(self.cfg.attributes)
        if self.path_re is not None:
            m = self.path_re.search(path)
            if m:
                for name, value in m.groupdict().items():
                    if value is not None:
                        attrs[name.replace("__", ".")] = value
        return attrs

    def watch_dirs(self) -> set[str]:
        """Directories whose entries can match an include pattern (for inotify)."""
        dirs: set[str] = set()
        for pattern, parts in zip(self.include, self._patterns, strict=True):
            dirs.add(_fixed_dir(parts))
            first_magic = _first_magic(parts)
            if "**" in pattern:
                continue  # deeper levels: the directories of matched files are added by the scan
            for level in range(first_magic, len(parts) - 1):
                dirs.update(d for d in glob.glob("/".join(parts[: level + 1])) if os.path.isdir(d))
        return {d for d in dirs if os.path.isdir(d)}


class _Tailer:
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

    def __init__(self, group: _Group, path: str, fd: int, st: os.stat_result, pos: int, attrs_path: str) -> None:
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
        self.copy_of: _Tailer | None = None  # the tailed file this one is a copy of (read nothing while it is)
        self.verified = 0  # bytes known equal to `copy_of`'s
        self.lead: bytes | None = None  # the file's first bytes (up to _LEAD_SIZE), to find copies quickly
        # When it was opened and when it was first read from, counted in files opened: only a file read from
        # before another one appeared can be the original that one is a copy of.
        self.born = self.first_read = -1
        self.wd = -1
        self.polled = False
        self.timer: asyncio.TimerHandle | None = None

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


class _Stored:
    """A position read back from the spool at start."""

    __slots__ = ("at", "dev", "eof", "fp", "fp_len", "group", "ino", "key", "offset", "path", "skip")

    def __init__(self, key: str, value: str, groups: list[_Group]) -> None:
        self.key = key
        _, dev, ino, fp = key.split(":")
        self.dev, self.ino, self.fp = int(dev), int(ino), fp
        data = json.loads(value)
        self.offset = int(data["offset"])
        self.path = str(data["path"])
        self.fp_len = int(data["fp_len"])
        self.at = str(data.get("at", self.path))
        self.skip = bool(data.get("skip", False))
        self.eof = bool(data.get("eof", False))  # read to its end when the agent stopped cleanly
        self.group = next((g for g in groups if g.matches(self.path)), None)


class FileSource:
    """Tails the files of every `[[files]]` section (see the module docstring)."""

    name = "files"
    config_section = "files"  # registered in edgeagent/sources/__init__.py

    def __init__(self, config: Config) -> None:
        self.config = config
        self._groups = [_Group(i, cfg, config.source_path) for i, cfg in enumerate(config.files)]
        self._ctx: SourceContext | None = None
        self._tailers: dict[tuple[int, int], _Tailer] = {}
        self._dirty: dict[_Tailer, None] = {}  # tailers to read, in order (a dict is an ordered set)
        self._wake = asyncio.Event()
        self._rescan_due = True
        self._markers: set[str] = set()
        self._forget: list[str] = []
        self._unopened: dict[tuple[int, int], _Stored] = {}  # stored positions of files that failed to open
        self._copies: set[_Tailer] = set()  # files known as copies of tailed ones (copy_of set)
        self._opened = 0  # files opened so far
        self._inotify: inotify.Inotify | None = None
        self._wd_tailer: dict[int, _Tailer] = {}
        self._dir_wd: dict[str, int] = {}
        self._wd_dir: dict[int, str] = {}
        self._rescan_timer: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._warned: set[str] = set()
        self._stats = {
            "lines": 0,
            "bytes_read": 0,
            "truncated_lines": 0,
            "invalid_encoding_lines": 0,
            "rotations": 0,
            "truncations": 0,
            "copies_recovered": 0,
            "lost_files": 0,
            "open_errors": 0,
        }
        min_rescan = min((g.cfg.rescan_interval for g in self._groups), default=10.0)
        self._rescan_interval = max(min_rescan, 0.1)
        self._poll_interval = max(min((g.cfg.poll_interval for g in self._groups), default=1.0), 0.05)

    # --- the protocol ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "files": len(self._tailers),
            "rotated_pending": sum(1 for t in self._tailers.values() if t.detached),
            "inotify": self._inotify is not None,
            **self._stats,
        }

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        loop = asyncio.get_running_loop()
        _raise_open_file_limit()
        try:
            self._inotify = inotify.Inotify()
            loop.add_reader(self._inotify.fileno(), self._on_inotify)
        except OSError as e:
            log.warning("files: %s; falling back to stat polling every %.1fs", e, self._poll_interval)
            self._inotify = None
        try:
            self._restore()
            self._rescan_due = False
            self._scan()
            self._flush_forgets()
            self._arm_rescan()
            while True:
                await self._work()
                await self._wake.wait()
                self._wake.clear()
        finally:
            self._shutdown(loop)

    # --- main loop --------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            if self._rescan_due:
                self._rescan_due = False
                self._scan()
            if not self._dirty:
                break
            tailers = list(self._dirty)
            self._dirty.clear()
            for t in tailers:
                await self._require_ctx().wait_writable()  # the spool cannot commit: read nothing more until it can
                if self._tailers.get(t.ident) is not t:
                    continue  # let go of meanwhile
                try:
                    more = self._read(t)
                except OSError as e:
                    self._warn_once(f"read:{t.at}", "files: reading %s failed: %s", t.at, e)
                    more = False
                if more:
                    self._dirty[t] = None
                await asyncio.sleep(0)  # one block per file per turn: fair to other files and sources
            self._flush_forgets()
        self._flush_forgets()

    def _mark(self, t: _Tailer) -> None:
        self._dirty[t] = None
        self._wake.set()

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        for ev in self._inotify.read_events():
            if ev.mask & inotify.IN_Q_OVERFLOW:
                self._rescan_due = True
                self._dirty.update(dict.fromkeys(self._tailers.values()))
                continue
            t = self._wd_tailer.get(ev.wd)
            if t is not None:
                self._dirty[t] = None
                if ev.mask & _RESCAN_EVENTS:
                    self._rescan_due = True
                if ev.mask & inotify.IN_IGNORED:  # the kernel dropped the watch (unmount): poll the file instead
                    self._wd_tailer.pop(ev.wd, None)
                    t.wd = -1
                    t.polled = True
                    self._arm_poll()
                continue
            if ev.wd in self._wd_dir:
                self._rescan_due = True
                if ev.mask & inotify.IN_IGNORED:
                    self._dir_wd.pop(self._wd_dir.pop(ev.wd), None)
        self._wake.set()

    def _arm_rescan(self) -> None:
        loop = asyncio.get_running_loop()
        self._rescan_timer = loop.call_later(self._rescan_interval, self._on_rescan_timer)

    def _on_rescan_timer(self) -> None:
        self._rescan_due = True
        self._wake.set()
        self._arm_rescan()

    def _arm_poll(self) -> None:
        if self._poll_timer is None and any(t.polled for t in self._tailers.values()):
            loop = asyncio.get_running_loop()
            self._poll_timer = loop.call_later(self._poll_interval, self._on_poll_timer)

    def _on_poll_timer(self) -> None:
        self._poll_timer = None
        polled = [t for t in self._tailers.values() if t.polled]
        if polled:
            self._dirty.update(dict.fromkeys(polled))
            self._wake.set()
            self._arm_poll()

    def _arm_timer(self, t: _Tailer, deadline_mono: float) -> None:
        if t.timer is not None:
            t.timer.cancel()
        loop = asyncio.get_running_loop()
        t.timer = loop.call_later(max(deadline_mono - time.monotonic(), 0.01), self._on_tailer_timer, t)

    def _on_tailer_timer(self, t: _Tailer) -> None:
        t.timer = None
        if self._tailers.get(t.ident) is t:
            self._mark(t)

    def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        for timer in (self._rescan_timer, self._poll_timer):
            if timer is not None:
                timer.cancel()
        self._rescan_timer = self._poll_timer = None
        self._store_read_to_end()
        for t in list(self._tailers.values()):
            self._close(t)
        self._dirty.clear()
        if self._inotify is not None:
            loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        self._wd_tailer.clear()
        self._dir_wd.clear()
        self._wd_dir.clear()
        self._unopened.clear()

    def _store_read_to_end(self) -> None:
        """At a clean stop, mark the files read to their end: if such a file is gone at the next start, nothing
        the agent could have read was lost (lines written after the stop cannot be known, see docs/files.md)."""
        ctx = self._ctx
        for t in self._tailers.values():
            with contextlib.suppress(OSError):
                if ctx is not None and t.key and not t.skip and os.fstat(t.fd).st_size <= t.pos:
                    position = (t.key, t.position_value(read_to_end=True))
                    ctx.emit_nowait(Batch(self.name, [], monotonic_ns(), ctx.boot_id, t.attrs, position))

    # --- restoring positions at start ---------------------------------------------------

    def _restore(self) -> None:
        """Reopen every file behind a stored position, wherever rotation moved it."""
        ctx = self._require_ctx()
        ctx.forget_positions(list(dict.fromkeys(self._forget)))
        self._forget = []
        self._markers = set(ctx.positions(SECTION_PREFIX))
        entries: list[_Stored] = []
        for key, value in ctx.positions(POSITION_PREFIX).items():
            try:
                entry = _Stored(key, value, self._groups)
            except (ValueError, KeyError, TypeError) as e:
                log.error("files: stored position %s = %r is unreadable (%s); dropping it", key, value, e)
                self._forget.append(key)
                continue
            if entry.group is None:
                log.info("files: %s is no longer in any [[files]] section; dropping its position", entry.path)
                self._forget.append(key)
                continue
            entries.append(entry)
        # Newest first: after a fingerprint upgrade interrupted by a crash, two keys name one file; the larger
        # offset is the later one.
        entries.sort(key=lambda e: -e.offset)
        unresolved: list[_Stored] = []
        for entry in entries:
            if not self._resume_in_place(entry):
                unresolved.append(entry)
        listings: dict[str, list[tuple[str, os.stat_result]]] = {}
        still: list[_Stored] = []
        for entry in unresolved:
            if not self._resume_renamed(entry, listings):
                still.append(entry)
        for entry in still:
            self._resume_from_copy(entry, listings)

    def _resume_in_place(self, entry: _Stored) -> bool:
        for path in dict.fromkeys((entry.at, entry.path)):
            st = _stat(path)
            if st is None or (st.st_dev, st.st_ino) != (entry.dev, entry.ino) or st.st_size < entry.offset:
                continue
            found = _file_fingerprint(path, entry.fp_len)
            if found is None:  # there, but not readable now: keep the position for the scan to retry
                self._unopened[(entry.dev, entry.ino)] = entry
                return True
            if found != entry.fp:
                continue
            if (entry.dev, entry.ino) in self._tailers:
                self._forget.append(entry.key)  # an older key of a file already resumed
                return True
            self._open_stored(entry, path)
            return True
        return False

    def _resume_renamed(self, entry: _Stored, listings: dict[str, list[tuple[str, os.stat_result]]]) -> bool:
        """Rotated by rename while the agent was down: find the inode in the same directory."""
        for path, st in self._listing(entry, listings):
            if (st.st_dev, st.st_ino) != (entry.dev, entry.ino) or st.st_size < entry.offset:
                continue
            if _file_fingerprint(path, entry.fp_len) != entry.fp:
                continue
            if (entry.dev, entry.ino) in self._tailers:
                self._forget.append(entry.key)
                return True
            self._stats["rotations"] += 1
            log.info("files: %s was rotated to %s while the agent was stopped; reading its rest", entry.path, path)
            self._open_stored(entry, path)
            return True
        return False

    def _resume_from_copy(self, entry: _Stored, listings: dict[str, list[tuple[str, os.stat_result]]]) -> None:
        """Copied and truncated while the agent was down: the copy holds what was not read yet."""
        candidates = [
            (path, st)
            for path, st in self._listing(entry, listings)
            if (st.st_dev, st.st_ino) != (entry.dev, entry.ino)
            and st.st_size >= entry.offset
            and _file_fingerprint(path, entry.fp_len) == entry.fp
        ]
        for path, st in sorted(candidates, key=lambda c: -c[1].st_mtime):
            if (st.st_dev, st.st_ino) in self._tailers:
                self._forget.append(entry.key)  # the copy is already tailed under its own position
                return
            self._stats["truncations"] += 1
            log.info("files: %s was copied to %s and truncated while the agent was stopped", entry.path, path)
            if self._open_stored(entry, path, copy=True):
                return
        self._forget.append(entry.key)
        truncated = any((st.st_dev, st.st_ino) == (entry.dev, entry.ino) for _, st in self._listing(entry, listings))
        if entry.eof:
            log.info(
                "files: %s, read to its end when the agent stopped, was %s while it was stopped",
                entry.path,
                "truncated" if truncated else "rotated away or deleted",
            )
        elif truncated:
            self._report_loss(
                entry.path,
                "file_truncated",
                f"edgeagent: {entry.path} was truncated while the agent was stopped and no copy of it was found "
                f"next to it; lines it got after byte {entry.offset}, if any, were not read",
            )
        else:
            self._report_loss(
                entry.path,
                "file_rotated_away",
                f"edgeagent: {entry.path} was rotated or deleted while the agent was stopped and no file with its "
                f"identity is left in {os.path.dirname(entry.at)}; lines it got after byte {entry.offset}, if "
                "any, were not read",
            )

    def _listing(
        self, entry: _Stored, listings: dict[str, list[tuple[str, os.stat_result]]]
    ) -> list[tuple[str, os.stat_result]]:
        out: list[tuple[str, os.stat_result]] = []
        for directory in dict.fromkeys((os.path.dirname(entry.at), os.path.dirname(entry.path))):
            listing = listings.get(directory)
            if listing is None:
                listing = listings[directory] = []
                try:
                    names = os.listdir(directory)
                except OSError:
                    names = []
                for name in names:
                    path = os.path.join(directory, name)
                    st = _stat(path)
                    if st is not None and stat.S_ISREG(st.st_mode):
                        listing.append((path, st))
            out.extend(listing)
        return out

    def _open_stored(self, entry: _Stored, path: str, copy: bool = False) -> bool:
        """Resume a stored position in the file at `path`. A file found but not readable now (permissions,
        descriptors) keeps its position: the scan retries it from there."""
        assert entry.group is not None
        t = self._open(entry.group, path, entry.offset, attrs_path=entry.path)
        if t is None:
            if not copy:
                self._unopened[(entry.dev, entry.ino)] = entry
            return False
        t.fp, t.fp_len, t.skip = entry.fp, entry.fp_len, entry.skip
        t.key = self._key(t)
        if copy:
            t.eof_release = True
        if t.key != entry.key:
            # A copy has an inode of its own: store its position under its real identity.
            self._emit(t, [])
            self._forget.append(entry.key)
        if not entry.group.matches(path):
            t.detached = True
        return True

    # --- finding files ------------------------------------------------------------------------

    def _scan(self) -> None:
        """Match every include glob; open new files, detach files no longer matched."""
        seen: set[tuple[int, int]] = set()
        # Watch the directories first: a file created from now on is either globbed below or notified.
        watch_dirs: set[str] = set().union(*(group.watch_dirs() for group in self._groups))
        self._update_dir_watches(watch_dirs, drop_others=False)
        new_markers: list[_Group] = []
        for group in self._groups:
            first_time = group.marker not in self._markers
            for pattern in group.include:
                for path in sorted(glob.glob(pattern, recursive="**" in pattern)):
                    if group.excluded(path):
                        continue
                    st = _stat(path)
                    if st is None or not stat.S_ISREG(st.st_mode):
                        continue
                    ident = (st.st_dev, st.st_ino)
                    if ident in seen:
                        continue  # two names (symlinks, hard links) for one file: tailed once
                    seen.add(ident)
                    watch_dirs.add(os.path.dirname(path))
                    t = self._tailers.get(ident)
                    if t is not None:
                        if t.detached and not t.eof_release:
                            t.detached = False  # renamed back, or a rotated file the section also matches
                            t.at = _real_path(t.fd, path)
                        continue
                    self._start_new(group, path, st, first_time)
            if first_time:
                new_markers.append(group)
        for t in list(self._tailers.values()):
            if t.ident not in seen and not t.detached:
                self._detach(t)
        for group in new_markers:
            self._markers.add(group.marker)
            self._require_ctx().emit_nowait(
                Batch(self.name, [], monotonic_ns(), self._require_ctx().boot_id, {}, (group.marker, "{}"))
            )
        self._update_dir_watches(watch_dirs)
        self._arm_poll()

    def _start_new(self, group: _Group, path: str, st: os.stat_result, first_time: bool) -> None:
        """A file seen for the first time: where to start reading it."""
        stored = self._unopened.get((st.st_dev, st.st_ino))
        if stored is not None:
            found = _file_fingerprint(path, stored.fp_len)
            if found is None:
                return  # still not readable: retried at the next scan
            del self._unopened[(st.st_dev, st.st_ino)]
            if found == stored.fp:
                self._open_stored(stored, path)
                return
        start, skip = 0, False
        from_end = first_time and group.cfg.start_at == "end"
        if from_end:
            start, skip = _end_of_last_line(path, st.st_size)
        t = self._open(group, path, start, attrs_path=path)
        if t is None:
            return
        t.skip = skip
        t.unidentified = not from_end  # a copy of a tailed file (copytruncate) must not be read from its start
        if t.size and start:
            self._set_fingerprint(t, t.size)  # store the start now: a restart must not begin again at 0

    def _open(self, group: _Group, path: str, pos: int, attrs_path: str) -> _Tailer | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            self._stats["open_errors"] += 1
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self._warn_once(f"open:{path}", "files: cannot open %s: %s (raise the open file limit)", path, e)
            elif e.errno != errno.ENOENT:
                self._warn_once(f"open:{path}", "files: cannot open %s: %s; will retry at each rescan", path, e)
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        existing = self._tailers.get((st.st_dev, st.st_ino))
        if existing is not None:  # replaced between stat and open by a file we already tail
            os.close(fd)
            return None
        t = _Tailer(group, _real_path(fd, path), fd, st, pos, attrs_path)
        self._opened += 1
        t.born = self._opened
        t.first_read = self._opened if pos else -1
        self._tailers[t.ident] = t
        self._watch(t)
        self._dirty[t] = None
        self._warned.discard(f"open:{path}")
        return t

    def _watch(self, t: _Tailer) -> None:
        if self._inotify is None:
            t.polled = True
            return
        try:
            # Through the descriptor: the watch follows the inode whatever its name becomes.
            t.wd = self._inotify.add_watch(f"/proc/self/fd/{t.fd}", _FILE_EVENTS)
            self._wd_tailer[t.wd] = t
        except OSError as e:
            self._warn_once(
                "watch", "files: cannot watch %s (%s); polling it every %.1fs", t.at, e, self._poll_interval
            )
            t.polled = True

    def _update_dir_watches(self, dirs: set[str], drop_others: bool = True) -> None:
        if self._inotify is None:
            return
        for directory in list(self._dir_wd) if drop_others else ():
            if directory not in dirs:
                wd = self._dir_wd.pop(directory)
                self._wd_dir.pop(wd, None)
                self._inotify.rm_watch(wd)
        for directory in dirs - self._dir_wd.keys():
            try:
                wd = self._inotify.add_watch(directory, _DIR_EVENTS)
            except OSError as e:
                self._warn_once(
                    "watch",
                    "files: cannot watch directory %s (%s); rescanning every %.1fs",
                    directory,
                    e,
                    self._rescan_interval,
                )
                continue
            self._dir_wd[directory] = wd
            self._wd_dir[wd] = directory

    def _detach(self, t: _Tailer) -> None:
        """The file is no longer at a matching path (renamed or deleted): read it to its end, then let go."""
        t.detached = True
        t.grew_mono = time.monotonic()  # rotate_wait counts from here: the writer may not have reopened yet
        self._stats["rotations"] += 1
        now_at = _real_path(t.fd, t.at)
        if now_at != t.at:
            t.at = now_at
            self._emit(t, [])  # remember where it went: a restart finds it there
        self._mark(t)

    # --- reading ------------------------------------------------------------------------------

    def _read(self, t: _Tailer) -> bool:
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
        if _rewritten(t, size):
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

    # --- copies noticed while they are written (copytruncate with an include that matches the copy) ------

    def _identify(self, t: _Tailer, size: int) -> bool:
        """Whether a new file can be read from its start now. A file whose first bytes equal everything read
        from a tailed file (or a whole fingerprint of it) is a copy of that file, whatever its size when it is
        seen: it then shadows the original (True). While its first bytes are only a beginning of such a file's
        (a copy still being written), it waits until they tell, or until its writer is idle."""
        if size == 0:
            return False
        head = os.pread(t.fd, min(size, FINGERPRINT_SIZE), 0)
        maybe = False
        for o in list(self._tailers.values()):
            if not 0 <= o.first_read < t.born or not o.pos or not o.fp_len or o.copy_of is not None:
                continue
            verdict = self._copy_verdict(head, o)
            if verdict is None:  # `o` was rewritten in place: its truncation is handled first, then this file
                self._dirty.update({o: None, t: None})
                return False
            if verdict == "copy":
                self._shadow(t, o, min(o.pos, FINGERPRINT_SIZE))
                return True
            maybe = maybe or verdict == "maybe"
        deadline = t.grew_mono + t.group.cfg.partial_line_timeout
        if maybe and time.monotonic() < deadline:
            self._arm_timer(t, deadline)
            return False
        t.unidentified = False
        return True

    def _copy_verdict(self, head: bytes, o: _Tailer) -> str | None:
        """Whether a file starting with `head` is a copy of `o`: "copy", "maybe" (too short to tell), "no",
        or None when `o` itself changed at its start (truncated, not handled yet)."""
        if o.lead is None:
            intact = self._intact_head(o, 0)
            if intact is None:
                return None
            o.lead = intact[:_LEAD_SIZE]
        if not head.startswith(o.lead[: len(head)]):
            return "no"  # the usual case, without a system call
        n = min(o.pos, FINGERPRINT_SIZE)
        theirs = self._intact_head(o, n)
        if theirs is None:
            return None
        if len(head) >= n:
            return "copy" if head[:n] == theirs[:n] else "no"
        return "maybe" if theirs.startswith(head) else "no"

    def _intact_head(self, t: _Tailer, n: int) -> bytes | None:
        """The first `n` bytes of `t` (fewer if shorter), None if its fingerprinted start changed."""
        data = os.pread(t.fd, max(n, t.fp_len), 0)
        return data if fingerprint(data[: t.fp_len]) == t.fp else None

    def _shadow(self, copy: _Tailer, original: _Tailer, verified: int) -> None:
        copy.unidentified = False
        copy.copy_of, copy.verified = original, verified
        self._copies.add(copy)
        self._stats["copies_recovered"] += 1
        log.info("files: %s is a copy of %s; it is read only where it differs", copy.at, original.at)

    def _follow_original(self, t: _Tailer, size: int) -> bool:
        """Compare the next block of a copy with its original. While the copy holds nothing but the original's
        bytes, reading the original is enough; it stops being a copy where it differs, or when the original
        is truncated or let go (`_unshadow`). True when there is more to compare."""
        o = t.copy_of
        assert o is not None
        o_size = os.fstat(o.fd).st_size
        if _rewritten(o, o_size):  # truncated (copytruncate): that is handled first, then this file
            self._dirty.update({o: None, t: None})
            return False
        end = min(size, o_size)
        if t.verified < end:
            n = min(end - t.verified, t.group.block_size)
            mine, theirs = os.pread(t.fd, n, t.verified), os.pread(o.fd, n, t.verified)
            if mine != theirs:
                self._diverged(t, t.verified + _first_difference(mine, theirs))
                return True
            t.verified += n
            return t.verified < end
        if size > o_size:
            self._diverged(t, o_size)
            return True
        if t.detached:  # a copy deleted or renamed away before its original was truncated: nothing to read
            self._close(t)
        return False

    def _diverged(self, t: _Tailer, at: int) -> None:
        """`t` differs from its original at byte `at`: its lines from the one holding that byte are its own."""
        back = max(0, at - t.group.block_size)
        nl = os.pread(t.fd, at - back, back).rfind(b"\n")
        start = back + nl + 1 if nl >= 0 else back
        assert t.copy_of is not None
        log.info("files: %s differs from %s at byte %d; reading it from byte %d", t.at, t.copy_of.at, at, start)
        self._copies.discard(t)
        t.copy_of = None
        t.pos = start

    def _unshadow(self, original: _Tailer, pos: int) -> bool:
        """The original was truncated or let go after `pos` bytes were read: its copies go on from there.
        True if it had any."""
        copies = [c for c in self._copies if c.copy_of is original]
        for c in copies:
            self._copies.discard(c)
            c.copy_of = None
            c.pos = min(pos, os.fstat(c.fd).st_size)
            self._dirty[c] = None
        return bool(copies)

    def _at_end(self, t: _Tailer, size: int) -> None:
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

    def _process(self, t: _Tailer, data: bytes, force: bool, full: bool) -> None:
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
        cut = _last_line_end(data, force)
        consumed = len(data) if force else cut + 1
        records: list[Any] = []
        truncated: dict[int, int] = {}
        raw_bytes = 0
        if cut >= 0:
            records, raw_bytes = self._lines(t, data[:cut], truncated)
        rest = len(data) - consumed
        if rest > group.max_line:
            # No newline within max_line_size: cut the line here and skip what follows of it.
            head = _cut_utf8(data[consumed : consumed + group.max_line + 1], group.max_line)
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

    def _lines(self, t: _Tailer, seg: bytes, truncated: dict[int, int]) -> tuple[list[bytes], int]:
        """Split a run of complete lines (without the final newline) into line bodies. Also returns their
        total length when it is known without a pass over the lines (-1 otherwise)."""
        if b"\r" in seg:
            seg = seg.replace(b"\r\n", b"\n")
            if seg.endswith(b"\r"):
                seg = seg[:-1]
        lines = seg.split(b"\n")
        limit = t.group.max_line
        if len(seg) > limit and _may_have_long_line(seg, limit) and max(map(len, lines)) > limit:
            for i, line in enumerate(lines):
                if len(line) > limit:
                    lines[i] = _cut_utf8(line, limit)
                    truncated[i] = len(line)
        raw_bytes = -1 if truncated else len(seg) - len(lines) + 1
        if t.group.encoding is not None or not seg.isascii():
            fixed = self._fix_encoding(lines, t, seg)
            if fixed is not lines:
                lines, raw_bytes = fixed, -1
        return lines, raw_bytes

    def _fix_encoding(self, lines: list[bytes], t: _Tailer, seg: bytes | None = None) -> list[bytes]:
        """Lines as valid UTF-8: decoded from the section's encoding, invalid bytes replaced (U+FFFD)."""
        encoding = t.group.encoding
        if encoding is not None:
            return [line.decode(encoding, "replace").encode() for line in lines]
        try:
            (seg if seg is not None else b"\n".join(lines)).decode()
            return lines
        except UnicodeDecodeError:
            pass
        out = []
        bad = 0
        for line in lines:
            try:
                line.decode()
                out.append(line)
            except UnicodeDecodeError:
                out.append(line.decode("utf-8", "replace").encode())
                bad += 1
        if bad:
            self._stats["invalid_encoding_lines"] += bad
            self._warn_once(f"utf8:{t.path}", "files: %s has invalid UTF-8; invalid bytes are replaced", t.path)
        return out

    def _process_multiline(self, t: _Tailer, data: bytes, force: bool, full: bool) -> None:
        """Group lines into records: a line matching multiline_start begins one, others join it."""
        group = t.group
        assert group.multiline is not None
        cut = _last_line_end(data, force)
        if cut < 0:
            if len(data) > group.max_line:
                head = _cut_utf8(data[: group.max_line + 1], group.max_line)
                t.pos += len(data)
                t.skip = True
                self._emit(t, self._mark_truncated(t, self._fix_encoding([head], t), {0: -1}))
            return
        raw = data[:cut].split(b"\n")
        match = group.multiline.match
        starts = [0] + [i for i in range(1, len(raw)) if match(raw[i])]
        ends = [*starts[1:], len(raw)]
        if force:
            complete = len(starts)  # the writer is idle, or the file is let go: the last record is done
        else:
            complete = len(starts) - 1  # the last record may go on in lines not read or written yet
            last_bytes = sum(len(line) + 1 for line in raw[starts[-1] :])
            if last_bytes > group.max_line or (complete == 0 and full):
                complete = len(starts)  # already too long (or fills a block): emit it (cut) now
        if complete == 0:
            return
        consumed = sum(len(line) + 1 for line in raw[: ends[complete - 1]])
        if force:
            consumed = min(consumed, len(data))
        records: list[bytes] = []
        truncated: dict[int, int] = {}
        limit = group.max_line
        for i in range(complete):
            body = b"\n".join(line[:-1] if line.endswith(b"\r") else line for line in raw[starts[i] : ends[i]])
            if len(body) > limit:
                truncated[i] = len(body)
                body = _cut_utf8(body, limit)
            records.append(body)
        if group.encoding is not None or not all(r.isascii() for r in records):
            records = self._fix_encoding(records, t)
        t.pos += consumed
        self._emit(t, self._mark_truncated(t, records, truncated) if truncated else records)

    def _mark_truncated(self, t: _Tailer, lines: list[bytes], truncated: dict[int, int]) -> list[Record]:
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
        records = []
        for i, line in enumerate(lines):
            original = truncated.get(i)
            if original is None:
                records.append(Record(line))
            elif original < 0:  # length unknown: the rest is skipped as it arrives
                records.append(Record(line, attributes=_TRUNCATED_ATTRS))
            else:
                records.append(
                    Record(
                        line, attributes={"edgeagent.line.truncated": True, "edgeagent.line.original_bytes": original}
                    )
                )
        return records

    def _emit(self, t: _Tailer, records: list[Any], raw_bytes: int = -1) -> None:
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

    # --- identity and rotation ---------------------------------------------------------------

    def _key(self, t: _Tailer) -> str:
        return f"{POSITION_PREFIX}{t.dev}:{t.ino}:{t.fp}"

    def _set_fingerprint(self, t: _Tailer, size: int) -> None:
        """(Re)compute the fingerprint over the first bytes there are, up to FINGERPRINT_SIZE, and store
        the position under the new key before the old key is dropped."""
        n = min(size, FINGERPRINT_SIZE)
        head = os.pread(t.fd, n, 0)
        old = t.key
        t.fp, t.fp_len, t.lead = fingerprint(head), n, head[:_LEAD_SIZE]
        t.key = self._key(t)
        if t.key != old:
            self._emit(t, [])
            if old:
                self._forget.append(old)

    def _truncated(self, t: _Tailer, seen_size: int) -> None:
        """The file was truncated or rewritten in place (copytruncate): read what was not read yet from the
        copy if one is next to it, then read the file again from its start."""
        self._stats["truncations"] += 1
        old_key, old_fp, old_len, old_pos, old_size = t.key, t.fp, t.fp_len, t.pos, seen_size
        log.info("files: %s was truncated at byte %d; reading it again from the start", t.at, old_pos)
        recovered = self._unshadow(t, old_pos)
        if old_fp and not recovered:
            recovered = self._recover_from_copy(t, old_fp, old_len, old_pos)
        if not recovered and old_size > old_pos and old_fp:
            self._report_loss(
                t.path,
                "file_truncated",
                f"edgeagent: {t.path} was truncated before its last {old_size - old_pos} bytes were read, "
                "and no copy of it was found next to it",
            )
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        t.pos, t.skip, t.fp, t.fp_len, t.key, t.lead, t.first_read = 0, False, "", 0, "", None, -1
        t.size = 0
        if old_key:
            self._forget.append(old_key)

    def _recover_from_copy(self, t: _Tailer, fp: str, fp_len: int, pos: int) -> bool:
        """Find the copy of the content `t` had (by fingerprint, next to the file or to the name it was
        found under) and read it from `pos`. True if the rest is taken care of."""
        paths: list[str] = []
        for directory in dict.fromkeys((os.path.dirname(t.at), os.path.dirname(t.path))):
            try:
                paths.extend(os.path.join(directory, name) for name in os.listdir(directory))
            except OSError:
                continue
        candidates: list[tuple[float, str, os.stat_result]] = []
        for path in paths:
            st = _stat(path)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size < pos or st.st_size < fp_len:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident == t.ident:
                continue
            if _file_fingerprint(path, fp_len) != fp:
                continue
            tailed = self._tailers.get(ident)
            if tailed is not None:  # the copy matches the include globs and is tailed already
                if tailed.unidentified:  # not read yet: from where this file had been read up to
                    tailed.unidentified, tailed.pos, tailed.skip = False, pos, t.skip
                    self._stats["copies_recovered"] += 1
                return True
            candidates.append((st.st_mtime, path, st))
        for _, path, _ in sorted(candidates, reverse=True):
            copy = self._open(t.group, path, pos, attrs_path=t.path)
            if copy is None:
                continue
            copy.fp, copy.fp_len, copy.skip = fp, fp_len, t.skip
            copy.key = self._key(copy)
            copy.eof_release = True
            copy.detached = not t.group.matches(path)
            self._emit(copy, [])
            self._stats["copies_recovered"] += 1
            log.info("files: reading the rest of %s from its copy %s (from byte %d)", t.path, path, pos)
            return True
        return False

    def _release(self, t: _Tailer) -> None:
        """Let go of a rotated, deleted or copied file that was read to its end."""
        if t.eof_release and t.group.matches(t.at):
            # A copy that the section's globs match: keep tailing it as a file of its own.
            t.eof_release = t.detached = False
            return
        self._close(t)
        if t.key:
            self._forget.append(t.key)

    def _close(self, t: _Tailer) -> None:
        if self._tailers.get(t.ident) is t:
            del self._tailers[t.ident]
        self._copies.discard(t)
        if self._copies:
            self._unshadow(t, t.pos)
        self._dirty.pop(t, None)
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        if t.wd >= 0 and self._inotify is not None:
            self._wd_tailer.pop(t.wd, None)
            self._inotify.rm_watch(t.wd)
            t.wd = -1
        with contextlib.suppress(OSError):
            os.close(t.fd)

    def _flush_forgets(self) -> None:
        """Drop positions of files let go (after what was read from them is committed)."""
        if not self._forget:
            return
        live = {t.key for t in self._tailers.values()}
        keys = [k for k in dict.fromkeys(self._forget) if k not in live]
        self._forget = []
        if keys:
            self._require_ctx().forget_positions(keys)

    # --- reporting ------------------------------------------------------------------------------

    def _report_loss(self, path: str, reason: str, text: str) -> None:
        """A loss the source could not prevent: logged, counted and shipped as a record (guarantee 5)."""
        log.warning("files: %s", text)
        self._stats["lost_files"] += 1
        ctx = self._require_ctx()
        ctx.count({"files_lost_" + reason: 1})
        record = Record(text, SEVERITY_WARN, "WARN", {"edgeagent.loss.reason": reason, "log.file.path": path})
        ctx.emit_nowait(Batch(self.name, [record], monotonic_ns(), ctx.boot_id))

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _require_ctx(self) -> SourceContext:
        assert self._ctx is not None, "FileSource.run() sets the context"
        return self._ctx


# --- small helpers -------------------------------------------------------------------------------


def _last_line_end(data: bytes, force: bool) -> int:
    """Index of the newline ending the last complete line in `data` (-1: none). With `force`, the end of
    `data` ends a line too."""
    if force:
        return len(data) - 1 if data.endswith(b"\n") else len(data)
    return data.rfind(b"\n")


def _may_have_long_line(seg: bytes, limit: int) -> bool:
    """False when no line of `seg` can be longer than `limit`: a longer line would cover a whole aligned
    window of (limit + 1) // 2 bytes without a newline. A few memchr calls instead of a len() per line."""
    window = max((limit + 1) // 2, 1)
    find = seg.find
    return any(find(b"\n", start, start + window) < 0 for start in range(0, len(seg) - window + 1, window))


def _first_magic(parts: list[str]) -> int:
    """Index of the first directory component of a split pattern that has glob characters."""
    return next((i for i, p in enumerate(parts[:-1]) if _MAGIC.search(p)), len(parts) - 1)


def _fixed_dir(parts: list[str]) -> str:
    """The deepest directory of a split pattern without glob characters."""
    return "/".join(parts[: _first_magic(parts)]) or "/"


def _real_path(fd: int, fallback: str) -> str:
    """Where the open file is now (symlinks resolved, renames followed), from /proc/self/fd."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback
    return fallback if path.endswith(" (deleted)") or not path.startswith("/") else path


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _rewritten(t: _Tailer, size: int) -> bool:
    """Whether the file is shorter than what was read from it, or its first bytes changed (truncated)."""
    return size < t.pos or bool(t.fp_len and (size < t.fp_len or _fd_fingerprint(t.fd, t.fp_len) != t.fp))


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _fd_fingerprint(fd: int, n: int) -> str:
    return fingerprint(os.pread(fd, n, 0))


def _file_fingerprint(path: str, n: int) -> str | None:
    """Fingerprint of the first `n` bytes of `path`; "" if it is shorter, None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        data = os.pread(fd, n, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return fingerprint(data) if len(data) == n else ""


def _end_of_last_line(path: str, size: int) -> tuple[int, bool]:
    """Where start_at = "end" begins: after the last complete line. A trailing line still being written
    is skipped to its end (True), so no fragment of it is shipped."""
    if size == 0:
        return 0, False
    try:
        with open(path, "rb") as f:
            start = max(0, size - _START_AT_END_LOOKBACK)
            f.seek(start)
            tail = f.read(size - start)
    except OSError:
        return size, False
    nl = tail.rfind(b"\n")
    if nl == len(tail) - 1:
        return size, False
    if nl < 0:
        return size, True
    return start + nl + 1, False


def _raise_open_file_limit() -> None:
    """One descriptor per tailed file: lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ImportError, ValueError, OSError):
        pass

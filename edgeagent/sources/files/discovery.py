"""Finding the files to tail: the `[[files]]` sections compiled, globbed, watched.

Owns `Group` (one section: include/exclude matching, attributes, limits and
encodings checked at start) and the `Discovery` part of `FileSource`: scanning
the globs (at start, on directory events, every `rescan_interval`), opening
new files at the right place (`start_at` for files present when a section is
used for the first time, their start otherwise), watching files and
directories, and noticing files that left their matching path (rotated,
deleted), which are then read to their end and let go.

Invariants: one file (device + inode) is tailed once, under the first name
found, whatever the symlinks, hard links and overlapping globs; a directory is
watched before it is globbed, so a file created meanwhile is seen either way.
"""

from __future__ import annotations

import codecs
import errno
import fnmatch
import glob
import os
import re
import stat
import time

from edgeagent.clock import monotonic_ns
from edgeagent.config import ConfigError, FilesConfig
from edgeagent.records import Attributes, Batch
from edgeagent.sources import inotify
from edgeagent.sources.files.identity import file_fingerprint, fingerprint, stat_path
from edgeagent.sources.files.state import FileSourceState, log
from edgeagent.sources.files.tail import BLOCK_SIZE, Tailer

SECTION_PREFIX = "files-section:"
_START_AT_END_LOOKBACK = 64 * 1024

# The Kubernetes pod log layout: /var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log.
# A "__" in a group name stands for "." in the attribute name.
KUBERNETES_PATH_REGEX = (
    r"/pods/(?P<k8s__namespace__name>[^_/]+)_(?P<k8s__pod__name>[^_/]+)_(?P<k8s__pod__uid>[^_/]+)"
    r"/(?P<k8s__container__name>[^/]+)/\d+\.log$"
)

FILE_EVENTS = inotify.IN_MODIFY | inotify.IN_ATTRIB | inotify.IN_MOVE_SELF
DIR_EVENTS = (
    inotify.IN_CREATE
    | inotify.IN_MOVED_FROM
    | inotify.IN_MOVED_TO
    | inotify.IN_DELETE
    | inotify.IN_DELETE_SELF
    | inotify.IN_MOVE_SELF
    | inotify.IN_ONLYDIR
)
RESCAN_EVENTS = inotify.IN_ATTRIB | inotify.IN_MOVE_SELF | inotify.IN_DELETE_SELF
_MAGIC = re.compile(r"[*?[]")


class Group:
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


class Discovery(FileSourceState):
    """Scanning, opening and watching (a part of `FileSource`)."""

    def _scan(self) -> None:
        """Match every include glob; open new files, detach files no longer matched."""
        seen: set[tuple[int, int]] = set()
        # Watch the directories first: a file created from now on is either globbed below or notified.
        watch_dirs: set[str] = set().union(*(group.watch_dirs() for group in self._groups))
        self._update_dir_watches(watch_dirs, drop_others=False)
        new_markers: list[Group] = []
        for group in self._groups:
            first_time = group.marker not in self._markers
            for pattern in group.include:
                for path in sorted(glob.glob(pattern, recursive="**" in pattern)):
                    if group.excluded(path):
                        continue
                    st = stat_path(path)
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
                            t.at = real_path(t.fd, path)
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

    def _start_new(self, group: Group, path: str, st: os.stat_result, first_time: bool) -> None:
        """A file seen for the first time: where to start reading it."""
        stored = self._unopened.get((st.st_dev, st.st_ino))
        if stored is not None:
            found = file_fingerprint(path, stored.fp_len)
            if found is None:
                return  # still not readable: retried at the next scan
            del self._unopened[(st.st_dev, st.st_ino)]
            if found == stored.fp:
                self._open_stored(stored, path)
                return
        start, skip = 0, False
        from_end = first_time and group.cfg.start_at == "end"
        if from_end:
            start, skip = end_of_last_line(path, st.st_size)
        t = self._open(group, path, start, attrs_path=path)
        if t is None:
            return
        t.skip = skip
        t.unidentified = not from_end  # a copy of a tailed file (copytruncate) must not be read from its start
        if t.size and start:
            self._set_fingerprint(t, t.size)  # store the start now: a restart must not begin again at 0

    def _open(self, group: Group, path: str, pos: int, attrs_path: str) -> Tailer | None:
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
        t = Tailer(group, real_path(fd, path), fd, st, pos, attrs_path)
        self._opened += 1
        t.born = self._opened
        t.first_read = self._opened if pos else -1
        self._tailers[t.ident] = t
        self._watch(t)
        self._dirty[t] = None
        self._warned.discard(f"open:{path}")
        return t

    def _watch(self, t: Tailer) -> None:
        if self._inotify is None:
            t.polled = True
            return
        try:
            # Through the descriptor: the watch follows the inode whatever its name becomes.
            t.wd = self._inotify.add_watch(f"/proc/self/fd/{t.fd}", FILE_EVENTS)
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
                wd = self._inotify.add_watch(directory, DIR_EVENTS)
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

    def _detach(self, t: Tailer) -> None:
        """The file is no longer at a matching path (renamed or deleted): read it to its end, then let go."""
        t.detached = True
        t.grew_mono = time.monotonic()  # rotate_wait counts from here: the writer may not have reopened yet
        self._stats["rotations"] += 1
        now_at = real_path(t.fd, t.at)
        if now_at != t.at:
            t.at = now_at
            self._emit(t, [])  # remember where it went: a restart finds it there
        self._mark(t)


def _first_magic(parts: list[str]) -> int:
    """Index of the first directory component of a split pattern that has glob characters."""
    return next((i for i, p in enumerate(parts[:-1]) if _MAGIC.search(p)), len(parts) - 1)


def _fixed_dir(parts: list[str]) -> str:
    """The deepest directory of a split pattern without glob characters."""
    return "/".join(parts[: _first_magic(parts)]) or "/"


def real_path(fd: int, fallback: str) -> str:
    """Where the open file is now (symlinks resolved, renames followed), from /proc/self/fd."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback
    return fallback if path.endswith(" (deleted)") or not path.startswith("/") else path


def end_of_last_line(path: str, size: int) -> tuple[int, bool]:
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

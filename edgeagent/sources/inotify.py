"""A minimal inotify binding (ctypes on libc), for the file source.

Owns one non-blocking inotify descriptor: add and remove watches, and parse the
events waiting on it. The caller registers `fileno()` with `loop.add_reader`,
so an idle agent sleeps in epoll instead of polling files. `Inotify()` raises
`OSError` where inotify is unavailable (no libc symbol, a kernel without it,
seccomp); callers then fall back to stat polling.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import NamedTuple

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_READ_SIZE = 64 * 1024


class Event(NamedTuple):
    wd: int
    mask: int
    name: str


def _load_libc() -> ctypes.CDLL:
    # The interpreter's own symbols include libc (glibc and musl); ctypes.util.find_library would run
    # ldconfig and import half the standard library to find it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


class Inotify:
    """One inotify instance. Not thread-safe; used from the event loop only."""

    def __init__(self) -> None:
        try:
            self._libc = _load_libc()
        except (OSError, AttributeError) as e:
            raise OSError(f"inotify is not available: {e}") from None
        fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: str, mask: int) -> int:
        """Watch `path` (symlinks followed); returns the watch descriptor. Adding
        a watch for an inode already watched returns its existing descriptor."""
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def rm_watch(self, wd: int) -> None:
        """Remove a watch; a watch the kernel already dropped is not an error."""
        self._libc.inotify_rm_watch(self._fd, wd)

    def read_events(self) -> list[Event]:
        """Every event waiting now (empty when there are none)."""
        events: list[Event] = []
        while True:
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return events
            if not buf:
                return events
            offset = 0
            end = len(buf)
            while offset + _EVENT_HEADER.size <= end:
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buf, offset)
                offset += _EVENT_HEADER.size
                name = buf[offset : offset + length].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                offset += length
                events.append(Event(wd, mask, name))
            if len(buf) < _READ_SIZE // 2:
                return events

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

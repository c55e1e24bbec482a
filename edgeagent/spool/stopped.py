"""Reading a stopped agent's spool exactly as the agent left it.

Owns how `Spool.open_readonly` connects when no agent holds the run lock. An
ordinary read-only connection to a WAL-mode file is not read-only for the
directory: SQLite creates the `-wal` file and a 32 KiB `-shm` file when they
are missing and leaves them behind, and the first connection to a `-shm` file
a killed agent left truncates and rebuilds it. On a stopped device `status`
and `spool dump` must change nothing (flash writes, files the agent did not
make, and on a full or read-only disk the open fails instead), so:

- without a `-wal` file, or with one that holds no committed transaction (empty,
  a header alone, frames of a transaction the agent never committed), all that
  was committed is in the database file: it is read with `immutable=1` (no
  `-shm`, no `-wal`, no lock, no write);
- a `-wal` with commits (an agent killed with SIGKILL, or a power cut) holds
  committed data that `immutable` would not see: it is read with the WAL index
  in this process's memory (`locking_mode=EXCLUSIVE` before the first read: no
  `-shm`), without locks (the `unix-none` VFS: nobody else uses the files) and
  with the database file opened read-only, so the checkpoint SQLite attempts
  when the connection closes cannot write and the WAL stays as it is.

Whether a WAL holds a commit is decided here by the WAL file format (header,
salts, cumulative checksums), the way SQLite recovers a WAL: a WAL without one
would be deleted by that close-time checkpoint, which has nothing to copy.
Nothing here ever writes; what guarantees the figures is that no agent runs
while they are read: `Spool.read_readonly` reads again when the run lock
changed hands meanwhile.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

from edgeagent.spool.database import connect_readonly

_WAL_MAGIC = 0x377F0682  # | 1: checksums over big-endian words
_WAL_VERSION = 3007000
_WAL_HEADER, _FRAME_HEADER = 32, 24


def is_wal_file(path: Path) -> bool:
    """True when the database header says WAL (read version 2 at byte 19, what SQLite goes by)."""
    with open(path, "rb") as f:
        header = f.read(20)
    return len(header) == 20 and header[19] == 2


def connect_as_left(path: Path, uri: str) -> sqlite3.Connection:
    """A read-only connection to the WAL-mode spool `path` (at `uri`) of a
    stopped agent that creates, writes and deletes nothing (see the module
    docstring). Raises sqlite3.Error or OSError."""
    if wal_holds_commits(Path(f"{path}-wal")):
        return connect_readonly(f"{uri}?mode=ro&vfs=unix-none", exclusive=True)
    return connect_readonly(f"{uri}?mode=ro&immutable=1")


def wal_holds_commits(wal: Path) -> bool:
    """True when `wal` has a valid header followed by valid frames up to a
    commit frame, as SQLite's WAL recovery reads it: frames whose salts match
    the header's and whose cumulative checksum holds; the first that does not
    ends the log. False when there is no such file."""
    try:
        f = open(wal, "rb")  # noqa: SIM115 - closed below, on every path
    except FileNotFoundError:
        return False
    with f:
        header = f.read(_WAL_HEADER)
        if len(header) < _WAL_HEADER:
            return False
        magic, version, page_size = struct.unpack(">III", header[:12])
        valid_size = 512 <= page_size <= 65536 and not page_size & (page_size - 1)
        if magic & ~1 != _WAL_MAGIC or version != _WAL_VERSION or not valid_size:
            return False
        order = ">" if magic & 1 else "<"
        checksum = _checksum(header[:24], (0, 0), order)
        if checksum != struct.unpack(">II", header[24:32]):
            return False
        while len(frame := f.read(_FRAME_HEADER + page_size)) == _FRAME_HEADER + page_size:
            page, commit_size = struct.unpack(">II", frame[:8])
            checksum = _checksum(frame[_FRAME_HEADER:], _checksum(frame[:8], checksum, order), order)
            if page == 0 or frame[8:16] != header[16:24] or checksum != struct.unpack(">II", frame[16:24]):
                return False
            if commit_size:
                return True
    return False


def _checksum(data: bytes, seed: tuple[int, int], order: str) -> tuple[int, int]:
    """SQLite's WAL checksum of `data` (a multiple of 8 bytes), continuing from `seed`."""
    s1, s2 = seed
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2

"""The SQLite file under the spool: connecting, pragmas, schema version,
checks, quarantine, transactions and the errors that tell them apart.

Unavailable is not corrupt (guarantee 6): disk full, I/O errors, a read-only
file system, permissions and locks raise `SpoolUnavailable` at open (the files
are left exactly as they were; the caller waits and retries) and
`sqlite3.OperationalError` from a write (nothing stored; the caller keeps it).

Corruption: only SQLITE_CORRUPT / SQLITE_NOTADB, a failed quick_check or a
failed checksum count (`is_corruption`). Such a file is moved aside as
`spool.db.corrupt-<time>` (`quarantine`) and salvaged (see `salvage`).

A fresh file (user_version 0, no tables) gets the current schema in-process
from `snapshot`, in one transaction. Only a file that exists at an older
version is migrated, in a child process (`SchemaChild`: `python -m
edgeagent.spool.schema`), so the agent never imports sqlite-utils. The child
dies with the agent (PR_SET_PDEATHSIG). Every file is created 0600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeagent.children import die_with_parent
from edgeagent.errors import SpoolError
from edgeagent.spool.snapshot import SCHEMA_VERSION, create_if_fresh
from edgeagent.statedir import filesystem_type

log = logging.getLogger("edgeagent.spool")

_VACUUM_SLACK = 1024 * 1024
_DISK_MARGIN = 64 * 1024
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_FILE_MODE, _DIR_MODE = 0o600, 0o700
_SCHEMA_CHILD_TIMEOUT = 120.0  # seconds; SQLite's own busy timeout in the child is 10 s

_CHUNK_COLUMNS = (
    "id, chunk_id, created_ns, boot_id, clock_offset_ns, clock_synced, records, raw_bytes, max_severity, payload, crc32"
)


class _Corrupt(sqlite3.DatabaseError):
    """A check of ours found corruption (quick_check, checksum)."""


def is_corruption(error: BaseException) -> bool:
    """True only for real corruption: SQLITE_CORRUPT / SQLITE_NOTADB or a
    failed check. Disk full, I/O errors, read-only and locked are not."""
    if isinstance(error, _Corrupt):
        return True
    code = getattr(error, "sqlite_errorcode", None)
    return (
        isinstance(error, sqlite3.DatabaseError)
        and code is not None
        and code & 0xFF
        in (
            _SQLITE_CORRUPT,
            _SQLITE_NOTADB,
        )
    )


def wal_limit_for(max_size: int) -> int:
    """The WAL is checkpointed and truncated near this size: an eighth of the
    cap, between 256KiB and 4MiB."""
    return min(max(max_size // 8, 256 * 1024), 4 * 1024 * 1024)


def _disk_room(path: Path, own_free: int = 0) -> int:
    """Bytes the spool could occupy: its files now plus what the filesystem
    has free for unprivileged writers, less a small safety margin. When less
    than the margin is free, not counting `own_free` (the reserve the spool
    released itself), something else filled the disk: evicting would not make
    room for long, so the room is unbounded here and the next write fails
    instead (the batcher waits; nothing is dropped)."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return 1 << 62
    if st.f_bavail * st.f_frsize - own_free < _DISK_MARGIN:
        return 1 << 62
    used = 0
    for suffix in ("", "-wal"):
        try:
            used += os.stat(str(path) + suffix).st_size
        except OSError:
            pass
    return max(used + st.f_bavail * st.f_frsize - _DISK_MARGIN, 0)


def _journal_mode(path: Path, journal: str) -> str:
    """What `[spool].journal` means for this file: "auto" is WAL, in the
    exclusive locking mode where memory maps cannot be shared (JFFS2, cramfs)."""
    if journal == "auto":
        return "exclusive" if filesystem_type(path.parent) in ("jffs2", "cramfs") else "wal"
    return journal


def _connect(path: Path, durability: str, journal: str, max_size: int) -> tuple[sqlite3.Connection, str]:
    """Connect, migrate and check. Raises sqlite3 errors (corrupt or not)."""
    mode = _journal_mode(path, journal)
    _migrate(path, mode == "exclusive")
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        if mode == "exclusive":
            # No shared-memory file: WAL works where mmap cannot share pages (JFFS2).
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        if mode in ("wal", "exclusive"):
            got = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if got.lower() != "wal":
                log.warning("spool %s: WAL unavailable (journal_mode=%s); using a rollback journal", path, got)
                mode = "rollback"
        if mode == "rollback":
            conn.execute("PRAGMA journal_mode = TRUNCATE")
        conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
        wal_limit = wal_limit_for(min(max_size, _disk_room(path)))
        conn.execute(f"PRAGMA journal_size_limit = {wal_limit}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {max(wal_limit // 4096, 16)}")
        # Debian builds SQLite with secure_delete on: every acknowledged
        # chunk would be overwritten with zeros, a second flash write of
        # everything uploaded. Log lines are not secrets the spool must shred.
        conn.execute("PRAGMA secure_delete = OFF")
        # Chunks are written once and read once: a large page cache buys
        # nothing but resident memory (SQLite's default is 2 MiB).
        conn.execute("PRAGMA cache_size = -512")
        result = conn.execute("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            raise _Corrupt("quick_check: " + "; ".join(r[0] for r in result[:3]))
    except BaseException:
        conn.close()
        raise
    return conn, mode


def connect_readonly(uri: str, exclusive: bool = False) -> sqlite3.Connection:
    """A read-only connection to `uri`, read once (the first read opens the WAL,
    the -shm and takes the locks). `exclusive`: the locking mode that keeps the
    WAL index in this process's memory, set before that first read."""
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if exclusive:
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _create_if_fresh(path: Path, exclusive: bool) -> int:
    """The file's schema version, after creating the current schema from `snapshot` if the file is fresh."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    try:
        if exclusive:
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        return create_if_fresh(conn)
    finally:
        conn.close()


def _migrate(path: Path, exclusive: bool) -> None:
    """Bring the schema to `SCHEMA_VERSION`, or refuse a newer one.

    A fresh file gets the current schema in-process (`snapshot`: no child,
    no sqlite-utils). A file at an older version is migrated in a
    short-lived child process: the agent itself never imports sqlite-utils
    and its dependencies (click, dateutil, pluggy: 4 MiB of RSS kept for the
    life of the daemon). Upgrades are rare; a fresh spool, the common first
    start, needs no child.
    """
    version = _create_if_fresh(path, exclusive)
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"{path} was written by a newer edgeagent (spool schema {version}, this version reads up to "
            f"{SCHEMA_VERSION}); upgrade edgeagent or move the file aside"
        )
    if version < SCHEMA_VERSION:
        SchemaChild(path, exclusive).result()


class SchemaChild:
    """`python -m edgeagent.spool.schema PATH SCHEMA_VERSION [--exclusive]`
    running for one spool file: it migrates the schema (or creates it, in a
    version-0 file that already has other tables), and exits 3
    with `sqlite error <code>: <message>` on stderr when SQLite fails.

    Wait for it with `result()` or end it with `stop()` (both reap it: no
    zombie). The kernel kills the child when the thread that started it ends
    (`children.die_with_parent`): an agent killed while the child runs leaves
    no child behind.
    """

    def __init__(self, path: Path, exclusive: bool) -> None:
        self.path = path
        command = [sys.executable, "-m", "edgeagent.spool.schema", str(path), str(SCHEMA_VERSION)]
        self.process = subprocess.Popen(
            command + (["--exclusive"] if exclusive else []),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent(),
        )

    def result(self) -> None:
        """Wait for the child; raise what its failure means: `_Corrupt`
        (quarantine), `sqlite3.OperationalError` with the child's SQLite code
        (unavailable), `SpoolError` (anything else, e.g. no sqlite-utils), or
        `subprocess.TimeoutExpired` after 120 s (the child is killed)."""
        try:
            stderr = self.process.communicate(timeout=_SCHEMA_CHILD_TIMEOUT)[1]
        finally:
            self.stop()
        if self.process.returncode == 0:
            return
        detail = (stderr.strip().splitlines()[-1:] or ["no output"])[0]
        code = re.match(r"sqlite error (\d+): ", detail)
        if code is None:
            raise SpoolError(f"creating or migrating the spool schema of {self.path} failed: {detail}")
        error = sqlite3.OperationalError(detail)
        error.sqlite_errorcode = int(code.group(1))  # type: ignore[attr-defined]
        if is_corruption(error):
            raise _Corrupt(detail)
        raise error

    def stop(self) -> None:
        """Kill the child if it still runs, and reap it. Idempotent."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


def _quarantine(path: Path, reason: str) -> str:
    """Move a corrupt spool aside (its salvage follows, see `_salvage_pending`)."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now // 10**9)) + f".{now % 10**9:09d}"
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(aside) + suffix))
    return f"spool {path} is corrupt ({reason}); moved aside to {aside}"


def _secure_files(path: Path) -> None:
    """The spool and everything next to it is readable by the agent's user
    only: create the database file 0600 (SQLite gives its -wal and -shm the
    same mode) and tighten files an older version left more open."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, _FILE_MODE))
    for f in path.parent.glob(f"{path.name}*"):
        with contextlib.suppress(OSError):
            if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o077:
                os.chmod(f, _FILE_MODE)


class _Txn:
    """`BEGIN IMMEDIATE` ... `COMMIT`, with the sync level for this commit."""

    def __init__(self, conn: sqlite3.Connection, synchronous: str) -> None:
        self._conn = conn
        self._synchronous = synchronous

    def __enter__(self) -> sqlite3.Cursor:
        self._conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn.cursor()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        elif self._conn.in_transaction:  # SQLite may have rolled back by itself (disk full, I/O error)
            self._conn.execute("ROLLBACK")


def _bump(c: sqlite3.Cursor, counters: dict[str, int]) -> None:
    c.executemany(
        "INSERT INTO counters (name, value) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
        [(k, v) for k, v in counters.items() if v],
    )


def _delete_ids(c: sqlite3.Cursor, table: str, ids: Sequence[int]) -> None:
    for i in range(0, len(ids), 500):
        part = ids[i : i + 500]
        c.execute(f"DELETE FROM {table} WHERE id IN ({','.join('?' * len(part))})", part)

"""Opening, recovering and closing the spool file, and the reserve file.

`SpoolBase` holds the one connection (used from one thread, the event loop's)
and what every part of the spool shares: `_write()` opens one `BEGIN
IMMEDIATE` transaction, synced or not. `open()` creates, migrates and checks
the file; only a corrupt one is moved aside and salvaged, at open and when
corruption shows up while the agent runs (`_recover`). `read_readonly` is
how `status` and `spool dump` read a running or stopped agent's spool,
changing nothing in a stopped one's state dir (`stopped`), and reading again
when the run lock changed hands while they read.

The reserve: a preallocated 256 KiB `spool.db.reserve` is kept next to the
spool while the disk has room, and released on a full disk so that deletions
(acks, rejects) can still commit: deleting is how space comes back. Released
means truncated to nothing, not deleted: the empty file says, across restarts,
that the free space it gave back is the spool's own (`reserve_given_back`),
not room the disk has, until the disk has room to preallocate it again.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Self, TypeVar

from edgeagent.errors import SpoolError, SpoolUnavailable
from edgeagent.records import Record
from edgeagent.spool.database import (
    _DIR_MODE,
    _FILE_MODE,
    _VACUUM_SLACK,
    SCHEMA_VERSION,
    _connect,
    _quarantine,
    _secure_files,
    _Txn,
    connect_readonly,
    is_corruption,
    log,
)
from edgeagent.spool.salvage import PayloadCheck, _salvage_pending
from edgeagent.spool.stopped import connect_as_left, is_wal_file
from edgeagent.statedir import holder, lock_stamp

T = TypeVar("T")
_RESERVE_BYTES = 256 * 1024  # released on a full disk so that deletes (acks) can still commit


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class SpoolBase:
    """The open spool file; `Spool` adds the tables. Create with `Spool.open()`."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, max_size: int, durability: str, journal: str, dead_letters_max: int
    ) -> None:
        self._conn = conn
        self.path = path
        self.max_size = max_size
        self.durability = durability
        self.journal = journal
        self.dead_letters_max = dead_letters_max
        self._synchronous = "FULL" if durability == "full" else "NORMAL"
        self._journal_requested = journal
        self.events: list[str] = []  # what happened at open (quarantine, salvage), for the log
        self._losses: list[Record] = []  # loss records to ship (guarantee 5)
        # Outcomes the uploader reported that could not be written yet (disk full):
        # retried before every write, and those chunks are not handed out again.
        self._unrecorded_acks: set[int] = set()
        self._unrecorded_rejects: dict[int, str] = {}
        self._unrecorded_counters: dict[str, int] = {}
        self._reserve = Path(str(path) + ".reserve")
        self._check_payload: PayloadCheck | None = None  # for salvages while running (see `open`)
        self.read_as_is = ""  # why `open_readonly` read the file without its -shm and locks (see there)
        self.as_left = False  # `open_readonly` found no agent: read without locks, creating nothing (see there)
        row = conn.execute("SELECT COALESCE(SUM(length(payload)), 0), COUNT(*) FROM chunks").fetchone()
        self._payload_bytes: int = row[0]
        self._chunk_count: int = row[1]

    # --- opening ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        max_size: int = 64 * 1024**2,
        durability: str = "full",
        journal: str = "auto",
        dead_letters_max: int = 4 * 1024**2,
        check_payload: PayloadCheck | None = None,
    ) -> Self:
        """Open (create, migrate, check) the spool. Raises SpoolUnavailable when
        the disk or file cannot be used now (the files are left as they were),
        SpoolError when it never will be. Only a corrupt file is moved aside.
        `check_payload` (the codec's decode; it raises ValueError for a payload
        it cannot decode) decides which chunks a salvage keeps, besides CRC32."""
        path = Path(path)
        try:
            path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create state dir {path.parent}: {e.strerror}") from None
        if not os.access(path.parent, os.W_OK):
            reason = "read-only file system" if os.statvfs(path.parent).f_flag & os.ST_RDONLY else "permission denied"
            raise SpoolUnavailable(
                f"spool {path} is unavailable: state dir {path.parent} is not writable ({reason}; "
                "run as a user that owns it)"
            )
        events: list[str] = []
        try:
            _secure_files(path)
            try:
                conn, mode = _connect(path, durability, journal, max_size)
            except sqlite3.Error as e:
                if not is_corruption(e):
                    raise
                events.append(_quarantine(path, str(e)))
                conn, mode = _connect(path, durability, journal, max_size)
            try:
                losses = _salvage_pending(path, conn, check_payload)
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as e:
            raise SpoolUnavailable(f"spool {path} is unavailable: {e}") from None
        except OSError as e:
            raise SpoolUnavailable(f"spool {path} is unavailable: {e.strerror or e}") from None
        spool = cls(conn, path, max_size, durability, mode, dead_letters_max)
        spool._journal_requested = journal
        spool._check_payload = check_payload
        spool.events = events + [str(lost.body) for lost in losses]
        spool._losses = losses
        spool._ensure_reserve()
        return spool

    @classmethod
    def open_readonly(cls, path: Path) -> Self | None:
        """The spool of a running (or stopped) agent, for `status` and `spool
        dump`; None when there is no spool yet. Raises sqlite3.Error or
        OSError when it cannot be read.

        With no agent holding the run lock of the spool's directory, a WAL-mode
        file is read exactly as the agent left it, committed WAL content
        included, creating, writing and deleting nothing (see `stopped`).
        `as_left` is then true: such a read takes no lock, so an agent that
        starts meanwhile is not kept out; `read_readonly` reads again then.

        While an agent runs, the connection shares its WAL index (`-shm`),
        which SQLite creates and sizes (writes) if it is missing, even for a
        read-only connection: on a full disk that fails ("disk I/O error").
        Then, if no WAL or journal holds anything, everything committed is in
        the file itself, and it is read as it is (`immutable`: no -shm, no
        lock, no write); `read_as_is` says why. Otherwise the error is raised."""
        path = Path(path)
        if not path.exists():
            return None
        uri = "file:" + urllib.parse.quote(str(path))  # a '?' or '#' in the path is not the URI's
        as_left, reason = holder(path.parent)[0] is None and is_wal_file(path), ""
        if as_left:
            conn = connect_as_left(path, uri)
        else:
            try:
                conn = connect_readonly(f"{uri}?mode=ro")
            except sqlite3.OperationalError as e:
                if any(_size(Path(f"{path}{suffix}")) for suffix in ("-wal", "-journal")):
                    raise
                conn, reason = connect_readonly(f"{uri}?mode=ro&immutable=1"), str(e)
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            conn.close()
            return None
        spool = cls(conn, path, 0, "full", "readonly", 0)
        spool.read_as_is, spool.as_left = reason, as_left
        return spool

    @classmethod
    def read_readonly(cls, path: Path, read: Callable[[Self | None], T]) -> T:
        """What `read` returns for the spool at `path`, opened with
        `open_readonly` (None: no spool yet) and closed after: `status` and
        `spool dump` read through this. When the run lock changed hands while
        it read (an agent took it, maybe released it again), what it returned
        or raised may mix the stopped agent's files with the new one's writes:
        a read without locks does not keep an agent out. Then it reads once
        more, and that read is what counts: an agent that still holds the lock
        is read the running agent's way (its WAL index and SQLite's locks, never
        its WAL as if stopped). Raises what opening or `read` raise."""
        path = Path(path)
        before = lock_stamp(path.parent)
        try:
            result = cls._read_once(path, read)
        except Exception:
            if lock_stamp(path.parent) == before:
                raise
        else:
            if lock_stamp(path.parent) == before:
                return result
        return cls._read_once(path, read)

    @classmethod
    def _read_once(cls, path: Path, read: Callable[[Self | None], T]) -> T:
        spool = cls.open_readonly(path)
        try:
            return read(spool)
        finally:
            if spool is not None:
                spool._conn.close()  # read-only: nothing to write back

    def take_losses(self) -> list[Record]:
        """Loss records about the spool itself to ship (built by `loss.record`):
        quarantines and what their salvage could not recover."""
        losses, self._losses = self._losses, []
        return losses

    # --- the reserve: room for deletes on a full disk ---------------------------------

    def _ensure_reserve(self) -> None:
        """Keep a small preallocated file next to the spool while the disk has
        room. On a full disk it is released so that acknowledged chunks can
        still be deleted: deleting is how space comes back."""
        if self.journal == "readonly" or self._reserve_size() >= _RESERVE_BYTES:
            return
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < 8 * _RESERVE_BYTES:
                return
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, _FILE_MODE)
            try:
                os.posix_fallocate(fd, 0, _RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            self._reserve.unlink(missing_ok=True)

    def reserve_given_back(self) -> int:
        """Bytes of the reserve released to the file system (it is kept, empty,
        until the disk has room for it again): free space that is the spool's
        own, not room another program left."""
        size = self._reserve_size()
        return _RESERVE_BYTES - size if size >= 0 else 0  # -1: never created (no room then) or removed by hand

    def _reserve_size(self) -> int:
        """The reserve file's size; -1 when there is none. One stat: it runs for every append."""
        try:
            return os.stat(self._reserve).st_size
        except OSError:
            return -1

    def _release_reserve(self) -> bool:
        if self._reserve_size() <= 0:
            return False
        try:
            os.truncate(self._reserve, 0)
        except OSError:
            return False
        log.warning(
            "disk full under %s: released the %d byte reserve to record deletions", self.path.parent, _RESERVE_BYTES
        )
        return True

    # --- transactions -------------------------------------------------------------

    def _write(self, synced: bool) -> _Txn:
        return _Txn(self._conn, self._synchronous if synced else "NORMAL")

    def _recover(self, reason: str) -> None:
        self._conn.close()
        self.events = [_quarantine(self.path, reason)]
        self._conn, self.journal = _connect(self.path, self.durability, self._journal_requested, self.max_size)
        losses = _salvage_pending(self.path, self._conn, self._check_payload)
        self.events += [str(lost.body) for lost in losses]
        self._losses += losses
        self._unrecorded_acks.clear()  # the salvage copied what was in the file; ids are the same
        self._unrecorded_rejects.clear()
        row = self._conn.execute("SELECT COALESCE(SUM(length(payload)), 0), COUNT(*) FROM chunks").fetchone()
        self._payload_bytes, self._chunk_count = row
        for event in self.events:
            log.error("%s", event)

    def _retrying_full(self, write: Callable[[], None]) -> None:
        """Run `write`; on a full disk release the reserve (and let SQLite
        checkpoint into it) and try once more."""
        try:
            write()
        except sqlite3.OperationalError:
            if not self._release_reserve():
                raise
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            write()

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (when idle or stopping)."""
        if self.journal in ("wal", "exclusive"):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _vacuum(self) -> None:
        page_size, free = self._conn.execute(
            "SELECT page_size, freelist_count FROM pragma_page_size, pragma_freelist_count"
        ).fetchone()
        slack = min(_VACUUM_SLACK, self.max_size // 16)
        if free * page_size > slack:
            keep = slack // 2 // page_size
            self._conn.execute(f"PRAGMA incremental_vacuum({free - keep})").fetchall()

    def file_sizes(self) -> dict[str, int]:
        sizes = {}
        for suffix in ("", "-wal", "-shm"):
            try:
                sizes["db" + suffix] = os.stat(str(self.path) + suffix).st_size
            except FileNotFoundError:
                pass
        return sizes

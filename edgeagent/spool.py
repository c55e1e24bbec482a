"""The durable spool: the only code that touches SQLite.

Owns `state_dir/spool.db`: chunks of compressed records waiting for upload,
source positions, boots (clock offsets for time correction), counters, dead
letters and the agent's status. One connection, used from one thread (the event
loop's); every write is one `BEGIN IMMEDIATE` transaction.

Durability (guarantee 1): `append()` stores a chunk and the source positions
it covers in one transaction, synced to disk before it returns when
`durability = "full"` (the default). Acks and status writes are not synced:
losing one to a power cut only resends a chunk (at-least-once) or shows an
older status, while saving a flash sync per acknowledgement.

Space (guarantee 4): the spool keeps the payload bytes it holds under
`max_size` — or the room the filesystem has, if less — minus room for the WAL
and free pages, evicting the least valuable chunks first (below WARN before
the rest, oldest first) and counting what it dropped. Free pages go back to
the filesystem by incremental vacuum once they exceed `_VACUUM_SLACK`; SQLite
checkpoints the WAL every `wal_limit_for(cap)` bytes and truncates it to that
size; the agent truncates it fully when it stops.

Unavailable is not corrupt (guarantee 6): disk full, I/O errors, a read-only
file system, permissions and locks raise `SpoolUnavailable` at open (the files
are left exactly as they were; the caller waits and retries) and
`sqlite3.OperationalError` from `append` (nothing stored; the caller keeps it).
Acks and rejects never raise for a full disk: a preallocated reserve file is
released so that deletions can commit, and an outcome that still cannot be
written is remembered, kept from the uploader and retried before every write.

Corruption: only SQLITE_CORRUPT / SQLITE_NOTADB, a failed quick_check or a
failed checksum count. Such a spool is moved aside as
`spool.db.corrupt-<time>`, what can still be read from it (positions, boots,
counters, chunks whose checksums verify) is copied into a fresh spool in one
transaction, what could not be is counted and handed out as a loss record
(`take_losses`), and only then is the copy renamed `.salvaged-<time>`; copies
not salvaged yet are never deleted. Every file is created 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.statedir import filesystem_type

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_WARN = 13
_VACUUM_SLACK = 1024 * 1024
_QUARANTINE_KEEP = 2  # salvaged copies kept for inspection; copies not salvaged yet are never deleted
_DISK_MARGIN = 64 * 1024
_RESERVE_BYTES = 256 * 1024  # released on a full disk so that deletes (acks) can still commit
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_FILE_MODE, _DIR_MODE = 0o600, 0o700

_CHUNK_COLUMNS = (
    "id, chunk_id, created_ns, boot_id, clock_offset_ns, clock_synced, records, raw_bytes, max_severity, payload, crc32"
)


class SpoolError(Exception):
    """The spool cannot be used (newer schema, unwritable state dir)."""


class SpoolUnavailable(SpoolError):
    """The spool cannot be opened or written right now (disk full, I/O error,
    read-only file system, permission, locked). Nothing was changed: wait and
    retry. Never a reason to quarantine."""


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


@dataclass(frozen=True, slots=True)
class NewChunk:
    """A chunk ready to store: `payload` is the zstd-compressed wire payload."""

    payload: bytes
    records: int
    raw_bytes: int
    max_severity: int
    boot_id: str
    clock_offset_ns: int
    clock_synced: bool
    created_ns: int = field(default_factory=time.time_ns)


@dataclass(frozen=True, slots=True)
class StoredChunk:
    id: int
    chunk_id: str
    created_ns: int
    boot_id: str
    clock_offset_ns: int
    clock_synced: bool
    records: int
    raw_bytes: int
    max_severity: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Eviction:
    """What one eviction pass dropped to stay under the size cap."""

    chunks: int
    records: int
    bytes: int
    oldest_ns: int
    newest_ns: int
    max_severity: int


def wal_limit_for(max_size: int) -> int:
    """The WAL is checkpointed and truncated near this size: an eighth of the
    cap, between 256KiB and 4MiB."""
    return min(max(max_size // 8, 256 * 1024), 4 * 1024 * 1024)


def _disk_room(path: Path) -> int:
    """Bytes the spool could occupy: its files now plus what the filesystem
    has free for unprivileged writers, less a small safety margin. When less
    than the margin is free, something else filled the disk: evicting would
    not make room for long, so the room is unbounded here and the next write
    fails instead (the batcher waits; nothing is dropped)."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return 1 << 62
    if st.f_bavail * st.f_frsize < _DISK_MARGIN:
        return 1 << 62
    used = 0
    for suffix in ("", "-wal"):
        try:
            used += os.stat(str(path) + suffix).st_size
        except OSError:
            pass
    return max(used + st.f_bavail * st.f_frsize - _DISK_MARGIN, 0)


class Spool:
    """See the module docstring. Create with `Spool.open()`."""

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
        self._losses: list[tuple[str, dict[str, Any]]] = []  # loss records to ship (guarantee 5)
        # Outcomes the uploader reported that could not be written yet (disk full):
        # retried before every write, and those chunks are not handed out again.
        self._unrecorded_acks: set[int] = set()
        self._unrecorded_rejects: dict[int, str] = {}
        self._unrecorded_counters: dict[str, int] = {}
        self._reserve = Path(str(path) + ".reserve")
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
    ) -> Spool:
        """Open (create, migrate, check) the spool. Raises SpoolUnavailable when
        the disk or file cannot be used now (the files are left as they were),
        SpoolError when it never will be. Only a corrupt file is moved aside."""
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
                conn, mode = cls._connect(path, durability, journal, max_size)
            except sqlite3.Error as e:
                if not is_corruption(e):
                    raise
                events.append(cls._quarantine(path, str(e)))
                conn, mode = cls._connect(path, durability, journal, max_size)
            try:
                losses = _salvage_pending(path, conn)
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as e:
            raise SpoolUnavailable(f"spool {path} is unavailable: {e}") from None
        except OSError as e:
            raise SpoolUnavailable(f"spool {path} is unavailable: {e.strerror or e}") from None
        spool = cls(conn, path, max_size, durability, mode, dead_letters_max)
        spool._journal_requested = journal
        spool.events = events + [text for text, _ in losses]
        spool._losses = losses
        spool._ensure_reserve()
        return spool

    @staticmethod
    def _connect(path: Path, durability: str, journal: str, max_size: int) -> tuple[sqlite3.Connection, str]:
        """Connect, migrate and check. Raises sqlite3 errors (corrupt or not)."""
        mode = journal
        if journal == "auto":
            mode = "exclusive" if filesystem_type(path.parent) in ("jffs2", "cramfs") else "wal"
        Spool._migrate(path, exclusive=mode == "exclusive")
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

    @staticmethod
    def _migrate(path: Path, exclusive: bool) -> None:
        """Bring the schema to `SCHEMA_VERSION`, or refuse a newer one.

        Schema work (sqlite-utils) runs in a short-lived child process: the
        agent itself never imports sqlite-utils and its dependencies (click,
        dateutil, pluggy: 4 MiB of RSS kept for the life of the daemon).
        """
        probe = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
        finally:
            probe.close()
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"{path} was written by a newer edgeagent (spool schema {version}, this version reads up to "
                f"{SCHEMA_VERSION}); upgrade edgeagent or move the file aside"
            )
        if version == SCHEMA_VERSION:
            return
        command = [sys.executable, "-m", "edgeagent.schema", str(path)] + (["--exclusive"] if exclusive else [])
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines()[-1:] or ["no output"])[0]
            code = re.match(r"sqlite error (\d+): ", detail)
            if code is None:
                raise SpoolError(f"creating or migrating the spool schema of {path} failed: {detail}")
            error = sqlite3.OperationalError(detail)
            error.sqlite_errorcode = int(code.group(1))  # type: ignore[attr-defined]
            if is_corruption(error):
                raise _Corrupt(detail)
            raise error

    @staticmethod
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

    @classmethod
    def open_readonly(cls, path: Path) -> Spool | None:
        """The spool of a running (or stopped) agent, for `status` and `spool
        dump`; None when there is no spool yet."""
        path = Path(path)
        if not path.exists():
            return None
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5.0)
        conn.execute("PRAGMA busy_timeout = 5000")
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            conn.close()
            return None
        return cls(conn, path, 0, "full", "readonly", 0)

    def close(self) -> None:
        try:
            self.retry_unrecorded()
            self.checkpoint()
        except sqlite3.Error:
            pass
        self._conn.close()

    def take_losses(self) -> list[tuple[str, dict[str, Any]]]:
        """Loss records (text, attributes) about the spool itself to ship:
        quarantines and what their salvage could not recover."""
        losses, self._losses = self._losses, []
        return losses

    # --- the reserve: room for deletes on a full disk ---------------------------------

    def _ensure_reserve(self) -> None:
        """Keep a small preallocated file next to the spool while the disk has
        room. On a full disk it is released so that acknowledged chunks can
        still be deleted: deleting is how space comes back."""
        if self.journal == "readonly" or self._reserve.exists():
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

    def _release_reserve(self) -> bool:
        try:
            self._reserve.unlink()
        except OSError:
            return False
        log.warning(
            "disk full under %s: released the %d byte reserve to record deletions", self.path.parent, _RESERVE_BYTES
        )
        return True

    # --- writing ------------------------------------------------------------------

    def _write(self, synced: bool) -> _Txn:
        return _Txn(self._conn, self._synchronous if synced else "NORMAL")

    def append(
        self,
        chunks: Sequence[NewChunk] = (),
        positions: dict[str, str | None] | None = None,
        counters: dict[str, int] | None = None,
        boot: tuple[str, int, bool] | None = None,
    ) -> list[Eviction]:
        """Store `chunks` and `positions` (None: delete that position) in one
        synced transaction.

        `boot` = (boot_id, clock_offset_ns, synced) records the boot's clock
        offset for time correction at upload. Returns what had to be evicted
        to make room (the caller ships a record about it). Raises
        sqlite3.OperationalError when the disk cannot take the write (full,
        I/O error, read-only): nothing was stored, the caller keeps it and
        retries.
        """
        self.retry_unrecorded()
        incoming = sum(len(c.payload) for c in chunks)
        try:
            evictions = self._make_room(incoming) if chunks else []
            self._insert(chunks, positions, counters, boot)
        except sqlite3.DatabaseError as e:
            if not is_corruption(e):
                raise
            # Malformed pages found while the agent runs (flash errors): the
            # same treatment as at start-up, then the write goes to the new file.
            self._recover(str(e))
            evictions = []
            self._insert(chunks, positions, counters, boot)
        self._payload_bytes += incoming
        self._chunk_count += len(chunks)
        self._ensure_reserve()
        return evictions

    def _recover(self, reason: str) -> None:
        self._conn.close()
        self.events = [self._quarantine(self.path, reason)]
        self._conn, self.journal = self._connect(self.path, self.durability, self._journal_requested, self.max_size)
        losses = _salvage_pending(self.path, self._conn)
        self.events += [text for text, _ in losses]
        self._losses += losses
        self._unrecorded_acks.clear()  # the salvage copied what was in the file; ids are the same
        self._unrecorded_rejects.clear()
        row = self._conn.execute("SELECT COALESCE(SUM(length(payload)), 0), COUNT(*) FROM chunks").fetchone()
        self._payload_bytes, self._chunk_count = row
        for event in self.events:
            log.error("%s", event)

    def _insert(
        self,
        chunks: Sequence[NewChunk],
        positions: dict[str, str | None] | None,
        counters: dict[str, int] | None,
        boot: tuple[str, int, bool] | None,
    ) -> None:
        now = time.time_ns()
        with self._write(synced=True) as c:
            if chunks:
                c.executemany(
                    "INSERT INTO chunks (chunk_id, created_ns, boot_id, clock_offset_ns, clock_synced, records, "
                    "raw_bytes, max_severity, payload, crc32) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            uuid.uuid4().hex,
                            chunk.created_ns,
                            chunk.boot_id,
                            chunk.clock_offset_ns,
                            int(chunk.clock_synced),
                            chunk.records,
                            chunk.raw_bytes,
                            chunk.max_severity,
                            chunk.payload,
                            zlib.crc32(chunk.payload),
                        )
                        for chunk in chunks
                    ],
                )
                _bump(
                    c,
                    {
                        "spooled_chunks": len(chunks),
                        "spooled_records": sum(ch.records for ch in chunks),
                        "spooled_raw_bytes": sum(ch.raw_bytes for ch in chunks),
                    },
                )
            if positions:
                c.executemany(
                    "INSERT INTO positions (key, value, updated_ns) VALUES (?,?,?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_ns = excluded.updated_ns",
                    [(k, v, now) for k, v in positions.items() if v is not None],
                )
                c.executemany("DELETE FROM positions WHERE key = ?", [(k,) for k, v in positions.items() if v is None])
            if counters:
                _bump(c, counters)
            if boot is not None:
                c.execute(
                    "INSERT INTO boots (boot_id, clock_offset_ns, synced, first_seen_ns, updated_ns) "
                    "VALUES (?,?,?,?,?) ON CONFLICT(boot_id) DO UPDATE SET clock_offset_ns = excluded.clock_offset_ns, "
                    "synced = excluded.synced, updated_ns = excluded.updated_ns",
                    (boot[0], boot[1], int(boot[2]), now, now),
                )

    def _budget(self) -> int:
        """Payload bytes the spool may hold: the cap — or the room the
        filesystem has, if that is less — less room for the WAL, free pages
        and dead letters. Watching the filesystem keeps a spool whose cap is
        above the free space from ever hitting ENOSPC: a WAL that cannot be
        checkpointed on a full disk would stop all writes."""
        cap = min(self.max_size, _disk_room(self.path))
        reserve = wal_limit_for(cap) + min(_VACUUM_SLACK, cap // 16) + min(self.dead_letters_max, cap // 8)
        return max(cap - reserve, cap // 2)

    def _make_room(self, incoming: int, need: int = 0) -> list[Eviction]:
        if not need:
            budget = self._budget()
            if self._payload_bytes + incoming <= budget:
                return []
            need = self._payload_bytes + incoming - budget
        victims = self._conn.execute(
            "SELECT id, records, length(payload), created_ns, max_severity FROM chunks "
            f"ORDER BY max_severity >= {_WARN}, id",
        )
        chosen: list[tuple[int, int, int, int, int]] = []
        freed = 0
        for row in victims:
            chosen.append(row)
            freed += row[2]
            if freed >= need:
                break
        victims.close()
        if not chosen:
            return []
        ids = [r[0] for r in chosen]
        ev = Eviction(
            chunks=len(chosen),
            records=sum(r[1] for r in chosen),
            bytes=freed,
            oldest_ns=min(r[3] for r in chosen),
            newest_ns=max(r[3] for r in chosen),
            max_severity=max(r[4] for r in chosen),
        )
        with self._write(synced=False) as c:
            _delete_ids(c, "chunks", ids)
            _bump(c, {"evicted_chunks": ev.chunks, "evicted_records": ev.records, "evicted_bytes": ev.bytes})
        self._payload_bytes -= freed
        self._chunk_count -= len(chosen)
        log.warning("spool full (%d bytes cap): evicted %d chunks, %d records", self.max_size, ev.chunks, ev.records)
        self._vacuum()
        return [ev]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged chunks. Returns how many were still there.

        Never raises for a full disk: if the deletion cannot be written (even
        after releasing the reserve), it is remembered, retried before every
        later write, and the chunks are not handed out again meanwhile."""
        ids = [i for i in ids if i not in self._unrecorded_acks]
        if not ids:
            return 0
        rows = self._select_ids("id, records, length(payload)", "chunks", ids)
        try:
            self._retrying_full(lambda: self._delete_acked(rows))
        except sqlite3.OperationalError as e:
            if not self._unrecorded_acks and not self._unrecorded_rejects:
                log.error("recording %d acknowledgements failed (%s); retrying until it works", len(rows), e)
            self._unrecorded_acks.update(r[0] for r in rows)
        return len(rows)

    def _delete_acked(self, rows: list[tuple[Any, ...]]) -> None:
        with self._write(synced=False) as c:
            _delete_ids(c, "chunks", [r[0] for r in rows])
            _bump(c, {"acked_chunks": len(rows), "acked_records": sum(r[1] for r in rows)})
        self._payload_bytes -= sum(r[2] for r in rows)
        self._chunk_count -= len(rows)
        self._vacuum()

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

    def retry_unrecorded(self) -> None:
        """Write the acknowledgements and refusals that could not be written
        before (disk full). Raises nothing: what still fails stays remembered."""
        if self._unrecorded_counters:
            self.add_counters({})
        if not (self._unrecorded_acks or self._unrecorded_rejects):
            return
        acks, self._unrecorded_acks = list(self._unrecorded_acks), set()
        rejects, self._unrecorded_rejects = dict(self._unrecorded_rejects), {}
        if acks:
            self.ack(acks)
        for reason in dict.fromkeys(rejects.values()):
            self.reject([i for i, r in rejects.items() if r == reason], reason)
        if not (self._unrecorded_acks or self._unrecorded_rejects):
            log.warning("recorded the acknowledgements and refusals that had failed")

    def reject(self, ids: Iterable[int], reason: str) -> int:
        """Move chunks the receiver refused for good into dead letters. On a
        full disk the move is remembered and retried (see `ack`)."""
        ids = [i for i in ids if i not in self._unrecorded_rejects]
        rows = self._select_ids(_CHUNK_COLUMNS, "chunks", ids)
        if not rows:
            return 0
        try:
            self._retrying_full(lambda: self._move_to_dead_letters(rows, reason))
        except sqlite3.OperationalError as e:
            if not self._unrecorded_acks and not self._unrecorded_rejects:
                log.error("recording %d refused chunks failed (%s); retrying until it works", len(rows), e)
            self._unrecorded_rejects.update((r[0], reason) for r in rows)
            return len(rows)
        log.error("receiver rejected %d chunks for good: %s", len(rows), reason)
        return len(rows)

    def _move_to_dead_letters(self, rows: list[tuple[Any, ...]], reason: str) -> None:
        now = time.time_ns()
        with self._write(synced=True) as c:
            c.executemany(
                "INSERT INTO dead_letters (chunk_id, created_ns, rejected_ns, reason, records, payload) "
                "VALUES (?,?,?,?,?,?)",
                [(r[1], r[2], now, reason, r[6], r[9]) for r in rows],
            )
            _delete_ids(c, "chunks", [r[0] for r in rows])
            _bump(c, {"dead_letter_chunks": len(rows), "dead_letter_records": sum(r[6] for r in rows)})
            self._trim_dead_letters(c)
        self._payload_bytes -= sum(len(r[9]) for r in rows)
        self._chunk_count -= len(rows)

    def _trim_dead_letters(self, c: sqlite3.Cursor) -> None:
        total = c.execute("SELECT COALESCE(SUM(length(payload)), 0) FROM dead_letters").fetchone()[0]
        if total <= self.dead_letters_max:
            return
        dropped = dropped_records = 0
        for dl_id, size, records in c.execute(
            "SELECT id, length(payload), records FROM dead_letters ORDER BY id"
        ).fetchall():
            if total <= self.dead_letters_max:
                break
            c.execute("DELETE FROM dead_letters WHERE id = ?", (dl_id,))
            total -= size
            dropped += 1
            dropped_records += records
        _bump(c, {"dead_letters_dropped": dropped, "dead_letters_dropped_records": dropped_records})

    def replace_payload(self, chunk_id: int, payload: bytes, clock_offset_ns: int) -> None:
        """Swap a chunk's payload after a time correction (to `clock_offset_ns`, now
        marked synced) without changing its id."""
        old = self._conn.execute("SELECT length(payload) FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
        if old is None:
            return
        try:
            with self._write(synced=False) as c:
                c.execute(
                    "UPDATE chunks SET payload = ?, crc32 = ?, clock_offset_ns = ?, clock_synced = 1 WHERE id = ?",
                    (payload, zlib.crc32(payload), clock_offset_ns, chunk_id),
                )
        except sqlite3.OperationalError as e:  # a full disk: the correction is made again next time
            log.warning("could not store the time-corrected payload of chunk %d: %s", chunk_id, e)
            return
        self._payload_bytes += len(payload) - old[0]

    def split(self, chunk: StoredChunk, payloads: Sequence[tuple[bytes, int]]) -> list[int]:
        """Replace a chunk by several (payload, records) parts, in its place in
        the upload order. Parts get ids `<chunk_id>.<n>` so receivers can still
        deduplicate."""
        with self._write(synced=True) as c:
            c.execute("DELETE FROM chunks WHERE id = ?", (chunk.id,))
            new_ids = []
            for n, (payload, records) in enumerate(payloads):
                c.execute(
                    "INSERT INTO chunks (chunk_id, created_ns, boot_id, clock_offset_ns, clock_synced, records, "
                    "raw_bytes, max_severity, payload, crc32) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        f"{chunk.chunk_id}.{n}",
                        chunk.created_ns,
                        chunk.boot_id,
                        chunk.clock_offset_ns,
                        int(chunk.clock_synced),
                        records,
                        chunk.raw_bytes * records // max(chunk.records, 1),
                        chunk.max_severity,
                        payload,
                        zlib.crc32(payload),
                    ),
                )
                new_ids.append(int(c.lastrowid or 0))
            _bump(c, {"split_extra_chunks": len(payloads) - 1})  # keeps the chunk count a salvage expects
        # New rows sort after newer chunks; upload order is by id, so the parts
        # go out after what was queued behind the original. Receivers order by time.
        self._payload_bytes += sum(len(p) for p, _ in payloads) - len(chunk.payload)
        self._chunk_count += len(payloads) - 1
        return new_ids

    def add_counters(self, counters: dict[str, int]) -> None:
        """Add to counters. On a full disk they are kept and written with the
        next write that succeeds (never raises for it)."""
        for name, value in counters.items():
            self._unrecorded_counters[name] = self._unrecorded_counters.get(name, 0) + value
        try:
            with self._write(synced=False) as c:
                _bump(c, self._unrecorded_counters)
        except sqlite3.OperationalError as e:
            log.warning("counters kept in memory until the spool accepts writes: %s", e)
            return
        self._unrecorded_counters = {}

    def set_status(self, entries: dict[str, Any]) -> None:
        """Publish status for `edgeagent status` (JSON values, not synced)."""
        now = time.time_ns()
        with self._write(synced=False) as c:
            c.executemany(
                "INSERT INTO status (key, value, updated_ns) VALUES (?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_ns = excluded.updated_ns",
                [(k, json.dumps(v), now) for k, v in entries.items()],
            )

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

    # --- reading ------------------------------------------------------------------

    def oldest(self, n: int, after_id: int = 0) -> list[StoredChunk]:
        """Up to `n` chunks with id > `after_id`, oldest first. The statement is
        finished before returning, so no read transaction stays open while
        the caller works on the network (it would block checkpoints)."""
        query = f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE id > ? ORDER BY id LIMIT ?"
        try:
            rows = self._conn.execute(query, (after_id, n)).fetchall()
        except sqlite3.DatabaseError as e:
            if not is_corruption(e) or self.journal == "readonly":
                raise
            self._recover(str(e))
            rows = self._conn.execute(query, (after_id, n)).fetchall()
        if self._unrecorded_acks or self._unrecorded_rejects:
            rows = [r for r in rows if r[0] not in self._unrecorded_acks and r[0] not in self._unrecorded_rejects]
        good = [r for r in rows if zlib.crc32(r[9]) == r[10]]
        if len(good) < len(rows) and self.journal != "readonly":
            self._drop_corrupt([r for r in rows if zlib.crc32(r[9]) != r[10]])
        return [StoredChunk(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9]) for r in good]

    def _drop_corrupt(self, rows: list[tuple[Any, ...]]) -> None:
        """Chunks whose bytes changed on disk (flash bit rot, a torn write the
        integrity check cannot see inside a blob) are removed and counted:
        sending them would only make the receiver reject garbage. On a full
        disk they are only left out of what is handed out, and dropped later."""
        try:
            with self._write(synced=False) as c:
                _delete_ids(c, "chunks", [r[0] for r in rows])
                _bump(c, {"corrupt_chunks": len(rows), "corrupt_records": sum(r[6] for r in rows)})
        except sqlite3.OperationalError as e:
            log.warning("could not drop %d corrupt chunks yet: %s", len(rows), e)
            return
        self._payload_bytes -= sum(len(r[9]) for r in rows)
        self._chunk_count -= len(rows)
        log.error("dropped %d corrupt chunks (%d records): checksum mismatch", len(rows), sum(r[6] for r in rows))

    def positions(self, prefix: str = "") -> dict[str, str]:
        rows = self._conn.execute(
            "SELECT key, value FROM positions WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
        ).fetchall()
        return dict(rows)

    def delete_positions(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            with self._write(synced=False) as c:
                c.executemany("DELETE FROM positions WHERE key = ?", [(k,) for k in keys])

    def boot_offset(self, boot_id: str) -> tuple[int, bool] | None:
        row = self._conn.execute("SELECT clock_offset_ns, synced FROM boots WHERE boot_id = ?", (boot_id,)).fetchone()
        return (row[0], bool(row[1])) if row else None

    def _select_ids(self, columns: str, table: str, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            rows += self._conn.execute(
                f"SELECT {columns} FROM {table} WHERE id IN ({','.join('?' * len(part))})", part
            ).fetchall()
        return rows

    def count_records(self, ids: Sequence[int]) -> int:
        """Records held by the chunks `ids` (those still in the spool)."""
        return sum(r[0] for r in self._select_ids("records", "chunks", list(ids)))

    def counters(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT name, value FROM counters").fetchall())

    @property
    def payload_bytes(self) -> int:
        return self._payload_bytes

    @property
    def chunk_count(self) -> int:
        return self._chunk_count

    def backlog(self) -> dict[str, int]:
        row = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(records), 0), COALESCE(SUM(length(payload)), 0), "
            "COALESCE(SUM(raw_bytes), 0), MIN(created_ns) FROM chunks"
        ).fetchone()
        return {"chunks": row[0], "records": row[1], "bytes": row[2], "raw_bytes": row[3], "oldest_ns": row[4] or 0}

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT id, chunk_id, created_ns, rejected_ns, reason, records, length(payload) FROM dead_letters "
            "ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        keys = ("id", "chunk_id", "created_ns", "rejected_ns", "reason", "records", "bytes")
        return [dict(zip(keys, r, strict=False)) for r in rows]

    def dead_letter_count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    def dead_letter_payloads(self) -> list[tuple[str, bytes]]:
        return self._conn.execute("SELECT chunk_id, payload FROM dead_letters ORDER BY id").fetchall()

    def status(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM status").fetchall()}

    def file_sizes(self) -> dict[str, int]:
        sizes = {}
        for suffix in ("", "-wal", "-shm"):
            try:
                sizes["db" + suffix] = os.stat(str(self.path) + suffix).st_size
            except FileNotFoundError:
                pass
        return sizes


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


def _salvage_pending(path: Path, dest: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
    """Salvage every quarantined copy of `path` that was not salvaged yet into
    `dest` (one transaction per copy, remembered in it), rename it
    `.salvaged-...`, and delete salvaged copies beyond the last few. A copy
    whose salvage did not finish is never deleted. Returns the loss records."""
    losses = []
    for copy in sorted(path.parent.glob(f"{path.name}.corrupt-*")):
        if copy.name.endswith(("-wal", "-shm")):
            continue
        losses.append(_salvage_one(copy, dest))
        done = copy.with_name(copy.name.replace(".corrupt-", ".salvaged-", 1))
        for suffix in ("", "-wal", "-shm"):
            if Path(str(copy) + suffix).exists():
                os.replace(Path(str(copy) + suffix), Path(str(done) + suffix))
    salvaged = sorted(p for p in path.parent.glob(f"{path.name}.salvaged-*") if not p.name.endswith(("-wal", "-shm")))
    for stale in salvaged[:-_QUARANTINE_KEEP]:
        for suffix in ("", "-wal", "-shm"):
            Path(str(stale) + suffix).unlink(missing_ok=True)
    return [loss for loss in losses if loss is not None]


def _salvage_one(copy: Path, dest: sqlite3.Connection) -> tuple[str, dict[str, Any]] | None:
    """Copy what can still be read from the corrupt spool `copy` into `dest`
    in one transaction, count what could not be (from the copy's own
    counters where they are readable) and return the loss record."""
    marker = "spool-salvaged:" + copy.name
    if dest.execute("SELECT 1 FROM positions WHERE key = ?", (marker,)).fetchone():
        return None  # salvaged before a crash that came before the rename
    try:
        src = sqlite3.connect(f"file:{copy}?mode=ro", uri=True, isolation_level=None)
        # A truncated file is refused as a whole (its header counts more pages
        # than the file has) unless the schema checks are relaxed: then every
        # page that is still there can be read.
        src.execute("PRAGMA writable_schema = ON")
    except sqlite3.Error:
        src = None
    file_bytes = sum(os.stat(str(copy) + s).st_size for s in ("", "-wal") if os.path.exists(str(copy) + s))
    dest.execute("BEGIN IMMEDIATE")
    try:
        old_counters, got = _copy_readable(src, dest) if src is not None else ({}, {"chunks": 0, "records": 0})
        failed, salvaged_bytes = got.pop("failed", 0), got.pop("bytes", 0)
        lost_chunks, lost_records = _expected_lost(old_counters, got["chunks"], got["records"], failed)
        lost_bytes = max(file_bytes - salvaged_bytes, 0) if lost_chunks or lost_records else 0
        _bump(
            dest.cursor(),
            {"spool_quarantined": 1, "salvage_lost_chunks": lost_chunks, "salvage_lost_records": max(lost_records, 0)},
        )
        dest.execute("INSERT INTO positions (key, value, updated_ns) VALUES (?, '1', ?)", (marker, time.time_ns()))
        dest.execute("COMMIT")
    except BaseException:
        if dest.in_transaction:
            dest.execute("ROLLBACK")
        raise
    finally:
        if src is not None:
            src.close()
    records_text = "an unknown number of" if lost_records < 0 else str(lost_records)
    text = (
        f"edgeagent: the spool was corrupt and was moved aside to {copy.name}; salvaged {got['chunks']} chunks "
        f"({got['records']} records); lost {lost_chunks} chunks, {records_text} records, {lost_bytes} bytes"
    )
    attributes: dict[str, Any] = {
        "edgeagent.loss.reason": "spool_corrupt",
        "edgeagent.loss.chunks": lost_chunks,
        "edgeagent.loss.bytes": lost_bytes,
        "edgeagent.spool.quarantined": copy.name,
    }
    if lost_records >= 0:
        attributes["edgeagent.loss.records"] = lost_records
    return text, attributes


def _copy_readable(src: sqlite3.Connection, dest: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
    """Positions, boots, counters and every chunk whose checksums verify.
    Returns the copy's counters and what was copied (chunks, records, bytes,
    failed rows)."""
    import zstandard

    old_counters: dict[str, int] = {}
    for table, cols in (
        ("positions", "key, value, updated_ns"),
        ("boots", "boot_id, clock_offset_ns, synced, first_seen_ns, updated_ns"),
        ("counters", "name, value"),
    ):
        try:
            rows = src.execute(f"SELECT {cols} FROM {table}").fetchall()
        except sqlite3.Error:
            continue
        if table == "counters":
            old_counters = {name: value for name, value in rows if isinstance(value, int)}
            _bump(dest.cursor(), old_counters)
            continue
        dest.executemany(
            f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({','.join('?' * len(cols.split(',')))})", rows
        )
    got = {"chunks": 0, "records": 0, "bytes": 0, "failed": 0}
    ids: list[int] = []
    try:
        for (chunk_id,) in src.execute("SELECT id FROM chunks ORDER BY id"):
            ids.append(chunk_id)
    except sqlite3.Error:
        pass  # the rows up to the damage were read
    dctx = zstandard.ZstdDecompressor()
    for chunk_id in ids:
        try:
            row = src.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
            if zlib.crc32(row[9]) != row[10]:
                raise ValueError("checksum mismatch")
            dctx.decompress(row[9])
        except (sqlite3.Error, zstandard.ZstdError, TypeError, ValueError):
            got["failed"] += 1
            continue
        try:
            dest.execute(f"INSERT INTO chunks ({_CHUNK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
        except sqlite3.IntegrityError:  # a second copy salvaged into the same spool: a new id
            dest.execute(f"INSERT INTO chunks ({_CHUNK_COLUMNS[4:]}) VALUES (?,?,?,?,?,?,?,?,?,?)", row[1:])
        got["chunks"] += 1
        got["records"] += row[6]
        got["bytes"] += len(row[9])
    return old_counters, got


def _expected_lost(counters: dict[str, int], chunks: int, records: int, failed: int) -> tuple[int, int]:
    """(chunks, records) the copy should have held by its counters, less what
    was salvaged; records is -1 when its counters were unreadable."""
    if "spooled_records" not in counters:
        return failed, -1

    def held(kind: str, extra: int = 0) -> int:
        gone = ("acked", "evicted", "dead_letter", "corrupt", "salvage_lost")
        return counters.get(f"spooled_{kind}", 0) + extra - sum(counters.get(f"{g}_{kind}", 0) for g in gone)

    lost_chunks = max(held("chunks", counters.get("split_extra_chunks", 0)) - chunks, failed, 0)
    return lost_chunks, max(held("records") - records, 0)

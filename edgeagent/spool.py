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

Corruption (guarantee 6): at open, a spool that SQLite cannot read or whose
quick_check fails is moved aside as `spool.db.corrupt-<time>`, what can still
be read from it (positions, boots, counters, chunks whose zstd checksum
verifies) is copied into a fresh spool, and the event is counted.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_WARN = 13
_VACUUM_SLACK = 1024 * 1024
_QUARANTINE_KEEP = 2

_CHUNK_COLUMNS = (
    "id, chunk_id, created_ns, boot_id, clock_offset_ns, clock_synced, records, raw_bytes, max_severity, payload, crc32"
)


class SpoolError(Exception):
    """The spool cannot be used (newer schema, unwritable state dir)."""


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
    has free for unprivileged writers, less a small safety margin."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return 1 << 62
    used = 0
    for suffix in ("", "-wal"):
        try:
            used += os.stat(str(path) + suffix).st_size
        except OSError:
            pass
    return max(used + st.f_bavail * st.f_frsize - 64 * 1024, 0)


def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (from /proc/self/mountinfo)."""
    best, best_type = "", ""
    target = str(path.resolve())
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                mount_point = parts[4].replace("\\040", " ")
                fs_type = parts[parts.index("-") + 1]
                if (target == mount_point or target.startswith(mount_point.rstrip("/") + "/")) and len(
                    mount_point
                ) >= len(best):
                    best, best_type = mount_point, fs_type
    except (OSError, ValueError, IndexError):
        pass
    return best_type


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
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create state dir {path.parent}: {e.strerror}") from None
        if not os.access(path.parent, os.W_OK):
            raise SpoolError(f"state dir {path.parent} is not writable (run as a user that owns it)")
        events: list[str] = []
        try:
            conn, mode = cls._connect(path, durability, journal, max_size)
            cls._check(conn)
        except SpoolError:
            raise
        except sqlite3.DatabaseError as e:
            events.extend(cls._quarantine_and_salvage(path, str(e), durability, journal, max_size))
            conn, mode = cls._connect(path, durability, journal, max_size)
        spool = cls(conn, path, max_size, durability, mode, dead_letters_max)
        spool._journal_requested = journal
        spool.events = events
        if events:
            spool.add_counters({"spool_quarantined": 1})
        return spool

    @staticmethod
    def _connect(path: Path, durability: str, journal: str, max_size: int) -> tuple[sqlite3.Connection, str]:
        mode = journal
        if journal == "auto":
            mode = "exclusive" if _fs_type(path.parent) in ("jffs2", "cramfs") else "wal"
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
            detail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            if "malformed" in detail[0] or "not a database" in detail[0]:
                raise sqlite3.DatabaseError(detail[0])
            raise SpoolError(f"creating or migrating the spool schema of {path} failed: {detail[0]}")

    @staticmethod
    def _check(conn: sqlite3.Connection) -> None:
        result = conn.execute("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            raise sqlite3.DatabaseError("quick_check: " + "; ".join(r[0] for r in result[:3]))

    @classmethod
    def _quarantine_and_salvage(
        cls, path: Path, reason: str, durability: str, journal: str, max_size: int
    ) -> list[str]:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        events = [f"spool {path} is corrupt ({reason}); moved aside to {aside}"]
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        old = sorted(path.parent.glob(f"{path.name}.corrupt-*[0-9]"))
        for stale in old[:-_QUARANTINE_KEEP]:
            for suffix in ("", "-wal", "-shm"):
                Path(str(stale) + suffix).unlink(missing_ok=True)
        conn, _ = cls._connect(path, durability, journal, max_size)
        try:
            counts = _salvage(aside, conn)
        finally:
            conn.close()
        events.append(
            "salvaged from {src}: {positions} positions, {chunks} chunks ({lost} unreadable chunks lost)".format(
                src=aside.name, **counts
            )
        )
        return events

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
            self.checkpoint()
        except sqlite3.Error:
            pass
        self._conn.close()

    # --- writing ------------------------------------------------------------------

    def _write(self, synced: bool) -> _Txn:
        return _Txn(self._conn, self._synchronous if synced else "NORMAL")

    def append(
        self,
        chunks: Sequence[NewChunk] = (),
        positions: dict[str, str] | None = None,
        counters: dict[str, int] | None = None,
        boot: tuple[str, int, bool] | None = None,
    ) -> list[Eviction]:
        """Store `chunks` and `positions` in one synced transaction.

        `boot` = (boot_id, clock_offset_ns, synced) records the boot's clock
        offset for time correction at upload. Returns what had to be evicted
        to make room (the caller ships a record about it).
        """
        incoming = sum(len(c.payload) for c in chunks)
        try:
            evictions = self._make_room(incoming) if chunks else []
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError):
                raise
            self._recover(str(e))
            evictions = []
        try:
            self._insert(chunks, positions, counters, boot)
        except sqlite3.OperationalError as e:
            if "full" not in str(e) or not self._chunk_count:
                raise
            # The filesystem filled up before the spool reached its cap: free
            # room inside the file (its free pages are reused without growing
            # it) by evicting as if the cap were where the disk is, then retry once.
            log.error("disk full under %s: evicting to make room", self.path.parent)
            evictions += self._make_room(incoming, need=max(incoming * 2, self._payload_bytes // 10))
            # Copy the WAL into the pages the eviction freed and truncate it:
            # the next commit needs room in the WAL, not inside the database.
            self.checkpoint()
            self._insert(chunks, positions, counters, boot)
        except sqlite3.DatabaseError as e:
            # Malformed pages found while the agent runs (flash errors): the
            # same treatment as at start-up, then the write goes to the new file.
            self._recover(str(e))
            self._insert(chunks, positions, counters, boot)
        self._payload_bytes += incoming
        self._chunk_count += len(chunks)
        return evictions

    def _recover(self, reason: str) -> None:
        self._conn.close()
        self.events = self._quarantine_and_salvage(
            self.path, reason, self.durability, self._journal_requested, self.max_size
        )
        self._conn, self.journal = self._connect(self.path, self.durability, self._journal_requested, self.max_size)
        row = self._conn.execute("SELECT COALESCE(SUM(length(payload)), 0), COUNT(*) FROM chunks").fetchone()
        self._payload_bytes, self._chunk_count = row
        for event in self.events:
            log.error("%s", event)
        self.add_counters({"spool_quarantined": 1})

    def _insert(
        self,
        chunks: Sequence[NewChunk],
        positions: dict[str, str] | None,
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
                    [(k, v, now) for k, v in positions.items()],
                )
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
        """Delete acknowledged chunks. Returns how many were still there."""
        ids = list(ids)
        if not ids:
            return 0
        rows = self._select_ids("id, records, length(payload)", "chunks", ids)
        with self._write(synced=False) as c:
            _delete_ids(c, "chunks", ids)
            _bump(c, {"acked_chunks": len(rows), "acked_records": sum(r[1] for r in rows)})
        self._payload_bytes -= sum(r[2] for r in rows)
        self._chunk_count -= len(rows)
        self._vacuum()
        return len(rows)

    def reject(self, ids: Iterable[int], reason: str) -> int:
        """Move chunks the receiver refused for good into dead letters."""
        ids = list(ids)
        rows = self._select_ids(_CHUNK_COLUMNS, "chunks", ids)
        if not rows:
            return 0
        now = time.time_ns()
        with self._write(synced=True) as c:
            c.executemany(
                "INSERT INTO dead_letters (chunk_id, created_ns, rejected_ns, reason, records, payload) "
                "VALUES (?,?,?,?,?,?)",
                [(r[1], r[2], now, reason, r[6], r[9]) for r in rows],
            )
            _delete_ids(c, "chunks", ids)
            _bump(c, {"dead_letter_chunks": len(rows), "dead_letter_records": sum(r[6] for r in rows)})
            self._trim_dead_letters(c)
        self._payload_bytes -= sum(len(r[9]) for r in rows)
        self._chunk_count -= len(rows)
        log.error("receiver rejected %d chunks for good: %s", len(rows), reason)
        return len(rows)

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

    def replace_payload(self, chunk_id: int, payload: bytes) -> None:
        """Swap a chunk's payload (after a time correction) without changing its id."""
        old = self._conn.execute("SELECT length(payload) FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
        if old is None:
            return
        with self._write(synced=False) as c:
            c.execute(
                "UPDATE chunks SET payload = ?, crc32 = ?, clock_synced = 1 WHERE id = ?",
                (payload, zlib.crc32(payload), chunk_id),
            )
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
                new_ids.append(c.lastrowid)
        # New rows sort after newer chunks; upload order is by id, so the parts
        # go out after what was queued behind the original. Receivers order by time.
        self._payload_bytes += sum(len(p) for p, _ in payloads) - len(chunk.payload)
        self._chunk_count += len(payloads) - 1
        return new_ids

    def add_counters(self, counters: dict[str, int]) -> None:
        with self._write(synced=False) as c:
            _bump(c, counters)

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
            if isinstance(e, sqlite3.OperationalError) or self.journal == "readonly":
                raise
            self._recover(str(e))
            rows = self._conn.execute(query, (after_id, n)).fetchall()
        good = [r for r in rows if zlib.crc32(r[9]) == r[10]]
        if len(good) < len(rows) and self.journal != "readonly":
            self._drop_corrupt([r for r in rows if zlib.crc32(r[9]) != r[10]])
        return [StoredChunk(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9]) for r in good]

    def _drop_corrupt(self, rows: list[tuple[Any, ...]]) -> None:
        """Chunks whose bytes changed on disk (flash bit rot, a torn write the
        integrity check cannot see inside a blob) are removed and counted:
        sending them would only make the receiver reject garbage."""
        with self._write(synced=False) as c:
            _delete_ids(c, "chunks", [r[0] for r in rows])
            _bump(c, {"corrupt_chunks": len(rows), "corrupt_records": sum(r[6] for r in rows)})
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


def _salvage(corrupt: Path, dest: sqlite3.Connection) -> dict[str, int]:
    """Copy what can still be read from a corrupt spool into `dest`."""
    import zstandard

    counts = {"positions": 0, "chunks": 0, "lost": 0}
    try:
        src = sqlite3.connect(f"file:{corrupt}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return counts
    try:
        for table, cols in (
            ("positions", "key, value, updated_ns"),
            ("boots", "boot_id, clock_offset_ns, synced, first_seen_ns, updated_ns"),
            ("counters", "name, value"),
        ):
            try:
                rows = src.execute(f"SELECT {cols} FROM {table}").fetchall()
            except sqlite3.Error:
                continue
            dest.executemany(
                f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({','.join('?' * len(cols.split(',')))})", rows
            )
            if table == "positions":
                counts["positions"] = len(rows)
        try:
            ids = [r[0] for r in src.execute("SELECT id FROM chunks ORDER BY id").fetchall()]
        except sqlite3.Error:
            ids = []
        dctx = zstandard.ZstdDecompressor()
        for chunk_id in ids:
            try:
                row = src.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
                if zlib.crc32(row[9]) != row[10]:
                    raise ValueError("checksum mismatch")
                dctx.decompress(row[9])
            except (sqlite3.Error, zstandard.ZstdError, TypeError, ValueError):
                counts["lost"] += 1
                continue
            dest.execute(f"INSERT INTO chunks ({_CHUNK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
            counts["chunks"] += 1
        if counts["lost"]:
            dest.execute(
                "INSERT INTO counters (name, value) VALUES ('salvage_lost_chunks', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (counts["lost"],),
            )
    finally:
        src.close()
    return counts

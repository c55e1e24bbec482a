"""The chunk queue: append, read, acknowledge, reject, split and evict.

Durability (guarantee 1): `append()` stores a chunk and the source positions
it covers in one transaction, synced to disk before it returns when
`durability = "full"` (the default) unless the caller says the records are
still in their input (`synced=False`: file lines, read again if the commit is
lost). Acks and status writes are not synced: losing one to a power cut only
resends a chunk (at-least-once) or shows an older status, while saving a flash
sync per acknowledgement.

The RAM tier (`hold`, `spool.held`): chunks may wait in RAM for their
acknowledgement instead of being written; `oldest` and `ack` treat them like
stored chunks (one id sequence), `append` writes every one still held with
their positions, and the positions of acknowledged ones are written by
`commit_released`. Operations that need the chunk in the file (reject, split,
time correction) write what is held first.

Space (guarantee 4): the spool keeps the payload bytes it holds under
`max_size` — or the room the filesystem has, if less — minus room for the WAL
and free pages, evicting the least valuable chunks first (below WARN before
the rest, oldest first) and counting what it dropped, in the transaction of
the write it makes room for (a write that fails drops nothing). Free pages go back to
the filesystem by incremental vacuum once they exceed `_VACUUM_SLACK`; SQLite
checkpoints the WAL every `wal_limit_for(cap)` bytes and truncates it to that
size; the agent truncates it fully when it stops.

Outcomes: acks and rejects never raise for a full disk: the reserve file is
released so that deletions can commit, and an outcome that still cannot be
written is remembered, kept from the uploader and retried before every write.
A chunk whose checksum no longer matches is dropped and counted, never sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edgeagent.spool.database import (
    _CHUNK_COLUMNS,
    _VACUUM_SLACK,
    _bump,
    _delete_ids,
    _disk_room,
    is_corruption,
    log,
    wal_limit_for,
)
from edgeagent.spool.held import HeldChunks, HeldEntry
from edgeagent.spool.state import SpoolState

_WARN = 13


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
    id: int = 0  # 0: the spool assigns the next one of its sequence
    chunk_id: str = ""  # the stable id receivers deduplicate by; empty: a random one

    def with_payload(self, payload: bytes) -> NewChunk:
        """This chunk with another `payload` (its compressed one): what `dataclasses.replace`
        does, at a fraction of its cost (the batcher does it for every chunk)."""
        return NewChunk(payload, self.records, self.raw_bytes, self.max_severity, self.boot_id, self.clock_offset_ns,
                        self.clock_synced, self.created_ns, self.id, self.chunk_id)  # fmt: skip


class StoredChunk(NamedTuple):
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


class Eviction(NamedTuple):
    """What one eviction pass dropped to stay under the size cap."""

    chunks: int
    records: int
    bytes: int
    oldest_ns: int
    newest_ns: int
    max_severity: int
    ids: tuple[int, ...] = ()


class Spool(SpoolState):
    """The durable spool (see the package docstring). Create with `Spool.open()`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held = HeldChunks()
        self._next_id = self._max_id() + 1

    def _max_id(self) -> int:
        """The highest chunk id ever used (AUTOINCREMENT's sequence survives deletes)."""
        seq = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        return max(seq[0], self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM chunks").fetchone()[0])

    def close(self) -> None:
        try:
            self.retry_unrecorded()
            self.checkpoint()
        except sqlite3.Error:
            pass
        self._conn.close()

    # --- writing ------------------------------------------------------------------

    def append(
        self,
        chunks: Sequence[NewChunk] = (),
        positions: dict[str, str | None] | None = None,
        counters: dict[str, int] | None = None,
        boot: tuple[str, int, bool] | None = None,
        synced: bool = True,
    ) -> list[Eviction]:
        """Store `chunks` and `positions` (None: delete that position) in one
        transaction, synced when `synced` (and `durability = "full"`), together
        with every chunk still held in RAM and all the positions held with them.

        `boot` = (boot_id, clock_offset_ns, synced) records the boot's clock
        offset for time correction at upload. Returns what had to be evicted
        to make room (the caller ships a record about it). Raises
        sqlite3.OperationalError when the disk cannot take the write (full,
        I/O error, read-only): nothing was stored, the caller keeps it and
        retries.
        """
        self.retry_unrecorded()
        held = self._held.pending()
        chunks = [*(e.new for e in held), *self._with_ids(chunks)]
        positions = {**self._held.positions(), **(positions or {})}
        counters = _added(counters or {}, self._held.counters())
        synced = synced or any(e.durable for e in held)
        incoming = sum(len(c.payload) for c in chunks)
        try:
            # Evicted in the same transaction: a write that fails after all drops nothing.
            eviction = self._victims(incoming) if chunks else None
            self._insert(chunks, positions, counters, boot, synced, eviction)
        except sqlite3.DatabaseError as e:
            if not is_corruption(e):
                raise
            # Malformed pages found while the agent runs (flash errors): the
            # same treatment as at start-up, then the write goes to the new file.
            self._recover(str(e))
            self._next_id = max(self._next_id, self._max_id() + 1)
            eviction = None
            self._insert(chunks, positions, counters, boot, synced)
        self._held.clear()
        self._payload_bytes += incoming
        self._chunk_count += len(chunks)
        if eviction is not None:
            self._evicted(eviction)
        self._ensure_reserve()
        return [eviction] if eviction is not None else []

    def _with_ids(self, chunks: Sequence[NewChunk]) -> list[NewChunk]:
        """`chunks` numbered from the spool's one sequence (held and stored chunks share it)."""
        numbered = [dataclasses.replace(chunk, id=self._next_id + n) for n, chunk in enumerate(chunks)]
        self._next_id += len(chunks)
        return numbered

    # --- the RAM tier ---------------------------------------------------------------

    def hold(
        self, chunks: Sequence[NewChunk], positions: dict[str, str | None], deadline: float, durable: bool
    ) -> None:
        """Keep `chunks` in RAM instead of writing them: `oldest` hands them
        out and `ack` forgets them. `positions` (reached once they are safe)
        are written only after every chunk held before them was acknowledged
        (`commit_released`), or with the chunks themselves (`append` writes
        everything held). The caller has them written by `deadline`
        (monotonic) unless acknowledged; `durable`: that write is synced."""
        for n, chunk in enumerate(chunks, self._next_id):
            chunk = dataclasses.replace(chunk, id=n, chunk_id=chunk.chunk_id or uuid.uuid4().hex)
            stored = StoredChunk(
                chunk.id,
                chunk.chunk_id,
                chunk.created_ns,
                chunk.boot_id,
                chunk.clock_offset_ns,
                chunk.clock_synced,
                chunk.records,
                chunk.raw_bytes,
                chunk.max_severity,
                chunk.payload,
            )
            self._held.add(HeldEntry(stored, chunk, {}, deadline, durable))
        self._next_id += len(chunks)
        self._held.add_positions(positions)

    def counters(self) -> dict[str, int]:
        """The counters in the file plus those of chunks delivered from RAM and not written yet."""
        return _added(super().counters(), self._held.counters())

    @property
    def held(self) -> HeldChunks:
        """The RAM tier, to read (counts, deadlines, positions handed over); change it through the spool."""
        return self._held

    def commit_released(self) -> None:
        """Write the positions that acknowledged chunks released from RAM, not
        synced (losing them to a power cut only sends those lines again).
        Raises sqlite3.OperationalError when the disk refuses (they are kept)."""
        positions, counters = self._held.released, self._held.counters()
        if positions or counters:
            self._insert((), positions, counters, None, synced=False)
            self._held.forget_released()

    def _store_held(self) -> None:
        """Write what is held, before an operation that needs the chunk in the file."""
        if self._held.entries:
            self.append(synced=False)

    def _insert(
        self,
        chunks: Sequence[NewChunk],
        positions: dict[str, str | None] | None,
        counters: dict[str, int] | None,
        boot: tuple[str, int, bool] | None,
        synced: bool = True,
        eviction: Eviction | None = None,
    ) -> None:
        now = time.time_ns()
        with self._write(synced=synced) as c:
            if (ev := eviction) is not None:
                _delete_ids(c, "chunks", ev.ids)
                _bump(c, {"evicted_chunks": ev.chunks, "evicted_records": ev.records, "evicted_bytes": ev.bytes})
            if chunks:
                c.executemany(
                    "INSERT INTO chunks (id, chunk_id, created_ns, boot_id, clock_offset_ns, clock_synced, records, "
                    "raw_bytes, max_severity, payload, crc32) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            chunk.id,
                            chunk.chunk_id or uuid.uuid4().hex,
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
        cap = min(self.max_size, _disk_room(self.path, self.reserve_given_back()))
        reserve = wal_limit_for(cap) + min(_VACUUM_SLACK, cap // 16) + min(self.dead_letters_max, cap // 8)
        return max(cap - reserve, cap // 2)

    def _victims(self, incoming: int) -> Eviction | None:
        """The least valuable chunks to drop so that `incoming` payload bytes
        fit the budget (None: they fit); `_insert` deletes them."""
        need = self._payload_bytes + incoming - self._budget()
        if need <= 0:
            return None
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
            return None
        return Eviction(
            chunks=len(chosen),
            records=sum(r[1] for r in chosen),
            bytes=freed,
            oldest_ns=min(r[3] for r in chosen),
            newest_ns=max(r[3] for r in chosen),
            max_severity=max(r[4] for r in chosen),
            ids=tuple(r[0] for r in chosen),
        )

    def _evicted(self, ev: Eviction) -> None:
        """After the transaction that evicted `ev` committed."""
        self._payload_bytes -= ev.bytes
        self._chunk_count -= ev.chunks
        log.warning("spool full (%d bytes cap): evicted %d chunks, %d records", self.max_size, ev.chunks, ev.records)
        with contextlib.suppress(sqlite3.OperationalError):  # the append is committed; vacuum again next time
            self._vacuum()

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged chunks. Returns how many were still there.

        Never raises for a full disk: if the deletion cannot be written (even
        after releasing the reserve), it is remembered, retried before every
        later write, and the chunks are not handed out again meanwhile."""
        ids = [i for i in ids if i not in self._unrecorded_acks]
        from_ram = self._held.ack(ids)
        ids = [i for i in ids if i not in from_ram]
        if not ids:
            return len(from_ram)
        rows = self._select_ids("id, records, length(payload)", "chunks", ids)
        try:
            self._retrying_full(lambda: self._delete_acked(rows))
        except sqlite3.OperationalError as e:
            if not self._unrecorded_acks and not self._unrecorded_rejects:
                log.error("recording %d acknowledgements failed (%s); retrying until it works", len(rows), e)
            self._unrecorded_acks.update(r[0] for r in rows)
        return len(rows) + len(from_ram)

    def _delete_acked(self, rows: list[tuple[Any, ...]]) -> None:
        with self._write(synced=False) as c:
            _delete_ids(c, "chunks", [r[0] for r in rows])
            _bump(c, {"acked_chunks": len(rows), "acked_records": sum(r[1] for r in rows)})
        self._payload_bytes -= sum(r[2] for r in rows)
        self._chunk_count -= len(rows)
        self._vacuum()

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
        if any(self._held.holds(i) for i in ids):
            self._store_held()
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
        if self._held.holds(chunk_id):
            self._store_held()
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
        self._store_held()
        with self._write(synced=True) as c:
            c.execute("DELETE FROM chunks WHERE id = ?", (chunk.id,))
            new_ids = []
            for n, (payload, records) in enumerate(payloads):
                c.execute(
                    "INSERT INTO chunks (id, chunk_id, created_ns, boot_id, clock_offset_ns, clock_synced, records, "
                    "raw_bytes, max_severity, payload, crc32) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        self._next_id + n,
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
                new_ids.append(self._next_id + n)
            _bump(c, {"split_extra_chunks": len(payloads) - 1})  # keeps the chunk count a salvage expects
        # New rows sort after newer chunks; upload order is by id, so the parts
        # go out after what was queued behind the original. Receivers order by time.
        self._payload_bytes += sum(len(p) for p, _ in payloads) - len(chunk.payload)
        self._chunk_count += len(payloads) - 1
        self._next_id += len(payloads)
        return new_ids

    # --- reading ------------------------------------------------------------------

    def oldest(self, n: int, after_id: int = 0) -> list[StoredChunk]:
        """Up to `n` chunks with id > `after_id`, oldest first. The statement is
        finished before returning, so no read transaction stays open while
        the caller works on the network (it would block checkpoints)."""
        if self._chunk_count == 0 and self.journal != "readonly":
            # Nothing in the file (the count follows every write of this
            # process; a reader's may be stale): a backlog delivered from RAM
            # asks for chunks hundreds of times a second.
            return self._held.oldest(n, after_id)
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
        stored = [StoredChunk(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9]) for r in good]
        held = self._held.oldest(n, after_id)
        return sorted(stored + held, key=lambda c: c.id)[:n] if held else stored

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

    def _select_ids(self, columns: str, table: str, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            rows += self._conn.execute(
                f"SELECT {columns} FROM {table} WHERE id IN ({','.join('?' * len(part))})", part
            ).fetchall()
        return rows

    def count_records(self, ids: Sequence[int]) -> int:
        """Records held by the chunks `ids` (those still in the spool, in RAM or in the file)."""
        in_ram = {e.chunk.id: e.chunk.records for e in self._held.pending()}
        stored = [i for i in ids if i not in in_ram]
        return sum(in_ram.get(i, 0) for i in ids) + sum(r[0] for r in self._select_ids("records", "chunks", stored))

    @property
    def payload_bytes(self) -> int:
        return self._payload_bytes

    @property
    def chunk_count(self) -> int:
        """Chunks waiting for delivery, in the file and held in RAM."""
        return self._chunk_count + self._held.count

    def backlog(self) -> dict[str, int]:
        row = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(records), 0), COALESCE(SUM(length(payload)), 0), "
            "COALESCE(SUM(raw_bytes), 0), MIN(created_ns) FROM chunks"
        ).fetchone()
        held = [e.chunk for e in self._held.pending()]
        return {
            "chunks": row[0] + len(held),
            "records": row[1] + sum(c.records for c in held),
            "bytes": row[2] + sum(len(c.payload) for c in held),
            "raw_bytes": row[3] + sum(c.raw_bytes for c in held),
            "oldest_ns": min(filter(None, [row[4], *(c.created_ns for c in held)]), default=0),
            "held_in_ram": len(held),
        }

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


def _added(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for name, value in b.items():
        out[name] = out.get(name, 0) + value
    return out

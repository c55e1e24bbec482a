"""The Batcher: batches -> chunks -> one spool transaction each, with the positions they cover.

Owns when chunks are cut (records, bytes, age), their encoding (through `edgeagent.codec`, compressed on
the codec's background thread), the RAM hold (`edgeagent.holding`) and the stall when the spool cannot
commit: nothing read is dropped, sources are paused until commits succeed again. See the package
docstring for the concurrency model and what reaches flash when.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from edgeagent import loss
from edgeagent.clock import Clock, ClockState, monotonic_ns
from edgeagent.codec import BackgroundCompressor, ChunkCodec
from edgeagent.config import SpoolConfig
from edgeagent.holding import RamHold, stable_chunk_id
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline.interfaces import AGENT_SOURCE
from edgeagent.records import Batch, Record
from edgeagent.spool import Eviction, NewChunk, Spool

log = logging.getLogger(__name__)


class Batcher:
    """Groups batches into chunks and commits them with their positions.

    Chunks never hold more than `chunk_max_records` records or
    `chunk_max_bytes` bytes of text: what is pending is cut into as many
    chunks as needed (a single record larger than `chunk_max_bytes` gets a
    chunk of its own; sources cut lines at their `max_line_size`).

    When a commit fails (disk full, I/O error, read-only file system), nothing
    pending is dropped: the batcher is *stalled*, retries with backoff, and
    `accepting` is False so sources stop reading until a commit succeeds
    (`wait_writable`). Positions are committed only with their records.

    A chunk that is full (by records or bytes) is encoded at once and
    compressed on the codec's background thread (at once where the process
    has one CPU to run on) while the loop reads and
    encodes the next ones; its commit (with exactly the positions and counters
    handed over with its records) follows when the compression is done, or
    before anything else is committed: commits stay in order, at most
    `MAX_BEHIND` flushes are behind, and a failed commit puts it and every
    flush behind it back in front of what is pending. `flush()` (age, drain,
    shutdown) waits for them.
    """

    RETRY_MAX = 5.0
    # Two: the loop hands the next chunk to the compressing thread before it waits for the one before, so
    # neither thread waits for the other while both have work (with one, the loop waited for about a fifth of
    # a bulk read); each one behind is a chunk's protobuf in RAM (a few hundred KiB).
    MAX_BEHIND = 2

    def __init__(
        self,
        spool: Spool,
        encoder: ChunkEncoder,
        boot_id: str,
        config: SpoolConfig,
        clock: Clock | None = None,
        on_commit: Callable[[], None] | None = None,
        thread_start: Callable[[], None] | None = None,
    ) -> None:
        """`thread_start`: run first in the compressing thread (`codec.BackgroundCompressor`)."""
        self.spool = spool
        self.encoder = encoder
        self.boot_id = boot_id
        self.config = config
        self.clock = clock or Clock()
        self.on_commit = on_commit
        self._codec = ChunkCodec()
        self._background = BackgroundCompressor(thread_start)
        self._behind: collections.deque[_Behind] = collections.deque()  # flushes compressing, oldest first
        self._pending: list[Batch] = []
        self._positions: dict[str, str | None] = {}  # None: forget the position
        self._counters: dict[str, int] = {}
        self._records = 0
        self._bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._hold = RamHold(spool, config, lambda: self.flush(store=True))
        self._urgent_since: float | None = None  # monotonic: the first pending record that no input keeps
        self._never_hold = False  # pending file lines with hold_file_lines = 0: committed as they are
        self._boot_state: ClockState | None = None
        self._committing = asyncio.Event()  # set while commits succeed; sources wait on it
        self._committing.set()
        self._retry_delay = config.flush_interval
        self.last_error = ""

    @property
    def pending_records(self) -> int:
        return self._records + sum(behind.records for behind in self._behind)

    def add(self, batch: Batch) -> None:
        if batch.position is not None:
            self._positions[batch.position[0]] = batch.position[1]
        if batch.records:
            was_urgent = self._urgent_since is not None
            self._note_kinds([batch])
            if not was_urgent and self._urgent_since is not None and self._timer is not None and not self.stalled:
                self._timer.cancel()  # armed for file lines: this record may not wait that long
                self._timer = None
            self._pending.append(batch)
            self._records += len(batch.records)
            self._bytes += batch.body_bytes()
        self._schedule()

    def forget(self, keys: list[str]) -> None:
        """Drop the stored positions `keys` with the next commit (in the same
        transaction as what was read before, so a replay cannot resurrect them)."""
        for key in keys:
            self._positions[key] = None
        self._schedule()

    def pending_positions(self) -> dict[str, str | None]:
        """Positions handed over but not committed yet (None: to be forgotten)."""
        positions: dict[str, str | None] = {}
        for behind in self._behind:
            positions.update(behind.positions)
        return positions | self._positions

    def _schedule(self) -> None:
        if self.stalled:
            return  # the retry timer commits once the spool accepts writes again
        if self._records >= self.config.chunk_max_records or self._bytes >= self.config.chunk_max_bytes:
            self._flush_behind()
        elif self._timer is None and (self._pending or self._positions or self._counters):
            self._arm_timer()

    @property
    def stalled(self) -> bool:
        """The last commit failed (disk full, I/O error): pending records are
        kept, nothing is dropped, and sources should stop reading."""
        return not self._committing.is_set()

    @property
    def accepting(self) -> bool:
        """Whether sources may read more: False while commits fail."""
        return self._committing.is_set()

    async def wait_committing(self) -> None:
        await self._committing.wait()

    async def wait_ram_room(self) -> None:
        """Return once RAM is not nearly full of file lines on their way to the
        receiver (`RamHold.open`; at most `PAUSE_MAX`). Only for sources whose
        input keeps what is not read yet: a syslog socket or the kernel's ring
        buffer would drop what waits."""
        await self._hold.open.wait()

    def count(self, counters: dict[str, int]) -> None:
        """Counters persisted with the next commit."""
        for name, value in counters.items():
            self._counters[name] = self._counters.get(name, 0) + value
        if self._timer is None:
            self._arm_timer()

    def _arm_timer(self, delay: float | None = None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # used outside a loop (tests, tools): the caller flushes
        self._timer = loop.call_later(self._age_limit() if delay is None else delay, self._on_timer)

    def _age_limit(self) -> float:
        """How long pending records wait before they are cut into chunks."""
        if self._urgent_since is None:
            return max(self.config.flush_interval, self.config.file_flush_interval)
        if self.on_commit is not None and not self._never_hold:
            return self.config.flush_interval / 2  # held, it has the other half to be acknowledged (see `_hold`)
        return self.config.flush_interval

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self, store: bool = False) -> bool:
        """Encode, compress and commit what is pending, in one transaction (after
        the flush compressing behind, if any), or hold it in RAM while delivery
        keeps up (`edgeagent.holding`); with `store`, write everything, what is
        held included. Returns False when the commit failed (everything stays
        pending)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._commit_behind(wait=True):
            return False
        store = store or self.stalled  # retrying a failed write: what was pending is written, not held
        if store and self.spool.held.unwritten and not (self._pending or self._positions or self._counters):
            try:
                self.spool.append(synced=False)  # held records that need it are synced (HeldEntry.durable)
            except Exception as e:
                self._stall(e)
                return False
        if not (self._pending or self._positions or self._counters):
            return True
        state = self.clock.state()
        chunks = [self._encode(boot, batches, state) for boot, batches in self._chunk_groups()]
        chunks = [c.with_payload(self._codec.compress(c.payload)) for c in chunks]
        return self._commit(chunks, self._positions, self._counters, state, may_hold=not store)

    def _flush_behind(self) -> None:
        """A full chunk: encode it now and let the background thread compress it
        while the loop goes on reading and encoding the next one; the commit
        follows when it is done (`_on_compressed`), in order. At most
        `MAX_BEHIND` flushes are behind: the next one first commits the oldest.
        Outside a loop: `flush`."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if not self._commit_behind(wait=True, keep=self.MAX_BEHIND - 1):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        state = self.clock.state()
        requests = [self._encode(boot, batches, state) for boot, batches in self._chunk_groups()]
        future = self._background.submit([chunk.payload for chunk in requests])
        behind = _Behind(
            future,
            requests,
            self._pending,
            self._positions,
            self._counters,
            state,
            self._records,
            holdable=self._urgent_since is None and not self._never_hold,
        )
        self._behind.append(behind)
        self._pending, self._positions, self._counters, self._records, self._bytes = [], {}, {}, 0, 0
        self._urgent_since, self._never_hold = None, False  # what it had is written, synced
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._on_compressed))

    def _on_compressed(self) -> None:
        if self._commit_behind() and self._timer is None and (self._pending or self._positions or self._counters):
            self._arm_timer()

    def _commit_behind(self, wait: bool = False, keep: int = 0) -> bool:
        """Commit the flushes compressing behind that are done, oldest first (with
        `wait`, waiting until at most `keep` are left), or hold them in RAM (only
        file lines, while delivery keeps up). When a commit fails, its batches,
        positions and counters, and those of every flush behind it, go back in
        front of what is pending: nothing is lost, the retry re-encodes."""
        while self._behind and (self._behind[0].future.done() or (wait and len(self._behind) > keep)):
            behind = self._behind.popleft()
            payloads = behind.future.result()
            chunks = list(map(NewChunk.with_payload, behind.chunks, payloads))
            holdable = behind.holdable
            if not self._commit(
                chunks, behind.positions, behind.counters, behind.state, holdable, behind=True, replayable=holdable
            ):
                self._unflush([behind, *self._behind])
                self._behind.clear()
                return False
        return True

    def _unflush(self, flushes: list[_Behind]) -> None:
        """Put flushes that were not committed back in front of what is pending, in order."""
        positions: dict[str, str | None] = {}
        for behind in flushes:
            positions.update(behind.positions)
            self._note_kinds(behind.batches)
            for name, value in behind.counters.items():
                self._counters[name] = self._counters.get(name, 0) + value
            self._records += behind.records
            self._bytes += sum(batch.body_bytes() for batch in behind.batches)
        self._pending = [batch for behind in flushes for batch in behind.batches] + self._pending
        self._positions = positions | self._positions

    def _note_kinds(self, batches: list[Batch]) -> None:
        """Note what pending records need (`edgeagent.holding`): never held (`hold_file_lines = 0`), or on
        flash within `flush_interval` of now (records no input keeps)."""
        for batch in batches:
            if batch.records:
                self._never_hold = self._never_hold or self._hold.never(batch)
                if self._urgent_since is None and not self._hold.replayable(batch):
                    self._urgent_since = time.monotonic()

    def _commit(
        self,
        chunks: list[NewChunk],
        positions: dict[str, str | None],
        counters: dict[str, int],
        state: ClockState,
        may_hold: bool = False,
        behind: bool = False,
        replayable: bool | None = None,
    ) -> bool:
        """Store `chunks` with `positions` and `counters` in one transaction, or
        hold them in RAM (`may_hold`: a flush by age, or a full chunk of file
        lines compressed `behind`; see `edgeagent.holding`). Other full chunks
        are written, synced. `replayable`: the chunks hold only file lines
        (default: judged from what is pending). On success what was pending is
        cleared if these were its positions."""
        boot = None
        if self._boot_state is None or (
            state.synced != self._boot_state.synced or abs(state.offset_ns - self._boot_state.offset_ns) > Clock.JUMP_NS
        ):
            boot = (self.boot_id, state.offset_ns, state.synced)
        if replayable is None:
            replayable = self._urgent_since is None
        try:
            never_hold = self._never_hold and not behind  # a behind flush's kind is in `replayable`
            must_write = never_hold or counters or boot or None in positions.values()
            if may_hold and self.on_commit is not None and self._hold.may_hold(chunks, replayable, bool(must_write)):
                self._hold.hold(chunks, positions, replayable, self._urgent_since)
                evictions = []
            else:
                synced = behind or not replayable or bool(must_write)
                evictions = self.spool.append(chunks, positions, counters, boot, synced=synced)
        except Exception as e:
            self._stall(e)
            return False
        if self.stalled:
            log.warning("spool accepts writes again; sources resume")
            self._committing.set()
        self._retry_delay = self.config.flush_interval
        self.last_error = ""
        if boot is not None:
            self._boot_state = state
        if positions is self._positions:
            self._pending = []
            self._positions = {}
            self._counters = {}
            self._records = 0
            self._bytes = 0
            self._urgent_since = None
            self._never_hold = False
        if evictions:
            self._report_evictions(evictions)
        self.ship_spool_losses()
        if chunks and self.on_commit is not None:
            self.on_commit()
        return True

    def _stall(self, error: Exception) -> None:
        """Keep everything pending: the positions were not stored either, so
        nothing is lost even if the agent dies before the retry succeeds."""
        if not self.stalled:
            log.error("committing %d records to the spool failed (%s); retrying, sources paused", self._records, error)
        self.last_error = f"{type(error).__name__}: {error}"
        self._committing.clear()
        self._arm_timer(self._retry_delay)
        self._retry_delay = min(self._retry_delay * 2, self.RETRY_MAX)

    async def drain(self, timeout: float) -> bool:
        """Commit what is pending, retrying for up to `timeout` seconds while
        the spool refuses writes (a stop during a stall). True when nothing is
        left pending."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.flush(store=True):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            await asyncio.sleep(min(self._retry_delay, left))
        return True

    def pending_summary(self) -> str:
        return f"{self._records} records, {len(self._positions)} positions, {len(self._counters)} counters"

    def _chunk_groups(self) -> list[tuple[str, list[Batch]]]:
        """Pending batches cut into chunks within the limits, per boot, in order."""
        max_records, max_bytes = self.config.chunk_max_records, self.config.chunk_max_bytes
        done: list[tuple[str, list[Batch]]] = []
        open_groups: dict[str, tuple[list[Batch], list[int]]] = {}  # boot -> (batches, [records, bytes])
        for batch in self._pending:
            for part in _split_batch(batch, max_records, max_bytes):
                batches, size = open_groups.setdefault(part.boot_id, ([], [0, 0]))
                records, raw = len(part.records), part.body_bytes()
                if batches and (size[0] + records > max_records or size[1] + raw > max_bytes):
                    done.append((part.boot_id, batches))
                    batches, size = open_groups[part.boot_id] = ([], [0, 0])
                batches.append(part)
                size[0] += records
                size[1] += raw
        done.extend((boot, batches) for boot, (batches, _) in open_groups.items() if batches)
        return done

    def _encode(self, boot_id: str, batches: list[Batch], state: ClockState) -> NewChunk:
        if boot_id == self.boot_id:
            offset, synced = state.offset_ns, state.synced
        else:
            known = self.spool.boot_offset(boot_id)
            offset, synced = known if known else (0, False)
        max_severity = 0
        records = raw = 0
        for batch in batches:
            records += len(batch.records)
            raw += batch.body_bytes()
            if batch.records and isinstance(batch.records[0], Record):
                for r in batch.records:
                    if isinstance(r, Record) and r.severity > max_severity:
                        max_severity = r.severity
        request = self.encoder.encode(batches, offset, synced)  # the caller compresses it into the payload
        return NewChunk(request, records, raw, max_severity, boot_id, offset, synced, chunk_id=stable_chunk_id(batches))

    def _report_evictions(self, evictions: list[Eviction]) -> None:
        records = [
            loss.record(
                loss.SPOOL_FULL,
                f"edgeagent: spool full, dropped {ev.records} records in {ev.chunks} chunks "
                f"({ev.bytes} bytes compressed) to stay under the spool size cap",
                records=ev.records,
                chunks=ev.chunks,
                byte_count=ev.bytes,
                extra={loss.OLDEST_UNIX_NANO: ev.oldest_ns, loss.NEWEST_UNIX_NANO: ev.newest_ns},
            )
            for ev in evictions
        ]
        self._ship(records)

    def ship_spool_losses(self) -> None:
        """Quarantines and what a salvage could not recover, as records (guarantee 5)."""
        losses = self.spool.take_losses()
        if losses:
            self._ship(losses)

    def _ship(self, records: list[Record]) -> None:
        """Records about the agent's own losses: committed at once (the counters
        already were), or kept pending like any record if the spool refuses."""
        self.add(Batch(AGENT_SOURCE, records, monotonic_ns(), self.boot_id))
        if not self.stalled:
            self.flush()


@dataclasses.dataclass
class _Behind:
    """A flush whose chunks the background thread is compressing, with what it commits."""

    future: Future[list[bytes]]
    chunks: list[NewChunk]  # payload: the uncompressed request until the future is done
    batches: list[Batch]
    positions: dict[str, str | None]
    counters: dict[str, int]
    state: ClockState
    records: int
    holdable: bool  # only file lines, and `hold_file_lines` is not "0s"


def _body_len(record: Record | bytes) -> int:
    if isinstance(record, bytes):
        return len(record)
    body = record.body
    return len(body) if isinstance(body, bytes) else len(body.encode())


def _split_batch(batch: Batch, max_records: int, max_bytes: int) -> list[Batch]:
    """`batch` cut into parts within the chunk limits (a record is never cut; one larger than
    `max_bytes` is a part of its own). The cut points are found by bisecting the running byte
    total, not by a Python step per record (a burst of kernel records, or a file's block when
    `chunk_max_bytes` is below the read size)."""
    if len(batch.records) <= max_records and batch.body_bytes() <= max_bytes:
        return [batch]
    records = batch.records
    try:
        lengths = list(map(len, records))  # type: ignore[arg-type]  # lines (bytes): C-level
    except TypeError:  # Record objects
        lengths = list(map(_body_len, records))
    total = list(itertools.accumulate(lengths, initial=0))  # total[i]: bytes before record i
    parts: list[Batch] = []
    start, count = 0, len(records)
    while start < count:
        last = min(count, start + max_records)
        end = max(start + 1, bisect.bisect_right(total, total[start] + max_bytes, start + 1, last + 1) - 1)
        part: Any = records[start:end]  # the same shape as `records`
        size = total[end] - total[start]
        parts.append(Batch(batch.source, part, batch.observed_mono_ns, batch.boot_id, batch.attributes, raw_bytes=size))
        start = end
    return parts

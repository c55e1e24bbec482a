"""What a source and an uploader may do: `SourceContext` and `UploaderContext`.

A source reads its committed positions (with what is still pending overlaid), emits batches, waits while
the spool cannot commit, and counts. An uploader reads chunks (oldest first, from the RAM hold or the
spool), settles them, waits for work or a wake, and gets payloads with wall times corrected to the clock
known now (guarantee 7).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgeagent.clock import Clock, ClockState
from edgeagent.codec import ChunkCodec
from edgeagent.config import Config
from edgeagent.pipeline.batcher import Batcher
from edgeagent.pipeline.interfaces import WAKE_DATA
from edgeagent.records import Batch
from edgeagent.refusals import DEFAULT_INTERVAL, RefusalReports, ShipLoss
from edgeagent.spool import Spool, StoredChunk

log = logging.getLogger(__name__)


class SourceContext:
    """What a source may do: read its stored positions, emit batches, count.

    Back-pressure: while the spool cannot commit, `accepting` is False; a
    source checks it (or awaits `wait_writable()`) before reading more, so
    memory stays bounded and nothing is read that could not be stored.
    `emit` waits by itself; `emit_nowait` (for reader callbacks) never refuses
    what was already read.
    """

    def __init__(self, batcher: Batcher, spool: Spool, boot_id: str, config: Config) -> None:
        self._batcher = batcher
        self._spool = spool
        self.boot_id = boot_id
        self.config = config

    def positions(self, prefix: str) -> dict[str, str]:
        """Positions whose key starts with `prefix`, as the source handed them
        over: the stored ones overlaid with those still pending in the batcher.
        A source restarted after a crash (or during a stall) resumes after what
        it already handed over, never behind it: nothing is read twice."""
        stored = self._spool.positions(prefix)
        handed = {**self._spool.held.positions(), **self._batcher.pending_positions()}
        for key, value in handed.items():
            if key.startswith(prefix):
                if value is None:
                    stored.pop(key, None)
                else:
                    stored[key] = value
        return stored

    def committed_positions(self, prefix: str) -> dict[str, str]:
        """Positions already committed to the spool (with their records)."""
        return self._spool.positions(prefix)

    def forget_positions(self, keys: list[str]) -> None:
        """Drop positions of streams that are gone for good, in the same commit
        as what was read before (never raises: a stall only delays it)."""
        self._batcher.forget(keys)

    def boot_offset(self, boot_id: str) -> tuple[int, bool] | None:
        """The clock offset stored for a (previous) boot, if any."""
        return self._spool.boot_offset(boot_id)

    @property
    def accepting(self) -> bool:
        """False while the spool cannot commit: read nothing more until `wait_writable()`."""
        return self._batcher.accepting

    async def wait_writable(self) -> None:
        """Return once the spool accepts commits (at once when it does)."""
        await self._batcher.wait_committing()

    async def wait_ram_room(self) -> None:
        """For sources whose input keeps what is not read yet (files): also wait
        while RAM is nearly full of their chunks on the way to the receiver, at
        most half a second (`edgeagent.holding`), so a link that keeps up paces
        the reading instead of the chunks going to flash."""
        await self._batcher.wait_ram_room()

    def pause_reader(self, fd: int, callback: Callable[[], None], still_wanted: Callable[[], bool]) -> None:
        """For sources that read in loop reader callbacks: stop watching `fd`
        until the spool accepts commits, then watch it again with `callback`
        if `still_wanted()` (the source may have closed it meanwhile)."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)

        def resume(_: object) -> None:
            if still_wanted():
                loop.add_reader(fd, callback)

        asyncio.ensure_future(self.wait_writable()).add_done_callback(resume)

    async def emit(self, batch: Batch) -> None:
        """Hand over records and the position after them. Yields to the loop so
        one busy source cannot starve the others or the uploader; waits while
        the spool cannot commit."""
        self._batcher.add(batch)
        if self._batcher.stalled:
            await self._batcher.wait_committing()
        else:
            await asyncio.sleep(0)

    def emit_nowait(self, batch: Batch) -> None:
        """`emit` for reader callbacks: never refuses what was read; the caller
        checks `accepting` before reading more."""
        self._batcher.add(batch)

    def count(self, counters: dict[str, int]) -> None:
        """Add to persistent counters (committed with the next chunk)."""
        self._batcher.count(counters)


class UploaderContext:
    """What an uploader may do: read, ack, reject and split chunks; wait for work."""

    def __init__(
        self,
        spool: Spool,
        config: Config,
        on_loss: ShipLoss | None = None,
        report_interval: float = DEFAULT_INTERVAL,
        *,
        boot_id: str | None = None,
        clock: Clock | None = None,
        refusals: RefusalReports | None = None,
    ) -> None:
        self.spool = spool
        self.config = config
        self._boot_id = boot_id  # this boot: its chunks are corrected by the live clock
        self._clock = clock or Clock()
        self.wake_event = asyncio.Event()
        self._reasons: set[str] = set()
        # on_loss(record, counters) ships a loss record and commits the counters with it.
        # A context replacing another (reload) takes over its reports, so none is sent twice.
        self.refusals = refusals or RefusalReports(spool, on_loss, report_interval)
        self.codec = ChunkCodec()  # for the uploader too: decode, split and build request bodies
        self.credentials_error: str | None = None
        self.credentials_error_since: float | None = None

    def reject(self, ids: list[int], reason: str) -> int:
        """Move chunks the receiver refused for good to dead letters (counted
        there), and report it in at most one record per interval (guarantee 5;
        see `edgeagent.refusals`: a refused report is never reported again).
        Returns how many chunks moved."""
        chunks = [c for i in ids for c in self.spool.oldest(1, i - 1) if c.id == i]
        moved = self.spool.reject(ids, reason)
        if moved:
            self.refusals.rejected(chunks, reason)
        return moved

    def credentials_refused(self, reason: str) -> None:
        """The receiver refused who we are, not what we sent (HTTP 401/403/407,
        MQTT "not authorized"): the data is fine and the configuration is not.
        Nothing is dead-lettered: the uploader keeps the chunks and retries
        with its backoff until the credentials are fixed; `status` shows the
        error. Logged once per distinct reason, not on every retry."""
        if reason != self.credentials_error:
            log.error("the receiver refused the credentials (%s); keeping the data and retrying with backoff", reason)
        if self.credentials_error is None:
            self.credentials_error_since = time.time()
        self.credentials_error = reason

    def credentials_accepted(self) -> None:
        """The receiver took a delivery: a credentials problem is over."""
        if self.credentials_error is not None:
            log.info("the receiver accepts the credentials again")
        self.credentials_error = self.credentials_error_since = None

    def credentials_status(self) -> dict[str, Any]:
        """For the uploader's `status()`: the credentials problem in force, if any."""
        return {"credentials_error": self.credentials_error, "credentials_error_since": self.credentials_error_since}

    def report_rejected(self, records: int, reason: str, chunks: Sequence[StoredChunk] = ()) -> None:
        """The receiver accepted a request (of `chunks`) but dropped `records` of
        it (OTLP partial success): count it, and report it like `reject`."""
        self.spool.add_counters({"rejected_records": records})
        self.refusals.partially_rejected(records, reason, chunks)

    def wake(self, reason: str = WAKE_DATA) -> None:
        """Wake the uploader: new chunks were stored (`WAKE_DATA`), an interface or
        default route came up (`WAKE_NETWORK`), someone asked (`WAKE_ASKED`:
        SIGUSR1, `edgeagent wake`), or the uploader's own reason."""
        self._reasons.add(reason)
        self.wake_event.set()

    def discard_wakes(self) -> None:
        """Forget wakes that came before now (an attempt just answered them)."""
        self._reasons.clear()
        self.wake_event.clear()

    async def wait_for_work(self, timeout: float | None) -> frozenset[str]:
        """Sleep until woken or `timeout` passes. Returns why it was woken (empty
        when the timeout passed): uploaders in backoff ignore `WAKE_DATA` alone,
        since retrying on every commit during an outage is a reconnect storm."""
        if not self.wake_event.is_set():  # under load it mostly is: no timer, no task
            try:
                async with asyncio.timeout(timeout):  # not wait_for: that makes a task per call
                    await self.wake_event.wait()
            except TimeoutError:
                pass
        reasons = frozenset(self._reasons)
        self.discard_wakes()
        return reasons

    def payload(self, chunk: StoredChunk) -> bytes:
        """The chunk's wire payload, with wall times corrected (see `corrected`)."""
        return self.corrected(chunk).payload

    def corrected(self, chunk: StoredChunk) -> StoredChunk:
        """`chunk` with its wall times right by the best clock known now
        (guarantee 7). The one place that shifts times: uploaders send, split
        and store what this returns, never shift again.

        Best known: for this boot the live clock (a device that set its clock
        while idle has committed nothing since), for an earlier boot the last
        offset its batcher stored. A chunk encoded before the clock was
        established is shifted to it and its records marked `adjusted`; one
        encoded with a plausible clock is shifted only if the offset has moved
        by more than `Clock.JUMP_NS` since (NTP stepped a stale clock). The new
        payload is stored with the offset it now matches, so the correction
        happens once, and parts of a split inherit both. Raises
        `codec.CorruptChunk` when a payload to shift cannot be decoded."""
        best = self._best_offset(chunk.boot_id)
        if best is None or not best.synced:
            return chunk
        delta = best.offset_ns - chunk.clock_offset_ns
        if chunk.clock_synced and abs(delta) <= Clock.JUMP_NS:
            return chunk
        payload = self.codec.shift(chunk.payload, delta)
        # On a full disk the spool keeps the old payload and offset (consistent: corrected the
        # same way next time); this upload, and split parts, use the corrected ones.
        self.spool.replace_payload(chunk.id, payload, best.offset_ns)
        log.info("chunk %s: wall times corrected by %.3f s to the clock known now", chunk.chunk_id, delta / 1e9)
        return chunk._replace(payload=payload, clock_offset_ns=best.offset_ns, clock_synced=True)

    def _best_offset(self, boot_id: str) -> ClockState | None:
        if boot_id == self._boot_id:
            return self._clock.state()
        known = self.spool.boot_offset(boot_id)
        return ClockState(*known) if known is not None else None

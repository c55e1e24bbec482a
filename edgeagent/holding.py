"""When a chunk may wait in RAM for its acknowledgement instead of going to flash.

Owns the policy of the spool's RAM tier (issue 16; the mechanism is
`Spool.hold` and `edgeagent.spool.held`): which records are *replayable* —
lines of a file on a disk, read up to a file position, which a crash or a
power cut only makes the agent read again — how long held chunks may wait
(`[spool].hold_file_lines` for file lines; for every other record the rest of
its `flush_interval`, so kernel messages reach flash as soon as they did when
every commit was written), what must be written at once, and the two timers
that write what was not acknowledged in time and the positions of what was.

Guarantees (design.md 1): a record no input keeps is on flash within
`flush_interval` of being read unless the receiver acknowledged it sooner; a
file line is written before its file can lose it (forgotten positions are
never held) and after `hold_file_lines` at the latest; counters (losses) and
CRIT+ records that no input keeps are written, synced, at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from edgeagent.config import SpoolConfig
from edgeagent.records import SEVERITY_FATAL, Batch
from edgeagent.spool import NewChunk, Spool
from edgeagent.statedir import filesystem_type

log = logging.getLogger(__name__)

FILES_SOURCE, FILE_POSITION_PREFIX = "files", "file:"
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})  # a power cut empties them: their files keep nothing
HOLD_MAX_BYTES = 1024 * 1024  # compressed bytes held in RAM at most; beyond that chunks are written
HOLD_PAUSE_BYTES = HOLD_MAX_BYTES // 2  # beyond that file sources pause while held chunks are being delivered
PAUSE_MAX = 0.5  # seconds sources wait for an acknowledgement to free RAM before reading on (and writing)
RELEASED_POSITIONS_INTERVAL = 30.0  # seconds: positions of chunks delivered from RAM are written this often,
RELEASED_POSITIONS_BYTES = 8 * 1024 * 1024  # or once this much text was delivered from RAM (what a crash re-sends)


def stable_chunk_id(batches: list[Batch]) -> str:
    """A chunk id derived from the source positions its records were read up
    to, how many there are and the text of the first and last of them, so that reading the same lines again after a
    crash — from the last stored position, which lags what was delivered from
    RAM — gives the same chunk the same id and receivers can drop the copy
    (design.md guarantee 2). Empty (the spool draws a random id) when a batch
    carries no position: nothing could read it again the same way."""
    if not batches or any(b.position is None for b in batches):
        return ""
    digest = hashlib.sha256()
    for b in batches:
        assert b.position is not None
        digest.update(f"{b.position[0]}={b.position[1]}#{len(b.records)}\n".encode())
    for edge in (batches[0].records[:1], batches[-1].records[-1:]):
        for r in edge:
            body = r if isinstance(r, bytes) else r.body
            digest.update(body if isinstance(body, bytes) else body.encode())
    return digest.hexdigest()[:32]


class RamHold:
    """See the module docstring. `store()` writes everything held (the batcher's `flush(store=True)`)."""

    def __init__(self, spool: Spool, config: SpoolConfig, store: Callable[[], object]) -> None:
        self.spool = spool
        self.config = config
        self._store = store
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._released_timer: asyncio.Handle | None = None
        self.open = asyncio.Event()  # file sources may read; cleared by `_gate` (`Batcher.wait_ram_room`)
        self.open.set()
        self._pause_timer: asyncio.TimerHandle | None = None
        self._gate_soon: asyncio.Handle | None = None
        spool.held.on_ack = self._on_ack
        self._ram_dirs: dict[str, bool] = {}  # directory -> on a RAM filesystem

    def replayable(self, batch: Batch) -> bool:
        """Whether these records are still in their input after a crash or a
        power cut: lines of a file on a disk, read up to a file position."""
        if self.config.hold_file_lines <= 0 or batch.source != FILES_SOURCE or batch.position is None:
            return False
        if not batch.position[0].startswith(FILE_POSITION_PREFIX):
            return False
        directory = os.path.dirname(str(batch.attributes.get("log.file.path", "")))
        on_ram = self._ram_dirs.get(directory)
        if on_ram is None:
            on_ram = self._ram_dirs[directory] = filesystem_type(Path(directory or "/")) in RAM_FILESYSTEMS
        return not on_ram

    def never(self, batch: Batch) -> bool:
        """File lines with `hold_file_lines = "0s"`: committed with their positions, never held, as
        before the RAM tier existed (exactly once between file and spool across a crash)."""
        return self.config.hold_file_lines <= 0 and batch.source == FILES_SOURCE and batch.position is not None

    def may_hold(self, chunks: list[NewChunk], replayable: bool, must_write: bool) -> bool:
        """Whether these chunks may wait in RAM: not too much is held, nothing
        held is overdue, nothing in the commit must be written now
        (`must_write`: counters, forgotten positions, a boot's clock), and no
        CRIT/ALERT/EMERG record that no input keeps (journald syncs at once
        after those too)."""
        if must_write or self.spool.held.payload_bytes + sum(len(c.payload) for c in chunks) > HOLD_MAX_BYTES:
            return False
        if self._overdue():
            return False
        return replayable or all(c.max_severity < SEVERITY_FATAL for c in chunks)

    def hold(
        self, chunks: list[NewChunk], positions: dict[str, str | None], replayable: bool, read_since: float | None
    ) -> None:
        """Hand the chunks to the spool's RAM tier with the time by which they
        are written unless acknowledged: file lines `hold_file_lines` from now;
        any other record `flush_interval` after the first of them was read
        (`read_since`), as if it had been committed then."""
        if replayable:
            deadline = time.monotonic() + self.config.hold_file_lines
        else:
            deadline = (read_since or time.monotonic()) + self.config.flush_interval
        self.spool.hold(chunks, positions, deadline, durable=not replayable)
        self._arm()
        self._gate()

    def _gate(self) -> None:
        """Pause the file sources while more than `HOLD_PAUSE_BYTES` of held chunks
        are on their way to the receiver (some in flight, or acknowledgements
        came just now, or the spool just opened and the uploader is still
        connecting), for at most `PAUSE_MAX`: delivery that keeps up paces
        the reading, the file keeps what is not read yet, and nothing more
        reaches flash. Room is left for the chunks already read. A slow or
        broken link does not acknowledge in time: reading goes on and what
        does not fit is written."""
        self._gate_soon = None
        held = self.spool.held
        if held.payload_bytes > HOLD_PAUSE_BYTES and not self._overdue():
            recently = time.monotonic() - held.last_ack < PAUSE_MAX
            if (held.in_flight or recently) and self.open.is_set() and self._pause_timer is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    return  # used outside a loop (tests, tools): nothing reads, nothing to pause
                self.open.clear()
                self._pause_timer = loop.call_later(PAUSE_MAX, self._pause_over)
            return
        self._resume()

    def _pause_over(self) -> None:
        self._pause_timer = None
        self.open.set()

    def _resume(self) -> None:
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        self.open.set()

    def _overdue(self) -> bool:
        deadline = self.spool.held.next_deadline()
        return deadline is not None and deadline <= time.monotonic()

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # used outside a loop (tests, tools): the caller flushes with store=True
        held = self.spool.held
        deadline = held.next_deadline()
        if deadline is not None and self._deadline_timer is None:
            self._deadline_timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._on_deadline)
        if self._released_timer is None and (held.entries or held.released):
            self._released_timer = loop.call_later(RELEASED_POSITIONS_INTERVAL, self._on_released)

    def _on_deadline(self) -> None:
        """Held chunks not acknowledged in time are written: delivery fell behind."""
        self._deadline_timer = None
        deadline = self.spool.held.next_deadline()
        if deadline is not None and deadline <= time.monotonic() + 0.001:
            self._store()
        self._arm()

    def _on_ack(self) -> None:
        """Chunks were acknowledged (called inside `Spool.ack`: act from the loop):
        maybe room for the paused sources; and when much was delivered from RAM
        since the positions were last written, write them now (a crash re-sends less)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside a loop (tests, tools): the caller writes
        if self.spool.held.acked_raw_bytes >= RELEASED_POSITIONS_BYTES:
            if self._released_timer is not None:
                self._released_timer.cancel()
            self._released_timer = loop.call_soon(self._on_released)
        if not self.open.is_set() and self._gate_soon is None:
            self._gate_soon = loop.call_soon(self._gate)

    def _on_released(self) -> None:
        self._released_timer = None
        try:
            self.spool.commit_released()
        except Exception as e:  # a full disk: kept in RAM, written with the next commit that succeeds
            log.warning("writing the positions of chunks delivered from RAM failed: %s", e)
        self._arm()

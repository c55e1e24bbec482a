"""Reports of what a receiver refused for good, without ever feeding a refusal loop.

Owns the reports about refusals (guarantee 5; the records are built by
`loss.record`): chunks moved to the dead letters (`rejected`) and records a
receiver dropped from an accepted request (OTLP partial success,
`partially_rejected`). What it guarantees:

- every refusal is counted in the spool when it happens (`dead_letter_*`,
  `rejected_records`, and the `unreported_*` counters of what no record has
  told yet), so a crash before the report loses no count;
- reports are aggregated: at most one record per kind per `interval`, holding
  the totals since the last one and the last reason. Shipping the record and
  taking its totals off `unreported_*` are committed in one transaction (the
  batcher's), so a report is neither lost nor sent twice across a crash;
- no loop, by construction: a refused chunk that holds nothing but such
  reports is counted and dead-lettered but never reported again. A receiver
  that refuses everything (HTTP 400, an MQTT ACL) gets one report for the real
  data and one dead letter for that report, then nothing until new data comes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence

from edgeagent import loss
from edgeagent.codec import ChunkCodec, CorruptChunk
from edgeagent.records import Record
from edgeagent.spool import Spool, StoredChunk

log = logging.getLogger(__name__)

KINDS = (loss.REJECTED, loss.PARTIALLY_REJECTED)
DEFAULT_INTERVAL = 60.0
# A chunk of reports only is small: larger ones are real data, not worth decoding to check.
_MAX_REPORT_RECORDS = 64
_MAX_REPORT_BYTES = 1024 * 1024

# on_loss(record, counters): ship `record` and add `counters` in the same commit.
ShipLoss = Callable[[Record, dict[str, int]], None]


def _counter(kind: str, what: str) -> str:
    return f"unreported_{kind}_{what}"


class RefusalReports:
    """See the module docstring. Used by `UploaderContext`, for every uploader."""

    def __init__(self, spool: Spool, ship: ShipLoss | None, interval: float = DEFAULT_INTERVAL) -> None:
        self._spool = spool
        self._ship = ship
        self._interval = interval
        self._pending: dict[str, list[int]] = {}  # kind -> [records, chunks] not reported yet
        self._persisted: dict[str, int] = {}  # unreported_* counter values this process may take off
        self._reason: dict[str, str] = {}
        self._last_report: dict[str, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._load()

    def _load(self) -> None:
        """Refusals counted before a restart but never reported are reported now."""
        counters = self._spool.counters()
        for kind in KINDS:
            records, chunks = counters.get(_counter(kind, "records"), 0), counters.get(_counter(kind, "chunks"), 0)
            if records > 0 or chunks > 0:
                self._pending[kind] = [records, chunks]
                self._persisted[_counter(kind, "records")] = records
                self._persisted[_counter(kind, "chunks")] = chunks
                self._reason[kind] = "refused before the agent restarted"
        self._schedule()

    def rejected(self, chunks: Sequence[StoredChunk], reason: str) -> None:
        """`chunks` were just moved to the dead letters."""
        fresh = [c for c in chunks if not only_reports(c)]
        if fresh:
            self._add(loss.REJECTED, sum(c.records for c in fresh), len(fresh), reason)
        elif chunks:
            log.info("a chunk holding only refusal reports was refused too; counted, not reported again")

    def partially_rejected(self, records: int, reason: str, chunks: Sequence[StoredChunk]) -> None:
        """An accepted request of `chunks` had `records` dropped by the receiver."""
        if chunks and all(only_reports(c) for c in chunks):
            return
        self._add(loss.PARTIALLY_REJECTED, records, 0, reason)

    def _add(self, kind: str, records: int, chunks: int, reason: str) -> None:
        pending = self._pending.setdefault(kind, [0, 0])
        pending[0] += records
        pending[1] += chunks
        self._reason[kind] = reason
        counters = {_counter(kind, "records"): records, _counter(kind, "chunks"): chunks}
        try:
            self._spool.add_counters(counters)
        except (sqlite3.Error, OSError) as e:
            # The dead_letter_* counters were committed with the move; only the
            # restart-proof reminder is missing. The record still goes out.
            log.error("could not count the refusal to report (%s)", e)
        else:
            for name, value in counters.items():
                self._persisted[name] = self._persisted.get(name, 0) + value
        self._schedule()

    def _schedule(self) -> None:
        """Report what is due now; arm one timer for what must wait for its interval."""
        now = time.monotonic()
        waiting = []
        for kind in list(self._pending):
            due = self._last_report.get(kind, -self._interval) + self._interval
            if now >= due:
                self._report(kind, now)
            else:
                waiting.append(due - now)
        if waiting and self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # outside the loop (tools, tests): the next refusal reports it
            self._timer = loop.call_later(min(waiting), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    def _report(self, kind: str, now: float) -> None:
        if self._ship is None:
            return
        records, chunks = self._pending.pop(kind)
        reason = self._reason.pop(kind, "")
        self._last_report[kind] = now
        taken = {name: -self._persisted.pop(name, 0) for name in (_counter(kind, "records"), _counter(kind, "chunks"))}
        what = f"{records} records" + (f" in {chunks} chunks moved to the dead letters" if chunks else "")
        self._ship(
            loss.record(
                kind,
                f"edgeagent: the receiver refused {what} for good (last reason: {reason})",
                records=records,
                chunks=chunks,
                detail=reason,
            ),
            {name: value for name, value in taken.items() if value},
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def only_reports(chunk: StoredChunk) -> bool:
    """Whether every record of `chunk` is a refusal report (the agent's own)."""
    if chunk.records > _MAX_REPORT_RECORDS or len(chunk.payload) > _MAX_REPORT_BYTES:
        return False
    try:
        records = ChunkCodec().records(chunk.payload, max_size=4 * _MAX_REPORT_BYTES)
    except CorruptChunk:
        return False
    kinds = [record["attributes"].get(loss.REASON) for record in records]
    return bool(kinds) and all(kind in KINDS for kind in kinds)

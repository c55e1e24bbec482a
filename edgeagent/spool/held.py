"""The spool's RAM tier: chunks held instead of written while delivery keeps up.

Owns the chunks `Spool.hold` took that were neither acknowledged nor written
yet, in id order, each with the source positions reached once it (and every
chunk before it) is safe, and a deadline by which the batcher writes it unless
it was acknowledged. No SQLite here; the spool writes what this hands it.

Guarantees (design.md guarantee 1):
- A position leaves this tier only once every chunk held before it was
  acknowledged (`released`: the records it covers were delivered and need no
  spooling), or together with every unacknowledged chunk, which the spool then
  writes in the same transaction (`pending`). It is never stored ahead of
  records that are neither delivered nor stored.
- Nothing is dropped here: an entry leaves by acknowledgement, or by being
  written (`clear` after the spool's transaction committed).
Ids come from the spool's one id sequence, so held and stored chunks go out in
one order and an acknowledgement finds its chunk wherever it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeagent.spool.chunks import NewChunk, StoredChunk


@dataclass(slots=True)
class HeldEntry:
    chunk: StoredChunk  # as handed to the uploader
    new: NewChunk  # as the spool writes it (same id and chunk id)
    positions: dict[str, str | None]  # None: forget that position
    deadline: float  # time.monotonic(): written by then unless acknowledged
    durable: bool  # its write is synced (records a crash or power cut could not bring back)
    acked: bool = False
    sent: bool = False  # handed to the uploader: an acknowledgement may come


@dataclass
class HeldChunks:
    """See the module docstring."""

    entries: list[HeldEntry] = field(default_factory=list)  # id order
    released: dict[str, str | None] = field(default_factory=dict)  # positions of an acknowledged prefix
    acked_chunks: int = 0  # delivered from RAM since the last write (counters)
    acked_records: int = 0
    acked_raw_bytes: int = 0
    on_ack: Callable[[], None] | None = None  # called after every `ack` (the RAM hold's policy listens)
    # time.monotonic() of the last acknowledgement, of a held or a stored chunk. It starts at the spool's
    # opening, as if one had just come: the uploader, connecting meanwhile, gets the same grace to deliver
    # (RamHold's pause) before what does not fit in RAM goes to flash; reading a file is faster than a
    # connection (about 40 chunks of a bulk read went to flash before the first CONNACK, measured).
    last_ack: float = field(default_factory=time.monotonic)

    def add(self, entry: HeldEntry) -> None:
        self.entries.append(entry)

    def add_positions(self, positions: dict[str, str | None]) -> None:
        """Positions reached with no records (filtered lines): safe once what was held before them is."""
        if self.entries:
            self.entries[-1].positions.update(positions)
        else:
            self.released.update(positions)

    @property
    def unwritten(self) -> bool:
        """Whether anything handed to this tier is still only in RAM: held chunks, or the positions and
        counters of chunks delivered from it (a stop writes them, or the next start sends those lines again)."""
        return bool(self.entries or self.released or self.acked_chunks)

    @property
    def count(self) -> int:
        return sum(not e.acked for e in self.entries)

    @property
    def payload_bytes(self) -> int:
        return sum(len(e.new.payload) for e in self.entries if not e.acked)

    def holds(self, chunk_id: int) -> bool:
        return any(e.chunk.id == chunk_id and not e.acked for e in self.entries)

    def oldest(self, n: int, after_id: int) -> list[StoredChunk]:
        """The first `n` unacknowledged chunks after `after_id`, marked as handed out."""
        entries = [e for e in self.entries if not e.acked and e.chunk.id > after_id][:n]
        for e in entries:
            e.sent = True
        return [e.chunk for e in entries]

    @property
    def in_flight(self) -> bool:
        """Whether a held chunk was handed to the uploader and not acknowledged yet."""
        return any(e.sent and not e.acked for e in self.entries)

    def ack(self, ids: Iterable[int]) -> set[int]:
        """Mark held chunks acknowledged (returns their ids); an acknowledged
        prefix releases its positions."""
        wanted = set(ids)
        done: set[int] = set()
        if wanted:
            self.last_ack = time.monotonic()
        for e in self.entries:
            if e.chunk.id in wanted and not e.acked:
                e.acked = True
                done.add(e.chunk.id)
                self.acked_chunks += 1
                self.acked_records += e.chunk.records
                self.acked_raw_bytes += e.chunk.raw_bytes
        while self.entries and self.entries[0].acked:
            self.released.update(self.entries.pop(0).positions)
        if wanted and self.on_ack is not None:
            self.on_ack()
        return done

    def positions(self) -> dict[str, str | None]:
        """Every position handed to this tier, the newest value per key."""
        out = dict(self.released)
        for e in self.entries:
            out.update(e.positions)
        return out

    def pending(self) -> list[HeldEntry]:
        """The unacknowledged entries, to be written with `positions()` in one transaction."""
        return [e for e in self.entries if not e.acked]

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self.entries if not e.acked), default=None)

    def counters(self) -> dict[str, int]:
        """What chunks delivered from RAM add to the spool's counters: taken in
        charge (spooled) and acknowledged, as a stored chunk would have been, so
        `spooled - acked - ...` still counts what the file holds; and how much
        of that never touched flash."""
        if not self.acked_chunks:
            return {}
        return {
            "spooled_chunks": self.acked_chunks,
            "spooled_records": self.acked_records,
            "spooled_raw_bytes": self.acked_raw_bytes,
            "acked_chunks": self.acked_chunks,
            "acked_records": self.acked_records,
            "acked_from_ram_chunks": self.acked_chunks,
            "acked_from_ram_records": self.acked_records,
        }

    def forget_released(self) -> None:
        """After a transaction wrote `released` and `counters()`."""
        self.released = {}
        self.acked_chunks = self.acked_records = self.acked_raw_bytes = 0

    def clear(self) -> None:
        """After a transaction wrote `pending()`, `positions()` and `counters()`."""
        self.entries = []
        self.forget_released()

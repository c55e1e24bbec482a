"""The durable spool: the only code that touches SQLite.

Owns `state_dir/spool.db`: chunks of compressed records waiting for upload,
source positions, boots (clock offsets for time correction), counters, dead
letters and the agent's status. One connection, used from one thread (the event
loop's); every write is one `BEGIN IMMEDIATE` transaction. No other module
opens a SQLite connection or runs SQL: everything goes through `Spool` (others
only catch `sqlite3.Error` where a spool call may raise it).

What it guarantees (design.md):
- durability (1): `append()` stores chunks and the source positions they cover
  in one transaction, synced before it returns with `durability = "full"`;
  a chunk is deleted only by `ack()` (or moved to dead letters by `reject()`);
- space (4): payload bytes stay under `max_size` or the filesystem's room,
  evicting the least valuable chunks first and counting what was dropped;
- losses (5): evictions, dead letters and salvage losses are counted, and the
  spool's own losses are handed out by `take_losses()` to be shipped;
- unavailable is not corrupt (6): disk full, EIO, read-only and locked raise
  `SpoolUnavailable` (open) or `sqlite3.OperationalError` (append) with nothing
  changed; acks and rejects never raise for a full disk. Only real corruption
  moves the file aside, and what can be read from it is salvaged.

Modules, bottom up:
- `database`: connect, pragmas, schema version, quick_check, quarantine,
  transactions, and the errors that tell corrupt from unavailable;
- `snapshot`: the current schema (`SCHEMA_VERSION`, its CREATE statements),
  created in-process in a fresh file, in one transaction;
- `schema`: the migrations (sqlite-utils, run in a child process so the agent
  never imports it), what defines the schema: only a spool that exists at an
  older version goes through them, and a test keeps `snapshot` identical to
  what they build;
- `salvage`: copying what can be read out of a quarantined file;
- `stopped`: reading a stopped agent's spool exactly as it left it (no
  `-shm` or `-wal` created, nothing written, committed WAL content included);
- `opening`: `SpoolBase`, opening, run-time recovery and the reserve file;
- `state`: positions, boots, counters and status;
- `chunks`: `Spool`, the chunk queue (append, read, ack, reject, split, evict).

The names below are imported on first use (PEP 562), not when the package is:
`from edgeagent.spool import Spool` works as usual, and the schema child
(`python -m edgeagent.spool.schema`) loads only `schema` and `snapshot`, not
the rest of the spool and their imports (about 10 ms of the child's CPU,
measured).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeagent.errors import SpoolError, SpoolUnavailable
    from edgeagent.spool.chunks import Eviction, NewChunk, Spool, StoredChunk
    from edgeagent.spool.database import is_corruption, wal_limit_for
    from edgeagent.spool.snapshot import SCHEMA_VERSION

_HOMES = {
    "SCHEMA_VERSION": "edgeagent.spool.snapshot",
    "Eviction": "edgeagent.spool.chunks",
    "NewChunk": "edgeagent.spool.chunks",
    "Spool": "edgeagent.spool.chunks",
    "SpoolError": "edgeagent.errors",
    "SpoolUnavailable": "edgeagent.errors",
    "StoredChunk": "edgeagent.spool.chunks",
    "is_corruption": "edgeagent.spool.database",
    "wal_limit_for": "edgeagent.spool.database",
}
__all__ = [
    "SCHEMA_VERSION",
    "Eviction",
    "NewChunk",
    "Spool",
    "SpoolError",
    "SpoolUnavailable",
    "StoredChunk",
    "is_corruption",
    "wal_limit_for",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)

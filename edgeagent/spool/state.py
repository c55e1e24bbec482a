"""The spool's small tables: source positions, boots, counters and status.

Positions are written by `Spool.append` in the same transaction as the chunks
they cover (guarantee 1); here they are read and deleted. Boots hold each
boot's clock offset for time correction at upload. Counters only ever grow
(what was spooled, acknowledged, evicted, rejected, lost) and survive a
salvage. Status is what `edgeagent status` shows, as JSON values, not synced.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from edgeagent.spool.database import _bump, log
from edgeagent.spool.opening import SpoolBase


class SpoolState(SpoolBase):
    """Positions, boots, counters and status of an open spool."""

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

    def counters(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT name, value FROM counters").fetchall())

    def status(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM status").fetchall()}

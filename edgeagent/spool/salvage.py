"""Salvage of a corrupt spool file that `database._quarantine` moved aside.

What can still be read from it (positions, boots, counters, chunks whose
CRC32 verifies and whose payload the `check_payload` function given to
`Spool.open` accepts: the agent passes `edgeagent.codec`'s bounded decode, so
the spool itself never decompresses anything) is copied into the fresh spool
in one transaction, what could not be is counted and handed out as a loss
record (`Spool.take_losses`), and only then is the copy renamed
`.salvaged-<time>`; copies not salvaged yet are never deleted, and only the
last few salvaged ones are kept.
"""

from __future__ import annotations

import os
import sqlite3
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from edgeagent import loss
from edgeagent.records import Record
from edgeagent.spool.database import _CHUNK_COLUMNS, _bump

_QUARANTINE_KEEP = 2  # salvaged copies kept for inspection; copies not salvaged yet are never deleted

# Raises ValueError for a payload that cannot be decoded (edgeagent.codec.ChunkCodec.decode).
PayloadCheck = Callable[[bytes], object]


def _salvage_pending(path: Path, dest: sqlite3.Connection, check_payload: PayloadCheck | None) -> list[Record]:
    """Salvage every quarantined copy of `path` that was not salvaged yet into
    `dest` (one transaction per copy, remembered in it), rename it
    `.salvaged-...`, and delete salvaged copies beyond the last few. A copy
    whose salvage did not finish is never deleted. Returns the loss records."""
    losses: list[Record | None] = []
    for copy in sorted(path.parent.glob(f"{path.name}.corrupt-*")):
        if copy.name.endswith(("-wal", "-shm")):
            continue
        losses.append(_salvage_one(copy, dest, check_payload))
        done = copy.with_name(copy.name.replace(".corrupt-", ".salvaged-", 1))
        for suffix in ("", "-wal", "-shm"):
            if Path(str(copy) + suffix).exists():
                os.replace(Path(str(copy) + suffix), Path(str(done) + suffix))
    salvaged = sorted(p for p in path.parent.glob(f"{path.name}.salvaged-*") if not p.name.endswith(("-wal", "-shm")))
    for stale in salvaged[:-_QUARANTINE_KEEP]:
        for suffix in ("", "-wal", "-shm"):
            Path(str(stale) + suffix).unlink(missing_ok=True)
    return [lost for lost in losses if lost is not None]


def _salvage_one(copy: Path, dest: sqlite3.Connection, check_payload: PayloadCheck | None) -> Record | None:
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
        nothing: tuple[dict[str, int], dict[str, int]] = ({}, {"chunks": 0, "records": 0})
        old_counters, got = _copy_readable(src, dest, check_payload) if src is not None else nothing
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
    return loss.record(
        loss.SPOOL_CORRUPT,
        f"edgeagent: the spool was corrupt and was moved aside to {copy.name}; salvaged {got['chunks']} chunks "
        f"({got['records']} records); lost {lost_chunks} chunks, {records_text} records, {lost_bytes} bytes",
        records=lost_records if lost_records >= 0 else None,
        chunks=lost_chunks,
        byte_count=lost_bytes,
        extra={"edgeagent.spool.quarantined": copy.name},
    )


def _copy_readable(
    src: sqlite3.Connection, dest: sqlite3.Connection, check_payload: PayloadCheck | None
) -> tuple[dict[str, int], dict[str, int]]:
    """Positions, boots, counters and every chunk whose CRC32 verifies and
    whose payload `check_payload` accepts (CRC32 alone without it). Returns the
    copy's counters and what was copied (chunks, records, bytes, failed rows)."""
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
    for chunk_id in ids:
        try:
            row = src.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
            if zlib.crc32(row[9]) != row[10]:
                raise ValueError("checksum mismatch")
            if check_payload is not None:
                check_payload(row[9])
        except (sqlite3.Error, TypeError, ValueError):
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

"""Spool schema migrations (sqlite-utils): what defines the schema.

Run as `python -m edgeagent.spool.schema SPOOL_PATH VERSION [--exclusive]` by
the spool (`database.SchemaChild`) when the file exists at a version behind
the one the agent reads (`SCHEMA_VERSION`, passed as VERSION), in a child
process, so a running agent never carries sqlite-utils (and click, dateutil,
pluggy) in RAM. A fresh file does not come here: the agent creates it from
`snapshot`, which a test keeps identical to what these migrations build from
version 0 (and this child still can). This module imports nothing else of
edgeagent but `snapshot` (the package's `__init__` loads its modules lazily),
so the child pays only for the interpreter, sqlite3 and sqlite-utils, whose
plugins it neither looks for nor runs. Each migration step takes the spool from version N to N+1 inside one
transaction; a spool written by a newer version is refused by the caller. A
failure is reported as `sqlite error <code>: <message>` on stderr (exit 3), so
the caller can tell a corrupt file from a disk that is full or failing.
"""

from __future__ import annotations

import sqlite3
import sys

import sqlite_utils

from edgeagent.spool.snapshot import set_new_file_layout


def _v1(db: sqlite_utils.Database) -> None:
    # AUTOINCREMENT: an id is never reused after deletes, so a late ack can
    # never delete a newer chunk that took the id of an acknowledged one.
    db.execute(
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            chunk_id TEXT NOT NULL,
            created_ns INTEGER NOT NULL,
            boot_id TEXT NOT NULL,
            clock_offset_ns INTEGER NOT NULL,
            clock_synced INTEGER NOT NULL,
            records INTEGER NOT NULL,
            raw_bytes INTEGER NOT NULL,
            max_severity INTEGER NOT NULL,
            payload BLOB NOT NULL,
            crc32 INTEGER NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            chunk_id TEXT NOT NULL,
            created_ns INTEGER NOT NULL,
            rejected_ns INTEGER NOT NULL,
            reason TEXT NOT NULL,
            records INTEGER NOT NULL,
            payload BLOB NOT NULL
        )"""
    )
    # create_table_sql, not Table.create: sqlite-utils 3.x (Yocto scarthgap, the
    # OpenWrt feed) commits inside create(), which ended the migration's
    # transaction early and failed the first start ("cannot rollback").
    db.execute(
        db.create_table_sql("positions", {"key": str, "value": str, "updated_ns": int}, pk="key", not_null={"value"})
    )
    db.execute(
        db.create_table_sql(
            "boots",
            {"boot_id": str, "clock_offset_ns": int, "synced": int, "first_seen_ns": int, "updated_ns": int},
            pk="boot_id",
        )
    )
    db.execute(db.create_table_sql("counters", {"name": str, "value": int}, pk="name", not_null={"value"}))
    db.execute(db.create_table_sql("status", {"key": str, "value": str, "updated_ns": int}, pk="key"))


# Adding a step: also bump snapshot.SCHEMA_VERSION and update snapshot.TABLES (tests/test_schema_snapshot.py).
MIGRATIONS = {0: _v1}


def migrate(conn: sqlite3.Connection, current: int, target: int) -> None:
    # execute_plugins=False: no search through every installed package's entry points for sqlite-utils
    # plugins (importlib.metadata: 10-20 ms of the child's CPU, more with more packages installed), and no
    # third-party code on the spool's connection.
    db = sqlite_utils.Database(conn, execute_plugins=False)
    if current == 0 and not db.table_names():
        set_new_file_layout(conn)
    for version in range(current, target):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](db)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def main(argv: list[str]) -> int:
    path, target = argv[0], int(argv[1])
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        try:
            if "--exclusive" in argv[2:]:
                conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current < target:
                migrate(conn, current, target)
        finally:
            conn.close()
    except sqlite3.Error as e:
        # The parent tells corruption (quarantine) from unavailability (wait) by this code.
        print(f"sqlite error {getattr(e, 'sqlite_errorcode', 1)}: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The spool schema at `SCHEMA_VERSION`, created in-process in a fresh file.

A brand-new spool (`user_version` 0 and no tables) gets the current schema
straight from this snapshot, as Rails' `db:schema:load` does from `schema.rb`:
the file layout pragmas, every CREATE statement and `user_version =
SCHEMA_VERSION` in one `BEGIN IMMEDIATE` transaction, with plain `sqlite3` and
no child process. A crash leaves either no schema (the next open creates it
again) or all of it. Only a spool that exists at an older version goes through
the migrations (`schema`, sqlite-utils, in a child process); they stay what
defines the schema, and `tests/test_schema_snapshot.py` fails when this
snapshot differs from what they build.

This module imports nothing but `sqlite3`: the agent imports it, and must
never load sqlite-utils. Adding a migration: bump `SCHEMA_VERSION`, add the
step to `schema.MIGRATIONS`, and copy the new `sqlite_master` SQL here (the
snapshot test prints it).
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1
PAGE_SIZE = 1024  # of spools created from now on; an existing spool keeps its own

# Exactly the `sqlite_master.sql` text the migrations (sqlite-utils 4.x) leave, in their order: the rows of a
# snapshot-built spool and a migrated one are identical (sqlite_sequence and the primary keys' autoindexes
# come with these statements).
TABLES = (
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
        )""",
    """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            chunk_id TEXT NOT NULL,
            created_ns INTEGER NOT NULL,
            rejected_ns INTEGER NOT NULL,
            reason TEXT NOT NULL,
            records INTEGER NOT NULL,
            payload BLOB NOT NULL
        )""",
    'CREATE TABLE "positions" (\n   "key" TEXT PRIMARY KEY,\n   "value" TEXT NOT NULL,\n   "updated_ns" INTEGER\n)',
    'CREATE TABLE "boots" (\n   "boot_id" TEXT PRIMARY KEY,\n   "clock_offset_ns" INTEGER,\n   "synced" INTEGER,\n'
    '   "first_seen_ns" INTEGER,\n   "updated_ns" INTEGER\n)',
    'CREATE TABLE "counters" (\n   "name" TEXT PRIMARY KEY,\n   "value" INTEGER NOT NULL\n)',
    'CREATE TABLE "status" (\n   "key" TEXT PRIMARY KEY,\n   "value" TEXT,\n   "updated_ns" INTEGER\n)',
)


def set_new_file_layout(conn: sqlite3.Connection) -> None:
    """The pragmas of a new spool file, outside any transaction and before its first table.

    Both only take effect before the first table exists (and before WAL mode writes page 1), and page_size
    only before auto_vacuum (which fixes the page size of the empty file). A commit writes every page it
    touches in full: 1 KiB pages make a trickle commit (a small chunk, its positions, counters) a quarter of
    the WAL bytes of 4 KiB ones (docs/spool.md, "Flash wear")."""
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")


def schema_state(conn: sqlite3.Connection) -> tuple[int, bool]:
    """(user_version, whether the file has any schema object). Raises sqlite3 errors (corrupt or not)."""
    version, has_schema = conn.execute(
        "SELECT (SELECT user_version FROM pragma_user_version), EXISTS (SELECT 1 FROM sqlite_master)"
    ).fetchone()
    return int(version), bool(has_schema)


def create_if_fresh(conn: sqlite3.Connection) -> int:
    """Create the current schema in a fresh file (user_version 0, no tables) on `conn` (autocommit mode), in
    one transaction; return the file's schema version afterwards (unchanged when it was not fresh)."""
    version, has_schema = schema_state(conn)
    if version != 0 or has_schema:
        return version
    set_new_file_layout(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version, has_schema = schema_state(conn)  # again under the write lock: another writer may have been first
        if version == 0 and not has_schema:
            for statement in TABLES:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            version = SCHEMA_VERSION
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back by itself (disk full, I/O error)
            conn.execute("ROLLBACK")
        raise
    return version

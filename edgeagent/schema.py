"""Spool schema creation and migrations (sqlite-utils).

Imported only when the spool's `user_version` is behind `SCHEMA_VERSION`, so a
running agent does not carry sqlite-utils (and click, dateutil, pluggy) in RAM.
Each migration step takes the spool from version N to N+1 inside one
transaction; a spool written by a newer version is refused by the caller.
"""

from __future__ import annotations

import sqlite3

import sqlite_utils


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
    db["positions"].create({"key": str, "value": str, "updated_ns": int}, pk="key", not_null={"value"})
    db["boots"].create(
        {"boot_id": str, "clock_offset_ns": int, "synced": int, "first_seen_ns": int, "updated_ns": int},
        pk="boot_id",
    )
    db["counters"].create({"name": str, "value": int}, pk="name", not_null={"value"})
    db["status"].create({"key": str, "value": str, "updated_ns": int}, pk="key")


MIGRATIONS = {0: _v1}


def migrate(conn: sqlite3.Connection, current: int, target: int) -> None:
    db = sqlite_utils.Database(conn)
    for version in range(current, target):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](db)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

"""A fresh spool gets its schema in-process from `edgeagent/spool/snapshot.py`;
the snapshot is checked against what the sqlite-utils migrations build, and
only a spool that exists at an older version goes through them (the child).
Real SQLite files, real child processes, a real full tmpfs, a real SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from disk import fill, tmpfs
from test_schema_child import TABLES, make_behind, schema_of

from edgeagent.spool import SCHEMA_VERSION, Spool, SpoolUnavailable, database
from edgeagent.spool.snapshot import TABLES as SNAPSHOT_TABLES


def describe(path: Path) -> dict[str, Any]:
    """What must be identical between a migrated spool and a snapshot-built one."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        pragmas = {p: conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("user_version", "page_size", "auto_vacuum")}
        pragmas["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    return {"sqlite_master": rows, **pragmas}


def created_statements(path: Path) -> list[str]:
    """The CREATE statements of `path` in the order they ran, as `snapshot.TABLES` must hold them."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid").fetchall()
    conn.close()
    return [sql for (sql,) in rows if sql != "CREATE TABLE sqlite_sequence(name,seq)"]


@pytest.fixture
def no_schema_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any schema child the spool starts fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a schema child was started for a fresh spool")

    monkeypatch.setattr(database.SchemaChild, "__init__", refuse)


def test_the_snapshot_builds_exactly_what_the_migrations_build(tmp_path: Path, no_schema_child: None) -> None:
    migrated, snapshot = tmp_path / "migrated.db", tmp_path / "snapshot.db"
    child = [sys.executable, "-m", "edgeagent.spool.schema", str(migrated), str(SCHEMA_VERSION)]
    subprocess.run(child, check=True, cwd=REPO)  # every migration, from version 0
    Spool.open(migrated).close()  # current already: the spool only sets its journal mode
    Spool.open(snapshot).close()
    statements = created_statements(migrated)
    assert describe(snapshot) == describe(migrated), (
        "edgeagent/spool/snapshot.py no longer builds what the migrations in edgeagent/spool/schema.py build: "
        f"set snapshot.SCHEMA_VERSION to {describe(migrated)['user_version']} and snapshot.TABLES to these "
        f"statements, in this order:\n{statements!r}"
    )
    assert list(SNAPSHOT_TABLES) == statements
    assert describe(snapshot)["journal_mode"] == "wal"
    assert describe(snapshot)["page_size"] == 1024 and describe(snapshot)["auto_vacuum"] == 2  # INCREMENTAL


def test_a_fresh_spool_is_created_without_a_child(tmp_path: Path, no_schema_child: None) -> None:
    """No file and an empty file: the open creates the schema itself (before: a child process, ~0.1 CPU s)."""
    for path in (tmp_path / "none" / "spool.db", tmp_path / "empty.db"):
        if path.name == "empty.db":
            path.touch(mode=0o600)
        Spool.open(path).close()
        assert schema_of(path) == (SCHEMA_VERSION, TABLES)


def test_an_older_spool_still_migrates_through_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    children: list[Path] = []
    real_init = database.SchemaChild.__init__

    def counting_init(self: database.SchemaChild, path: Path, exclusive: bool) -> None:
        children.append(path)
        real_init(self, path, exclusive)

    monkeypatch.setattr(database.SchemaChild, "__init__", counting_init)
    older, fresh = tmp_path / "older.db", tmp_path / "fresh.db"
    make_behind(older)
    Spool.open(older).close()
    assert children == [older]
    Spool.open(fresh).close()
    assert children == [older], "the fresh one was created in-process"
    assert set(describe(fresh)["sqlite_master"]) <= set(describe(older)["sqlite_master"])
    assert (describe(older)["user_version"], describe(older)["journal_mode"]) == (SCHEMA_VERSION, "wal")
    if SCHEMA_VERSION > 1:  # built by the migrations up to the version before: the same file as a fresh one
        assert describe(older) == describe(fresh)


def test_a_full_disk_at_the_first_start_is_unavailable_not_corrupt(tmp_path: Path, no_schema_child: None) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "spool.db"
        fill(disk)
        with pytest.raises(SpoolUnavailable, match="full"):
            Spool.open(path)
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "spool.db"], "nothing quarantined or left over"
        assert schema_of(path) == (0, [])
        (disk / "filler").unlink()
        Spool.open(path).close()
        assert schema_of(path) == (SCHEMA_VERSION, TABLES)


# Runs Spool.open on a fresh file and SIGKILLs itself when the creation is about to run `statement`.
CRASH_AT = """
import os, signal, sqlite3, sys
from edgeagent.spool import Spool
connect = sqlite3.connect
def crashing_connect(*args, **kwargs):
    conn = connect(*args, **kwargs)
    conn.set_trace_callback(lambda sql: sql.startswith(sys.argv[2]) and os.kill(os.getpid(), signal.SIGKILL))
    return conn
sqlite3.connect = crashing_connect
Spool.open(sys.argv[1])
"""


@pytest.mark.parametrize("statement", ['CREATE TABLE "boots"', "PRAGMA user_version =", "COMMIT"])
def test_a_crash_while_creating_leaves_no_schema_and_the_next_open_creates_it(tmp_path: Path, statement: str) -> None:
    path = tmp_path / "spool.db"
    crash = subprocess.run([sys.executable, "-c", CRASH_AT, str(path), statement], cwd=REPO)
    assert crash.returncode == -signal.SIGKILL, "the creation ran in the agent's own process, and was killed"
    assert schema_of(path) == (0, []), "all or nothing: one transaction"
    Spool.open(path).close()
    assert schema_of(path) == (SCHEMA_VERSION, TABLES)
    assert describe(path)["page_size"] == 1024

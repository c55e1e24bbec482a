"""The spool schema migration with the sqlite-utils the device images ship:
3.38 on Yocto scarthgap and in our OpenWrt feed, 4.x elsewhere. sqlite-utils
3.x commits inside `Table.create()`, which used to end the migration's
transaction early and fail the agent's first start."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]


def test_the_migration_is_atomic_and_complete_with_sqlite_utils_3(tmp_path: Path) -> None:
    target = tmp_path / "sqlite-utils-3"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", "--target",
         str(target), "sqlite-utils==3.38"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if install.returncode != 0:
        pytest.skip(f"sqlite-utils 3.38 cannot be installed here: {install.stderr.strip()[-300:]}")
    spool = tmp_path / "spool.db"
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent.spool.schema", str(spool)], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert out.returncode == 0, (
        out.stderr
    )  # before the fix: "sqlite error 1: cannot rollback - no transaction is active"
    assert tables(spool) == ["boots", "chunks", "counters", "dead_letters", "positions", "sqlite_sequence", "status"]
    with sqlite3.connect(spool) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1

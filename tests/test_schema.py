"""The spool schema child: the migration with the sqlite-utils the device
images ship (3.38 on Yocto scarthgap and in our OpenWrt feed, 4.x elsewhere;
sqlite-utils 3.x commits inside `Table.create()`, which used to end the
migration's transaction early and fail the agent's first start), and what the
child loads."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from edgeagent.spool import SCHEMA_VERSION
from edgeagent.spool.schema import MIGRATIONS
from edgeagent.spool.snapshot import TABLES as SNAPSHOT_TABLES

SPOOL_MODULES = {
    "edgeagent.errors",
    "edgeagent.spool.chunks",
    "edgeagent.spool.database",
    "edgeagent.spool.held",
    "edgeagent.spool.opening",
    "edgeagent.spool.salvage",
    "edgeagent.spool.state",
}


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
    child = [sys.executable, "-m", "edgeagent.spool.schema", str(spool), str(SCHEMA_VERSION)]
    out = subprocess.run(child, capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, (
        out.stderr
    )  # before the fix: "sqlite error 1: cannot rollback - no transaction is active"
    assert tables(spool) == ["boots", "chunks", "counters", "dead_letters", "positions", "sqlite_sequence", "status"]
    with sqlite3.connect(spool) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        built = conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid").fetchall()
    conn.close()
    # The same schema as the snapshot a fresh spool gets; sqlite-utils 3.x only quotes names as [name].
    unquoted = [re.sub(r"\[(\w+)\]", r'"\1"', sql) for (sql,) in built]
    built_sql = [sql for sql in unquoted if not sql.startswith("CREATE TABLE sqlite_sequence")]
    assert built_sql == list(SNAPSHOT_TABLES)


# Runs the schema module as `python -m` does (as __main__), then prints the child's sys.modules: -X importtime
# would not show modules loaded through importlib.import_module (the package's lazy names).
RUN_AND_LIST_MODULES = """
import json, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module("edgeagent.spool.schema", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted(sys.modules)))
"""


def modules_of_a_child(spool: Path, env: dict[str, str] | None = None) -> set[str]:
    """The modules a real schema child building `spool` has loaded when it is done."""
    argv = [sys.executable, "-c", RUN_AND_LIST_MODULES, "edgeagent.spool.schema", str(spool), str(SCHEMA_VERSION)]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(json.loads(run.stdout))


def test_the_child_loads_the_schema_module_and_sqlite_utils_only(tmp_path: Path) -> None:
    """The child is told the version to build: it imports no other spool module (chunks, database, ...: about
    10 ms of its CPU); before, `main` imported `SCHEMA_VERSION` from the package, which loaded all of them."""
    spool = tmp_path / "spool.db"
    loaded = modules_of_a_child(spool)
    assert {"edgeagent.spool", "sqlite_utils"} <= loaded  # the schema module itself runs as __main__
    assert loaded & SPOOL_MODULES == set()
    assert tables(spool) == ["boots", "chunks", "counters", "dead_letters", "positions", "sqlite_sequence", "status"]
    with sqlite3.connect(spool) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_the_package_still_gives_its_names_on_first_use() -> None:
    """`edgeagent.spool` loads its modules lazily; every name it exports still imports, and unknown ones fail."""
    import edgeagent.spool

    for name in edgeagent.spool.__all__:
        assert getattr(edgeagent.spool, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        edgeagent.spool.Nope  # noqa: B018


def test_every_schema_version_has_its_migration() -> None:
    """The child builds up to the version it is given: one migration step per version the agent reads."""
    assert sorted(MIGRATIONS) == list(range(SCHEMA_VERSION))


def test_the_child_neither_looks_for_nor_runs_sqlite_utils_plugins(tmp_path: Path) -> None:
    """A sqlite-utils plugin installed on the device (a real distribution with a `sqlite_utils` entry point)
    runs for any `sqlite_utils.Database`, but not on the spool's connection; and the child does not search the
    installed packages for plugins at all (importlib.metadata: 10-20 ms of its CPU)."""
    site = tmp_path / "site"
    (site / "marking_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "marking_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: marking-plugin\n")
    (site / "marking_plugin-1.0.dist-info" / "entry_points.txt").write_text("[sqlite_utils]\nmark = marking_plugin\n")
    marker = tmp_path / "plugin-ran"
    (site / "marking_plugin.py").write_text(
        "import sqlite_utils\n\n\n@sqlite_utils.hookimpl\ndef prepare_connection(conn):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    probe = [sys.executable, "-c", "import sqlite_utils; sqlite_utils.Database(memory=True)"]
    subprocess.run(probe, check=True, env=env, cwd=REPO)
    assert marker.exists(), "the plugin is installed and runs for a Database with plugins"
    marker.unlink()
    spool = tmp_path / "spool.db"
    loaded = modules_of_a_child(spool, env)
    assert not marker.exists(), "a plugin ran on the spool's connection"
    bare = [sys.executable, "-c", "import sys; print('importlib.metadata' in sys.modules)"]
    if subprocess.run(bare, capture_output=True, text=True, env=env).stdout.strip() == "False":  # not site's doing
        assert "importlib.metadata" not in loaded
    assert tables(spool) == ["boots", "chunks", "counters", "dead_letters", "positions", "sqlite_sequence", "status"]

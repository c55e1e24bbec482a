"""The spool's schema child: `Spool.open` migrates a spool that exists with a
schema behind in a child process, and reports what the child met exactly as
it would have in-process (full disk: unavailable; damage: quarantine). Real
SQLite files, real child processes, a real full tmpfs and real `edgeagent run`
processes."""

from __future__ import annotations

import signal
import sqlite3
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, wait_for
from disk import fill, tmpfs

from edgeagent.spool import SCHEMA_VERSION, Spool, SpoolError, SpoolUnavailable

QUIET = '[kmsg]\nenabled = false\n[upload]\nto = "none"\n'
TABLES = ["boots", "chunks", "counters", "dead_letters", "positions", "sqlite_sequence", "status"]


def schema_of(path: Path) -> tuple[int, list[str]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    finally:
        conn.close()
    return version, names


def make_behind(path: Path) -> None:
    """A spool that exists with a schema behind the current one, which only the child migrates: built by the
    migrations up to the version before the current one when there is one; else (schema 1) by hand, a version-0
    file with a table already in it (not fresh: the open hands it to the child, which runs every migration)."""
    if SCHEMA_VERSION > 1:
        build = [sys.executable, "-m", "edgeagent.spool.schema", str(path), str(SCHEMA_VERSION - 1)]
        subprocess.run(build, check=True, cwd=REPO)
        return
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE leftover (x)")
    conn.close()


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """A writer's lock on `path`: the schema child can read, but waits to write."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_a_spool_behind_is_migrated_by_a_child_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    make_behind(path)
    holder = hold_write_lock(path)  # the child waits for the writer: Spool.open waits for the child
    releaser = threading.Timer(0.5, lambda: holder.execute("ROLLBACK"))
    releaser.start()
    try:
        Spool.open(path).close()
    finally:
        releaser.join()
        holder.close()
    assert schema_of(path)[0] == SCHEMA_VERSION and set(TABLES) <= set(schema_of(path)[1])
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SpoolError, match="newer edgeagent"):
        Spool.open(path)


def test_a_full_disk_met_by_the_child_is_unavailable_and_quarantines_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "spool.db"
        make_behind(path)
        before = path.read_bytes()
        fill(disk)
        with pytest.raises(SpoolUnavailable, match="sqlite error 13"):  # SQLITE_FULL
            Spool.open(path)
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "spool.db"]
        assert path.read_bytes() == before


def corrupt_free_pages(path: Path) -> None:
    """A behind spool whose header and table of tables read, but whose free-page list is damaged: the child
    meets the damage when its first CREATE TABLE takes a free page."""
    make_behind(path)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE filler (x)")
        conn.executemany("INSERT INTO filler VALUES (randomblob(3000))", [()] * 20)
        conn.execute("DROP TABLE filler")
    conn.close()
    with open(path, "r+b") as f:
        header = f.read(100)
        page_size, first_trunk = struct.unpack(">H", header[16:18])[0], struct.unpack(">I", header[32:36])[0]
        page_size = 65536 if page_size == 1 else page_size
        f.seek((first_trunk - 1) * page_size)
        f.write(b"\xff" * 8)


def test_a_corrupt_file_met_by_the_child_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    corrupt_free_pages(path)
    spool = Spool.open(path)
    spool.close()
    assert len(spool.events) >= 1 and "is corrupt (sqlite error 11" in spool.events[0]
    assert schema_of(path) == (SCHEMA_VERSION, TABLES)
    assert len(list(path.parent.glob("spool.db.*-*"))) == 1


def test_a_fresh_looking_file_with_a_corrupt_schema_is_quarantined_without_a_child(tmp_path: Path) -> None:
    """Header version 0 but a damaged table of tables: the open finds the damage in-process, quarantines the
    file and creates a new one from the snapshot."""
    path = tmp_path / "spool.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with open(path, "r+b") as f:
        f.seek(100)  # page 1's b-tree header, right after the 100-byte file header
        f.write(b"\xff" * 8)
    spool = Spool.open(path)
    spool.close()
    assert "is corrupt (" in spool.events[0]
    assert schema_of(path) == (SCHEMA_VERSION, TABLES)
    assert len(list(path.parent.glob("spool.db.*-*"))) == 1


def schema_children(parent: int) -> list[int]:
    """Pids of `edgeagent.spool.schema` processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"edgeagent.spool.schema" in cmdline:
            found.append(int(entry.name))
    return found


def ended(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_an_agent_stopped_while_its_schema_child_runs_leaves_no_child(
    tmp_path: Path, make_agent: Any, stop: str
) -> None:
    """The child runs (blocked by a writer) while the agent starts; kill -9 or SIGTERM the agent: the
    child goes with it (before, a kill -9 left it running until SQLite's 10 s busy timeout)."""
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.state_dir.mkdir(mode=0o700)
    make_behind(agent.state_dir / "spool.db")
    holder = hold_write_lock(agent.state_dir / "spool.db")
    try:
        agent.start(wait_ready=False)
        (child,) = wait_for(lambda: schema_children(agent.proc.pid), 30, 0.01, what="the agent's schema child")
        if stop == "SIGKILL":
            agent.kill()
        else:
            agent.signal(signal.SIGTERM)
            holder.execute("ROLLBACK")  # if the agent waits for the child, it can now finish, then stop
            assert agent.proc.wait(30) in (0, -signal.SIGTERM)
            agent.proc = None
        wait_for(lambda: ended(child), 5, 0.01, what="the schema child gone with the agent")
    finally:
        holder.close()

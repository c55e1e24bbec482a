"""`edgeagent status` as a user reads it: fresh while the agent runs, the last
known states after it stopped, times a person can read, no Python reprs; and
a stopped agent's state dir left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, wait_for
from otlp_server import OtlpServer

from edgeagent.spool import NewChunk, Spool
from edgeagent.spool.stopped import wal_holds_commits


def status(config: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "status", "-c", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_status_is_fresh_while_running_and_kept_after_a_stop(tmp_path: Path, make_agent) -> None:  # type: ignore[no-untyped-def]
    server = OtlpServer().start()
    log_file = tmp_path / "app.log"
    log_file.write_text("")
    agent = make_agent(
        f'state_dir = "{{state_dir}}"\ndevice_id = "dev"\n[kmsg]\nenabled = false\n'
        f'[[files]]\ninclude = ["{log_file}"]\n'
        f'[upload]\nto = "otlp_http"\n[otlp_http]\nendpoint = "{server.url}"\n'
    )
    try:
        agent.start()
        with log_file.open("a") as f:
            f.write("a line of 24 bytes here\n" * 10)
        # The status interval is 5 s; `status` asks the agent for a fresh one (SIGUSR2).
        wait_for(lambda: len(server.delivered) == 1, what="the lines delivered")
        running = json.loads(status(agent.config_path, "--json"))
        assert running["agent"]["state"] == "running"
        assert running["agent"]["age_s"] < 2.0
        assert running["sources"]["files"]["bytes_read"] == 240
        assert running["uploader"]["acked_chunks"] == 1
        assert agent.stop() == 0
    finally:
        server.stop()
    stopped = json.loads(status(agent.config_path, "--json"))
    assert stopped["agent"]["state"] == "stopped"
    assert stopped["sources"]["files"]["bytes_read"] == 240  # the last known states, not {}
    assert stopped["uploader"]["acked_chunks"] == 1
    text = status(agent.config_path)
    assert re.search(
        r"agent: +stopped \(pid \d+, version \S+, started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s ago\)\)", text
    )
    assert re.search(r"as of \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s ago\)", text)
    assert "source files: " in text and "bytes_read=240" in text
    assert "uploader:  " in text and "acked_chunks=1" in text
    assert "mqtt:" not in text  # logs over OTLP and no fleet: no MQTT session
    for python_repr in ("None", "True", "False", "{", "["):
        assert python_repr not in text, (python_repr, text)


def state_of(directory: Path) -> dict[str, tuple[int, int, str] | int]:
    """Every file in `directory` (name, size, mtime, content hash) and the directory's own mtime."""
    files: dict[str, tuple[int, int, str] | int] = {".": directory.stat().st_mtime_ns}
    for path in sorted(directory.iterdir()):
        st = path.stat()
        files[path.name] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


def spooled(agent: Any) -> int:
    return int(agent.status().get("counters", {}).get("spooled_records", 0))


def append_lines(log_file: Path, start: int, count: int) -> None:
    with log_file.open("a") as f:
        f.write("".join(f"line {n} {'x' * 80}\n" for n in range(start, start + count)))


def figures(spool: Spool) -> dict[str, Any]:
    backlog = spool.backlog()
    return {
        "chunks": backlog["chunks"],
        "records": backlog["records"],
        "bytes": backlog["bytes"],
        "counters": spool.counters(),
        "dead_letters": spool.dead_letter_count(),
    }


def committed_figures(state_dir: Path, scratch: Path) -> dict[str, Any]:
    """What the spool holds, WAL included: a copy of the state dir opened the way the agent opens it (SQLite
    replays the WAL into the copy), so the original stays as the stopped agent left it."""
    shutil.copytree(state_dir, scratch)
    spool = Spool.open(scratch / "spool.db")
    try:
        return figures(spool)
    finally:
        spool.close()


def records_in_the_database_file_alone(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        return int(conn.execute("SELECT COALESCE(SUM(records), 0) FROM chunks").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_status_of_a_stopped_agent_leaves_its_state_dir_as_it_was(tmp_path: Path, make_agent: Any, how: str) -> None:
    """`status` and `spool dump` of a stopped agent's spool change nothing in its state dir: SQLite's read-only
    open of a WAL-mode file created a 32 KiB `spool.db-shm` and an empty `spool.db-wal` after a clean stop, and
    rebuilt (truncated and rewrote) the `-shm` a killed agent left. After a SIGKILL mid-write the records the
    agent committed to its WAL are part of the figures, as the agent finds them when it starts again."""
    log_file = tmp_path / "app.log"
    log_file.write_text("")
    agent = make_agent(
        'state_dir = "{state_dir}"\n[kmsg]\nenabled = false\n[upload]\nto = "none"\n'
        f'[spool]\nflush_interval = "50ms"\n[[files]]\ninclude = ["{log_file}"]\nstart_at = "beginning"\n'
    )
    agent.start()
    append_lines(log_file, 0, 1000)
    wait_for(lambda: spooled(agent) >= 1000, 30, 0.1, what="the first lines spooled")
    if how == "stopped":
        assert agent.stop() == 0
    else:
        append_lines(log_file, 1000, 100_000)
        wait_for(lambda: spooled(agent) > 1000, 30, 0.02, what="more lines being spooled")
        agent.kill()  # mid-write: the source is still reading the 100 000 lines
    state_dir = agent.state_dir
    before = state_of(state_dir)
    wal = state_dir / "spool.db-wal"
    if how == "stopped":
        assert "spool.db-shm" not in before and "spool.db-wal" not in before  # the agent removed them
    else:
        assert wal_holds_commits(wal), "the killed agent left committed transactions in its WAL"

    shown = json.loads(status(agent.config_path, "--json"))
    assert state_of(state_dir) == before
    text = status(agent.config_path)
    assert state_of(state_dir) == before
    dump = subprocess.run(
        [sys.executable, "-m", "edgeagent", "spool", "dump", "-c", str(agent.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert dump.returncode == 0, dump.stderr
    assert state_of(state_dir) == before

    truth = committed_figures(state_dir, tmp_path / "copy")
    assert truth["records"] >= 1000
    if how == "killed":  # what the WAL holds counts: the database file alone has fewer records
        assert records_in_the_database_file_alone(state_dir / "spool.db") < truth["records"]
        assert state_of(state_dir) == before
    assert {k: shown["backlog"][k] for k in ("chunks", "records", "bytes")} == {
        k: truth[k] for k in ("chunks", "records", "bytes")
    }
    assert shown["counters"] == truth["counters"] and shown["dead_letters"] == truth["dead_letters"]
    assert "spool_error" not in shown and "spool_note" not in shown
    assert len(dump.stdout.splitlines()) == truth["records"]
    assert f"backlog:   {truth['chunks']} chunks, {truth['records']} records, {truth['bytes']} bytes" in text
    expected_state = "stopped" if how == "stopped" else "not running (last seen running; killed or crashed)"
    assert shown["agent"]["state"] == expected_state

    agent.start()  # the agent finds what status showed, and goes on from there
    assert spooled(agent) >= truth["counters"]["spooled_records"]
    assert agent.stop() == 0


@pytest.mark.parametrize("wal", ["committed", "header only", "uncommitted frames only"])
def test_status_reads_what_a_killed_agents_wal_commits(tmp_path: Path, wal: str) -> None:
    """The WAL a killed agent leaves is read when it holds commits, and left out when it does not (a header
    alone, or frames of a transaction that never committed): then the database file holds everything, and
    reading the WAL would make SQLite delete it when the read-only connection closes."""
    live = tmp_path / "live"
    spool = Spool.open(live / "spool.db")
    try:
        spool.append([NewChunk(b"a" * 100, 10, 1000, 9, "boot", 0, True)])
        spool.checkpoint()  # the first chunk is in the database file, the WAL is empty
        spool.append([NewChunk(b"b" * 100, 5, 500, 9, "boot", 0, True)])
        state_dir = tmp_path / "state"
        shutil.copytree(live, state_dir)  # the files as SIGKILL leaves them: the spool is still open
    finally:
        spool.close()
    wal_file = state_dir / "spool.db-wal"
    page_size = int.from_bytes(wal_file.read_bytes()[8:12], "big")
    frames = (wal_file.stat().st_size - 32) // (24 + page_size)
    assert frames >= 2
    if wal == "header only":
        os.truncate(wal_file, 32)
    elif wal == "uncommitted frames only":
        os.truncate(wal_file, 32 + (frames - 1) * (24 + page_size))  # without the commit frame
    assert wal_holds_commits(wal_file) == (wal == "committed")
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state_dir}"\n[kmsg]\nenabled = false\n[upload]\nto = "none"\n')
    before = state_of(state_dir)

    shown = json.loads(status(config, "--json"))
    assert state_of(state_dir) == before
    chunks = 2 if wal == "committed" else 1
    assert shown["backlog"]["chunks"] == chunks and shown["counters"]["spooled_chunks"] == chunks
    assert shown["backlog"]["records"] == (15 if wal == "committed" else 10)

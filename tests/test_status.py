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

from edgeagent import cli, config
from edgeagent.spool import NewChunk, Spool
from edgeagent.spool.stopped import wal_holds_commits
from edgeagent.statedir import RunLock, holder


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


def agent_tailing_a_file(tmp_path: Path, make_agent: Any, lines: int) -> tuple[Any, Path]:
    """A running agent that spools a file (no upload) and the file, once it spooled its first `lines` lines."""
    log_file = tmp_path / "app.log"
    log_file.write_text("")
    agent = make_agent(
        'state_dir = "{state_dir}"\n[kmsg]\nenabled = false\n[upload]\nto = "none"\n'
        f'[spool]\nflush_interval = "50ms"\n[[files]]\ninclude = ["{log_file}"]\nstart_at = "beginning"\n'
    )
    agent.start()
    append_lines(log_file, 0, lines)
    wait_for(lambda: spooled(agent) >= lines, 30, 0.1, what="the first lines spooled")
    return agent, log_file


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_status_of_a_stopped_agent_leaves_its_state_dir_as_it_was(tmp_path: Path, make_agent: Any, how: str) -> None:
    """`status` and `spool dump` of a stopped agent's spool change nothing in its state dir: SQLite's read-only
    open of a WAL-mode file created a 32 KiB `spool.db-shm` and an empty `spool.db-wal` after a clean stop, and
    rebuilt (truncated and rewrote) the `-shm` a killed agent left. After a SIGKILL mid-write the records the
    agent committed to its WAL are part of the figures, as the agent finds them when it starts again."""
    agent, log_file = agent_tailing_a_file(tmp_path, make_agent, 1000)
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


class AgentStartsDuringTheRead:
    """A `read` for `Spool.read_readonly` (what `status` and `spool dump` read through) that meets an agent
    starting: the reader has opened the stopped agent's spool and checked the run lock, and before its first read
    this takes the agent's run lock (`RunLock`, the agent's own lock file and call) and writes as a starting
    agent does (`Spool.open`, a chunk, its status), in the WAL. `releases`: it then stops again (closes the
    spool, which checkpoints, and releases the lock) before the read. `spool_as_left` lists, per read, whether
    it was read as a stopped agent's spool, and `shown` what each read gave."""

    def __init__(self, state_dir: Path, read: Any, releases: bool = False) -> None:
        self.state_dir, self.read, self.releases = state_dir, read, releases
        self.lock = RunLock(state_dir)
        self.live: Spool | None = None
        self.spool_as_left: list[bool] = []
        self.shown: list[Any] = []

    def __call__(self, spool: Spool | None) -> Any:
        assert spool is not None
        self.spool_as_left.append(spool.as_left)
        if len(self.spool_as_left) == 1:
            self.lock.acquire()
            self.live = Spool.open(self.state_dir / "spool.db")
            self.live.append([NewChunk(b"b" * 100, 5, 500, 9, "boot", 0, True)])
            self.live.set_status({"agent": {"state": "running", "pid": os.getpid()}})
            if self.releases:
                self.stop()
        self.shown.append(self.read(spool))
        return self.shown[-1]

    def stop(self) -> None:
        if self.live is not None:
            self.live.close()
            self.live = None
        self.lock.release()


def stopped_agents_spool(tmp_path: Path) -> tuple[Any, list[str]]:
    """The config of a stopped agent whose spool holds one chunk (cleanly closed: no -wal), and its chunk ids."""
    state_dir = tmp_path / "state"
    spool = Spool.open(state_dir / "spool.db")
    try:
        spool.append([NewChunk(b"a" * 100, 10, 1000, 9, "boot", 0, True)])
        spool.set_status({"agent": {"state": "stopped", "pid": 1}})
        ids = [c.chunk_id for c in spool.oldest(10)]
    finally:
        spool.close()
    assert not (state_dir / "spool.db-wal").exists()
    config_path = tmp_path / "agent.toml"
    config_path.write_text(f'state_dir = "{state_dir}"\n[kmsg]\nenabled = false\n[upload]\nto = "none"\n')
    return config.load(config_path), ids


@pytest.mark.parametrize("command", ["status", "spool dump"])
def test_an_agent_starting_while_status_or_dump_reads_is_read_again(tmp_path: Path, command: str) -> None:
    """`status` and `spool dump` read a stopped agent's spool without locks, which keeps no agent out: one that
    takes the run lock between their check of it and their read writes while they read. They read again, then,
    sharing the agent's WAL index: the second read is what they show (the first one, read `immutable`, cannot
    see what the agent wrote to its WAL)."""
    cfg, ids = stopped_agents_spool(tmp_path)
    if command == "status":
        read = AgentStartsDuringTheRead(cfg.state_dir, lambda spool: cli._spool_status(cfg, spool))
    else:
        read = AgentStartsDuringTheRead(cfg.state_dir, lambda spool: cli._dump_items(spool, False, 0))
    try:
        shown = Spool.read_readonly(cfg.spool_path, read)
        assert read.spool_as_left == [True, False]  # read again, the running agent's way
        assert read.live is not None
        truth = [c.chunk_id for c in read.live.oldest(10)]
    finally:
        read.stop()
    assert len(truth) == 2 and truth[0] == ids[0]
    if command == "status":
        assert read.shown[0]["backlog"]["chunks"] == 1 and read.shown[0]["agent"]["state"] == "stopped"  # stale
        assert shown["agent"] == {"state": "running", "pid": os.getpid()}
        assert shown["backlog"]["chunks"] == 2 and shown["backlog"]["records"] == 15
        assert shown["counters"]["spooled_chunks"] == 2
        assert "spool_error" not in shown and "spool_note" not in shown
    else:
        items, extra = shown
        assert [chunk_id for chunk_id, _ in read.shown[0][0]] == ids  # stale
        assert [chunk_id for chunk_id, _ in items] == truth and extra == {}


def test_an_agent_that_started_and_stopped_while_status_read_is_read_again(tmp_path: Path) -> None:
    """An agent that took the run lock and released it again while `status` read (a crash loop, a quick
    restart) may have rewritten the file under the read (its checkpoint at the stop): the lock file it rewrote
    with its pid tells, and the spool is read again, as the stopped agent's it is again."""
    cfg, _ = stopped_agents_spool(tmp_path)
    read = AgentStartsDuringTheRead(cfg.state_dir, lambda spool: cli._spool_status(cfg, spool), releases=True)
    shown = Spool.read_readonly(cfg.spool_path, read)
    assert read.spool_as_left == [True, True]
    assert shown["agent"] == {"state": "running", "pid": os.getpid()}  # the last state it stored
    assert shown["backlog"]["chunks"] == 2 and shown["backlog"]["records"] == 15
    assert not (cfg.state_dir / "spool.db-wal").exists() and not (cfg.state_dir / "spool.db-shm").exists()


def test_a_read_that_fails_while_an_agent_starts_is_read_again(tmp_path: Path) -> None:
    """A read without locks that fails while an agent starts (a page it rewrote as it was read: "database disk
    image is malformed", staged here by raising that error, since a torn page cannot be had on cue) does not
    count: the spool is read again. Without an agent starting, the error is the answer."""
    cfg, ids = stopped_agents_spool(tmp_path)

    def torn(spool: Spool | None) -> Any:
        raise sqlite3.DatabaseError("database disk image is malformed")

    read = AgentStartsDuringTheRead(
        cfg.state_dir, lambda spool: torn(spool) if len(read.spool_as_left) == 1 else cli._dump_items(spool, False, 0)
    )
    try:
        items, _ = Spool.read_readonly(cfg.spool_path, read)
    finally:
        read.stop()
    assert read.spool_as_left == [True, False] and len(items) == 2 and items[0][0] == ids[0]
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        Spool.read_readonly(cfg.spool_path, torn)  # nobody took the lock this time


def test_status_shows_an_agent_that_started_while_it_read_as_running(tmp_path: Path, make_agent: Any) -> None:
    """A real `edgeagent run` starting while `status` reads its stopped spool, and going on running: `status`
    shows it the running agent's way (its own status and figures, its WAL through its WAL index, not the
    stopped agent's files read as they were), in-process through the same code as the command."""
    agent, log_file = agent_tailing_a_file(tmp_path, make_agent, 100)
    assert agent.stop() == 0
    cfg = config.load(agent.config_path)
    reads: list[bool] = []

    def agent_starts_first(spool: Spool | None) -> dict[str, Any]:
        assert spool is not None
        reads.append(spool.as_left)
        if len(reads) == 1:
            agent.start()  # it holds the run lock once `status` says it is running
            append_lines(log_file, 100, 200)
            wait_for(lambda: spooled(agent) >= 300, 30, 0.1, what="the agent's new lines spooled")
        return cli._spool_status(cfg, spool)

    try:
        shown = Spool.read_readonly(cfg.spool_path, agent_starts_first)
        assert reads == [True, False]
        assert agent.proc is not None and holder(cfg.state_dir)[0] == agent.proc.pid
        assert shown["agent"]["state"] == "running" and shown["agent"]["pid"] == agent.proc.pid
        assert shown["counters"]["spooled_records"] >= 300 and "spool_note" not in shown
        truth = Spool.read_readonly(cfg.spool_path, figures)  # the agent is idle: no line, no upload
        assert {k: shown["backlog"][k] for k in ("chunks", "records", "bytes")} == {
            k: truth[k] for k in ("chunks", "records", "bytes")
        }
        assert truth["records"] >= 300
    finally:
        assert agent.stop() == 0

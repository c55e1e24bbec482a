"""The state dir with real `edgeagent run` processes: the run lock, file modes,
unsafe and volatile state dirs, and a stop or reload while a full disk stalls
the agent."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, spool_records, wait_for
from disk import fill, tmpfs

from edgeagent.spool import Spool

QUIET = '[kmsg]\nenabled = false\n[upload]\nto = "none"\n'


def edgeagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


def test_a_second_agent_on_the_same_state_dir_exits_at_once(make_agent: Any) -> None:
    """Issue 9, degraded storage 2: both used to run and store every line twice."""
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.start()
    second = edgeagent("run", "-c", str(agent.config_path))
    assert second.returncode != 0
    (line,) = error_lines(second.stderr)
    assert str(agent.state_dir) in line and f"pid {agent.proc.pid}" in line
    # status and wake never take the run lock: they work while the agent runs.
    status = json.loads(edgeagent("status", "--json", "-c", str(agent.config_path)).stdout)
    assert status["agent"]["pid"] == agent.proc.pid and status["agent"]["state"] == "running"
    assert edgeagent("wake", "-c", str(agent.config_path)).returncode == 0
    assert agent.stop() == 0
    # The lock goes with the process (also after kill -9): the next agent starts.
    agent.start()
    agent.kill()
    agent.start()
    assert agent.stop() == 0


def test_state_dir_and_every_file_in_it_are_private(make_agent: Any) -> None:
    """Issue 9, file modes: state_dir was 0755 and the spool 0644."""
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.start()
    assert stat.S_IMODE(agent.state_dir.stat().st_mode) == 0o700
    names = {p.name for p in agent.state_dir.iterdir()}
    assert {"spool.db", "spool.db-wal", "spool.db-shm", "edgeagent.lock"} <= names
    for p in agent.state_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert agent.stop() == 0


def test_an_older_spool_is_made_private(make_agent: Any) -> None:
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.start()
    assert agent.stop() == 0
    os.chmod(agent.state_dir / "spool.db", 0o644)
    agent.start()
    assert stat.S_IMODE((agent.state_dir / "spool.db").stat().st_mode) == 0o600
    assert agent.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the group/other-writable check applies to root")
@pytest.mark.parametrize("unsafe", ["symlink", "group-writable", "world-writable"])
def test_an_unsafe_state_dir_is_refused(tmp_path: Path, unsafe: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    state_dir = real
    if unsafe == "symlink":
        state_dir = tmp_path / "link"
        state_dir.symlink_to(real)
    else:
        os.chmod(real, 0o770 if unsafe == "group-writable" else 0o707)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state_dir}"\n' + QUIET)
    done = edgeagent("run", "-c", str(config))
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert str(state_dir) in line
    assert ("symlink" in line) if unsafe == "symlink" else ("0700" in line and "writable" in line)
    assert not (real / "spool.db").exists()


def test_a_state_dir_on_tmpfs_gets_a_warning(tmp_path: Path, make_agent: Any) -> None:
    with tmpfs(tmp_path / "ram", "8m") as ram:
        agent = make_agent(f'state_dir = "{ram / "state"}"\n' + QUIET)
        agent.start()
        assert agent.stop() == 0
        assert "will not survive a reboot" in agent.stderr()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def append_lines(path: Path, start: int, count: int, width: int = 100) -> None:
    pad = "x" * width
    with open(path, "a") as f:
        for base in range(start, start + count, 10_000):
            f.write("".join(f"{n} {pad}\n" for n in range(base, min(base + 10_000, start + count))))


def tailing_agent(make_agent: Any, state_dir: Path, log_path: Path, extra: str = "") -> Any:
    """An agent on `state_dir` reading `log_path` from its beginning, uploading nothing."""
    files = f'[[files]]\ninclude = ["{log_path}"]\nstart_at = "beginning"\n'
    agent = make_agent(f'state_dir = "{state_dir}"\n' + QUIET + extra + files)
    agent.state_dir = state_dir
    return agent


def spooled_records(state_dir: Path) -> int:
    spool = Spool.open_readonly(state_dir / "spool.db")
    if spool is None:
        return 0
    try:
        return spool.counters().get("spooled_records", 0)
    finally:
        spool.close()


def line_numbers(state_dir: Path) -> list[int]:
    return [int(r["body"].split()[0]) for r in spool_records(state_dir) if r["scope"] == "edgeagent/files"]


def test_a_full_disk_pauses_sources_and_a_stop_during_the_stall_is_not_clean(tmp_path: Path, make_agent: Any) -> None:
    """Issue 9, degraded storage 3, 4 and 7, in a real agent on a real full
    tmpfs: the file source stops reading (memory stays bounded: it grew by
    hundreds of MB before), nothing is read twice after a reload, a stop
    during the stall exits non-zero, and once space is back every line is in
    the spool exactly once."""
    log_path = tmp_path / "app.log"
    log_path.write_text("")
    with tmpfs(tmp_path / "disk", "4m") as disk:
        agent = tailing_agent(make_agent, disk / "state", log_path, '[spool]\nflush_interval = "100ms"\n')
        agent.start()
        append_lines(log_path, 0, 1000)
        wait_for(lambda: len(line_numbers(agent.state_dir)) == 1000, 30, what="the first lines spooled")
        fill(disk)
        before = rss_kib(agent.proc.pid)
        total = 1000 + 150_000  # about 16 MB appended while the disk is full
        append_lines(log_path, 1000, 150_000)
        wait_for(
            lambda: "unavailable" in str(agent.status().get("agent", {}).get("state", "")),
            30,
            what="status saying the spool is unavailable",
        )
        peak = before
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(agent.proc.pid))
            time.sleep(0.1)
        agent.signal(signal.SIGHUP)  # a reload during the stall keeps what is pending
        wait_for(lambda: "reloading config" in agent.stderr(), 20, what="the reload")
        for _ in range(20):
            peak = max(peak, rss_kib(agent.proc.pid))
            time.sleep(0.1)
        assert peak - before < 24 * 1024, f"RSS grew from {before} to {peak} KiB while the disk was full"
        assert agent.stop(timeout=60) != 0, "a stop that could not commit what was read must not exit 0"
        assert "not committed" in agent.stderr()
        (disk / "filler").unlink()
        agent.start()
        wait_for(lambda: spooled_records(agent.state_dir) >= total, 120, interval=0.5, what="every line spooled")
        assert agent.stop() == 0
        numbers = line_numbers(agent.state_dir)
        assert len(numbers) == total and sorted(numbers) == list(range(total)), "every line exactly once"


def test_status_and_wake_while_the_spool_is_unavailable_at_start_up(tmp_path: Path, make_agent: Any) -> None:
    """Issue 9, degraded storage 1: a disk full at start-up is waited out (the
    agent keeps running and retrying), `status` says so, `wake` still finds it."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        agent = make_agent(f'state_dir = "{disk / "state"}"\n' + QUIET)
        agent.state_dir = disk / "state"
        Spool.open(agent.state_dir / "spool.db").close()
        (agent.state_dir / "spool.db.reserve").unlink(missing_ok=True)
        before = (agent.state_dir / "spool.db").read_bytes()
        filler = fill(disk)
        agent.start(wait_ready=False)
        state = wait_for(
            lambda: "spool unavailable" in (s := str(agent.status().get("agent", {}).get("state", ""))) and s,
            30,
            0.5,
            what="status saying the spool is unavailable",
        )
        assert "space" in state or "disk" in state or "I/O" in state
        assert edgeagent("wake", "-c", str(agent.config_path)).returncode == 0
        assert (agent.state_dir / "spool.db").read_bytes() == before, "an unavailable spool is left as it was"
        assert not list(agent.state_dir.glob("spool.db.*-*")), "nothing quarantined"
        filler.unlink()
        wait_for(agent.ready, 30, 0.5, what="the agent running once space is back")
        assert agent.stop() == 0


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGHUP", "SIGUSR2"])
def test_a_signal_the_moment_the_run_lock_names_the_agent_is_handled(tmp_path: Path, make_agent: Any, sig: str) -> None:
    """`wake` (SIGUSR1) and `status` find the agent by its run lock; SIGHUP reloads it. The lock names the
    process only once its handlers are in place: a signal sent the first moment the lock shows its pid is
    handled, never the default action that ends a process silently (CI found `wake` killing an agent that
    took the lock before it imported its modules)."""
    from edgeagent.statedir import holder

    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.start(wait_ready=False)
    pid = wait_for(lambda: holder(agent.state_dir)[0], 30, 0.001, what="the run lock naming the agent")
    assert pid == agent.proc.pid
    os.kill(pid, getattr(signal, sig))
    wait_for(agent.ready, 30, 0.1, what="the agent running after the signal")
    assert agent.stop() == 0


def test_status_on_a_full_disk_shows_what_a_stopped_agent_left(tmp_path: Path, make_agent: Any) -> None:
    """A stopped agent's spool on a full disk: SQLite's read-only open creates and sizes the WAL's -shm
    file, which fails ("disk I/O error"), and `status` showed an empty backlog of an agent "not started".
    With no agent holding the run lock the spool is read as the agent left it, creating nothing (see
    test_status.py), so a full disk makes no difference. While an agent holds the lock, the read shares its
    -shm; when that cannot be created and no WAL holds anything, the file is read as it is, saying so."""
    log_path = tmp_path / "app.log"
    log_path.write_text("")
    with tmpfs(tmp_path / "disk", "2m") as disk:
        agent = tailing_agent(make_agent, disk / "state", log_path)
        agent.start()
        append_lines(log_path, 0, 100)
        wait_for(lambda: spooled_records(agent.state_dir) >= 100, 30, what="the lines spooled")
        assert agent.stop() == 0
        (agent.state_dir / "spool.db.reserve").unlink(missing_ok=True)
        assert not (agent.state_dir / "spool.db-shm").exists()  # a clean stop leaves the file alone
        fill(disk)
        before = sorted(p.name for p in agent.state_dir.iterdir())
        out = edgeagent("status", "--json", "-c", str(agent.config_path))
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert "spool_error" not in status and "spool_note" not in status
        assert status["agent"]["state"] == "stopped" and status["backlog"]["records"] == 100
        text = edgeagent("status", "-c", str(agent.config_path))
        assert text.returncode == 0, text.stderr
        assert "backlog:   1 chunks, 100 records" in text.stdout
        assert sorted(p.name for p in agent.state_dir.iterdir()) == before

        holder = subprocess.Popen(["flock", str(agent.state_dir / "edgeagent.lock"), "sleep", "60"])
        try:  # an agent holds the run lock (its spool unavailable on the full disk)
            wait_for(
                lambda: "pid" in json.loads(edgeagent("status", "--json", "-c", str(agent.config_path)).stdout)["agent"]
            )
            status = json.loads(edgeagent("status", "--json", "-c", str(agent.config_path)).stdout)
            assert "spool_error" not in status and "disk I/O error" in status["spool_note"]
            assert status["backlog"]["records"] == 100
            text = edgeagent("status", "-c", str(agent.config_path))
            assert "backlog:   1 chunks, 100 records" in text.stdout and "read as it is on disk" in text.stdout
        finally:
            holder.kill()
            holder.wait()


def test_status_with_nothing_to_show_fails_naming_the_spool(tmp_path: Path, make_agent: Any) -> None:
    """A spool that cannot be read and no agent holding the run lock: nothing is known, and `status` says
    so with the file and why (it printed "not started" and empty counts, exit 0). With an agent holding
    the lock it answers from the lock, and says in its text what it could not read."""
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.state_dir.mkdir(mode=0o700)
    (agent.state_dir / "spool.db").write_bytes(b"not a database, not even its header " * 200)
    out = edgeagent("status", "-c", str(agent.config_path))
    assert out.returncode == 1 and out.stdout == ""
    (line,) = error_lines(out.stderr)
    assert str(agent.state_dir / "spool.db") in line and "not a database" in line and "run lock" in line

    holder = subprocess.Popen(["flock", str(agent.state_dir / "edgeagent.lock"), "sleep", "60"])
    try:
        wait_for(lambda: json.loads(edgeagent("status", "--json", "-c", str(agent.config_path)).stdout or "{}"), 10)
        status = json.loads(edgeagent("status", "--json", "-c", str(agent.config_path)).stdout)
        assert "not a database" in status["spool_error"] and status["backlog"] == {} and status["dead_letters"] is None
        text = edgeagent("status", "-c", str(agent.config_path)).stdout
        assert "(cannot read the spool: file is not a database)" in text and "backlog:   unknown" in text
    finally:
        holder.kill()
        holder.wait()

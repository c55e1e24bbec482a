"""The command line as a user runs it: real processes, real spool files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, wait_for

from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher
from edgeagent.records import Batch, Record
from edgeagent.spool import Spool

QUIET = '[kmsg]\nenabled = false\n[upload]\nto = "none"\n'


def edgeagent(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], capture_output=True, text=True, cwd=REPO, timeout=60, check=check
    )


def write_config(tmp_path: Path, extra: str = QUIET) -> Path:
    path = tmp_path / "edgeagent.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\ndevice_id = "test-dev"\n' + extra)
    return path


def test_version() -> None:
    out = edgeagent("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("edgeagent ")


def test_check_config_misspelt_key_fails_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[kmsg]\nmin_prioity = 3\n")
    out = edgeagent("check-config", "-c", str(path))
    assert out.returncode != 0
    assert "kmsg.min_prioity" in out.stderr and "min_priority" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_check_config_prints_effective_toml(tmp_path: Path) -> None:
    import tomllib

    out = edgeagent("check-config", "-c", str(write_config(tmp_path)))
    assert out.returncode == 0, out.stderr
    effective = tomllib.loads(out.stdout)
    assert effective["device_id"] == "test-dev"
    assert effective["spool"]["durability"] == "full"


def test_status_json_on_a_fresh_state_dir(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    out = edgeagent("status", "--json", "-c", str(path))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["agent"]["state"] == "not started"
    assert status["backlog"]["chunks"] == 0
    assert not (tmp_path / "state").exists(), "status must not create anything"


def test_run_with_invalid_config_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[spool]\nmax_size = "huge"\n')
    out = edgeagent("run", "-c", str(path))
    assert out.returncode == 2
    assert "spool.max_size" in out.stderr and "Traceback" not in out.stderr


def test_missing_default_config_has_a_hint(tmp_path: Path) -> None:
    env = dict(os.environ, EDGEAGENT_CONFIG=str(tmp_path / "absent.toml"))
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "status"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )
    assert out.returncode == 2
    assert "absent.toml" in out.stderr and "EDGEAGENT_CONFIG" in out.stderr


def test_spool_dump_decodes_chunks_to_json_lines(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    spool = Spool.open(tmp_path / "state" / "spool.db")
    batcher = Batcher(spool, ChunkEncoder({"device.id": "test-dev"}, "t"), "boot-a", SpoolConfig())
    batcher.add(Batch("files", [b"first line", b"second line"], 10, "boot-a", {"log.file.path": "/var/log/a.log"}))
    batcher.add(Batch("kmsg", [Record("oops", 17, "ERR", {"kmsg.sequence": 9})], 20, "boot-a"))
    batcher.flush()
    spool.close()
    out = edgeagent("spool", "dump", "-c", str(path))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["body"] for r in rows] == ["first line", "second line", "oops"]
    assert rows[0]["attributes"]["log.file.path"] == "/var/log/a.log"
    assert rows[2]["severity_number"] == 17 and rows[2]["attributes"]["kmsg.sequence"] == 9
    assert rows[0]["resource"]["device.id"] == "test-dev"
    assert rows[0]["chunk_id"] == rows[2]["chunk_id"]


def test_status_while_running_and_wake_and_clean_stop(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.start()
    status = agent.status()
    assert status["agent"]["state"] == "running"
    text = edgeagent("status", "-c", str(agent.config_path))
    assert "running" in text.stdout
    assert edgeagent("wake", "-c", str(agent.config_path)).returncode == 0
    assert agent.stop() == 0
    assert agent.status()["agent"]["state"] == "stopped"
    out = edgeagent("wake", "-c", str(agent.config_path))
    assert out.returncode == 1 and "no running agent" in out.stderr


def test_sighup_with_broken_config_keeps_running(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.start()
    good = agent.config_path.read_text()
    reader = agent.config_path.with_name("reader.toml")  # status needs a valid config to find the spool
    reader.write_text(good)

    def errors() -> dict[str, str]:
        out = edgeagent("status", "--json", "-c", str(reader))
        return json.loads(out.stdout)["agent"].get("errors", {})

    agent.config_path.write_text(good + "[spool]\nmax_size = 'enormous'\n")
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "config" in errors(), what="reload error in status")
    assert agent.proc is not None and agent.proc.poll() is None
    assert "spool.max_size" in errors()["config"]
    agent.config_path.write_text(good)
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "config" not in errors(), what="reload accepted")
    assert agent.stop() == 0
    assert "reload refused" in agent.stderr()


def test_agent_starts_on_a_corrupt_spool(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.state_dir.mkdir(parents=True)
    (agent.state_dir / "spool.db").write_bytes(b"\x00garbage" * 4096)
    agent.start()
    assert list(agent.state_dir.glob("spool.db.salvaged-*"))
    assert agent.status()["counters"]["spool_quarantined"] == 1
    assert agent.stop() == 0
    assert "corrupt" in agent.stderr()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_exit_cleanly(make_agent, sig: int) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.start()
    assert agent.proc is not None
    agent.proc.send_signal(sig)
    assert agent.proc.wait(20) == 0
    agent.proc = None

"""The kmsg source end to end: the real agent process reading the real /dev/kmsg,
killed with SIGKILL, restarted with /tmp wiped; every line lands in the spool
exactly once with the mapped severity."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import spool_records, wait_for, write_kmsg

SEVERITY = {0: 21, 1: 21, 2: 21, 3: 17, 4: 13, 5: 10, 6: 9, 7: 5}

CONFIG = """
state_dir = "{state_dir}"
[kmsg]
min_priority = "debug"
pstore_dir = "{pstore_dir}"
[spool]
flush_interval = "200ms"
[upload]
to = "none"
"""


def marked(state_dir: Path, mark: str) -> list[dict[str, Any]]:
    return [r for r in spool_records(state_dir) if mark in str(r.get("body"))]


def test_lines_written_while_running_and_while_killed_arrive_exactly_once(
    devkmsg: None, make_agent: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_dir = tmp_path / "tmp"  # the agent's /tmp, wiped between runs
    tmp_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_dir))
    agent = make_agent(CONFIG.replace("{pstore_dir}", str(tmp_path / "no-pstore")))
    mark = f"edgeagent-e2e-{uuid.uuid4().hex}"
    expected: list[tuple[str, int]] = []

    def write(phase: str) -> None:
        for level in range(8):
            text = f"{mark} {phase} level {level}"
            write_kmsg(level, text)
            expected.append((text, level))

    write("before the first start")
    agent.start()
    write("while running")
    wait_for(lambda: len(marked(agent.state_dir, mark)) == len(expected), 30, what="lines read while running")
    agent.kill()
    write("while killed")
    shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    agent.start()
    wait_for(lambda: len(marked(agent.state_dir, mark)) >= len(expected), 30, what="lines written while killed")
    write("after the restart")
    agent.kill()  # possibly before these were committed: they must come after the next start
    agent.start()
    wait_for(lambda: len(marked(agent.state_dir, mark)) >= len(expected), 30, what="lines after the restart")
    assert agent.stop() == 0

    records = marked(agent.state_dir, mark)
    assert sorted(r["body"] for r in records) == sorted(text for text, _ in expected)  # each exactly once
    severity_of = dict(expected)
    for record in records:
        level = severity_of[record["body"]]
        assert record["severity_number"] == SEVERITY[level]
        assert record["attributes"]["kmsg.level"] == level
        assert record["attributes"]["kmsg.facility"] == "user"
        assert record["attributes"]["boot.id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert record["scope"] == "edgeagent/kmsg"
    assert not any(tmp_dir.iterdir())  # nothing of the agent's state lives in /tmp


def test_a_missing_device_shows_in_status_and_the_agent_keeps_running(make_agent: Any, tmp_path: Path) -> None:
    pstore = tmp_path / "pstore"
    pstore.mkdir()
    (pstore / "dmesg-ramoops-0").write_text("Panic#1 Part1\n<0>[  9.000000] Kernel panic - not syncing: test\n")
    config = CONFIG.replace("{pstore_dir}", str(pstore)).replace(
        "[kmsg]\n", f'[kmsg]\npath = "{tmp_path / "no-kmsg"}"\n'
    )
    agent = make_agent(config)
    agent.start()
    status = wait_for(
        lambda: (s := agent.status()).get("sources", {}).get("kmsg", {}).get("state") == "error" and s,
        30,
        what="kmsg error in status",
    )
    assert "does not exist" in status["sources"]["kmsg"]["error"]
    assert status["agent"]["state"] == "running"
    # The other source of the agent still did its work.
    wait_for(lambda: marked(agent.state_dir, "Kernel panic - not syncing: test"), 30, what="pstore records")
    assert agent.stop() == 0

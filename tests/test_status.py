"""`edgeagent status` as a user reads it: fresh while the agent runs, the last
known states after it stopped, times a person can read, no Python reprs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, wait_for
from otlp_server import OtlpServer


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

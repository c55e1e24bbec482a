"""Live apply (Agent.apply_config, reached here through SIGHUP): only what changed is
rebuilt, and no line is lost or read twice across 20 applies while lines flow."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

from conftest import Broker, spool_records, wait_for

CONFIG = """
device_id = "apply-test"
state_dir = "{state_dir}"
[kmsg]
enabled = false
[upload]
to = "{to}"
[mqtt]
url = "{url}"
first_connect_delay = "0s"
[spool]
flush_interval = "{flush}"
[[files]]
include = ["{log}"]
start_at = "beginning"
max_line_size = "{line_kib}KiB"
"""


class Writer:
    """Appends numbered lines from a thread until stopped."""

    def __init__(self, path: Path) -> None:
        self.seq = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            os.write(self._fd, "".join(f"line {self.seq + i:07d}\n" for i in range(10)).encode())
            self.seq += 10
            self._stop.wait(0.01)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)
        return self.seq


def applies(agent) -> int:  # type: ignore[no-untyped-def]
    return agent.stderr().count("applied config: changed")


def test_twenty_applies_while_lines_flow_lose_and_duplicate_nothing(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "app.log"
    log.touch()

    def text(line_kib: int, flush: str = "100ms") -> str:
        return CONFIG.format(
            state_dir="{state_dir}", to="none", url="mqtt://127.0.0.1:1", flush=flush, log=log, line_kib=line_kib
        )

    agent = make_agent(text(1))
    agent.start()
    writer = Writer(log)
    for i in range(20):
        new_text = text(2 + i, "100ms" if i % 2 else "200ms")
        agent.config_path.write_text(new_text.replace("{state_dir}", str(agent.state_dir)))
        agent.signal(signal.SIGHUP)
        wait_for(lambda i=i: applies(agent) >= i + 1, 30, what=f"apply {i + 1}")
    written = writer.stop()
    assert agent.stderr().count("restarted ['files']") == 20
    wait_for(lambda: len(_lines(agent.state_dir)) >= written, 30, what=f"{written} lines in the spool")
    agent.stop()
    lines = _lines(agent.state_dir)
    assert lines == [f"line {n:07d}" for n in range(written)]


def _lines(state_dir: Path) -> list[str]:
    return [r["body"] for r in spool_records(state_dir) if r["scope"] == "edgeagent/files"]


def test_only_changed_components_are_rebuilt(mosquitto: Broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "app.log"
    log.touch()

    def text(line_kib: int, flush: str, url: str = mosquitto.url) -> str:
        return CONFIG.format(state_dir="{state_dir}", to="mqtt", url=url, flush=flush, log=log, line_kib=line_kib)

    agent = make_agent(text(1, "100ms"))
    agent.start()

    def connections() -> int:
        return len(re.findall(r"New client connected .* as apply-test", mosquitto.log.read_text()))

    wait_for(lambda: connections() == 1, what="the uploader's connection")

    def apply(new_text: str, n: int) -> None:
        agent.config_path.write_text(new_text.replace("{state_dir}", str(agent.state_dir)))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: applies(agent) >= n, 30, what=f"apply {n}")

    apply(text(2, "100ms"), 1)  # [[files]] only
    apply(text(2, "300ms"), 2)  # [spool] only: changed in place
    assert connections() == 1, "the uploader must not reconnect for a [[files]] or [spool] change"
    assert "restarted ['files']" in agent.stderr() and "changed ['spool']; restarted no source" in agent.stderr()
    apply(text(2, "300ms", url=mosquitto.url + "/"), 3)  # [mqtt] changed: the uploader is replaced
    wait_for(lambda: connections() == 2, what="the new uploader's connection")
    with open(log, "a") as f:
        f.write("after the applies\n")
    wait_for(lambda: agent.status().get("uploader", {}).get("acked_records", 0) >= 1, what="a line shipped")
    assert agent.stop() == 0

"""Agent wiring: configs that parse but cannot be used, and losses at the
receiver shipped as records."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO, spool_records, wait_for

from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import AGENT_SOURCE, Batcher, UploaderContext
from edgeagent.records import Batch
from edgeagent.spool import Spool

QUIET = '[kmsg]\nenabled = false\n[upload]\nto = "none"\n'
BAD_TLS = (
    '[kmsg]\nenabled = false\n[upload]\nto = "otlp_http"\n'
    '[otlp_http]\nendpoint = "https://127.0.0.1:9/v1/logs"\nca_file = "/nonexistent/ca.pem"\n'
)


def edgeagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_check_config_builds_components_and_names_the_unusable_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n' + BAD_TLS)
    out = edgeagent("check-config", "-c", str(path))
    assert out.returncode == 2, out.stderr
    assert "ca_file" in out.stderr and "/nonexistent/ca.pem" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_with_an_unusable_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n' + BAD_TLS)
    out = edgeagent("run", "-c", str(path))
    assert out.returncode == 2 and "ca_file" in out.stderr


def test_reload_to_an_unusable_config_keeps_the_running_one(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent = make_agent('state_dir = "{state_dir}"\n' + QUIET)
    agent.start()
    reader = agent.config_path.with_name("reader.toml")
    reader.write_text(agent.config_path.read_text())
    agent.config_path.write_text(agent.config_path.read_text().split("[kmsg]")[0] + BAD_TLS)
    agent.signal(signal.SIGHUP)

    def errors() -> dict[str, str]:
        return json.loads(edgeagent("status", "--json", "-c", str(reader)).stdout)["agent"].get("errors", {})

    wait_for(lambda: "config" in errors(), what="the refused reload in status")
    assert "ca_file" in errors()["config"]
    assert agent.proc is not None and agent.proc.poll() is None
    assert agent.stop() == 0


def test_receiver_rejections_are_shipped_as_records(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool.db")
    batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", SpoolConfig())

    def ship(record, counters):  # type: ignore[no-untyped-def]
        batcher.add(Batch(AGENT_SOURCE, [record], 0, "boot"))
        batcher.count(counters)

    ctx = UploaderContext(spool, None, on_loss=ship)  # type: ignore[arg-type]
    batcher.add(Batch("files", [b"a", b"b", b"c"], 0, "boot"))
    batcher.flush()
    (chunk,) = spool.oldest(10)
    assert ctx.reject([chunk.id], "HTTP 400: bad request") == 1
    ctx.report_rejected(7, "schema violation")
    batcher.flush()
    losses = [r for r in spool_records(tmp_path) if r["scope"] == f"edgeagent/{AGENT_SOURCE}"]
    assert [(r["attributes"]["edgeagent.loss.reason"], r["attributes"]["edgeagent.loss.records"]) for r in losses] == [
        ("rejected", 3),
        ("partially_rejected", 7),
    ]
    assert all(r["severity_number"] == 13 for r in losses)
    counters = spool.counters()
    assert counters["dead_letter_records"] == 3 and counters["rejected_records"] == 7

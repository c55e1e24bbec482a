"""A small fleet: agent processes behind per-device ACLs (mosquitto acl_file with
%c / %u patterns, as docs/fleet.md shows), driven by `edgeagent fleet push --group`.
The default suite runs 3 agents; the slow suite runs 20 and prints the figures."""

from __future__ import annotations

import collections
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, Broker, free_port, wait_for
from test_fleet_device import agent_config, fleet_cli

from edgeagent.fleet.envelope import Envelope
from edgeagent.fleet.operator import BrokerOptions, Connection

ACL = """
user ops
topic readwrite edgeagent/#

pattern read edgeagent/%c/config/desired
pattern write edgeagent/%c/config/status
pattern write edgeagent/%u/logs
pattern write edgeagent/%u/status
pattern read edgeagent/group/fleet-test/config/desired
"""


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    (workdir / "acl").write_text(ACL)
    broker = Broker(workdir, extra_config=f"acl_file {workdir / 'acl'}\n")
    broker.start()
    yield broker
    broker.stop()


def reports(broker: Broker) -> dict[str, dict[str, Any]]:
    conn = Connection(BrokerOptions(broker.url, username="ops"))
    try:
        messages = conn.collect_retained("edgeagent/+/config/status")
    finally:
        conn.close()
    return {m.topic.split("/")[1]: json.loads(m.payload) for m in messages if m.payload}


def all_report(broker: Broker, devices: list[str], state: str, version: int) -> dict[str, dict[str, Any]]:
    def check() -> dict[str, dict[str, Any]] | None:
        seen = reports(broker)
        ok = all(seen.get(d, {}).get("state") == state and seen.get(d, {}).get("version") == version for d in devices)
        return seen if ok else None

    return wait_for(check, 300, interval=0.5, what=f"all {len(devices)} devices {state} v{version}")


def run_fleet(acl_broker: Broker, make_agent: Any, tmp_path: Path, count: int) -> dict[str, float]:
    devices = [f"fleet-{i:02d}" for i in range(count)]
    agents: list[AgentProcess] = []
    for device in devices:
        text = agent_config(
            acl_broker, tmp_path, device, probation="5s", groups=("fleet-test",), mqtt_extra=f'username = "{device}"'
        )
        agents.append(make_agent(text, name=device))
    for agent in agents:
        agent.start(wait_ready=False)
    for agent in agents:
        wait_for(agent.ready, 120, what="agent ready")
    figures: dict[str, float] = {}
    group = ["--broker", acl_broker.url, "--username", "ops", "--group", "fleet-test"]

    conf = tmp_path / "good.toml"
    conf.write_text('log_level = "debug"\n[spool]\nflush_interval = "200ms"\n')
    started = time.monotonic()
    out = fleet_cli("push", *group, str(conf))
    assert out.returncode == 0, out.stderr
    all_report(acl_broker, devices, "applied", 1)
    figures["all applied (s)"] = time.monotonic() - started

    # An invalid config, published by hand (the CLI refuses to push it): rejected, naming the key.
    conn = Connection(BrokerOptions(acl_broker.url, username="ops"))
    try:
        bad = Envelope("group:fleet-test", 2, '[kmsg]\nmin_priority = "loud"\n')
        conn.publish_retained("edgeagent/group/fleet-test/config/desired", bad.encode())
    finally:
        conn.close()
    seen = all_report(acl_broker, devices, "rejected", 2)
    assert all("kmsg.min_priority = 'loud'" in seen[d]["reason"] for d in devices)
    for device, agent in zip(devices, agents, strict=True):
        with open(tmp_path / f"{device}.log", "a") as f:
            f.write("still shipping after a rejected config\n")
        wait_for(lambda a=agent: a.status().get("uploader", {}).get("acked_records", 0) >= 1, 120, what="shipping")

    # A config that cuts them off (allowed by policy): all roll back within probation and report.
    conf.write_text(f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n')
    started = time.monotonic()
    assert fleet_cli("push", *group, str(conf)).returncode == 0
    seen = all_report(acl_broker, devices, "rolled_back", 3)
    figures["all rolled back (s)"] = time.monotonic() - started
    assert all(seen[d]["applied_version"] == 1 for d in devices)
    listing = fleet_cli("status", "--broker", acl_broker.url, "--username", "ops")
    assert all(d in listing.stdout for d in devices), listing.stdout
    return figures


def test_three_agents_apply_reject_and_roll_back(acl_broker: Broker, make_agent: Any, tmp_path: Path) -> None:
    run_fleet(acl_broker, make_agent, tmp_path, 3)


def test_a_device_cannot_read_another_devices_config(acl_broker: Broker) -> None:
    """The ACL example holds: a client reads only its own desired topic."""
    ops = Connection(BrokerOptions(acl_broker.url, username="ops"))
    try:
        ops.publish_retained("edgeagent/fleet-01/config/desired", b"for fleet-01 only")
    finally:
        ops.close()

    def read_as(client: str) -> str:
        topic = "edgeagent/fleet-01/config/desired"
        args = ["-h", acl_broker.host, "-p", str(acl_broker.port), "-i", client, "-u", client, "-t", topic]
        out = subprocess.run(["mosquitto_sub", *args, "-C", "1", "-W", "2"], capture_output=True, text=True)
        return out.stdout

    assert read_as("fleet-01").strip() == "for fleet-01 only"
    assert read_as("fleet-02") == ""


@pytest.mark.slow
def test_twenty_agents(acl_broker: Broker, make_agent: Any, tmp_path: Path) -> None:
    figures = run_fleet(acl_broker, make_agent, tmp_path, 20)
    # Reconnect spread after a broker restart (from the broker's own log).
    log_size = acl_broker.log.stat().st_size
    acl_broker.stop()
    time.sleep(2)
    restarted = time.monotonic()
    acl_broker.start()
    wait_for(lambda: acl_broker.log.read_text()[log_size:].count("New client connected") >= 20, 300, interval=0.5)
    figures["restart to all reconnected (s)"] = time.monotonic() - restarted
    stamps = [
        int(line.split(":", 1)[0])
        for line in acl_broker.log.read_text()[log_size:].splitlines()
        if "New client connected" in line and line.split(":", 1)[0].isdigit()
    ]
    histogram = collections.Counter(stamp - min(stamps) for stamp in stamps)
    print("\nfleet figures (20 agents):", json.dumps({k: round(v, 1) for k, v in figures.items()}))
    print("reconnects per second after the broker restart:", dict(sorted(histogram.items())))

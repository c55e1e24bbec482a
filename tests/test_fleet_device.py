"""Fleet config end to end: real agent processes, a real mosquitto, the operator
CLI and envelopes published by hand where the CLI would refuse them."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, AgentProcess, Broker, free_port, wait_for

from edgeagent.fleet import envelope as env_mod
from edgeagent.fleet.envelope import Envelope
from edgeagent.fleet.operator import BrokerOptions, Connection

CONFIG = """
device_id = "{device}"
state_dir = "{{state_dir}}"
[kmsg]
enabled = false
[upload]
to = "mqtt"
[mqtt]
url = "{url}"
first_connect_delay = "0s"
{mqtt_extra}
[spool]
flush_interval = "100ms"
[[files]]
include = ["{log}"]
start_at = "beginning"
[fleet]
enabled = true
groups = {groups}
allow = ["log_level", "kmsg", "files", "spool.flush_interval", "upload.max_rate", "mqtt.url"]
probation = "{probation}"
{extra}
"""


def agent_config(
    broker: Broker,
    tmp_path: Path,
    device: str = "gw-1",
    probation: str = "20s",
    extra: str = "",
    groups: tuple[str, ...] = ("berlin",),
    mqtt_extra: str = "",
) -> str:
    """An agent with fleet config on, tailing its own `DEVICE.log` in `tmp_path` into `broker`."""
    log = tmp_path / f"{device}.log"
    log.touch()
    return CONFIG.format(
        device=device,
        url=broker.url,
        log=log,
        probation=probation,
        extra=extra,
        groups=json.dumps(list(groups)),
        mqtt_extra=mqtt_extra,
    )


def fleet_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", "fleet", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def publish(broker: Broker, topic: str, payload: bytes) -> None:
    conn = Connection(BrokerOptions(broker.url))
    try:
        conn.publish_retained(topic, payload)
    finally:
        conn.close()


def desired(broker: Broker, device: str, version: int, text: str, key: Path | None = None) -> None:
    envelope = Envelope(f"device:{device}", version, text)
    if key is not None:
        envelope = env_mod.sign(envelope, key)
    publish(broker, f"edgeagent/{device}/config/desired", envelope.encode())


def fleet_status(agent: AgentProcess) -> dict[str, Any]:
    return agent.status().get("fleet") or {}


def reported(broker: Broker, device: str) -> dict[str, Any]:
    conn = Connection(BrokerOptions(broker.url))
    try:
        topic = f"edgeagent/{device}/config/status"
        messages = [m for m in conn.collect_retained(topic) if m.topic == topic]
    finally:
        conn.close()
    return json.loads(messages[-1].payload) if messages else {}


def wait_state(agent: AgentProcess, state: str, version: int, timeout: float = 60) -> dict[str, Any]:
    return wait_for(
        lambda: (s := fleet_status(agent)).get("state") == state and s.get("version") == version and s,
        timeout,
        what=f"fleet state {state} v{version} (last: {fleet_status(agent)})",
    )


def shipped(agent: AgentProcess) -> int:
    return int(agent.status().get("uploader", {}).get("acked_records", 0))


def test_push_applies_live_and_reports(mosquitto: Broker, make_agent: Any, tmp_path: Path) -> None:
    agent = make_agent(agent_config(mosquitto, tmp_path))
    agent.start()
    conf = tmp_path / "desired.toml"
    conf.write_text('log_level = "debug"\n[spool]\nflush_interval = "300ms"\n')
    out = fleet_cli("push", "--broker", mosquitto.url, "--device", "gw-1", "--wait", "60", str(conf))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gw-1" in out.stdout and "applied" in out.stdout
    status = wait_state(agent, "applied", 1)
    assert status["applied_version"] == 1 and status["config_hash"] and status["boot_id"]
    assert reported(mosquitto, "gw-1")["state"] == "applied"
    state = tomllib.loads((agent.state_dir / "fleet" / "state.toml").read_text())
    assert state["last_good"]["device:gw-1"]["config"]["spool"]["flush_interval"] == "300ms"
    assert (agent.state_dir / "fleet" / "state.toml").stat().st_mode & 0o777 == 0o600
    text = subprocess.run(
        [sys.executable, "-m", "edgeagent", "status", "-c", str(agent.config_path)], capture_output=True, text=True
    ).stdout
    assert "fleet:     state=applied, scope=device:gw-1, version=1, applied_version=1" in text, text
    listing = fleet_cli("status", "--broker", mosquitto.url)
    assert "gw-1" in listing.stdout and "applied" in listing.stdout
    # The retained config is read again after a restart and not re-applied.
    agent.stop()
    agent.start()
    wait_for(lambda: "ignoring device:gw-1 v1" in agent.stderr() or fleet_status(agent).get("version") == 1, 30)
    assert agent.stderr().count("fleet: device:gw-1 v1 applied") == 1


def test_invalid_and_forbidden_configs_are_rejected_and_logs_keep_flowing(
    mosquitto: Broker, make_agent: Any, tmp_path: Path
) -> None:
    agent = make_agent(agent_config(mosquitto, tmp_path))
    agent.start()
    log = tmp_path / "gw-1.log"
    desired(mosquitto, "gw-1", 1, '[kmsg]\nmin_priority = "loud"\n')
    status = wait_state(agent, "rejected", 1)
    assert "kmsg.min_priority = 'loud'" in status["reason"] and "expected a priority" in status["reason"]
    desired(mosquitto, "gw-1", 2, 'state_dir = "/tmp/elsewhere"\n')
    assert "state_dir" in wait_state(agent, "rejected", 2)["reason"]
    desired(mosquitto, "gw-1", 3, '[[files]]\ninclude = ["/etc/../etc/shadow"]\n')
    assert "files[0].include" in wait_state(agent, "rejected", 3)["reason"]
    big = {"format": 1, "scope": "device:gw-1", "version": 4, "config": "#" * (64 * 1024)}
    publish(mosquitto, "edgeagent/gw-1/config/desired", json.dumps(big).encode())
    assert "limit" in wait_state(agent, "rejected", 0)["reason"]
    with open(log, "a") as f:
        f.write("still shipping\n")
    wait_for(lambda: shipped(agent) >= 1, what="a line shipped after the rejections")
    # A replay of a rejected version is ignored; a higher one is applied.
    desired(mosquitto, "gw-1", 2, 'log_level = "debug"\n')
    desired(mosquitto, "gw-1", 5, 'log_level = "debug"\n')
    wait_state(agent, "applied", 5)
    assert "ignoring device:gw-1 v2" in agent.stderr()


def test_signed_configs_only_when_keys_are_trusted(mosquitto: Broker, make_agent: Any, tmp_path: Path) -> None:
    private, public = env_mod.generate_keypair(tmp_path / "op.key")
    _, other_public = env_mod.generate_keypair(tmp_path / "other.key")
    agent = make_agent(agent_config(mosquitto, tmp_path, extra=f'trusted_keys = ["{other_public}", "{public}"]'))
    agent.start()
    desired(mosquitto, "gw-1", 1, 'log_level = "debug"\n')
    assert "unsigned" in wait_state(agent, "rejected", 1)["reason"]
    forged = env_mod.sign(Envelope("device:gw-1", 1, 'log_level = "debug"\n'), private)
    publish(
        mosquitto, "edgeagent/gw-1/config/desired", Envelope(forged.scope, 2, forged.config, forged.signature).encode()
    )
    assert "does not verify" in wait_state(agent, "rejected", 2)["reason"]
    # Neither unverified version was remembered: version 1, properly signed, still applies.
    desired(mosquitto, "gw-1", 1, 'log_level = "debug"\n', key=private)
    wait_state(agent, "applied", 1)
    conf = tmp_path / "next.toml"
    conf.write_text('log_level = "warning"\n')
    out = fleet_cli(
        "push", "--broker", mosquitto.url, "--device", "gw-1", "--key", str(private), "--wait", "60", str(conf)
    )
    assert out.returncode == 0 and "applied" in out.stdout, out.stdout + out.stderr
    wait_state(agent, "applied", 2)


def test_config_that_cuts_the_device_off_is_rolled_back(mosquitto: Broker, make_agent: Any, tmp_path: Path) -> None:
    agent = make_agent(agent_config(mosquitto, tmp_path, probation="3s"))
    agent.start()
    dead = f"mqtt://127.0.0.1:{free_port()}"
    desired(mosquitto, "gw-1", 1, f'[mqtt]\nurl = "{dead}"\n')
    status = wait_state(agent, "rolled_back", 1)
    assert "mqtt" in status["reason"] and "not connected" in status["reason"]
    wait_for(
        lambda: reported(mosquitto, "gw-1").get("state") == "rolled_back", what="the rollback reported on the broker"
    )
    with open(tmp_path / "gw-1.log", "a") as f:
        f.write("after the rollback\n")
    wait_for(lambda: shipped(agent) >= 1, what="shipping again on the restored broker")
    agent.stop()
    agent.start()
    assert fleet_status(agent).get("state") == "rolled_back"
    assert "fleet: applying device:gw-1 v1" not in agent.stderr().split("started: device")[-1]


def test_crash_during_probation_restores_the_last_good_config(
    mosquitto: Broker, make_agent: Any, tmp_path: Path
) -> None:
    agent = make_agent(agent_config(mosquitto, tmp_path, probation="10m"))
    agent.start()
    desired(mosquitto, "gw-1", 1, 'log_level = "debug"\n')
    wait_state(agent, "applied", 1)
    desired(mosquitto, "gw-1", 2, f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n')
    wait_state(agent, "applying", 2)
    state_file = agent.state_dir / "fleet" / "state.toml"
    assert tomllib.loads(state_file.read_text())["probation"]["version"] == 2
    agent.kill()
    agent.start()
    status = wait_state(agent, "rolled_back", 2)
    assert "restarted while device:gw-1 v2 was on probation" in status["reason"]
    assert status["applied_version"] == 1
    wait_for(lambda: reported(mosquitto, "gw-1").get("state") == "rolled_back", what="the rollback on the broker")
    assert "probation" not in tomllib.loads(state_file.read_text())


def test_fleet_works_when_logs_go_over_otlp_http(mosquitto: Broker, make_agent: Any, tmp_path: Path) -> None:
    text = agent_config(mosquitto, tmp_path).replace('to = "mqtt"', 'to = "otlp_http"')
    text += '[otlp_http]\nendpoint = "http://127.0.0.1:1/v1/logs"\n'
    agent = make_agent(text)
    agent.start()
    desired(mosquitto, "gw-1", 1, '[upload]\nmax_rate = "10KiB"\n')
    wait_state(agent, "applied", 1)
    wait_for(lambda: reported(mosquitto, "gw-1").get("state") == "applied", what="the report over the shared session")


@pytest.mark.slow  # the same apply path runs 20 times through SIGHUP in test_live_apply (default suite)
def test_twenty_fleet_applies_while_lines_flow_lose_and_duplicate_nothing(
    mosquitto: Broker, make_agent: Any, tmp_path: Path
) -> None:
    from conftest import spool_records
    from test_live_apply import Writer

    text = agent_config(mosquitto, tmp_path, extra=f'allowed_paths = ["{tmp_path}/*"]')
    agent = make_agent(text.replace('to = "mqtt"', 'to = "none"'))
    agent.start()
    log = tmp_path / "gw-1.log"
    writer = Writer(log)
    for version in range(1, 21):
        layer = f'[[files]]\ninclude = ["{log}"]\nstart_at = "beginning"\nmax_line_size = "{version}KiB"\n'
        desired(mosquitto, "gw-1", version, layer)
        wait_state(agent, "applied", version)
    written = writer.stop()
    assert agent.stderr().count("restarted ['files']") == 20

    def lines() -> list[str]:
        return [r["body"] for r in spool_records(agent.state_dir) if r["scope"] == "edgeagent/files"]

    wait_for(lambda: len(lines()) >= written, 30, what=f"{written} lines in the spool")
    agent.stop()
    assert lines() == [f"line {n:07d}" for n in range(written)]

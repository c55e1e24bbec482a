"""`edgeagent fleet keygen | push | status` against a real mosquitto."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from conftest import REPO, Broker

from edgeagent.fleet import report
from edgeagent.fleet.envelope import Verifier, decode
from edgeagent.fleet.operator import BrokerOptions, Connection


def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", "fleet", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def retained(broker: Broker, topic: str) -> list[bytes]:
    conn = Connection(BrokerOptions(broker.url))
    try:
        return [m.payload for m in conn.collect_retained(topic) if m.topic == topic]
    finally:
        conn.close()


def test_keygen_writes_private_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = fleet_cli("keygen", str(tmp_path / "op.key"))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "op.key").stat().st_mode) == 0o600
    assert len((tmp_path / "op.key.pub").read_text().strip()) == 44  # base64 of 32 bytes
    again = fleet_cli("keygen", str(tmp_path / "op.key"))
    assert again.returncode == 1 and "exists" in again.stderr


def test_push_versions_signs_and_publishes_retained(mosquitto: Broker, tmp_path: Path) -> None:
    assert fleet_cli("keygen", str(tmp_path / "op.key")).returncode == 0
    conf = tmp_path / "desired.toml"
    conf.write_text('log_level = "debug"\n')
    topic = "edgeagent/gw-7/config/desired"
    first = fleet_cli(
        "push", "--broker", mosquitto.url, "--device", "gw-7", "--key", str(tmp_path / "op.key"), str(conf)
    )
    assert first.returncode == 0, first.stderr
    assert "pushed version 1" in first.stderr
    second = fleet_cli(
        "push", "--broker", mosquitto.url, "--device", "gw-7", "--key", str(tmp_path / "op.key"), str(conf)
    )
    assert "pushed version 2" in second.stderr, second.stderr
    (payload,) = retained(mosquitto, topic)
    envelope = decode(payload)
    assert (envelope.scope, envelope.version, envelope.config) == ("device:gw-7", 2, 'log_level = "debug"\n')
    Verifier([str(tmp_path / "op.key.pub")]).check(envelope)
    explicit = fleet_cli("push", "--broker", mosquitto.url, "--group", "berlin", "--version", "40", str(conf))
    assert explicit.returncode == 0, explicit.stderr
    (group_payload,) = retained(mosquitto, "edgeagent/group/berlin/config/desired")
    assert decode(group_payload).version == 40 and decode(group_payload).signature is None


def test_push_refuses_an_invalid_config_before_publishing(mosquitto: Broker, tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[kmsg]\nmin_priority = "loud"\n')
    out = fleet_cli("push", "--broker", mosquitto.url, "--device", "gw-7", str(conf))
    assert out.returncode == 1
    assert "not pushed" in out.stderr and "kmsg.min_priority = 'loud'" in out.stderr
    assert retained(mosquitto, "edgeagent/gw-7/config/desired") == []


def test_status_lists_one_line_per_device(mosquitto: Broker) -> None:
    conn = Connection(BrokerOptions(mosquitto.url))
    try:
        for device, state in (("gw-1", "applied"), ("gw-2", "rejected")):
            doc = report.document(
                state,
                version=3,
                scope=f"device:{device}",
                applied_version=3 if state == "applied" else 2,
                config_hash="h",
                layers={},
                reason="" if state == "applied" else "kmsg.min_priority = 'loud': expected a priority",
                boot_id="b",
            )
            conn.publish_retained(f"edgeagent/{device}/config/status", report.encode(doc))
    finally:
        conn.close()
    out = fleet_cli("status", "--broker", mosquitto.url, "--json")
    assert out.returncode == 0, out.stderr
    reports = json.loads(out.stdout)
    assert [(r["device"], r["state"]) for r in reports] == [("gw-1", "applied"), ("gw-2", "rejected")]
    text = fleet_cli("status", "--broker", mosquitto.url, "--device", "gw-2").stdout
    assert "gw-2" in text and "rejected" in text and "loud" in text and "gw-1" not in text
    unreachable = fleet_cli("status", "--broker", "mqtt://127.0.0.1:1")
    assert unreachable.returncode == 1 and "cannot connect" in unreachable.stderr

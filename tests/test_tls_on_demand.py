"""TLS is loaded only when the config uses it (edgeagent.tls), and a config that turns it on later
(SIGHUP, a fleet config) gets it: the agent restarts itself, same PID, with TLS loaded.

Checked on the real process: /proc/PID/maps shows whether libssl and libcrypto are mapped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, AgentProcess, Broker, free_port, wait_for
from mqtt_helpers import Subscriber, bodies
from tls import Pki, agent_config, make_pki, mosquitto_tls_listener

from edgeagent.fleet.envelope import Envelope
from edgeagent.fleet.operator import BrokerOptions, Connection

TOPIC = "edgeagent/gw-tls/logs"
OPENSSL = ("libssl.so", "libcrypto.so", "_ssl.", "_hashlib.")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[tuple[Broker, int]]:
    """One mosquitto with a plain listener (`broker.port`) and a TLS one (the int)."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    tls_port = free_port()
    broker = Broker(workdir, mosquitto_tls_listener(pki, tls_port))
    broker.start()
    yield broker, tls_port
    broker.stop()


def openssl_mapped(agent: AgentProcess) -> list[str]:
    assert agent.proc is not None
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    return sorted({name for name in OPENSSL if name in maps})


def arrived(logs: Subscriber, text: str) -> bool:
    return any(text in bodies(message.payload) for message in logs.received())


def restarted(agent: AgentProcess, before: dict[str, Any]) -> Callable[[], bool]:
    """True once the agent runs again, same PID, started after `before`."""

    def check() -> bool:
        now = agent.status().get("agent", {})
        return now.get("state") == "running" and now.get("started", 0) > before["started"] and agent.ready()

    return check


def start_without_tls(agent: AgentProcess, log: Path, logs: Subscriber) -> tuple[AgentProcess, dict[str, Any]]:
    """Start `agent` (an mqtt:// config tailing `log`): a line arrives, no OpenSSL is mapped.
    Returns it with its status before any restart."""
    log.write_text("line over plain mqtt\n")
    agent.start()
    wait_for(lambda: arrived(logs, "line over plain mqtt"), what="the line over mqtt://")
    assert openssl_mapped(agent) == []
    return agent, agent.wait_status(lambda s: s["agent"]["started"])["agent"]


def started_over_mqtt(
    broker: Broker, log: Path, make_agent: Any, subscribers: list[Subscriber]
) -> tuple[AgentProcess, dict[str, Any], Subscriber]:
    """An agent tailing `log` over mqtt:// (no TLS loaded), its status and a subscriber to its logs."""
    logs = Subscriber(broker.port, TOPIC)
    subscribers.append(logs)
    agent, before = start_without_tls(make_agent(agent_config(log, f'url = "{broker.url}"')), log, logs)
    return agent, before, logs


def append_lines(log: Path, first: int, count: int) -> None:
    with log.open("a") as f:
        f.write("".join(f"line {n}\n" for n in range(first, first + count)))


def reload_to_mqtts(agent: AgentProcess, log: Path, tls_port: int, pki: Pki) -> None:
    text = agent_config(log, f'url = "mqtts://127.0.0.1:{tls_port}"\nca_file = "{pki.ca_cert}"')
    agent.config_path.write_text(text.replace("{state_dir}", str(agent.state_dir)))
    agent.signal(signal.SIGHUP)


def test_no_openssl_without_tls_and_sighup_to_mqtts_restarts_with_it(
    tmp_path: Path, tls_broker: tuple[Broker, int], pki: Pki, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    tls_port = tls_broker[1]
    log = tmp_path / "app.log"
    agent, before, logs = started_over_mqtt(tls_broker[0], log, make_agent, subscribers)
    assert agent.proc is not None
    pid = agent.proc.pid

    reload_to_mqtts(agent, log, tls_port, pki)
    wait_for(restarted(agent, before), 60, what="the agent running again after the restart for TLS")
    assert agent.proc.pid == pid and agent.proc.poll() is None  # executed itself: same process
    assert "restarting with TLS loaded" in agent.stderr()
    assert set(openssl_mapped(agent)) >= {"libssl.so", "_ssl."}
    with log.open("a") as f:
        f.write("line over mqtts\n")
    wait_for(lambda: arrived(logs, "line over mqtts"), what="the line over mqtts://")
    status = agent.wait_status(lambda s: "uploader" in s, what="a status with the uploader")
    assert status["uploader"]["broker"] == f"mqtts://127.0.0.1:{tls_port}"
    assert agent.stop() == 0


def test_a_restart_for_tls_sends_no_line_twice(
    tmp_path: Path, tls_broker: tuple[Broker, int], pki: Pki, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    """The restart is a clean stop: the positions of what was delivered from RAM are written, and the
    agent started again reads on after them. Before, lines delivered while the reload was being checked
    (in a child with TLS) were sent again after the restart: nothing but their chunk id told the copy."""
    tls_port = tls_broker[1]
    log = tmp_path / "app.log"
    agent, before, logs = started_over_mqtt(tls_broker[0], log, make_agent, subscribers)
    append_lines(log, 0, 2000)
    wait_for(lambda: arrived(logs, "line 1999"), what="the first lines over mqtt://")
    reload_to_mqtts(agent, log, tls_port, pki)
    append_lines(log, 2000, 2000)  # read, and delivered from RAM, while the new config is checked
    wait_for(restarted(agent, before), 60, what="the agent running again after the restart for TLS")
    append_lines(log, 4000, 1)
    wait_for(lambda: arrived(logs, "line 4000"), what="a line over mqtts://")
    sent = Counter(body for message in logs.received() for body in bodies(message.payload))
    assert sorted(sent) == sorted(["line over plain mqtt", *(f"line {n}" for n in range(4001))])
    assert [body for body, copies in sent.items() if copies > 1] == [], "lines sent twice"
    assert agent.stop() == 0


@pytest.mark.parametrize("sig", ["SIGUSR2", "SIGUSR1", "SIGHUP"])
def test_signals_during_the_restart_for_tls_are_not_fatal(
    tmp_path: Path, tls_broker: tuple[Broker, int], pki: Pki, make_agent: Any, subscribers: list[Subscriber], sig: str
) -> None:
    """`status` (SIGUSR2), `wake` (SIGUSR1) or a reload (SIGHUP) acting on what they read a moment
    before can signal the agent while it stops and executes itself again: between its loop's end and
    the new loop, such a signal used to kill it (exit -12 for SIGUSR2)."""
    tls_port = tls_broker[1]
    log = tmp_path / "app.log"
    agent, before, _ = started_over_mqtt(tls_broker[0], log, make_agent, subscribers)
    assert agent.proc is not None
    pid = agent.proc.pid
    reload_to_mqtts(agent, log, tls_port, pki)
    wait_for(lambda: "restarting with TLS loaded" in agent.stderr(), 30, 0.005, what="the restart beginning")
    running_again = restarted(agent, before)
    deadline = time.monotonic() + 60
    while agent.proc.poll() is None and not running_again() and time.monotonic() < deadline:
        for _ in range(200):  # every 2 ms between two looks at the status
            if agent.proc.poll() is not None:
                break
            os.kill(pid, getattr(signal, sig))
            time.sleep(0.002)
    assert agent.proc.poll() is None, f"{sig} killed the agent (exit {agent.proc.returncode}):\n{agent.stderr()}"
    wait_for(running_again, 60, what="the agent running again after the restart for TLS")
    assert agent.proc.pid == pid
    assert agent.stop() == 0


def refused_reload_to_mqtts(
    agent: AgentProcess, broker: Broker, log: Path, mqtt: str, before_reload: Callable[[], object] = lambda: None
) -> str:
    """Start `agent` on mqtt://, reload it to `mqtt` (an mqtts:// section) and return the refusal
    logged; checks that nothing restarted and that it still runs without TLS on the old broker."""
    agent.start()
    before_reload()
    agent.config_path.write_text(agent_config(log, mqtt).replace("{state_dir}", str(agent.state_dir)))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in agent.stderr(), what="the refused reload")
    assert "restarting" not in agent.stderr() and openssl_mapped(agent) == []
    status = agent.wait_status(lambda s: "uploader" in s, what="a status with the uploader")
    assert status["uploader"]["broker"] == broker.url
    assert agent.stop() == 0
    return next(line for line in agent.stderr().splitlines() if "reload refused" in line)


def test_reload_to_mqtts_with_an_unusable_ca_is_refused_before_any_restart(
    tmp_path: Path, tls_broker: tuple[Broker, int], make_agent: Any
) -> None:
    """The TLS files are checked (in a child with TLS) before the agent restarts for them:
    a bad one is refused like any bad reload and the agent keeps running as it was."""
    broker, tls_port = tls_broker
    log = tmp_path / "app.log"
    log.touch()
    bad_ca = tmp_path / "not-a-ca.pem"
    bad_ca.write_text("not a certificate\n")
    agent = make_agent(agent_config(log, f'url = "{broker.url}"'))
    refusal = refused_reload_to_mqtts(agent, broker, log, f'url = "mqtts://127.0.0.1:{tls_port}"\nca_file = "{bad_ca}"')
    line = agent.config_path.read_text().splitlines().index(f'ca_file = "{bad_ca}"') + 1
    assert f"{agent.config_path}:{line}: mqtt.ca_file = '{bad_ca}'" in refusal, refusal  # the file's line
    assert not list(agent.state_dir.glob(".tls-check-*"))  # the copy with the secrets is gone


def test_reload_to_mqtts_that_cannot_be_checked_is_refused(
    tmp_path: Path, tls_broker: tuple[Broker, int], pki: Pki, make_agent: Any
) -> None:
    """The copy checked with TLS cannot be written (here a directory is in its way, as a full or
    read-only state dir would do): the reload is refused, the agent runs on without TLS."""
    broker, tls_port = tls_broker
    log = tmp_path / "app.log"
    log.touch()
    agent = make_agent(agent_config(log, f'url = "{broker.url}"'))

    def block_the_copy() -> None:
        assert agent.proc is not None
        (agent.state_dir / f".tls-check-{agent.proc.pid}.toml").mkdir()

    mqtts = f'url = "mqtts://127.0.0.1:{tls_port}"\nca_file = "{pki.ca_cert}"'
    refusal = refused_reload_to_mqtts(agent, broker, log, mqtts, block_the_copy)
    assert "cannot check the new config with TLS loaded" in refusal, refusal


def test_fleet_config_turning_on_mqtts_is_proven_after_the_restart(
    tmp_path: Path,
    tls_broker: tuple[Broker, int],
    pki: Pki,
    make_agent: Any,
    subscribers: list[Subscriber],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS files cannot be set remotely, so the broker is verified against the system store:
    here SSL_CERT_FILE (read by OpenSSL's defaults) names the test CA."""
    broker, tls_port = tls_broker
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    logs = Subscriber(broker.port, TOPIC)
    subscribers.append(logs)
    log = tmp_path / "app.log"
    fleet = '[fleet]\nenabled = true\nallow = ["mqtt.url"]\nprobation = "60s"\n'
    agent, before = start_without_tls(make_agent(agent_config(log, f'url = "{broker.url}"', fleet)), log, logs)
    assert agent.proc is not None
    pid = agent.proc.pid

    url = f"mqtts://127.0.0.1:{tls_port}"
    envelope = Envelope("device:gw-tls", 1, f'[mqtt]\nurl = "{url}"\n')
    conn = Connection(BrokerOptions(broker.url))
    try:
        conn.publish_retained("edgeagent/gw-tls/config/desired", envelope.encode())
    finally:
        conn.close()
    wait_for(restarted(agent, before), 60, what="the agent running again after the restart for TLS")
    wait_for(lambda: agent.status().get("fleet", {}).get("state") == "applied", 60, what="fleet v1 applied")
    status = agent.status()
    assert status["fleet"]["applied_version"] == 1 and status["uploader"]["broker"] == url
    assert agent.proc.pid == pid and set(openssl_mapped(agent)) >= {"libssl.so", "_ssl."}
    assert "back on probation after the restart" in agent.stderr() and "rolled back" not in agent.stderr()
    state = tomllib.loads((agent.state_dir / "fleet" / "state.toml").read_text())
    assert "probation" not in state and state["last_good"]["device:gw-tls"]["config"]["mqtt"]["url"] == url
    with log.open("a") as f:
        f.write("after the fleet config\n")
    wait_for(lambda: arrived(logs, "after the fleet config"), what="the line over mqtts://")
    assert agent.stop() == 0

    # A fresh start (a reboot, a service restart: no EDGEAGENT_TLS) with that layer in effect: the
    # local file says mqtt://, so TLS is kept out at first; the effective config restarts it with TLS.
    agent.start()
    wait_for(lambda: agent.status().get("uploader", {}).get("connected"), 30, what="connected again")
    status = agent.status()
    assert status["uploader"]["broker"] == url and status["fleet"]["state"] == "applied"
    assert agent.stderr().count("restarting with TLS loaded") == 2  # the apply's, and this start's
    assert agent.stderr().split("restarting with TLS loaded")[-1].count("started: device") == 1
    assert set(openssl_mapped(agent)) >= {"libssl.so", "_ssl."}
    with log.open("a") as f:
        f.write("after a fresh start\n")
    wait_for(lambda: arrived(logs, "after a fresh start"), what="the line over mqtts:// after a fresh start")
    assert agent.stop() == 0


def test_without_tls_hashes_and_paho_socket_errors_work() -> None:
    """In a process where TLS is kept out: hashlib's built-in sha256 gives the same digests, and a
    read with nothing to read is EAGAIN to paho (its except clauses name ssl's exceptions)."""
    code = """
import json, socket, sys
from edgeagent import tls
assert tls.keep_out() and not tls.available()
import hashlib, asyncio
from edgeagent.holding import stable_chunk_id
from edgeagent.mqtt.client import BoundedClient
from edgeagent.records import Batch
try:
    import ssl
    raise SystemExit("ssl imported")
except ImportError:
    pass
client = BoundedClient(client_id="t")
client._sock, peer = socket.socketpair()
client._sock.setblocking(False)
try:
    client._sock_recv(1)
except BlockingIOError:
    eagain = "BlockingIOError"
except Exception as e:
    eagain = type(e).__name__
chunk_id = stable_chunk_id([Batch("f", [b"a", b"b"], 1, "boot", position=("f:1", 2))])
print(json.dumps([hashlib.sha256(b"edgeagent").hexdigest(), chunk_id, eagain, sys.modules.get("_hashlib") is not None]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    digest, chunk_id, eagain, openssl_hashes = json.loads(out.stdout)
    import hashlib

    from edgeagent.holding import stable_chunk_id
    from edgeagent.records import Batch

    assert digest == hashlib.sha256(b"edgeagent").hexdigest()
    assert chunk_id == stable_chunk_id([Batch("f", [b"a", b"b"], 1, "boot", position=("f:1", 2))])
    assert eagain == "BlockingIOError" and openssl_hashes is False

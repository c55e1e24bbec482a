"""The MQTT uploader inside the real agent process: a backlog left by an earlier
run goes out at start, status shows the connection, and a SIGKILL between
PUBLISH and PUBACK loses nothing (the chunk is sent again, same chunk-id)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import REPO, Broker, spool_records, wait_for
from mqtt_helpers import BOOT_ID, Subscriber, line_numbers, line_text

from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher
from edgeagent.records import Batch
from edgeagent.spool import Spool

TOPIC = "edgeagent/gw-agent/logs"
STATUS_TOPIC = "edgeagent/gw-agent/status"


def agent_config(broker: Broker, log_file: Path | None = None, spool: str = "") -> str:
    files = ""
    if log_file is not None:
        files = f'[[files]]\ninclude = ["{log_file}"]\nstart_at = "beginning"\n'
    return f"""
device_id = "gw-agent"
state_dir = "{{state_dir}}"
[kmsg]
enabled = false
{files}
[spool]
flush_interval = "200ms"
{spool}
[upload]
to = "mqtt"
retry_initial = "200ms"
retry_max = "2s"
shutdown_timeout = "2s"
[mqtt]
url = "{broker.url}"
connect_timeout = "3s"
first_connect_delay = "0s"
"""


def uploader_status(agent: Any) -> dict[str, Any]:
    return agent.status().get("uploader", {})


def test_backlog_from_an_earlier_run_goes_out_at_start(
    mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    logs = Subscriber(mosquitto.port, TOPIC)
    status = Subscriber(mosquitto.port, STATUS_TOPIC, client_id="status-watcher")
    subscribers += [logs, status]
    agent = make_agent(agent_config(mosquitto))
    spool = Spool.open(agent.state_dir / "spool.db")
    batcher = Batcher(spool, ChunkEncoder({"device.id": "gw-agent"}, "test"), BOOT_ID, SpoolConfig())
    for first in range(0, 9000, 3000):
        batcher.add(Batch("test", [line_text(n) for n in range(first, first + 3000)], 1, BOOT_ID))
        batcher.flush()
    spool.close()

    agent.start()
    wait_for(lambda: spool_records(agent.state_dir) == [], 30, what="backlog sent")
    wait_for(lambda: sorted(n for ns in line_numbers(logs.received()) for n in ns) == list(range(9000)))
    wait_for(lambda: uploader_status(agent).get("acked") == 3, what="status shows the acks")
    st = uploader_status(agent)
    assert st["connected"] is True and st["broker"] == mosquitto.url and st["last_error"] is None
    assert st["sent"] == 3 and st["in_flight"] == 0 and st["since"] > 0

    assert agent.stop() == 0
    wait_for(lambda: status.received() and json.loads(status.received()[-1].payload)["state"] == "offline")


@contextmanager
def publishing_to_a_stopped_broker(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber], spool: str = ""
) -> Iterator[tuple[Any, Subscriber]]:
    """An agent tailing a file, connected; the broker is then stopped (SIGSTOP: PUBACKs will not
    come) and 500 lines are written; yields (agent, subscriber) once a chunk of them is in flight."""
    logs = Subscriber(mosquitto.port, TOPIC)
    subscribers.append(logs)
    log_file = tmp_path / "app.log"
    log_file.write_bytes(b"")
    agent = make_agent(agent_config(mosquitto, log_file, spool))
    agent.start()
    wait_for(lambda: uploader_status(agent).get("connected"), 30, what="agent connected")
    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)
    try:
        log_file.write_bytes(b"".join(line_text(n) + b"\n" for n in range(500)))
        wait_for(lambda: uploader_status(agent).get("in_flight", 0) >= 1, 30, what="chunk published")
        yield agent, logs
    finally:
        mosquitto.proc.send_signal(signal.SIGCONT)


def test_sigkill_between_publish_and_puback_resends_the_chunk(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    """File lines written to the spool (hold_file_lines = 0: like kernel messages, on flash within
    flush_interval when not acknowledged); test_holding has the same for lines held in RAM."""
    with publishing_to_a_stopped_broker(tmp_path, mosquitto, make_agent, subscribers, 'hold_file_lines = "0s"') as (
        agent,
        logs,
    ):
        wait_for(lambda: len(spool_records(agent.state_dir)) == 500, 30, what="the unacknowledged chunk written")
        in_spool = spool_records(agent.state_dir)
        assert sorted(int(r["body"].split()[1]) for r in in_spool) == list(range(500))
        chunk_ids = {r["chunk_id"] for r in in_spool}
        agent.kill()

    # The spool still has it; the restarted agent sends it again, under the same chunk id.
    assert {r["chunk_id"] for r in spool_records(agent.state_dir)} == chunk_ids
    agent.start()
    wait_for(lambda: spool_records(agent.state_dir) == [], 30, what="chunk resent and acknowledged")
    wait_for(lambda: {m.user_properties["chunk-id"] for m in logs.received()} >= chunk_ids, what="chunk at subscriber")
    delivered = logs.received()
    # Any copy the broker took in before the kill (it may deliver it after SIGCONT) is the same chunk.
    assert {m.user_properties["chunk-id"] for m in delivered} == chunk_ids
    for numbers in line_numbers(delivered):
        assert numbers == sorted(numbers)
    assert {n for numbers in line_numbers(delivered) for n in numbers} == set(range(500))
    assert agent.stop() == 0


def reload_with(agent: Any, config_text: str) -> None:
    """Rewrite the config file and SIGHUP; wait until the agent says it reloaded."""
    before = agent.stderr().count("reloading config from")
    agent.config_path.write_text(config_text.replace("{state_dir}", str(agent.state_dir)))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: agent.stderr().count("reloading config from") > before, 30, what="the reload")


def online_messages(status: Subscriber) -> int:
    """Each connection publishes one retained "online" status (the broker's log is buffered)."""
    return sum(json.loads(m.payload)["state"] == "online" for m in status.received())


def test_a_reload_that_leaves_the_connection_alone_keeps_it_up(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    """Issue 10: only what changed is rebuilt. Log level, spool and upload rate
    change; the MQTT connection stays (one connection at the broker, the same
    session), and lines keep flowing through it."""
    logs = Subscriber(mosquitto.port, TOPIC)
    status = Subscriber(mosquitto.port, STATUS_TOPIC, client_id="status-watcher")
    subscribers += [logs, status]
    log_file = tmp_path / "app.log"
    log_file.write_bytes(b"".join(line_text(n) + b"\n" for n in range(100)))
    text = agent_config(mosquitto, log_file)
    agent = make_agent(text)
    agent.start()
    wait_for(lambda: {n for ns in line_numbers(logs.received()) for n in ns} == set(range(100)), 30)
    wait_for(lambda: online_messages(status) == 1, what="the online status")
    wait_for(lambda: agent.status().get("mqtt", {}).get("connections") == 1, what="status shows the connection")

    changed = text.replace('device_id = "gw-agent"\n', 'device_id = "gw-agent"\nlog_level = "debug"\n')
    reload_with(agent, changed.replace("[upload]\n", '[upload]\nmax_rate = "1MiB"\n'))
    with log_file.open("ab") as f:
        f.write(b"".join(line_text(n) + b"\n" for n in range(100, 200)))
    wait_for(lambda: {n for ns in line_numbers(logs.received()) for n in ns} == set(range(200)), 30)
    st = agent.wait_status(lambda s: "mqtt" in s, what="a status with the MQTT session")
    assert st["mqtt"]["connections"] == 1 and st["mqtt"]["connected"] and online_messages(status) == 1
    assert agent.stop() == 0


def test_a_reload_with_a_new_broker_moves_the_session(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    status = Subscriber(mosquitto.port, STATUS_TOPIC, client_id="status-watcher")
    subscribers.append(status)
    other_dir = tmp_path / "other-broker"
    other_dir.mkdir()
    other = Broker(other_dir)
    other.start()
    try:
        logs = Subscriber(other.port, TOPIC)
        subscribers.append(logs)
        log_file = tmp_path / "app.log"
        log_file.write_bytes(b"")
        agent = make_agent(agent_config(mosquitto, log_file))
        agent.start()
        wait_for(lambda: agent.status().get("mqtt", {}).get("connected"), 30, what="connected to the first broker")

        reload_with(agent, agent_config(other, log_file))
        agent.wait_status(lambda s: s["mqtt"]["broker"] == other.url, 30, what="a session for the new broker")
        agent.wait_status(lambda s: s["mqtt"]["connected"], 30, what="connected to the new broker")
        # The old connection said goodbye (not a will, which would come only after the keepalive).
        wait_for(lambda: any(json.loads(m.payload).get("reason") == "shutdown" for m in status.received()), 30)
        with log_file.open("ab") as f:
            f.write(b"".join(line_text(n) + b"\n" for n in range(50)))
        wait_for(lambda: {n for ns in line_numbers(logs.received()) for n in ns} == set(range(50)), 30)
        assert agent.stop() == 0
    finally:
        other.stop()


def test_the_session_runs_for_fleet_config_when_logs_go_over_otlp(
    mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    """Issue 10: the session exists whenever something needs it, not only for MQTT logs."""
    status = Subscriber(mosquitto.port, STATUS_TOPIC, client_id="status-watcher")
    subscribers.append(status)
    text = agent_config(mosquitto).replace('to = "mqtt"', 'to = "otlp_http"')
    agent = make_agent(text + '[otlp_http]\nendpoint = "http://127.0.0.1:9/v1/logs"\n[fleet]\nenabled = true\n')
    agent.start()
    wait_for(lambda: online_messages(status) == 1, 30, what="the session's online status")
    wait_for(lambda: agent.status().get("mqtt", {}).get("connected"), 30, what="the session in status")
    assert agent.status()["uploader"]["protocol"] != "mqtt"
    text = subprocess.run(
        [sys.executable, "-m", "edgeagent", "status", "-c", str(agent.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    assert re.search(r"^mqtt: +.*connected=yes", text, re.MULTILINE), text  # shown to people too, not only in --json
    assert agent.stop() == 0
    wait_for(lambda: json.loads(status.received()[-1].payload).get("reason") == "shutdown", what="the goodbye")

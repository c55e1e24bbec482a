"""The MQTT uploader inside the real agent process: a backlog left by an earlier
run goes out at start, status shows the connection, and a SIGKILL between
PUBLISH and PUBACK loses nothing (the chunk is sent again, same chunk-id)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, spool_records, wait_for
from mqtt_helpers import BOOT_ID, Subscriber, line_numbers, line_text

from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher
from edgeagent.records import Batch
from edgeagent.spool import Spool

TOPIC = "edgeagent/gw-agent/logs"
STATUS_TOPIC = "edgeagent/gw-agent/status"


def agent_config(broker: Broker, log_file: Path | None = None) -> str:
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
[upload]
to = "mqtt"
retry_initial = "200ms"
retry_max = "2s"
shutdown_timeout = "2s"
[mqtt]
url = "{broker.url}"
connect_timeout = "3s"
"""


@pytest.fixture
def subscribers() -> Iterator[list[Subscriber]]:
    running: list[Subscriber] = []
    yield running
    for subscriber in running:
        subscriber.close()


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


def test_sigkill_between_publish_and_puback_resends_the_chunk(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    logs = Subscriber(mosquitto.port, TOPIC)
    subscribers.append(logs)
    log_file = tmp_path / "app.log"
    log_file.write_bytes(b"")
    agent = make_agent(agent_config(mosquitto, log_file))
    agent.start()
    wait_for(lambda: uploader_status(agent).get("connected"), 30, what="agent connected")

    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)  # PUBACKs will not come
    try:
        log_file.write_bytes(b"".join(line_text(n) + b"\n" for n in range(500)))
        wait_for(lambda: uploader_status(agent).get("in_flight", 0) >= 1, 30, what="chunk published")
        in_spool = spool_records(agent.state_dir)
        assert sorted(int(r["body"].split()[1]) for r in in_spool) == list(range(500))
        chunk_ids = {r["chunk_id"] for r in in_spool}
        agent.kill()
    finally:
        mosquitto.proc.send_signal(signal.SIGCONT)

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

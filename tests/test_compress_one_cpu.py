"""Where the process may run on one CPU only, chunks are compressed on the loop's thread, not on a thread of
their own (`codec.BackgroundCompressor`): there is no second core for it. Checked with a real CPU affinity, in
this process and on a real agent started under `taskset`, whose every line must still arrive, in order."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import Broker, wait_for
from mqtt_helpers import Subscriber
from test_mqtt_agent import TOPIC, agent_config, uploader_status

from edgeagent.codec import BackgroundCompressor, usable_cpus
from edgeagent.otlp import decode_request

LINES = 20000  # about 1 MiB: several full chunks (256 KiB), each compressed behind or inline


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """This thread may run on one CPU only (the one it is on) while the test runs."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def requests() -> list[bytes]:
    return [b"a protobuf of chunk %d " % n * 2000 for n in range(3)]


def test_with_one_cpu_submit_compresses_at_once_and_starts_no_thread(one_cpu: int) -> None:
    assert usable_cpus() == 1
    threads = threading.active_count()
    compressor = BackgroundCompressor()
    future = compressor.submit(requests())
    assert future.done(), "compressed at once, on this thread"
    assert threading.active_count() == threads
    assert [zstandard.ZstdDecompressor().decompress(p) for p in future.result()] == requests()


# A machine with one CPU cannot show the thread; CI's has two (and the test above covers the one-CPU case there).
@pytest.mark.skipif(usable_cpus() < 2, reason="needs two CPUs to run on")
def test_with_two_cpus_submit_compresses_on_a_thread_of_its_own() -> None:
    threads = threading.active_count()
    compressor = BackgroundCompressor()
    payloads = compressor.submit(requests()).result(timeout=30)
    assert threading.active_count() == threads + 1
    assert [zstandard.ZstdDecompressor().decompress(p) for p in payloads] == requests()


def line(n: int) -> bytes:
    return b"line %07d of a file read in bulk by an agent with one CPU\n" % n


def test_an_agent_with_one_cpu_delivers_every_line_in_order(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    logs = Subscriber(mosquitto.port, TOPIC)
    subscribers.append(logs)
    log_file = tmp_path / "app.log"
    log_file.write_bytes(b"".join(map(line, range(LINES))))
    agent = make_agent(agent_config(mosquitto, log_file))
    agent.prefix = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
    agent.start()
    wait_for(lambda: uploader_status(agent).get("acked_records", 0) >= LINES, 60, what="every line acknowledged")

    def bodies() -> list[Any]:
        return [
            record["body"]
            for message in logs.received()
            for record in decode_request(zstandard.ZstdDecompressor().decompress(message.payload))
        ]

    wait_for(lambda: len(bodies()) >= LINES, 30, what="every line at the subscriber")
    assert bodies() == [line(n).rstrip(b"\n").decode() for n in range(LINES)]
    assert "one CPU to run on: chunks are compressed on the event loop's thread" in agent.stderr()
    assert agent.stop() == 0

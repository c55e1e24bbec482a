"""The OTLP/HTTP uploader end to end: the real agent process (`edgeagent run`)
draining its spool to a real local OTLP/HTTP endpoint, killed with SIGKILL
between the POST and the answer, stopped with SIGTERM, woken with SIGUSR1.

Most tests fill the spool before the agent starts, through the real Batcher,
so they do not depend on a particular source; one reads a real file through
the file source. kmsg is disabled."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import spool_records, wait_for
from otlp_server import Answer, OtlpServer

from edgeagent.clock import monotonic_ns
from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher
from edgeagent.records import Batch
from edgeagent.spool import Spool

CONFIG = """
state_dir = "{{state_dir}}"
device_id = "gw-e2e"
[kmsg]
enabled = false
[upload]
to = "otlp_http"
retry_initial = "{retry_initial}"
retry_max = "{retry_max}"
shutdown_timeout = "1s"
[otlp_http]
endpoint = "{endpoint}"
timeout = "30s"
"""


def config(endpoint: str, retry_initial: str = "100ms", retry_max: str = "1s") -> str:
    return CONFIG.format(endpoint=endpoint, retry_initial=retry_initial, retry_max=retry_max)


def fill_spool(state_dir: Path, chunks: list[list[str]]) -> list[str]:
    """Commit each list of lines as one chunk; returns the chunk ids."""
    spool = Spool.open(state_dir / "spool.db")
    try:
        batcher = Batcher(spool, ChunkEncoder({"device.id": "gw-e2e"}, "test"), "boot-e2e", SpoolConfig())
        for lines in chunks:
            batcher.add(Batch("files", [x.encode() for x in lines], monotonic_ns(), "boot-e2e"))
            batcher.flush()
        return [c.chunk_id for c in spool.oldest(len(chunks))]
    finally:
        spool.close()


def test_the_agent_delivers_its_backlog_and_reports_status(make_agent: Any) -> None:
    with OtlpServer() as server:
        agent = make_agent(config(server.url))
        lines = [f"backlog line {i}" for i in range(2000)]
        ids = fill_spool(agent.state_dir, [lines[:1000], lines[1000:]])
        agent.start()
        wait_for(lambda: not spool_records(agent.state_dir), what="the backlog acknowledged")
        assert server.lines() == lines
        assert [i for r in server.received for i in r.chunk_ids] == ids
        status = agent.wait_status(lambda s: s["uploader"]["acked_chunks"] == 2, what="uploader status with the acks")
        uploader = status["uploader"]
        assert uploader["endpoint"] == server.url and uploader["connected"] is True
        assert uploader["last_status"] == 200
        assert agent.stop() == 0


def test_lines_appended_to_a_file_arrive_at_the_collector_in_order(make_agent: Any, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app_log = logs / "app.log"
    first = [f"first run line {i}" for i in range(500)]
    app_log.write_text("".join(line + "\n" for line in first))
    with OtlpServer() as server:
        text = config(server.url) + f'[[files]]\ninclude = ["{logs}/*.log"]\nstart_at = "beginning"\n'
        agent = make_agent(text.replace("[upload]", '[spool]\nflush_interval = "200ms"\n[upload]'))
        agent.start()
        wait_for(lambda: server.lines() == first, what="the file's lines at the collector")
        more = [f"appended line {i}" for i in range(500)]
        with app_log.open("a") as f:
            f.write("".join(line + "\n" for line in more))
        wait_for(lambda: server.lines() == first + more, what="the appended lines at the collector")
        scopes = [sl for got in server.received for rl in got.request.resource_logs for sl in rl.scope_logs]
        paths = {kv.value.string_value for sl in scopes for kv in sl.scope.attributes if kv.key == "log.file.path"}
        assert paths == {str(app_log)}
        resource = {
            kv.key: kv.value.string_value for kv in server.received[0].request.resource_logs[0].resource.attributes
        }
        assert resource["device.id"] == "gw-e2e" and resource["os.type"] == "linux"
        assert agent.stop() == 0


def test_sigkill_between_post_and_answer_resends_the_chunk(make_agent: Any) -> None:
    release = threading.Event()
    with OtlpServer() as server:
        server.answer(Answer(hold=release))
        agent = make_agent(config(server.url))
        lines = [f"in flight {i}" for i in range(100)]
        (chunk,) = fill_spool(agent.state_dir, [lines])
        agent.start()
        wait_for(lambda: server.count() == 1, what="the POST to arrive")
        assert server.received[0].chunk_ids == [chunk]
        agent.kill()  # the server has the request; the agent never sees an answer
        release.set()
        assert [r["chunk_id"] for r in spool_records(agent.state_dir)] == [chunk] * 100

        agent.start()
        wait_for(lambda: not spool_records(agent.state_dir), what="the resend acknowledged")
        assert [r.chunk_ids for r in server.received] == [[chunk], [chunk]]
        assert server.received[1].raw == server.received[0].raw
        assert server.lines() == lines  # the receiver dropped the duplicate by chunk id
        assert agent.stop() == 0


def test_sigterm_waits_a_bounded_time_and_keeps_unanswered_chunks(make_agent: Any) -> None:
    release = threading.Event()
    with OtlpServer() as server:
        server.answer(Answer(hold=release))
        agent = make_agent(config(server.url))
        (chunk,) = fill_spool(agent.state_dir, [["unanswered at shutdown"]])
        agent.start()
        wait_for(lambda: server.count() == 1, what="the POST to arrive")
        assert agent.stop() == 0  # shutdown_timeout is 1s; the answer never comes
        release.set()
        assert [r["chunk_id"] for r in spool_records(agent.state_dir)] == [chunk]


def test_sigusr1_retries_at_once_after_an_outage(make_agent: Any) -> None:
    with OtlpServer() as probe:
        port = probe.port  # nobody listens here until the server below starts
    endpoint = f"http://127.0.0.1:{port}/v1/logs"
    agent = make_agent(config(endpoint, retry_initial="10m", retry_max="10m"))
    (chunk,) = fill_spool(agent.state_dir, [["after the outage"]])
    agent.start()
    wait_for(
        lambda: (agent.status().get("uploader") or {}).get("failed_requests", 0) >= 1,
        what="a failed attempt shown in status",
    )
    assert agent.status()["uploader"]["last_error"] == "connection refused"
    with OtlpServer(port=port) as server:
        agent.signal(signal.SIGUSR1)  # what `edgeagent wake` and the OpenWrt hotplug script send
        wait_for(lambda: server.delivered, what="delivery right after the wake")
        assert server.delivered == {chunk: ["after the outage"]}
        wait_for(lambda: not spool_records(agent.state_dir), what="the ack")
        assert agent.stop() == 0


OUTAGE = float(os.environ.get("EDGEAGENT_TEST_OUTAGE", "300"))  # seconds; shorter for a quick check


@pytest.mark.slow
def test_a_five_minute_outage_in_the_middle_of_a_100k_line_drain_loses_nothing(make_agent: Any) -> None:
    lines = [f"drain line {i:06d}" for i in range(100_000)]
    server = OtlpServer().start()
    port = server.port
    # One chunk of 1000 lines a request, so the outage falls in the middle of the drain.
    agent = make_agent(config(server.url, retry_initial="1s", retry_max="1m") + 'max_request_size = "64KiB"\n')
    ids = fill_spool(agent.state_dir, [lines[i : i + 1000] for i in range(0, len(lines), 1000)])
    held = threading.Event()
    server.answer(*([Answer()] * 30), Answer(hold=held))
    agent.start()
    try:
        wait_for(lambda: server.count() == 31, 60, what="30 requests answered and the 31st in flight")
        server.stop()  # resets the held request; nothing listens for the next five minutes
        outage_end = time.monotonic() + OUTAGE
        wait_for(lambda: time.monotonic() > outage_end, OUTAGE + 10, interval=1, what="the end of the outage")
        during = agent.status()["uploader"]
        assert during["connected"] is False and during["acked_chunks"] == len(server.delivered) > 0
        # Backoff, not a storm: about a dozen attempts in five minutes (one a second would be 300).
        assert during["failed_requests"] < max(OUTAGE / 8, 10)
        back = OtlpServer(port=port).start()
        try:
            agent.signal(signal.SIGUSR1)
            wait_for(lambda: not spool_records(agent.state_dir), 120, what="the rest of the drain")
            delivered = dict(server.delivered)
            delivered.update({k: v for k, v in back.delivered.items() if k not in delivered})
            assert list(delivered) == ids
            assert [line for chunk in delivered.values() for line in chunk] == lines
        finally:
            back.stop()
        assert agent.stop() == 0
    finally:
        server.stop()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_hostile_collector_does_not_grow_the_agent_and_every_line_arrives(make_agent: Any) -> None:
    """A 2xx announcing a 600 MiB chunk and streaming 256 MiB of it, then garbage, then a
    sane collector: the agent reads a bounded amount, stays up, and delivers everything."""
    from test_otlp_hostile import HugeChunk

    huge = HugeChunk(streamed=256 * 1024 * 1024)
    with OtlpServer() as server:
        server.answer(
            Answer(raw=huge, delivers=True),
            Answer(raw=b"HTTP/1.1 503 x\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n"),
            Answer(raw=b"\x00garbage" * 1000),
        )
        agent = make_agent(config(server.url))
        lines = [f"line {i}" for i in range(300)]
        fill_spool(agent.state_dir, [lines[:100], lines[100:200], lines[200:]])
        agent.start()
        wait_for(lambda: not spool_records(agent.state_dir), what="the backlog acknowledged")
        assert agent.proc is not None and agent.proc.poll() is None
        peak_mib = _peak_rss_kib(agent.proc.pid) / 1024
        assert server.lines() == lines
        assert agent.stop() == 0
    assert huge.sent < 32 * 1024 * 1024, huge.sent
    assert peak_mib < 100, f"agent peak RSS {peak_mib:.0f} MiB"


def test_a_receiver_refusing_everything_gets_one_report_not_a_loop(make_agent: Any, tmp_path: Path) -> None:
    """Reproduction: the loss record about a refusal was refused in turn, dead-lettered,
    reported again, once a second forever (20 dead letters in 20 s from one line)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("the only line\n")
    with OtlpServer() as server:
        server.default = Answer(400, b"schema violation")
        text = config(server.url) + f'[[files]]\ninclude = ["{logs}/*.log"]\nstart_at = "beginning"\n'
        agent = make_agent(text.replace("[upload]", '[spool]\nflush_interval = "200ms"\n[upload]'))
        agent.start()

        def dead_letters() -> int:
            return int(agent.status()["dead_letters"])

        wait_for(lambda: dead_letters() >= 2, what="the line and its loss report refused")
        # The old loop made a new dead letter about every flush interval plus a retry:
        # give it many times that, then nothing new may have happened.
        refused = server.count()
        time.sleep(3)
        assert dead_letters() == 2 and server.count() == refused == 2
        lines = [line for r in server.received for line in r.lines()]
        assert lines[0] == "the only line" and "refused 1 records" in lines[1]
        assert agent.stop() == 0

"""The OTLP/HTTP uploader in-process, against a real local OTLP/HTTP endpoint
(tests/otlp_server.py) with scripted answers, draining a real Spool filled by
the real Batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import io
import re
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import until
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from otlp_server import Answer, OtlpServer
from tls import Pki, make_pki

from edgeagent.config import ConfigError, loads
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import WAKE_NETWORK, Batcher, UploaderContext
from edgeagent.records import SEVERITY_ERROR, SEVERITY_INFO, SEVERITY_WARN, Batch, Record
from edgeagent.spool import NewChunk, Spool
from edgeagent.uploaders.otlp_http import (
    CHUNK_ID_HEADER,
    OtlpHttpUploader,
    parse_partial_success,
    parse_retry_after,
)

BOOT = "11111111-2222-3333-4444-555555555555"
RESOURCE = {"device.id": "gw-test", "host.name": "testhost", "os.type": "linux"}


class Harness:
    """A real spool and batcher feeding the uploader under test."""

    def __init__(self, tmp_path: Path, endpoint: str, upload: str = "", otlp: str = "") -> None:
        upload_keys = _merge_keys('to = "otlp_http"\nretry_initial = "20ms"\nretry_max = "2s"', upload)
        otlp_keys = _merge_keys(f'endpoint = "{endpoint}"\ntimeout = "5s"\nconnect_timeout = "2s"', otlp)
        text = (
            f'device_id = "gw-test"\nstate_dir = "{tmp_path / "state"}"\n'
            f"[upload]\n{upload_keys}\n[otlp_http]\n{otlp_keys}\n"
        )
        self.config = loads(text, "test.toml")
        self.spool = Spool.open(self.config.spool_path)
        self.ctx = UploaderContext(self.spool, self.config)
        self.batcher = Batcher(
            self.spool, ChunkEncoder(RESOURCE, "test"), BOOT, self.config.spool, on_commit=self.ctx.wake
        )
        self.uploader = OtlpHttpUploader(self.config)
        self.task: asyncio.Task[None] | None = None

    def add_lines(self, lines: list[str], path: str = "/var/log/app.log") -> str:
        """One chunk of plain lines (the file source's fast path); returns its chunk id."""
        batch = Batch("files", [x.encode() for x in lines], 1_000_000, BOOT, {"log.file.path": path})
        self.batcher.add(batch)
        self.batcher.flush()
        return self.newest_chunk_id()

    def add_records(self, records: list[Record]) -> str:
        self.batcher.add(Batch("kmsg", records, 1_000_000, BOOT))
        self.batcher.flush()
        return self.newest_chunk_id()

    def newest_chunk_id(self) -> str:
        return self.spool.oldest(10**6)[-1].chunk_id

    def chunk_ids(self) -> list[str]:
        return [c.chunk_id for c in self.spool.oldest(10**6)]

    def start(self) -> None:
        self.task = asyncio.create_task(self.uploader.run(self.ctx))

    async def stop(self, timeout: float = 5.0) -> None:
        await self.uploader.drain(timeout)
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    def close(self) -> None:
        self.spool.close()


def _merge_keys(defaults: str, overrides: str) -> str:
    """TOML `key = value` lines, the overrides replacing defaults of the same key."""
    keys: dict[str, str] = {}
    for line in (defaults + "\n" + overrides).splitlines():
        if line.strip():
            key, value = line.split("=", 1)
            keys[key.strip()] = value.strip()
    return "\n".join(f"{k} = {v}" for k, v in keys.items())


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


@pytest.fixture
def server() -> Any:
    with OtlpServer() as s:
        yield s


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- wire format ---------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_each_compression_decodes_to_the_original_records(tmp_path: Path, server: OtlpServer, compression: str) -> None:
    h = Harness(tmp_path, server.url, otlp=f'compression = "{compression}"')
    lines = [f"line {i} ünïcødé" for i in range(500)]
    kernel = [
        Record("eth0: link up", SEVERITY_INFO, "INFO", {"kmsg.facility": "kern"}, 5_000_000_000),
        Record("disk error", SEVERITY_ERROR, "ERR", {"kmsg.facility": "kern"}, 6_000_000_000),
        Record("thermal warning", SEVERITY_WARN, "WARNING", None, 7_000_000_000),
    ]

    async def test() -> None:
        first = h.add_lines(lines)
        second = h.add_records(kernel)
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "all chunks acknowledged")
        await h.stop()

        got = server.received
        assert [r.headers["content-type"] for r in got] == ["application/x-protobuf"] * len(got)
        expected_encoding = {"zstd": "zstd", "gzip": "gzip", "none": None}[compression]
        assert {r.headers.get("content-encoding") for r in got} == {expected_encoding}
        assert [i for r in got for i in r.chunk_ids] == [first, second]
        assert server.errors == []
        assert server.delivered[first] == lines
        assert server.delivered[second] == ["eth0: link up", "disk error", "thermal warning"]

        # Decode independently of the test server, with the standard tools only.
        raw = got[0].raw
        if compression == "zstd":  # the two chunks' frames, one after the other: one stream
            body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True).read()
        elif compression == "gzip":
            import gzip

            body = gzip.decompress(raw)
        else:
            body = raw
        request = ExportLogsServiceRequest.FromString(body)
        file_rl, kmsg_rl = request.resource_logs
        resource = {kv.key: kv.value.string_value for kv in file_rl.resource.attributes}
        assert resource == RESOURCE
        file_records = file_rl.scope_logs[0].log_records
        assert [r.body.string_value for r in file_records] == lines
        # The file's path is common to its lines: a scope attribute, not repeated on each record.
        assert [list(r.attributes) for r in file_records] == [[]] * len(lines)
        assert {kv.key: kv.value.string_value for kv in file_rl.scope_logs[0].scope.attributes} == {
            "log.file.path": "/var/log/app.log"
        }
        assert file_rl.scope_logs[0].scope.name == "edgeagent/files"
        kmsg_records = kmsg_rl.scope_logs[0].log_records
        assert [(r.severity_number, r.severity_text) for r in kmsg_records] == [
            (SEVERITY_INFO, "INFO"),
            (SEVERITY_ERROR, "ERR"),
            (SEVERITY_WARN, "WARNING"),
        ]
        assert {kv.key: kv.value.string_value for kv in kmsg_records[0].attributes} == {"kmsg.facility": "kern"}
        assert kmsg_records[1].time_unix_nano > kmsg_records[0].time_unix_nano > 0

        st = h.uploader.status()
        assert st["acked_chunks"] == 2 and st["acked_records"] == 503 and st["rejected_chunks"] == 0
        assert st["connected"] is True and st["last_status"] == 200 and st["endpoint"] == server.url
        assert h.spool.counters()["acked_chunks"] == 2

    run(test)
    h.close()


def test_small_chunks_are_coalesced_and_large_ones_go_alone_as_stored(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)

    async def test() -> None:
        small = [h.add_lines([f"c{c} l{i}" for i in range(10)]) for c in range(5)]
        assert h.spool.chunk_count == 5
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "acks")
        assert len(server.received) == 1
        assert server.received[0].chunk_ids == small
        assert server.received[0].headers[CHUNK_ID_HEADER.lower()] == ",".join(small)
        assert server.lines() == [f"c{c} l{i}" for c in range(5) for i in range(10)]
        # A chunk above the coalescing target goes alone, byte for byte as stored.
        h.batcher.config = dataclasses.replace(h.batcher.config, chunk_max_bytes=2 * 1024 * 1024)
        big = h.add_lines([f"{i:08d} " + "x" * 100 for i in range(12000)])
        payload = h.spool.oldest(1)[0].payload
        await until(lambda: h.spool.chunk_count == 0, "the big chunk acked")
        await h.stop()
        assert server.received[-1].chunk_ids == [big]
        assert server.received[-1].raw == payload

    run(test)
    h.close()


def test_keep_alive_reuses_one_connection(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)

    async def test() -> None:
        h.start()
        for n in range(4):
            h.add_lines([f"batch {n}"])
            await until(lambda: h.spool.chunk_count == 0, "ack")
        await h.stop()
        assert len(server.received) == 4
        assert {r.connection for r in server.received} == {1}

    run(test)
    h.close()


# --- answers -------------------------------------------------------------------


def test_nothing_is_deleted_before_the_ack(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    release = threading.Event()
    server.answer(Answer(hold=release))

    async def test() -> None:
        chunk = h.add_lines(["held"])
        h.start()
        await until(lambda: server.count() == 1, "the request to arrive")
        assert h.chunk_ids() == [chunk]  # request received, no answer yet: still spooled
        assert h.uploader.status()["state"] == "sending"
        release.set()
        await until(lambda: h.spool.chunk_count == 0, "ack after release")
        await h.stop()

    run(test)
    h.close()


def test_partial_success_is_counted_as_loss_not_dead_lettered(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    server.answer(Answer(rejected=3, message="3 records too old"))

    async def test() -> None:
        h.add_lines([f"l{i}" for i in range(10)])
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "ack")
        await h.stop()

    run(test)
    assert h.spool.counters()["rejected_records"] == 3
    assert h.spool.dead_letters() == []
    st = h.uploader.status()
    assert st["rejected_records"] == 3 and st["rejected_chunks"] == 0
    assert "3 records too old" in st["last_error"]
    h.close()


def test_permanent_error_dead_letters_only_that_chunk(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    server.answer(Answer(400, b"field 5 is invalid: bad payload"))

    async def test() -> None:
        bad = h.add_lines(["refused"])
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "the refused chunk leaves the queue")
        good = h.add_lines(["accepted"])
        await until(lambda: h.spool.chunk_count == 0, "the next chunk delivered")
        await h.stop()
        dead = h.spool.dead_letters()
        assert [d["chunk_id"] for d in dead] == [bad]
        assert "HTTP 400" in dead[0]["reason"] and "bad payload" in dead[0]["reason"]
        assert server.delivered == {good: ["accepted"]}

    run(test)
    assert h.uploader.status()["rejected_chunks"] == 1
    h.close()


@pytest.mark.parametrize("status", [401, 403, 407])
def test_refused_credentials_keep_the_backlog_and_retry(tmp_path: Path, server: OtlpServer, status: int) -> None:
    """An expired token is a configuration problem, not bad data: the chunks stay,
    the uploader retries with backoff, status names the problem until it is fixed."""
    h = Harness(tmp_path, server.url)
    hold = threading.Event()
    server.answer(Answer(status, b"token expired"), Answer(status, b"token expired"), Answer(status, hold=hold))

    async def test() -> None:
        first = h.add_lines(["one", "two"])
        h.start()
        await until(lambda: server.count() >= 2, "a retry after the refusal")
        st = h.uploader.status()
        assert f"HTTP {status}" in st["credentials_error"] and "token expired" in st["credentials_error"]
        assert st["credentials_error_since"] is not None
        assert h.spool.dead_letters() == [] and h.chunk_ids() == [first]
        hold.set()
        await until(lambda: h.spool.chunk_count == 0, "delivery once the credentials are fixed")
        await h.stop()
        assert server.delivered == {first: ["one", "two"]}

    run(test)
    st = h.uploader.status()
    assert st["credentials_error"] is None and st["rejected_chunks"] == 0 and st["failed_requests"] == 3
    assert h.spool.counters().get("dead_letter_chunks", 0) == 0
    h.close()


@pytest.mark.parametrize("status", [429, 502, 503, 504, 500])
def test_retryable_errors_keep_the_chunk_and_retry(tmp_path: Path, server: OtlpServer, status: int) -> None:
    h = Harness(tmp_path, server.url)
    server.answer(Answer(status), Answer(status))

    async def test() -> None:
        chunk = h.add_lines(["try again"])
        h.start()
        await until(lambda: server.delivered, "delivery on the third try")
        await until(lambda: h.spool.chunk_count == 0, "ack")
        await h.stop()
        assert [r.answered for r in server.received] == [status, status, 200]
        assert [r.chunk_ids for r in server.received] == [[chunk]] * 3
        assert h.spool.dead_letters() == []

    run(test)
    st = h.uploader.status()
    assert st["failed_requests"] == 2 and st["acked_chunks"] == 1 and st["failures_in_a_row"] == 0
    h.close()


def test_retry_after_seconds_is_honoured(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    server.answer(Answer(429, headers={"Retry-After": "2"}))

    async def test() -> None:
        h.add_lines(["slow down"])
        h.start()
        await until(lambda: h.uploader.status()["state"] == "backoff", "backoff after 429")
        st = h.uploader.status()
        # The backoff alone would wait at most 40ms (retry_initial 20ms, first failure).
        assert st["retry_after"] == 2.0 and st["retry_delay"] == 2.0
        assert st["last_status"] == 429
        # A wake (network up, SIGUSR1) does not cut a wait the server asked for.
        h.ctx.wake(WAKE_NETWORK)
        await asyncio.sleep(0.05)
        assert server.count() == 1 and h.uploader.status()["state"] == "backoff"
        await until(lambda: h.spool.chunk_count == 0, "delivery after Retry-After")
        await h.stop()

    run(test)
    h.close()


def test_retry_after_http_date_is_honoured_and_capped(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url, upload='retry_max = "1s"')
    in_two_seconds = email.utils.formatdate(time.time() + 2, usegmt=True)
    server.answer(Answer(503, headers={"Retry-After": in_two_seconds}), Answer(503, headers={"Retry-After": "86400"}))

    async def test() -> None:
        h.add_lines(["maintenance"])
        h.start()
        await until(lambda: h.uploader.status()["retry_after"] is not None, "the first 503")
        first = h.uploader.status()
        assert 0 < first["retry_after"] <= 2.0
        assert first["retry_delay"] == min(first["retry_after"], 1.0)  # capped at [upload].retry_max
        await until(lambda: server.count() == 2, "the second try")
        await until(lambda: h.uploader.status()["retry_after"] == 86400, "the second 503")
        assert h.uploader.status()["retry_delay"] == 1.0
        await until(lambda: h.spool.chunk_count == 0, "delivery")
        await h.stop()

    run(test)
    h.close()


def test_slow_answer_times_out_and_the_chunk_is_resent(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url, otlp='timeout = "300ms"')
    release = threading.Event()
    server.answer(Answer(hold=release))

    async def test() -> None:
        chunk = h.add_lines(["slow"])
        h.start()
        await until(lambda: server.count() >= 2, "a resend after the timeout")
        release.set()
        await until(lambda: h.spool.chunk_count == 0, "ack of the resend")
        await h.stop()
        assert all(r.chunk_ids == [chunk] for r in server.received)
        assert server.delivered == {chunk: ["slow"]}

    run(test)
    st = h.uploader.status()
    assert st["failed_requests"] >= 1 and "no answer" in (st["last_error"] or "")
    assert h.spool.dead_letters() == []
    h.close()


def test_connection_reset_is_retried(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    server.answer(Answer(reset=True), Answer(reset=True))

    async def test() -> None:
        chunk = h.add_lines(["reset me"])
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "delivery after resets")
        await h.stop()
        assert [r.answered for r in server.received] == [None, None, 200]
        assert server.delivered == {chunk: ["reset me"]}

    run(test)
    assert h.uploader.status()["failed_requests"] == 2
    assert h.spool.dead_letters() == []
    h.close()


def test_a_server_closing_keep_alive_connections_costs_no_retry(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    server.answer(Answer(close=True), Answer(drop=True))

    async def test() -> None:
        h.start()
        for n in range(3):
            h.add_lines([f"line {n}"])
            await until(lambda: h.spool.chunk_count == 0, f"ack {n}")
        await h.stop()
        assert [r.connection for r in server.received] == [1, 2, 3]
        assert h.uploader.status()["failed_requests"] == 0

    run(test)
    h.close()


def test_413_splits_the_chunk_and_delivers_every_record(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    server.answer(Answer(413))
    lines = [f"record {i}" for i in range(100)]

    async def test() -> None:
        chunk = h.add_lines(lines)
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "the parts delivered")
        await h.stop()
        assert server.received[0].answered == 413
        parts = [i for r in server.received[1:] for i in r.chunk_ids]
        assert parts and all(p.startswith(chunk + ".") for p in parts)
        assert server.lines() == lines

    run(test)
    st = h.uploader.status()
    assert st["split_chunks"] == 1 and st["max_request_size"] < 4 * 1024**2
    assert h.spool.dead_letters() == []
    h.close()


def test_chunks_above_max_request_size_are_split_before_sending(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url, otlp='max_request_size = "4KiB"')
    lines = [f"{i:05d} " + "y" * 60 for i in range(300)]

    async def test() -> None:
        h.add_lines(lines)
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "delivery in parts")
        await h.stop()
        assert all(len(r.body) <= 4096 for r in server.received)
        assert len(server.received) > 4
        assert server.lines() == lines

    run(test)
    assert h.spool.counters()["acked_records"] == 300
    h.close()


def test_a_single_record_too_large_for_the_receiver_is_dead_lettered(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    server.answer(Answer(413, b"request entity too large"))

    async def test() -> None:
        chunk = h.add_lines(["x" * 5000])
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "the chunk leaves the queue")
        await h.stop()
        dead = h.spool.dead_letters()
        assert [d["chunk_id"] for d in dead] == [chunk]
        assert "413" in dead[0]["reason"] and "single record" in dead[0]["reason"]

    run(test)
    h.close()


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_chunk_damaged_in_the_spool_is_dead_lettered_and_the_queue_moves_on(
    tmp_path: Path, server: OtlpServer, compression: str
) -> None:
    h = Harness(tmp_path, server.url, otlp=f'compression = "{compression}"')
    good_frame = zstandard.ZstdCompressor(write_checksum=True).compress(b"\x0a" * 400)
    damaged = good_frame[:-8] + bytes(8)  # the frame checksum no longer matches
    h.spool.append([NewChunk(damaged, 1, 400, 9, BOOT, 0, True)])
    bad = h.newest_chunk_id()

    async def test() -> None:
        good = h.add_lines(["after the damaged one"])
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "both chunks leave the queue")
        await h.stop()
        assert [d["chunk_id"] for d in h.spool.dead_letters()] == [bad]
        assert server.delivered == {good: ["after the damaged one"]}

    run(test)
    h.close()


# --- outages, wakes, shutdown ----------------------------------------------------


def test_an_outage_in_the_middle_of_a_drain_loses_nothing(tmp_path: Path, server: OtlpServer) -> None:
    # max_request_size keeps one chunk (about 50 KB) a request, so the outage falls between requests.
    h = Harness(
        tmp_path, server.url, upload='retry_initial = "50ms"\nretry_max = "200ms"', otlp='max_request_size = "64KiB"'
    )
    lines = [f"n={i}" for i in range(100_000)]
    for start in range(0, len(lines), 1000):
        h.add_lines(lines[start : start + 1000])
    release = threading.Event()
    # Two requests answered, the third hangs while the server goes away.
    server.answer(Answer(), Answer(), Answer(hold=release))

    async def test() -> None:
        h.start()
        await until(lambda: server.count() == 3, "the third request in flight")
        port = server.port
        await asyncio.to_thread(server.stop)  # resets the held connection; refuses new ones
        await until(lambda: h.uploader.status()["failed_requests"] >= 3, "failed attempts during the outage")
        assert h.spool.chunk_count > 0
        assert h.uploader.status()["connected"] is False
        restarted = OtlpServer(port=port).start()
        try:
            h.ctx.wake(WAKE_NETWORK)  # network up
            await until(lambda: h.spool.chunk_count == 0, "drain after the outage")
            await h.stop()
            delivered = dict(server.delivered)
            delivered.update({k: v for k, v in restarted.delivered.items() if k not in delivered})
            assert [line for chunk in delivered.values() for line in chunk] == lines
        finally:
            restarted.stop()

    run(test)
    assert h.spool.dead_letters() == []
    assert h.spool.counters()["acked_records"] == 100_000
    h.close()


class LongBackoff:
    """Backoff's jitter may pick any delay from 0; this test needs a long one."""

    failures = 0

    def failed(self, retry_after: float | None = None) -> float:
        self.failures += 1
        return 60.0

    def succeeded(self) -> None:
        self.failures = 0


def test_a_network_wake_retries_at_once_but_new_data_does_not(tmp_path: Path) -> None:
    with OtlpServer() as probe:
        port = probe.port  # a port nobody listens on once the probe stops
    h = Harness(tmp_path, f"http://127.0.0.1:{port}/v1/logs")
    h.uploader._backoff = LongBackoff()  # type: ignore[assignment]

    async def test() -> None:
        h.add_lines(["waiting"])
        h.start()
        await until(lambda: h.uploader.status()["state"] == "backoff", "backoff after connection refused")
        st = h.uploader.status()
        assert st["last_error"] == "connection refused" and st["failed_requests"] == 1
        h.add_lines(["more data"])  # commits wake the uploader; that must not retry
        await asyncio.sleep(0.2)
        assert h.uploader.status()["failed_requests"] == 1
        with OtlpServer(port=port) as server:
            h.ctx.wake(WAKE_NETWORK)  # what NetworkWatch or SIGUSR1 does
            await until(lambda: h.spool.chunk_count == 0, "delivery right after the wake")
            await h.stop()
            assert server.lines() == ["waiting", "more data"]

    run(test)
    h.close()


def test_drain_waits_for_the_answer_in_flight(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    release = threading.Event()
    server.answer(Answer(hold=release))

    async def test() -> None:
        h.add_lines(["in flight at shutdown"])
        h.start()
        await until(lambda: server.count() == 1, "request in flight")
        threading.Timer(0.2, release.set).start()
        await h.uploader.drain(10)
        assert h.spool.chunk_count == 0
        await h.stop()

    run(test)
    h.close()


def test_drain_gives_up_after_its_timeout_and_keeps_the_chunk(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url)
    release = threading.Event()
    server.answer(Answer(hold=release))

    async def test() -> None:
        chunk = h.add_lines(["never answered"])
        h.start()
        await until(lambda: server.count() == 1, "request in flight")
        await h.stop(timeout=0.2)
        assert h.chunk_ids() == [chunk]
        assert h.uploader.status()["state"] == "stopped"
        release.set()

    run(test)
    h.close()


def test_max_rate_paces_request_bodies(tmp_path: Path, server: OtlpServer) -> None:
    h = Harness(tmp_path, server.url, upload='max_rate = "20KiB"', otlp='compression = "none"')

    async def test() -> None:
        h.add_lines([f"{i:06d} " + "z" * 90 for i in range(300)])  # about 33 KB uncompressed
        started = time.monotonic()
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "delivery")
        elapsed = time.monotonic() - started
        await h.stop()
        size = len(server.received[0].raw)
        # A lower bound only (a loaded machine is slower, never faster): all but the
        # first 5 KiB piece wait for the rate.
        assert elapsed >= (size - 5 * 1024) / (20 * 1024) * 0.9
        assert h.uploader.status()["sent_bytes"] == size

    run(test)
    h.close()


# --- TLS -------------------------------------------------------------------------


def _tls_server(pki: Pki, client_cert: bool) -> OtlpServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca_cert)
    return OtlpServer(tls=context)


def test_tls_with_the_ca_file_delivers(tmp_path: Path, pki: Pki) -> None:
    with _tls_server(pki, client_cert=False) as server:
        assert server.url.startswith("https://127.0.0.1:")
        h = Harness(tmp_path, server.url, otlp=f'ca_file = "{pki.ca_cert}"')

        async def test() -> None:
            chunk = h.add_lines(["over tls"])
            h.start()
            await until(lambda: h.spool.chunk_count == 0, "delivery over TLS")
            await h.stop()
            assert server.delivered == {chunk: ["over tls"]}

        run(test)
        h.close()


def test_tls_verification_is_on_by_default(tmp_path: Path, pki: Pki) -> None:
    with _tls_server(pki, client_cert=False) as server:
        h = Harness(tmp_path, server.url)  # system CAs: the test CA is unknown
        wrong_ca = Harness(tmp_path / "b", server.url, otlp=f'ca_file = "{pki.other_ca_cert}"')

        async def test() -> None:
            for harness in (h, wrong_ca):
                chunk = harness.add_lines(["must not go out"])
                harness.start()
                await until(lambda hh=harness: hh.uploader.status()["failed_requests"] >= 1, "a refused handshake")
                await harness.stop()
                assert harness.chunk_ids() == [chunk]
                assert "certificate verification failed" in harness.uploader.status()["last_error"]
            assert server.received == []

        run(test)
        h.close()
        wrong_ca.close()


def test_tls_insecure_skips_verification(tmp_path: Path, pki: Pki) -> None:
    with _tls_server(pki, client_cert=False) as server:
        h = Harness(tmp_path, server.url, otlp="tls_insecure = true")

        async def test() -> None:
            h.add_lines(["unverified"])
            h.start()
            await until(lambda: h.spool.chunk_count == 0, "delivery without verification")
            await h.stop()

        run(test)
        h.close()


def test_mutual_tls_with_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    with _tls_server(pki, client_cert=True) as server:
        with_cert = Harness(
            tmp_path / "a",
            server.url,
            otlp=f'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"',
        )
        without = Harness(tmp_path / "b", server.url, otlp=f'ca_file = "{pki.ca_cert}"')

        async def test() -> None:
            refused = without.add_lines(["no client cert"])
            without.start()
            await until(lambda: without.uploader.status()["failed_requests"] >= 1, "refusal without a client cert")
            await without.stop()
            assert without.chunk_ids() == [refused]
            assert server.delivered == {}

            chunk = with_cert.add_lines(["mutual"])
            with_cert.start()
            await until(lambda: with_cert.spool.chunk_count == 0, "delivery with a client cert")
            await with_cert.stop()
            assert server.delivered == {chunk: ["mutual"]}
            subject = dict(x[0] for x in server.received[-1].client_cert["subject"])
            assert subject["commonName"] == "gw-tls-client"

        run(test)
        with_cert.close()
        without.close()


# --- configuration and parsing -----------------------------------------------------


def test_configuration_errors_name_the_key(tmp_path: Path) -> None:
    cases = [
        ('ca_file = "/nonexistent/ca.pem"', "https://h/v1/logs", "otlp_http.ca_file"),
        ('cert_file = "/nonexistent/c.pem"', "https://h/v1/logs", "otlp_http.cert_file"),
        ('headers = { "Content-Type" = "text/plain" }', "http://h/v1/logs", "otlp_http.headers.Content-Type"),
        ('headers = { "Bad Name" = "x" }', "http://h/v1/logs", "otlp_http.headers.Bad Name"),
        ('headers = { "X-Token" = "a\\nb" }', "http://h/v1/logs", "otlp_http.headers.X-Token"),
        ('headers = { "X-Token" = "tøkén✓" }', "http://h/v1/logs", "otlp_http.headers.X-Token"),
        ("", "http://user:pw@h/v1/logs", "otlp_http.endpoint"),
        ("", "http://h:99999/v1/logs", "otlp_http.endpoint"),
    ]
    for otlp, endpoint, key in cases:
        text = f'state_dir = "{tmp_path}"\n[upload]\nto = "otlp_http"\n[otlp_http]\nendpoint = "{endpoint}"\n{otlp}\n'
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
            OtlpHttpUploader(loads(text, "edge.toml"))
        assert re.match(r"edge\.toml(:\d+)?: ", str(error.value))  # the line where config parsing knows it
        if "headers" in key:
            assert "value not shown" in str(error.value) and "tøkén" not in str(error.value)


def test_endpoint_without_a_path_gets_the_logs_path_and_headers_are_sent(tmp_path: Path, server: OtlpServer) -> None:
    base = server.url.removesuffix("/v1/logs")
    h = Harness(tmp_path, base, otlp='headers = { Authorization = "Bearer s3cret", "X-Tenant" = "fleet-a" }')

    async def test() -> None:
        h.add_lines(["authorised"])
        h.start()
        await until(lambda: h.spool.chunk_count == 0, "delivery")
        await h.stop()

    run(test)
    got = server.received[0]
    assert got.path == "/v1/logs"
    assert got.headers["authorization"] == "Bearer s3cret" and got.headers["x-tenant"] == "fleet-a"
    assert got.headers["user-agent"].startswith("edgeagent/")
    h.close()


def test_parse_retry_after() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\u00b2", None),  # str.isdigit() accepts superscripts; float() refuses them
        ("\u0663", None),  # Arabic-Indic three: a Unicode digit, not an HTTP one
        ("\uff11\uff12", None),  # fullwidth digits
        ("1e400", None),
        ("99999999999999999999999", 24 * 3600.0),  # huge: the nearest safe meaning is "long"
        ("Fri, 31 Dec 9999 23:59:59 GMT", 24 * 3600.0),
        ("Mon, 01 Jan 0001 00:00:00 GMT", 0.0),
        ("Mon, 99 Foo 2026 99:99:99 GMT", None),
        ("x" * 10_000, None),
        ("", None),
    ],
)
def test_retry_after_nonsense_is_read_as_a_safe_value(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, now=1_800_000_000.0) == expected


def test_parse_partial_success() -> None:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsPartialSuccess,
        ExportLogsServiceResponse,
    )

    body = ExportLogsServiceResponse(
        partial_success=ExportLogsPartialSuccess(rejected_log_records=7, error_message="too old")
    ).SerializeToString()
    assert parse_partial_success(body) == (7, "too old")
    assert parse_partial_success(b"") == (0, "")
    assert parse_partial_success(
        b'{"partialSuccess":{"rejectedLogRecords":"2","errorMessage":"x"}}', "application/json"
    ) == (
        2,
        "x",
    )
    assert parse_partial_success(b"\xff\xff\xff", "application/x-protobuf") == (0, "")


@pytest.mark.parametrize(
    ("body", "rejected"),
    [
        (b'{"partialSuccess":{"rejectedLogRecords":1e400}}', (1 << 63) - 1),  # inf: the nearest int64
        (b'{"partialSuccess":{"rejectedLogRecords":-1e400}}', 0),
        (b'{"partialSuccess":{"rejectedLogRecords":NaN}}', 0),
        (b'{"partialSuccess":{"rejectedLogRecords":"99999999999999999999999999"}}', (1 << 63) - 1),
        (b'{"partialSuccess":{"rejectedLogRecords":"\\u00b2"}}', 0),
        (b'{"partialSuccess":{"rejectedLogRecords":-3}}', 0),
        (b'{"partialSuccess":{"rejectedLogRecords":true}}', 0),
        (b'{"partialSuccess":{"rejectedLogRecords":[1]}}', 0),
        (b'{"partialSuccess":[]}', 0),
        (b"[]", 0),
        (b"[" * 100_000 + b"]" * 100_000, 0),  # nesting deep enough to overflow the recursion limit
        (b'{"partialSuccess":{"rejectedLogRecords":4.0,"errorMessage":{"a":1}}}', 4),
    ],
)
def test_partial_success_nonsense_never_raises(body: bytes, rejected: int) -> None:
    assert parse_partial_success(body, "application/json")[0] == rejected


def test_partial_success_protobuf_is_bounded_and_printable() -> None:
    # rejected_log_records = -1 (ten-byte varint), error_message with control characters
    message = b"\x1b[2Jfake log line\nERROR"
    inner = b"\x08" + b"\xff" * 9 + b"\x01" + b"\x12" + bytes([len(message)]) + message
    assert parse_partial_success(b"\x0a" + bytes([len(inner)]) + inner) == (0, "?[2Jfake log line?ERROR")

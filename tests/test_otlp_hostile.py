"""The OTLP/HTTP uploader against a hostile or broken collector (guarantee 6).

A real local endpoint (tests/otlp_server.py) answers with raw bytes: garbage,
lies about sizes, endless or huge answers, nonsense in the fields the uploader
reads. Whatever it sends, the uploader stays up, reads a bounded amount, keeps
(or acknowledges) exactly what the answer allows, and once the peer behaves
every line arrives. Scripted cases for each reproduced defect, then a
property-based fuzz test (hypothesis): bounded in the default suite, longer
under `-m slow`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path

import pytest
from conftest import until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceResponse,
)
from otlp_server import Answer, OtlpServer
from test_otlp_http import Harness, run

HUGE_CHUNK = 600 * 1024 * 1024
STREAMED = 64 * 1024 * 1024  # what the server tries to push of it before giving up


class HugeChunk:
    """A 2xx whose chunked body announces 600 MiB, then streams until the client stops reading."""

    def __init__(self, streamed: int = STREAMED) -> None:
        self.sent = 0
        self.streamed = streamed

    def __call__(self, sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % HUGE_CHUNK)
        sock.settimeout(3)  # a client that stopped reading without closing shows as a timeout here
        block = b"x" * 65536
        while self.sent < self.streamed:
            sock.sendall(block)
            self.sent += len(block)


def slowloris(sock: socket.socket) -> None:
    """A 2xx status line, a byte at a time, for longer than the client's timeout."""
    deadline = time.monotonic() + 6
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 1000:
        if time.monotonic() > deadline:
            return
        sock.sendall(bytes([byte]))
        time.sleep(0.05)


def _lines(tag: str, n: int = 3) -> list[str]:
    return [f"{tag}-{i}" for i in range(n)]


def test_a_huge_chunked_answer_is_not_read_beyond_the_bound(tmp_path: Path) -> None:
    """Reproduction: `readexactly(size)` trusted a 600 MiB chunk size (1.8 GB RSS)."""
    huge = HugeChunk()
    with OtlpServer() as server:
        server.answer(Answer(raw=huge, delivers=True))
        h = Harness(tmp_path, server.url, otlp='timeout = "5s"')

        async def test() -> None:
            chunk = h.add_lines(_lines("huge"))
            h.start()
            await until(lambda: h.spool.chunk_count == 0, "the 2xx acknowledged")
            await h.stop()
            assert server.delivered == {chunk: _lines("huge")}

        run(test)
    # The client read at most its 64 KiB bound and closed; what the server got out
    # before noticing is what the kernel's socket buffers took, not the 64 MiB.
    assert huge.sent < 16 * 1024 * 1024, huge.sent
    assert h.spool.dead_letters() == []
    h.close()


HOSTILE_ANSWERS = {
    "not http": (b"SSH-2.0-OpenSSH_9.6\r\n", False),
    "bad status code": (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", False),
    "superscript status": ("HTTP/1.1 2²0 OK\r\nContent-Length: 0\r\n\r\n".encode("latin-1"), False),
    "huge status line": (b"HTTP/1.1 200 " + b"O" * 200_000, True),
    "huge header": (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", True),
    "too many headers": (b"HTTP/1.1 200 OK\r\n" + b"X-H: 1\r\n" * 5000 + b"Content-Length: 0\r\n\r\n", True),
    "folded header": (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n", True),
    "bad chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", True),
    "negative chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n", True),
    "chunk longer than said": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n", True),
    "truncated body": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", True),
    "superscript length": ("HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n".encode("latin-1"), True),
    "conflicting lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello", True),
    "endless interim answers": (b"HTTP/1.1 100 Continue\r\n\r\n" * 50, False),
    "superscript retry-after": (
        "HTTP/1.1 503 Busy\r\nRetry-After: ²\r\nContent-Length: 0\r\n\r\n".encode("latin-1"),
        False,
    ),
    "huge retry-after": (b"HTTP/1.1 429 Slow\r\nRetry-After: 99999999999999999999\r\nContent-Length: 0\r\n\r\n", False),
    "closed at once": (b"", False),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ANSWERS))
def test_a_broken_answer_never_stops_the_uploader(tmp_path: Path, case: str) -> None:
    raw, delivers = HOSTILE_ANSWERS[case]
    with OtlpServer() as server:
        server.answer(Answer(raw=raw, delivers=delivers), Answer(raw=raw, delivers=delivers))
        h = Harness(tmp_path, server.url, upload='retry_max = "200ms"', otlp='timeout = "2s"')

        async def test() -> None:
            first = h.add_lines(_lines("a"))
            h.start()
            await until(lambda: server.count() >= 2, "two hostile answers")
            second = h.add_lines(_lines("b"))
            await until(lambda: h.spool.chunk_count == 0, "delivery once the server behaves")
            assert h.task is not None and not h.task.done(), "the uploader stopped"
            await h.stop()
            assert server.lines() == _lines("a") + _lines("b")
            assert set(server.delivered) == {first, second}

        run(test)
    assert h.spool.dead_letters() == []
    h.close()


def test_a_slowloris_answer_times_out_and_is_retried(tmp_path: Path) -> None:
    with OtlpServer() as server:
        server.answer(Answer(raw=slowloris))
        h = Harness(tmp_path, server.url, otlp='timeout = "1s"')

        async def test() -> None:
            h.add_lines(_lines("slow"))
            h.start()
            await until(lambda: h.spool.chunk_count == 0, "delivery after the timeout")
            await h.stop()

        run(test)
        assert server.lines() == _lines("slow")
    assert "no answer" in h.uploader.status()["last_error"]
    h.close()


def test_an_overflowing_partial_success_is_counted_not_a_crash(tmp_path: Path) -> None:
    """Reproduction: `{"rejectedLogRecords": 1e400}` raised OverflowError after the ack, losing the count."""
    body = b'{"partialSuccess":{"rejectedLogRecords":1e400,"errorMessage":"\\u001b[31mred"}}'
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with OtlpServer() as server:
        server.answer(Answer(raw=raw, delivers=True))
        h = Harness(tmp_path, server.url)

        async def test() -> None:
            h.add_lines(_lines("p", 4))
            h.start()
            await until(lambda: h.spool.chunk_count == 0, "ack")
            h.add_lines(_lines("q"))
            await until(lambda: h.spool.chunk_count == 0, "the next chunk")
            assert h.task is not None and not h.task.done()
            await h.stop()

        run(test)
        assert server.lines() == _lines("p", 4) + _lines("q")
    # The count is bounded by what the request held, and it was kept.
    assert h.spool.counters()["rejected_records"] == 4
    status = h.uploader.status()
    assert status["rejected_records"] == 4 and "\x1b" not in status["last_error"]
    h.close()


# --- property-based: random and malformed answers -----------------------------------

_STATUSES = [200, 202, 204, 206, 301, 304, 401, 403, 407, 408, 429, 500, 502, 503, 504, 599]
_HEADER_NAMES = ["Retry-After", "Content-Type", "Connection", "Content-Length", "Transfer-Encoding", "X-Junk"]
_header_value = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["chunked", "close", "keep-alive", "application/json", "application/x-protobuf", "²", "1e400"]),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
).map(lambda v: v.replace("\r", "").replace("\n", "").encode("latin-1", "replace"))
_json_number = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.booleans(),
    st.none(),
)


def _json_body(rejected: object, message: object) -> bytes:
    text = json.dumps({"partialSuccess": {"rejectedLogRecords": rejected, "errorMessage": message}})
    return text.encode()


_body = st.one_of(
    st.binary(max_size=300),
    st.builds(_json_body, _json_number, st.one_of(st.text(max_size=30), _json_number)),
    st.builds(
        lambda n, m: ExportLogsServiceResponse(
            partial_success=ExportLogsPartialSuccess(rejected_log_records=n, error_message=m)
        ).SerializeToString(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.text(max_size=30),
    ),
)


@st.composite
def _answer(draw: st.DrawFn) -> Answer:
    """One raw HTTP answer: interim answers, a status, random headers, a body framed honestly or not."""
    if draw(st.integers(0, 9)) == 0:
        return Answer(raw=draw(st.binary(max_size=400)))
    status = draw(st.sampled_from(_STATUSES))
    out = b"HTTP/1.1 100 Continue\r\n\r\n" * draw(st.integers(0, 10))
    out += b"HTTP/1.%d %d %s\r\n" % (draw(st.integers(0, 1)), status, draw(_header_value))
    for _ in range(draw(st.integers(0, 6))):
        out += draw(st.sampled_from(_HEADER_NAMES)).encode() + b": " + draw(_header_value) + b"\r\n"
    body = draw(_body)
    framing = draw(st.sampled_from(["length", "wrong length", "chunked", "lying chunks", "close", "truncated"]))
    if framing == "length":
        out += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    elif framing == "wrong length":
        out += b"Content-Length: %d\r\n\r\n%s" % (draw(st.integers(0, 10**20)), body)
    elif framing == "chunked":
        out += (
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"\r\n0\r\n\r\n"
        )
    elif framing == "lying chunks":
        out += b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (draw(st.integers(0, 2**60)), body)
    elif framing == "close":
        out += b"\r\n" + body
    else:
        out = out[: draw(st.integers(0, len(out)))]
    return Answer(raw=out, delivers=200 <= status < 300)


def _fuzz_one(answers: list[Answer]) -> None:
    with tempfile.TemporaryDirectory() as tmp, OtlpServer() as server:
        server.answer(*answers)
        h = Harness(Path(tmp), server.url, upload='retry_initial = "5ms"\nretry_max = "20ms"', otlp='timeout = "1s"')

        async def test() -> None:
            ids = [h.add_lines(_lines(f"c{n}", 2)) for n in range(3)]
            h.start()
            await until(lambda: h.spool.chunk_count == 0, "every chunk delivered", timeout=40)
            assert h.task is not None and not h.task.done(), "the uploader stopped"
            await h.stop()
            assert set(server.delivered) == set(ids)

        try:
            asyncio.run(asyncio.wait_for(test(), 60))
            assert h.spool.dead_letters() == []
            assert sorted(server.lines()) == sorted(line for n in range(3) for line in _lines(f"c{n}", 2))
        finally:
            h.close()


_FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=25, **_FUZZ)
@given(st.lists(_answer(), min_size=1, max_size=6))
def test_fuzz_random_answers_never_stop_the_uploader_and_lose_nothing(answers: list[Answer]) -> None:
    _fuzz_one(answers)


@pytest.mark.slow
@settings(max_examples=400, **_FUZZ)
@given(st.lists(_answer(), min_size=1, max_size=12))
def test_fuzz_random_answers_long(answers: list[Answer]) -> None:
    _fuzz_one(answers)

"""A real OTLP/HTTP logs endpoint inside the test process, with scripted answers.

`OtlpServer` is a `ThreadingHTTPServer` on 127.0.0.1 (plain or TLS, optionally
requiring a client certificate). Every request is decoded the way a receiver
would, with standard tools only (zstandard, gzip, opentelemetry-proto), and
recorded. Answers come from a script (`answer(...)`), then the default (200):
status and body, a delay, a hold until the test releases it, OTLP partial
success, a TCP reset instead of an answer, or raw bytes (a hostile or broken
server: garbage, huge or endless answers). With `max_request_size` set, larger
bodies are answered 413 whatever the script says.

Each chunk of edgeagent's is one ResourceLogs in a request, and the request's
`X-Edgeagent-Chunk-Id` header lists the chunk ids in the same order, so the
server can tell what each chunk delivered and deduplicate resends by chunk id.
"""

from __future__ import annotations

import gzip
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import zstandard
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

CHUNK_ID_HEADER = "X-Edgeagent-Chunk-Id"


@dataclass
class Answer:
    """What the server does with one request."""

    status: int = 200
    body: bytes | None = None  # None: an empty ExportLogsServiceResponse for 2xx, a short text otherwise
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (or resetting)
    hold: threading.Event | None = None  # answer only once this is set (stop() sets it)
    reset: bool = False  # abort the connection with a TCP RST instead of answering
    rejected: int = 0  # OTLP partial success: rejected_log_records
    message: str = ""  # OTLP partial success: error_message
    close: bool = False  # send `Connection: close` and close after answering
    drop: bool = False  # close after answering without saying so (an idle timeout)
    # A hostile or broken server: these bytes (or what this function writes to the socket)
    # instead of an answer, then the connection is closed. `delivers`: the request counts as
    # delivered (the receiver stored it before its answer went wrong).
    raw: bytes | Callable[[socket.socket], None] | None = None
    delivers: bool = False


@dataclass
class Received:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]  # lower-case names
    raw: bytes  # the body as sent
    body: bytes  # decompressed
    request: ExportLogsServiceRequest
    chunk_ids: list[str]
    connection: int  # serial number of the TCP connection it came on
    client_cert: dict[str, Any] | None
    answered: int | None = None  # status sent; None if reset or never answered

    def records(self) -> list[Any]:
        return [r for rl in self.request.resource_logs for sl in rl.scope_logs for r in sl.log_records]

    def lines(self) -> list[str]:
        return [r.body.string_value for r in self.records()]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a collector
    server: _Server
    timeout = 60

    def setup(self) -> None:
        super().setup()
        self.serial = self.server.next_serial()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = _decode_body(raw, headers.get("content-encoding", ""))
            request = ExportLogsServiceRequest.FromString(body)
        except Exception as e:  # a broken request is the uploader's bug: record it and answer 400
            owner.errors.append(f"{type(e).__name__}: {e}")
            self._answer(Answer(400, f"undecodable request: {e}".encode()), None)
            return
        ids = [x for x in headers.get(CHUNK_ID_HEADER.lower(), "").split(",") if x]
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        received = Received(self.path, headers, raw, body, request, ids, self.serial, cert)
        if owner.max_request_size is not None and len(raw) > owner.max_request_size:
            answer = Answer(413, b"request body too large")  # as a collector or proxy with a body limit
        else:
            answer = owner.next_answer()
        with owner.lock:
            owner.received.append(received)
        self._answer(answer, received)

    def _answer(self, answer: Answer, received: Received | None) -> None:
        owner = self.server.owner
        if answer.delay:
            time.sleep(answer.delay)
        if answer.hold is not None:
            answer.hold.wait()
        if answer.raw is not None and not owner.stopped:
            self._answer_raw(answer, received)
            return
        if answer.reset or owner.stopped:
            # SO_LINGER 0: close() sends RST, not FIN; the client sees "connection reset".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if answer.body is not None:
            body, content_type = answer.body, answer.headers.get("Content-Type", "text/plain")
        elif 200 <= answer.status < 300:
            response = ExportLogsServiceResponse()
            if answer.rejected or answer.message:
                response.partial_success.CopyFrom(
                    ExportLogsPartialSuccess(rejected_log_records=answer.rejected, error_message=answer.message)
                )
            body, content_type = response.SerializeToString(), "application/x-protobuf"
        else:
            body, content_type = f"scripted {answer.status}".encode(), "text/plain"
        self.send_response(answer.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in answer.headers.items():
            if name.lower() != "content-type":
                self.send_header(name, value)
        if answer.close:
            self.send_header("Connection", "close")
        if answer.close or answer.drop:
            self.close_connection = True
        if received is not None:
            # Recorded before the answer leaves, as a collector processes before answering.
            received.answered = answer.status
            if 200 <= answer.status < 300:
                owner.deliver(received)
        self.end_headers()
        self.wfile.write(body)

    def _answer_raw(self, answer: Answer, received: Received | None) -> None:
        if received is not None and answer.delivers:
            self.server.owner.deliver(received)
        try:
            if callable(answer.raw):
                answer.raw(self.connection)
            elif answer.raw:
                self.connection.sendall(answer.raw)
        except OSError:
            pass  # the client gave up on us: that is the point
        self.close_connection = True


def _decode_body(raw: bytes, encoding: str) -> bytes:
    if encoding == "zstd":
        # As the OpenTelemetry Collector decodes it: one stream of as many frames as there are (a request of
        # several chunks is their stored frames one after the other); anything after the last frame fails.
        decompressor, parts = zstandard.ZstdDecompressor(), []
        while True:
            frame = decompressor.decompressobj()
            parts.append(frame.decompress(raw))
            if not frame.eof:
                raise ValueError("the body ends inside a zstd frame")
            raw = frame.unused_data
            if not raw:
                return b"".join(parts)
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding in ("", "identity"):
        return raw
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: OtlpServer, port: int) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        owner = self.owner
        if owner.tls is not None:
            try:
                request.settimeout(10)
                request = owner.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                owner.tls_failures.append(str(e))
                request.close()
                return
        with owner.lock:
            owner.connections.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with owner.lock:
                owner.connections.discard(request)

    def next_serial(self) -> int:
        with self.owner.lock:
            self.owner.connection_count += 1
            return self.owner.connection_count


class OtlpServer:
    """See the module docstring. `url` is the endpoint to configure."""

    def __init__(self, tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.tls = tls
        self.port = port
        self.lock = threading.Lock()
        self.script: deque[Answer] = deque()
        self.default = Answer()
        self.max_request_size: int | None = None  # bodies (as sent) above it are answered 413
        self.received: list[Received] = []
        self.delivered: dict[str, list[str]] = {}  # chunk id -> lines, first 2xx delivery, in order
        self.delivered_records: dict[str, list[Any]] = {}
        self.errors: list[str] = []
        self.tls_failures: list[str] = []
        self.connections: set[Any] = set()
        self.connection_count = 0
        self.stopped = True
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._holds: list[threading.Event] = []

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1/logs"

    def start(self) -> OtlpServer:
        self._server = _Server(self, self.port)
        self.port = self._server.server_address[1]
        self.stopped = False
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (an outage)."""
        self.stopped = True
        for hold in self._holds:
            hold.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            open_connections = list(self.connections)
        for conn in open_connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def answer(self, *answers: Answer) -> None:
        """Queue answers for the next requests, in order."""
        with self.lock:
            for a in answers:
                if a.hold is not None:
                    self._holds.append(a.hold)
            self.script.extend(answers)

    def next_answer(self) -> Answer:
        with self.lock:
            return self.script.popleft() if self.script else self.default

    def deliver(self, received: Received) -> None:
        groups = received.request.resource_logs
        with self.lock:
            if len(groups) != len(received.chunk_ids):
                self.errors.append(f"{len(received.chunk_ids)} chunk ids for {len(groups)} ResourceLogs")
                return
            for chunk_id, group in zip(received.chunk_ids, groups, strict=True):
                if chunk_id in self.delivered:
                    continue  # a resend: the chunk id lets the receiver drop it
                records = [r for sl in group.scope_logs for r in sl.log_records]
                self.delivered_records[chunk_id] = records
                self.delivered[chunk_id] = [r.body.string_value for r in records]

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def lines(self) -> list[str]:
        """Every line delivered (answered 2xx), resends dropped, in delivery order."""
        with self.lock:
            return [line for lines in self.delivered.values() for line in lines]

    def __enter__(self) -> OtlpServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

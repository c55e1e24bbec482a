"""The OTLP/HTTP uploader: POSTs spooled chunks to an OpenTelemetry collector.

Owns everything between the spool and an OTLP/HTTP logs endpoint: choosing the
oldest chunks, coalescing small ones into one request (the body is built by
`edgeagent.codec` per `[otlp_http].compression`), the HTTP exchange itself, and what each answer means
for the chunks (ack, retry, split, dead letter). A chunk leaves the spool only
on a 2xx (guarantee 2); records a 2xx reports as rejected (OTLP partial
success) are counted and logged as loss (guarantee 5).

The HTTP/1.1 client is a minimal one on asyncio streams rather than
`http.client` in `asyncio.to_thread`, because:
- cancellation works: `drain(timeout)` and SIGTERM interrupt a request at any
  `await`, whereas a thread blocked in `http.client` cannot be stopped and
  `asyncio.run` waits for it at exit;
- timeouts follow progress: the body is written in pieces, each with its own
  write timeout, so a big request over a slow link is not cut off the way a
  single `sendall` with a socket timeout would be (its timeout covers the whole
  call), and `[upload].max_rate` can pace the same pieces;
- no thread, no extra stack, nothing the one-loop concurrency model has to
  make an exception for. The client needs only what an OTLP exchange uses: one
  POST with a known length; responses with Content-Length, chunked or
  close-delimited bodies; 1xx interim answers; keep-alive. The response side
  (`http11`) reads an untrusted server strictly and within fixed bounds, and
  `otlp_answer` reads what a body says (partial success, error text).

Every field read from an answer is parsed with explicit ranges; nonsense is
logged and given the nearest safe meaning, and no answer can crash the
uploader, exhaust memory or change what is kept (guarantee 6).

One request is in flight at a time, in spool order (the window of
`[upload].window` is not used): coalescing makes requests large enough that a
single stream saturates a metered link, and it keeps the order of delivery the
order of the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from edgeagent import __version__, codec, tls
from edgeagent.config import Config, ConfigError, display_url, parse_url
from edgeagent.pipeline import WAKE_DATA, UploaderContext
from edgeagent.spool import StoredChunk
from edgeagent.uploaders import Backoff
from edgeagent.uploaders.http11 import (
    STREAM_LIMIT,
    ProtocolError,
    Response,
    parse_retry_after,
    printable,
    read_response,
)
from edgeagent.uploaders.otlp_answer import explanation, parse_partial_success
from edgeagent.uploaders.outcome import Delivered, Outcome, Rejected, Retry, Settled, Split, settle

log = logging.getLogger(__name__)

CHUNK_ID_HEADER = "X-Edgeagent-Chunk-Id"

# Requests are topped up with further chunks until they hold this much
# uncompressed protobuf: enough to amortise a round trip on a slow link, small
# enough that gzip or none requests (which decode the chunks) stay cheap; zstd
# requests are the stored frames one after the other (codec.request_body).
_COALESCE_TARGET = 1024 * 1024
# Bounds the chunk-id header (33 bytes an id) well under common proxy limits (8 KiB).
_MAX_COALESCE_CHUNKS = 64
_WRITE_PIECE = 64 * 1024
# A keep-alive connection unused this long is closed: NAT boxes on cellular links
# drop idle flows silently, and a request on such a flow only fails after `timeout`.
_IDLE_CLOSE = 30.0
# OTLP/HTTP retryable answers, plus 408 (the server gave up waiting for our request: transient).
_RETRYABLE = frozenset({408, 429, 502, 503, 504})
# "Fix the credentials", not "the data is bad": retried with backoff, never dead-lettered.
_CREDENTIALS = frozenset({401, 403, 407})
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection"}
    | {CHUNK_ID_HEADER.lower()}
)
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class _CorruptChunk(Exception):
    def __init__(self, chunk: StoredChunk, error: Exception) -> None:
        super().__init__(str(error))
        self.chunk = chunk
        self.error = error


@contextlib.contextmanager
def _corrupt_as(chunk: StoredChunk) -> Iterator[None]:
    """Decoding errors inside the block are `chunk`'s damage."""
    try:
        yield
    except codec.CorruptChunk as e:
        raise _CorruptChunk(chunk, e) from e


@dataclass(slots=True)
class _Request:
    chunks: list[StoredChunk]
    body: bytes
    raw_size: int  # uncompressed ExportLogsServiceRequest bytes
    records: int


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.requests = 0
        self.reusable = True
        self.response_started = False

    def close(self) -> None:
        self.writer.close()


class OtlpHttpUploader:
    """See the module docstring. Built from `[otlp_http]` and `[upload]`."""

    def __init__(self, config: Config) -> None:
        self._cfg = config.otlp_http
        self._source = config.source_path or "<config>"
        self._endpoint = self._cfg.endpoint
        self._scheme, self._host, self._port, self._path, self._host_header = self._parse_endpoint()
        self._tls = self._tls_context_keeper() if self._scheme == "https" else None
        self._static_head = self._build_static_head(config)
        self._compression = self._cfg.compression
        self._learned_limit = self._cfg.max_request_size  # lowered by 413 answers
        self._rate = config.upload.max_rate
        self._backoff = Backoff(config.upload.retry_initial, config.upload.retry_max)
        self._conn: _Connection | None = None
        self._ctx: UploaderContext | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._pace_at = 0.0
        self._state = "idle"
        self._reachable: bool | None = None
        self._since: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_status: int | None = None
        self._last_success_at: float | None = None
        self._retry_delay: float | None = None
        self._retry_after: float | None = None
        self._next_attempt_at: float | None = None
        self._counters = {
            "requests": 0,
            "sent_chunks": 0,
            "sent_bytes": 0,
            "acked_chunks": 0,
            "acked_records": 0,
            "failed_requests": 0,
            "rejected_chunks": 0,
            "rejected_records": 0,
            "split_chunks": 0,
        }

    # --- configuration ------------------------------------------------------------

    def _fail(self, key: str, value: Any, problem: str) -> ConfigError:
        shown = value if isinstance(value, str) and value.startswith("(value not shown") else repr(value)
        return ConfigError(f"{self._source}: otlp_http.{key} = {shown}: {problem}")

    def _parse_endpoint(self) -> tuple[str, str, int, str, str]:
        try:  # config parsing checked it already; this only fails for configs built by hand
            address = parse_url(self._endpoint, ("http", "https"), True)
        except ValueError as e:
            raise self._fail("endpoint", display_url(self._endpoint), f"expected {e}") from None
        # OTel convention: an endpoint without a path is a base URL for the logs signal.
        path = address.path if address.path.startswith("/") else "/v1/logs" + address.path
        host = address.host
        host_header = f"[{host}]" if ":" in host else host
        if address.port != (443 if address.tls else 80):
            host_header += f":{address.port}"
        return address.scheme, host, address.port, path, host_header

    def _tls_context_keeper(self) -> tls.ContextKeeper:
        """The TLS context of every connection: made now (unusable files stop the start or the reload), and
        made again at a connection when one of its files changed (a renewed certificate, a rotated CA)."""
        cfg = self._cfg
        keeper = tls.ContextKeeper(
            tls.TlsFiles(cfg.ca_file, cfg.cert_file, cfg.key_file, "otlp_http"), verify=not cfg.tls_insecure
        )
        try:
            keeper.context()
        except tls.TlsFileError as e:
            raise ConfigError(f"{self._source}: {e}") from None
        return keeper

    def _build_static_head(self, config: Config) -> bytes:
        """Request-line and headers shared by every request (all but length and ids)."""
        lines = [
            f"POST {self._path} HTTP/1.1",
            f"Host: {self._host_header}",
            f"User-Agent: edgeagent/{__version__}",
            f"Content-Type: {codec.CONTENT_TYPE}",
        ]
        encoding = codec.content_encoding(config.otlp_http.compression)
        if encoding:
            lines.append(f"Content-Encoding: {encoding}")
        hidden = "(value not shown: it may be a secret)"
        for name, value in config.otlp_http.headers.items():
            key = f"headers.{name}"
            if not _TOKEN_RE.match(name):
                raise self._fail(key, hidden, "the header name is not a valid HTTP token")
            if name.lower() in _RESERVED_HEADERS:
                raise self._fail(key, hidden, "this header is set by the agent and cannot be configured")
            if any(c in value for c in "\r\n\0"):
                raise self._fail(key, hidden, "header values cannot contain line breaks or NUL")
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise self._fail(key, hidden, "header values must be Latin-1 text") from None
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    # --- the upload loop ----------------------------------------------------------

    async def run(self, ctx: UploaderContext) -> None:
        self._ctx = ctx
        try:
            while not self._stopping:
                request = self._next_request(ctx)
                if request is None:
                    self._state = "idle"
                    await self._wait_idle(ctx)
                    continue
                self._state = "sending"
                self._idle.clear()
                try:
                    await self._attempt(ctx, request)
                finally:
                    self._idle.set()
        finally:
            self._state = "stopped"
            self._close_connection()

    async def _wait_idle(self, ctx: UploaderContext) -> None:
        if self._conn is None:
            await ctx.wait_for_work(None)
        elif not await ctx.wait_for_work(_IDLE_CLOSE):
            self._close_connection()

    async def _attempt(self, ctx: UploaderContext, request: _Request) -> None:
        self._counters["requests"] += 1
        self._counters["sent_chunks"] += len(request.chunks)
        outcome: Outcome
        try:
            response = await self._exchange(request)
        except (OSError, EOFError, TimeoutError, ProtocolError) as e:
            self._set_reachable(False)
            outcome = Retry(_describe(e))
        except tls.TlsFileError as e:  # a TLS file that broke since the start: ours to fix, retried meanwhile
            outcome = Retry(str(e))
        else:
            self._set_reachable(True)
            self._last_status = response.status
            outcome = self._outcome(request, response)
        settled = self._apply(ctx, request.chunks, outcome)
        if isinstance(outcome, Retry):
            await self._retry_later(ctx, outcome, settled.retry_in or 0.0)

    def _outcome(self, request: _Request, response: Response) -> Outcome:
        """What an HTTP answer means for the request's chunks."""
        status = response.status
        if 200 <= status < 300:
            return self._delivered(request, response)
        if status == 413:
            return self._too_large(request, response)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status in _CREDENTIALS:
            what = f"HTTP {status} {response.reason}: {explanation(response)} (check otlp_http.headers)"
            return Retry(what, retry_after, credentials=True)
        if 400 <= status < 500 and status not in _RETRYABLE:
            return Rejected(f"HTTP {status} {response.reason} from {self._endpoint}: {explanation(response)}")
        what = f"HTTP {status} {response.reason}"
        if 300 <= status < 400:
            location = printable(response.headers.get("location", "?"), 200)
            what += f" (redirect to {location} not followed: fix otlp_http.endpoint)"
        elif status >= 400 and response.body:
            what += f": {explanation(response)}"
        return Retry(what, retry_after)

    def _delivered(self, request: _Request, response: Response) -> Delivered:
        rejected, message = parse_partial_success(response.body, response.headers.get("content-type", ""))
        if rejected > request.records:
            log.warning(
                "%s says it rejected %d of %d records; counting %d",
                self._endpoint,
                rejected,
                request.records,
                request.records,
            )
            rejected = request.records
        return Delivered(rejected, message)

    def _too_large(self, request: _Request, response: Response) -> Outcome:
        if request.records <= 1:
            return Rejected(
                f"HTTP 413 from {self._endpoint}: a single record of {request.raw_size} bytes is larger than the "
                f"receiver accepts: {explanation(response)}"
            )
        # Next requests stay under half of what was refused; a chunk above that is
        # split (now, or before it is sent: see _select). Halving ends at single records.
        self._learned_limit = max(1, min(self._learned_limit, request.raw_size // 2))
        what = (
            f"HTTP 413: request of {request.raw_size} bytes too large; now sending at most "
            f"{self._learned_limit} bytes a request"
        )
        self._note_error(what)
        log.warning("%s refused %d bytes as too large (413); splitting", self._endpoint, request.raw_size)
        return Split(what, self._learned_limit, certain=len(request.chunks) == 1)

    def _apply(self, ctx: UploaderContext, chunks: list[StoredChunk], outcome: Outcome) -> Settled:
        """`outcome.settle`, and what it did in the counters and status."""
        settled = settle(ctx, chunks, outcome, self._backoff)
        self._counters["acked_chunks"] += settled.acked
        self._counters["acked_records"] += settled.acked_records
        self._counters["rejected_chunks"] += settled.dead_lettered
        self._counters["split_chunks"] += settled.split
        if settled.dead_letter_reason:
            self._note_error(settled.dead_letter_reason)
        if isinstance(outcome, Delivered):
            self._retry_delay = self._retry_after = self._next_attempt_at = None
            self._last_success_at = time.time()
            if outcome.rejected_records > 0:
                self._counters["rejected_records"] += outcome.rejected_records
                self._note_error(
                    f"receiver rejected {outcome.rejected_records} of {settled.acked_records} records: "
                    f"{outcome.message or '(no message)'}"
                )
        return settled

    async def _retry_later(self, ctx: UploaderContext, retry: Retry, delay: float) -> None:
        self._counters["failed_requests"] += 1
        self._retry_delay = delay
        self._retry_after = retry.after
        self._next_attempt_at = time.time() + delay
        what = retry.reason
        if what != self._last_error:
            log.warning("upload to %s failed: %s; retrying in %.1fs", self._endpoint, what, delay)
        else:
            log.debug("upload to %s failed again: %s; retrying in %.1fs", self._endpoint, what, delay)
        self._note_error(what)
        self._state = "backoff"
        await self._wait_retry(ctx, delay, server_asked=retry.after is not None)

    async def _wait_retry(self, ctx: UploaderContext, delay: float, server_asked: bool) -> None:
        """Sleep until the retry is due; a wake that is not about new data (network
        up, SIGUSR1, shutdown) ends the wait early, unless the server asked for it
        (Retry-After). New data does not: during an outage chunks are committed
        about every second, and retrying on each would be a reconnect storm."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        # Wakes from before the failure are answered by the attempt that just failed.
        ctx.discard_wakes()
        while not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            reasons = await ctx.wait_for_work(remaining)
            if reasons - {WAKE_DATA} and not server_asked:
                return

    # --- choosing what to send ----------------------------------------------------

    def _next_request(self, ctx: UploaderContext) -> _Request | None:
        """The oldest chunks, as many as fit one request; None when the spool is empty.

        A chunk that cannot be decompressed (damaged in the spool) goes to dead
        letters rather than blocking the queue.
        """
        while True:
            try:
                return self._select(ctx)
            except _CorruptChunk as e:
                reason = f"chunk {e.chunk.chunk_id} is corrupt in the spool ({e.error}); it cannot be sent"
                self._apply(ctx, [e.chunk], Rejected(reason))

    def _select(self, ctx: UploaderContext) -> _Request | None:
        """See `_next_request`. Chunks are read one at a time so memory stays at
        about one request whatever the backlog."""
        limit = self._learned_limit
        target = min(limit, _COALESCE_TARGET)
        chunks: list[StoredChunk] = []
        payloads: list[bytes] = []
        sizes: list[int] = []
        after = 0
        while len(chunks) < _MAX_COALESCE_CHUNKS:
            found = ctx.spool.oldest(1, after)
            if not found:
                break
            chunk = found[0]
            after = chunk.id
            with _corrupt_as(chunk):
                chunk = ctx.corrected(chunk)  # split parts inherit the corrected times: never shifted twice
                payload = chunk.payload
                size = ctx.codec.raw_size(payload)
            if chunks and (sum(sizes) + size > limit):
                break  # goes first in the next request
            if size > limit and chunk.records > 1:
                reason = f"chunk of {size} bytes, above the {limit} bytes a request may hold"
                settled = self._apply(ctx, [chunk], Split(reason, limit, certain=False))
                if settled.split or settled.dead_lettered:
                    continue  # its parts are queued behind the newer chunks (spool.split)
            chunks.append(chunk)
            payloads.append(payload)
            sizes.append(size)
            if sum(sizes) >= target:
                break
        if not chunks:
            return None
        try:
            body = ctx.codec.request_body(payloads, self._compression)
        except codec.CorruptChunk as e:
            raise _CorruptChunk(chunks[e.index], e) from e
        return _Request(chunks, body, sum(sizes), sum(c.records for c in chunks))

    # --- HTTP/1.1 -----------------------------------------------------------------

    async def _exchange(self, request: _Request) -> Response:
        for fresh_retry in (False, True):
            conn = self._conn
            reused = conn is not None and conn.requests > 0
            if conn is None or conn.reader.at_eof():
                self._close_connection()
                conn = self._conn = await self._connect()
                reused = False
            conn.requests += 1
            conn.response_started = False
            try:
                await self._send(conn, request)
                response = await self._read_response(conn)
            except (OSError, EOFError, ProtocolError) as e:
                self._close_connection()
                # A keep-alive connection the server closed just as we reused it fails
                # before any answer: resend once on a new connection, without backoff.
                # Not after a timeout: the server may just be slow, and would get it twice.
                stale = reused and not conn.response_started and not isinstance(e, TimeoutError)
                if stale and not fresh_retry:
                    log.debug("keep-alive connection to %s closed under us (%s); reconnecting", self._host, e)
                    continue
                raise
            except BaseException:  # cancellation: the connection's state is unknown
                self._close_connection()
                raise
            if not conn.reusable:
                self._close_connection()
            return response
        raise AssertionError("unreachable")  # the loop either returns or raises

    async def _connect(self) -> _Connection:
        context = self._tls.context() if self._tls is not None else None  # TlsFileError: a file since broken
        try:
            async with asyncio.timeout(self._cfg.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=context,
                    limit=STREAM_LIMIT,
                    server_hostname=self._host if context is not None else None,
                )
        except TimeoutError:
            raise TimeoutError(
                f"connecting to {self._host}:{self._port} timed out after {self._cfg.connect_timeout:g}s"
            ) from None
        return _Connection(reader, writer)

    async def _send(self, conn: _Connection, request: _Request) -> None:
        ids = ",".join(c.chunk_id for c in request.chunks)
        head = self._static_head + f"Content-Length: {len(request.body)}\r\n{CHUNK_ID_HEADER}: {ids}\r\n\r\n".encode()
        conn.writer.write(head)
        body = memoryview(request.body)
        piece = _WRITE_PIECE if not self._rate else min(_WRITE_PIECE, max(1024, self._rate // 4))
        for start in range(0, len(body), piece):
            part = body[start : start + piece]
            await self._pace(len(part))
            conn.writer.write(part)
            try:
                async with asyncio.timeout(self._cfg.timeout):
                    await conn.writer.drain()
            except TimeoutError:
                raise TimeoutError(f"sending to {self._endpoint}: no progress for {self._cfg.timeout:g}s") from None
            self._counters["sent_bytes"] += len(part)
        if not body:
            await conn.writer.drain()

    async def _pace(self, nbytes: int) -> None:
        """`[upload].max_rate`: request bodies leave at most this many bytes a second."""
        if not self._rate:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(self._pace_at, now)
        self._pace_at = start + nbytes / self._rate
        if start > now:
            await asyncio.sleep(start - now)

    async def _read_response(self, conn: _Connection) -> Response:
        def started() -> None:
            conn.response_started = True

        try:
            async with asyncio.timeout(self._cfg.timeout):
                response = await read_response(conn.reader, started)
        except TimeoutError:
            raise TimeoutError(
                f"no answer (or not all of it) from {self._endpoint} within {self._cfg.timeout:g}s"
            ) from None
        conn.reusable = response.reusable
        return response

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- shutdown and status ------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Let the request in flight finish (ack, or retry state) within `timeout`,
        then stop; chunks not acknowledged stay in the spool for the next start."""
        self._stopping = True
        if self._ctx is not None:
            self._ctx.wake("stop")
        if self._idle.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "shutdown: no answer from %s within %.1fs; the chunks in flight stay in the spool and are sent "
                "again at the next start",
                self._endpoint,
                timeout,
            )

    def _set_reachable(self, reachable: bool) -> None:
        if reachable != self._reachable:
            self._reachable = reachable
            self._since = time.time()

    def _note_error(self, what: str) -> None:
        self._last_error = what
        self._last_error_at = time.time()

    def status(self) -> dict[str, Any]:
        return {
            "protocol": "otlp_http",
            "endpoint": self._endpoint,
            "compression": self._compression,
            "state": self._state,
            "connected": bool(self._reachable),
            "since": _round(self._since),
            "connection_open": self._conn is not None,
            "last_status": self._last_status,
            "last_error": self._last_error,
            "last_error_at": _round(self._last_error_at),
            "last_success_at": _round(self._last_success_at),
            "retry_delay": _round(self._retry_delay),
            "retry_after": _round(self._retry_after),
            "next_attempt_at": _round(self._next_attempt_at),
            "failures_in_a_row": self._backoff.failures,
            "max_request_size": self._learned_limit,
            **(self._ctx.credentials_status() if self._ctx is not None else {}),
            **self._counters,
        }


# --- helpers (module level: pure, and tested on their own) -------------------------


def _describe(error: BaseException) -> str:
    ssl = sys.modules.get("ssl")  # None where TLS is kept out (edgeagent.tls)
    if ssl and isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {error.verify_message or error}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    text = str(error) or type(error).__name__
    return text if isinstance(error, (TimeoutError, EOFError, ProtocolError)) else f"{type(error).__name__}: {text}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)

"""Reading an HTTP/1.1 response from an untrusted server, strictly and within fixed bounds.

Owns the response side of the OTLP/HTTP uploader's client: the status line,
the headers, the body (Content-Length, chunked or close-delimited) and the
interim 1xx answers. What it guarantees, whatever the server sends:

- memory: at most `MAX_LINE` bytes a line, `MAX_HEADERS` header lines and
  `MAX_HEADER_BYTES` in all, `MAX_INTERIM` 1xx answers, and `BODY_KEEP` bytes of
  body. A body (or a chunk) announced larger is read up to `BODY_KEEP` and the
  connection is then closed, never read to its end: a size is a claim, not a
  reason to allocate;
- strictness: numbers (status, Content-Length, chunk sizes) are ASCII digits of
  bounded length; a line that is not what HTTP/1.1 allows is a
  `ProtocolError`, which the uploader treats as a network failure (retry with
  backoff; nothing is acknowledged or refused because of it);
- text that came from the server (reason phrase, header values) is returned as
  printable text only, so it cannot forge log lines or status output.

The caller bounds the time (one timeout around the whole response: a server
trickling a byte at a time is cut off like a silent one).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

from edgeagent.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_LINE = 8 * 1024  # status line, each header line, each chunk-size line
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024
MAX_INTERIM = 8  # 1xx answers before the final one
BODY_KEEP = 64 * 1024  # bytes of a body read and kept (partial success, error text)
STREAM_LIMIT = 2 * MAX_LINE  # asyncio.StreamReader limit for connections using this module
RETRY_AFTER_MAX = 24 * 3600.0  # a longer Retry-After is read as this (the uploader caps it at retry_max anyway)

_STATUS_RE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([^\r\n]*))?\r?\n")
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS_RE = re.compile(r"[0-9]{1,18}")
_ASCII_DIGITS_RE = re.compile(r"[0-9]+")
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n")


@dataclass(slots=True)
class Response:
    status: int
    reason: str  # printable
    headers: dict[str, str]  # lower-case names, printable values; repeated headers joined with ", "
    body: bytes  # at most BODY_KEEP bytes
    reusable: bool  # the connection may carry another request


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: ASCII delay-seconds or an
    HTTP-date (RFC 9110 10.2.3), within [0, RETRY_AFTER_MAX]. None when absent;
    anything else is logged and read as None (the backoff delay applies)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if _ASCII_DIGITS_RE.fullmatch(text):  # not str.isdigit(): it accepts "²" and other digits float() refuses
        return RETRY_AFTER_MAX if len(text) > 9 else min(float(text), RETRY_AFTER_MAX)
    if len(text) <= 64:
        try:
            when = email.utils.parsedate_to_datetime(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
        else:
            return min(max(0.0, seconds), RETRY_AFTER_MAX)
    log.warning("unreadable Retry-After %r from the server; using the backoff delay instead", printable(text, 60))
    return None


def printable(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters with control characters replaced: safe in logs and status."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


async def read_response(reader: asyncio.StreamReader, on_first_byte: Callable[[], None]) -> Response:
    """The final answer to one request (interim 1xx answers are skipped).
    Raises ProtocolError, EOFError (closed early) or OSError."""
    for _ in range(MAX_INTERIM + 1):
        line = await _read_line(reader, "status line")
        if not line:
            raise EOFError("the connection was closed before an answer arrived")
        on_first_byte()
        minor, status, reason = _parse_status_line(line)
        headers = await read_headers(reader)
        if status == 101:
            raise ProtocolError("unexpected 101 Switching Protocols")
        if status >= 200:
            break
    else:
        raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")
    body, complete = await _read_body(reader, status, headers)
    connection = headers.get("connection", "").lower()
    reusable = complete and "close" not in connection and (minor == 1 or "keep-alive" in connection)
    return Response(status, reason, headers, body, reusable)


async def _read_line(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise EOFError(f"the connection was closed in the middle of the {what}") from None
        return b""
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"{what} longer than {MAX_LINE} bytes") from None
    if len(line) > MAX_LINE:
        raise ProtocolError(f"{what} longer than {MAX_LINE} bytes")
    return line


def _parse_status_line(line: bytes) -> tuple[int, int, str]:
    match = _STATUS_RE.fullmatch(line)
    if match is None:
        raise ProtocolError(f"not an HTTP/1.x status line: {printable(line.decode('latin-1'), 60)!r}")
    return int(match[1]), int(match[2]), printable((match[3] or b"").decode("latin-1"), 100)


async def read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    """Header (or trailer) lines up to the empty line, bounded in count and size."""
    headers: dict[str, str] = {}
    total = 0
    for _ in range(MAX_HEADERS + 1):
        line = await _read_line(reader, "header")
        if not line:
            raise EOFError("the connection was closed in the middle of an answer's headers")
        if line in (b"\r\n", b"\n"):
            return headers
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise ProtocolError(f"headers larger than {MAX_HEADER_BYTES} bytes")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):  # also refuses obsolete line folding
            raise ProtocolError(f"malformed header line {printable(line.decode('latin-1'), 60)!r}")
        key = name.decode("ascii").lower()
        text = printable(value.decode("latin-1").strip(), MAX_LINE)
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    raise ProtocolError(f"more than {MAX_HEADERS} header lines")


def parse_content_length(value: str) -> int:
    """Content-Length: ASCII digits; repeated equal values (joined with ", ") are allowed."""
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise ProtocolError(f"conflicting Content-Length values {printable(value, 60)!r}")
    text = values.pop()
    if not _DIGITS_RE.fullmatch(text):
        raise ProtocolError(f"bad Content-Length {printable(value, 60)!r}")
    return int(text)


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> tuple[bytes, bool]:
    """(body kept, whether the whole body was read so the connection can be reused)."""
    if status in (204, 304):
        return b"", True
    encoding = headers.get("transfer-encoding")
    if encoding is not None:
        codings = [c.strip().lower() for c in encoding.split(",")]
        if codings[-1] == "chunked":
            return await _read_chunked(reader)
        return await _read_until_close(reader), False  # RFC 9112 6.3: read until the server closes
    length = headers.get("content-length")
    if length is not None:
        n = parse_content_length(length)
        if n > BODY_KEEP:
            # Not worth reading to keep the connection: take the head, close.
            return await _read_at_most(reader, BODY_KEEP), False
        return await _read_exactly(reader, n), True
    return await _read_until_close(reader), False


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    kept = bytearray()
    while True:
        line = await _read_line(reader, "chunk size line")
        match = _CHUNK_SIZE_RE.fullmatch(line)
        if match is None:
            raise ProtocolError(f"bad chunk size line {printable(line.decode('latin-1'), 40)!r}")
        size = int(match[1], 16)
        if size == 0:
            await read_headers(reader)  # trailers
            return bytes(kept), True
        room = BODY_KEEP - len(kept)
        if size > room:
            kept += await _read_exactly(reader, room)
            return bytes(kept), False  # the rest is never read: the connection is closed
        kept += await _read_exactly(reader, size)
        if await _read_line(reader, "chunk end") not in (b"\r\n", b"\n"):
            raise ProtocolError("chunk data longer than its size line said")


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise EOFError(f"the connection was closed in the middle of a body ({n} bytes announced)") from None


async def _read_at_most(reader: asyncio.StreamReader, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        piece = await reader.read(n - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)


async def _read_until_close(reader: asyncio.StreamReader) -> bytes:
    return await _read_at_most(reader, BODY_KEEP)

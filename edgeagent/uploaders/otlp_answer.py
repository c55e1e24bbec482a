"""What an OTLP/HTTP answer's body says, read from an untrusted receiver.

Owns the two things the uploader takes from a body: the partial-success count
and message of an `ExportLogsServiceResponse` (protobuf, or OTLP/JSON), and the
receiver's explanation of an error (`google.rpc.Status.message`, or the start
of the text). Guarantees: nothing here raises on any body (bad protobuf, bad
JSON, JSON nested beyond the recursion limit, numbers like `1e400`); counts are
integers in [0, 2**63); text is printable and at most 300 characters.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from edgeagent.otlp import DecodeError, iter_fields
from edgeagent.uploaders.http11 import Response, printable

log = logging.getLogger(__name__)

_EXCERPT = 300
_INT_RE = re.compile(r"-?[0-9]+")
_INT64_LIMIT = 1 << 63


def parse_partial_success(body: bytes, content_type: str = "application/x-protobuf") -> tuple[int, str]:
    """(rejected_log_records, error_message) from an ExportLogsServiceResponse
    (protobuf, or JSON when the receiver answers JSON). (0, "") when absent or
    unreadable: a 2xx is a delivery whatever its body. The count is an integer
    in [0, 2**63) whatever the body says; the message is printable and short.
    The caller bounds the count by the records it sent."""
    if not body:
        return 0, ""
    try:
        if "json" in content_type.lower():
            rejected, message = _json_partial_success(json.loads(body))
        else:
            rejected, message = _protobuf_partial_success(body)
    except (DecodeError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        log.warning("unreadable OTLP response body (%s); counting the request as fully accepted", printable(str(e)))
        return 0, ""
    if rejected is None:
        log.warning("OTLP partial success with an unreadable rejected count; counting it as 0")
        rejected = 0
    elif not 0 <= rejected < _INT64_LIMIT:
        log.warning("OTLP partial success with rejected count %s out of range; clamped", printable(str(rejected), 40))
        rejected = min(max(rejected, 0), _INT64_LIMIT - 1)
    return rejected, printable(message, _EXCERPT)


def _json_partial_success(document: Any) -> tuple[int | None, str]:
    partial = document.get("partialSuccess") if isinstance(document, dict) else None
    if not isinstance(partial, dict):
        return 0, ""
    message = partial.get("errorMessage")
    return _json_int(partial.get("rejectedLogRecords", 0)), message if isinstance(message, str) else ""


def _json_int(value: Any) -> int | None:
    """An int64 as OTLP/JSON writes it (a number or a decimal string); None for anything else.
    Infinite or huge numbers come back huge (clamped by the caller), never as an exception."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return _INT64_LIMIT if math.isinf(value) and value > 0 else -1 if math.isinf(value) else int(value)
    if isinstance(value, str) and _INT_RE.fullmatch(value):
        return int(value) if len(value) <= 20 else _INT64_LIMIT * (-1 if value.startswith("-") else 1)
    return None


def _protobuf_partial_success(body: bytes) -> tuple[int, str]:
    rejected, message = 0, ""
    for field_no, wire, start, end in iter_fields(body):
        if field_no == 1 and wire == 2:  # partial_success
            for f, w, s, e in iter_fields(body, start, end):
                if f == 1 and w == 0:
                    rejected = e - (1 << 64) if e >= 1 << 63 else e
                elif f == 2 and w == 2:
                    message = body[s : min(e, s + 4 * _EXCERPT)].decode("utf-8", "replace")
    return rejected, message


def explanation(response: Response) -> str:
    """The receiver's explanation: google.rpc.Status.message for a protobuf
    body, else the start of the text."""
    body = response.body
    if not body:
        return "(empty body)"
    if "protobuf" in response.headers.get("content-type", ""):
        try:
            for f, w, s, e in iter_fields(body):
                if f == 2 and w == 2:
                    return printable(body[s:e].decode("utf-8", "replace"), _EXCERPT)
        except DecodeError:
            pass
    text = body[:_EXCERPT].decode("utf-8", "replace")
    return printable(" ".join(text.split()), _EXCERPT) or "(blank body)"

"""The fleet status report (docs/fleet.md, "Status").

Owns the status document published retained on `[fleet] status_topic` and
shown by `edgeagent status`. Guarantees: the fields of the contract
(`state`, `version`, `applied_version`, `config_hash`, `reason`, `at`,
`agent_version`, `boot_id`) are always present, never null; nothing that looks
like a secret survives in `reason`; two reports that differ only in `at` are
the same report (`same_report`), so a report is sent on change only.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from edgeagent import __version__

STATES = ("applying", "applied", "rejected", "failed", "rolled_back")
MAX_REASON = 1000
_SECRET_RE = re.compile(r"((?:password|secret|token|authorization)[^=:]*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)", re.I)


def rfc3339_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def redact(text: str) -> str:
    return _SECRET_RE.sub(lambda m: m.group(1) + "'<redacted>'", text)[:MAX_REASON]


def document(
    state: str,
    *,
    version: int,
    scope: str,
    applied_version: int,
    config_hash: str,
    layers: dict[str, int],
    reason: str,
    boot_id: str,
) -> dict[str, Any]:
    assert state in STATES, state
    return {
        "state": state,
        "version": version,
        "scope": scope,
        "applied_version": applied_version,
        "config_hash": config_hash,
        "layers": layers,
        "reason": redact(reason),
        "at": rfc3339_now(),
        "agent_version": __version__,
        "boot_id": boot_id,
    }


def same_report(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "at"} == {k: v for k, v in b.items() if k != "at"}


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()

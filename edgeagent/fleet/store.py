"""Persistent fleet state in `state_dir/fleet/state.toml`.

Owns what the device remembers about remote config across restarts: the
layers in effect, the last good layers, the rejected versions per scope, the
probation marker and the last status reported. Guarantees:

- every change is one atomic replacement of the file (written with tomli-w to
  a temporary file, fsynced, renamed over the old one, the directory fsynced),
  so a crash or power cut leaves either the old or the new state, never a mix;
- the directory is 0700 and the file 0600 (remote config may name paths);
- a state file that cannot be read is set aside (`state.toml.corrupt`) and the
  device starts from its local config alone, which is always a safe fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

log = logging.getLogger(__name__)

MAX_REJECTED_PER_SCOPE = 32


@dataclass(frozen=True)
class Layer:
    """One accepted remote layer: `scope` is `device:ID` or `group:NAME`."""

    scope: str
    version: int
    table: dict[str, Any]


@dataclass
class FleetState:
    applied: dict[str, Layer] = field(default_factory=dict)
    last_good: dict[str, Layer] = field(default_factory=dict)
    rejected: dict[str, list[int]] = field(default_factory=dict)
    probation: dict[str, Any] | None = None  # {"scope", "version", "reason", "started_at"} while on trial
    status: dict[str, Any] = field(default_factory=dict)  # the last status report

    def highest_seen(self, scope: str) -> int:
        applied = self.applied.get(scope)
        return max([applied.version if applied else 0, *self.rejected.get(scope, [])])

    def reject(self, scope: str, version: int) -> None:
        versions = sorted({*self.rejected.get(scope, []), version})
        self.rejected[scope] = versions[-MAX_REJECTED_PER_SCOPE:]


def layers_hash(layers: dict[str, Layer]) -> str:
    """sha256 of the effective remote layers (scope, version, table), '' when there are none."""
    if not layers:
        return ""
    data = [[scope, layer.version, layer.table] for scope, layer in sorted(layers.items())]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class FleetStore:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "fleet"
        self.path = self.directory / "state.toml"

    def load(self) -> FleetState:
        try:
            data = tomllib.loads(self.path.read_text(encoding="utf-8"))
            return _from_plain(data)
        except FileNotFoundError:
            return FleetState()
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
            aside = self.path.with_name("state.toml.corrupt")
            log.error("fleet: %s unreadable (%s); moved to %s, using the local config alone", self.path, e, aside)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return FleetState()

    def save(self, state: FleetState) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.path, tomli_w.dumps(_to_plain(state)).encode())


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _layers_plain(layers: dict[str, Layer]) -> dict[str, Any]:
    return {scope: {"version": layer.version, "config": layer.table} for scope, layer in layers.items()}


def _layers_from(data: dict[str, Any]) -> dict[str, Layer]:
    return {scope: Layer(scope, int(item["version"]), dict(item["config"])) for scope, item in data.items()}


def _to_plain(state: FleetState) -> dict[str, Any]:
    out: dict[str, Any] = {
        "applied": _layers_plain(state.applied),
        "last_good": _layers_plain(state.last_good),
        "rejected": state.rejected,
        "status": state.status,
    }
    if state.probation is not None:
        out["probation"] = state.probation
    return out


def _from_plain(data: dict[str, Any]) -> FleetState:
    return FleetState(
        applied=_layers_from(data.get("applied", {})),
        last_good=_layers_from(data.get("last_good", {})),
        rejected={scope: [int(v) for v in versions] for scope, versions in data.get("rejected", {}).items()},
        probation=data.get("probation"),
        status=dict(data.get("status", {})),
    )

"""The local policy that remote config must pass after it parsed.

Owns the rules of docs/fleet.md, "What remote config may set". Guarantees:

- a remote layer may set only what `[fleet] allow` lists (a section name
  covers its keys; `section.key` covers one key);
- it can never set `state_dir`, `device_id`, `[fleet]`, TLS files,
  `tls_insecure`, identities, credentials or secrets (also not through `allow`);
- the broker URL and the collector endpoint need their own `allow` entry
  (`mqtt.url`, `otlp_http.endpoint`); a section entry does not cover them;
- every `[[files]] include` stays within `allowed_paths`: `..` is refused,
  the pattern's directories are resolved (symlinks followed) before matching,
  and so is every file the pattern matches today;
- keys are checked in document order and the first offending one is named.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from typing import Any

from edgeagent.config import LOCAL_ONLY_KEYS, REDACTED, SECRET_KEYS, SECTION_TYPES, Config, FleetConfig
from edgeagent.errors import PolicyError

# Which keys are local-only is said once, where each key is defined (config.LOCAL_ONLY and SECRET metadata).
NEVER = LOCAL_ONLY_KEYS
EXPLICIT_ONLY = frozenset({"mqtt.url", "otlp_http.endpoint"})
_GLOB_CHARS = frozenset("*?[")


def check(layer: dict[str, Any], fleet: FleetConfig) -> None:
    """Raise PolicyError naming the first key of `layer` the policy forbids."""
    allow = set(fleet.allow)
    for top, value in layer.items():
        if top in SECTION_TYPES and isinstance(value, dict):
            for key, sub in value.items():
                _check_key(f"{top}.{key}", sub, allow)
        else:
            _check_key(top, value, allow)
        if top == "files":
            _check_files(value, fleet)


def _check_key(key: str, value: Any, allow: set[str]) -> None:
    section = key.partition(".")[0]
    if key in NEVER or section in NEVER:
        raise PolicyError(key, _shown(key, value), "never settable by remote config")
    if key in EXPLICIT_ONLY:
        if key not in allow:
            raise PolicyError(key, value, f"not allowed: [fleet] allow must name {key!r} itself")
        return
    if key not in allow and section not in allow:
        raise PolicyError(key, _shown(key, value), f"not allowed by [fleet] allow = {sorted(allow)!r}")


def _shown(key: str, value: Any) -> Any:
    """Never echo what could be a secret back into a status report."""
    return REDACTED if key in SECRET_KEYS and value else value


def _check_files(value: Any, fleet: FleetConfig) -> None:
    if not isinstance(value, list):
        return  # the parser already refused it
    allowed = [_resolve_pattern(p) for p in fleet.allowed_paths]
    for i, table in enumerate(value):
        includes = table.get("include", []) if isinstance(table, dict) else []
        for pattern in [includes] if isinstance(includes, str) else includes:
            key = f"files[{i}].include"
            if not allowed:
                raise PolicyError(key, pattern, "remote [[files]] need [fleet] allowed_paths, which is empty")
            if ".." in pattern.split("/"):
                raise PolicyError(key, pattern, "'..' is not allowed in remote paths")
            resolved = _resolve_pattern(pattern)
            if not _within(resolved, allowed):
                raise PolicyError(key, pattern, f"resolves to {resolved!r}, outside [fleet] allowed_paths")
            for match in glob.glob(resolved):
                real = os.path.realpath(match)
                if not _within(real, allowed):
                    raise PolicyError(key, pattern, f"matches {match!r} -> {real!r}, outside [fleet] allowed_paths")


def _resolve_pattern(pattern: str) -> str:
    """Follow symlinks in the literal directories of a glob pattern."""
    parts = pattern.split("/")
    literal = 0
    while literal < len(parts) - 1 and not _GLOB_CHARS & set(parts[literal]):
        literal += 1
    head = os.path.realpath("/".join(parts[:literal]) or "/")
    return "/".join([head.rstrip("/"), *parts[literal:]])


def _within(path: str, allowed: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in allowed)


def connectivity_change(old: Config, new: Config) -> str:
    """Which connectivity settings differ ('' if none): these applies go on probation."""
    changed = [name for name in ("upload", "mqtt", "otlp_http") if getattr(old, name) != getattr(new, name)]
    if old.upload.to == new.upload.to and "upload" in changed:
        changed.remove("upload")  # window, rate and retry timing do not decide reachability
    return ", ".join(changed)

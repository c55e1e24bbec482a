"""The kinds of config values and how each is checked: durations, sizes,
syslog priorities, choices, regexes, secrets, and the URLs and listen
addresses the config names. Each parser raises ValueError saying what was
expected; the loader turns that into a ConfigError naming the file, line and key.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from edgeagent.records import SYSLOG_LEVEL_NAMES

# --- value kinds ----------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "k": 1024,
    "K": 1024,
    "KiB": 1024,
    "M": 1024**2,
    "MiB": 1024**2,
    "G": 1024**3,
    "GiB": 1024**3,
}


def parse_duration(value: Any) -> float:
    """'500ms', '5s', '2m', '1h', '1d' -> seconds. A bare number is seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError('a duration like "500ms", "5s", "2m", "1h"')


def parse_size(value: Any) -> int:
    """'64MiB', '512KiB', '1GB', 4096 -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError('a size like "64MiB", "512KiB", "1GB" or a number of bytes')


def parse_priority(value: Any) -> int:
    """A syslog level name ('warning') or number 0-7."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 7:
        return value
    if isinstance(value, str):
        if value.strip().isdigit() and 0 <= int(value) <= 7:
            return int(value)
        level = SYSLOG_LEVEL_NAMES.get(value.strip().lower())
        if level is not None:
            return level
    names = ", ".join(sorted(set(SYSLOG_LEVEL_NAMES) - {"error", "warn"}, key=lambda name: SYSLOG_LEVEL_NAMES[name]))
    raise ValueError(f"a priority name ({names}) or a number 0-7")


def _choice(*choices: str) -> dict[str, Any]:
    return {"kind": "choice", "choices": choices}


# Never settable by remote (fleet) config, whatever `[fleet] allow` says: the device's identity and state,
# what it executes or opens as a device, its TLS material and its credentials (docs/fleet.md).
LOCAL_ONLY = {"local_only": True}
# A secret's value never appears in output: check-config, errors, logs, status. Secrets are local-only too.
SECRET = {"secret": True, "local_only": True}
REDACTED = "<redacted>"

DURATION = {"kind": "duration"}
SIZE = {"kind": "size"}
PRIORITY = {"kind": "priority"}
REGEX = {"kind": "regex"}


# --- URLs -------------------------------------------------------------------------


class Address(NamedTuple):
    """Where a URL points: scheme, host (an IPv6 literal without brackets),
    port (the scheme's default when the URL has none), path."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "https")


_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "http": 80, "https": 443}


def display_url(url: str) -> str:
    """`url` with any password in it replaced, fit for errors and logs."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@]*)@", lambda m: m.group(1) + REDACTED + "@", url)


def parse_url(url: str, schemes: tuple[str, ...], with_path: bool) -> Address:
    """Parse and check a broker or collector URL. Raises ValueError saying what
    was expected. Credentials in URLs are refused: they would be shown in every
    error, log line and status (use the username/password or headers keys)."""
    from urllib.parse import urlsplit

    shape = " or ".join(f"{s}://HOST[:PORT]{'[/PATH]' if with_path else ''}" for s in schemes)
    if not isinstance(url, str) or any(c.isspace() for c in url):
        raise ValueError(shape)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        detail = "a port number between 1 and 65535" if "port" in str(e).lower() else shape
        raise ValueError(detail) from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(shape)
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{shape} without credentials (they belong in the username/password or headers keys)")
    if port == 0:
        raise ValueError("a port number between 1 and 65535")
    if not with_path and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"{shape} (no path, query or fragment)")
    if parts.fragment:
        raise ValueError(f"{shape} (no fragment)")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return Address(parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme], path)


# Matched with `re.match` (compiled at first use, then cached by `re`): only a [[syslog]] section needs it.
_LISTEN_PATTERN = r"^(udp|tcp)://(\[[0-9a-fA-F:.]+\]|[^/:\[\]]+):(\d{1,5})$|^(unix|unix-stream)://(/.+)$"


def parse_listen(listen: str) -> tuple[str, str, int]:
    """A [[syslog]] listen address as (transport, host or socket path, port or 0).
    Transports: "udp", "tcp", "unix" (datagram), "unix-stream". Raises ValueError."""
    m = re.match(_LISTEN_PATTERN, listen)
    if m is None or (m.group(3) and not 0 < int(m.group(3)) <= 65535):
        raise ValueError("udp://HOST:PORT, tcp://HOST:PORT, unix:///PATH or unix-stream:///PATH")
    if m.group(1):
        return m.group(1), m.group(2).strip("[]"), int(m.group(3))
    return m.group(4), m.group(5), 0

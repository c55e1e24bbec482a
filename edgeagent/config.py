"""Configuration: the TOML file parsed once into frozen, validated objects.

Every section is a frozen dataclass; a field's `metadata["kind"]` says how its
TOML value is checked and converted (duration, size, choice, ...). Unknown keys
are errors with a did-you-mean. Every error names the file, the line where it
can be found, the dotted key, the bad value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.errors import ConfigError
from edgeagent.records import SYSLOG_LEVEL_NAMES

DEFAULT_CONFIG_PATH = Path("/etc/edgeagent/edgeagent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edgeagent")


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


# --- sections -------------------------------------------------------------------


@dataclass(frozen=True)
class KmsgConfig:
    enabled: bool = True
    min_priority: int = field(default=6, metadata=PRIORITY)  # info
    path: str = field(default="/dev/kmsg", metadata=LOCAL_ONLY)
    pstore: bool = True
    pstore_dir: str = field(default="/sys/fs/pstore", metadata=LOCAL_ONLY)
    pstore_clear: bool = False


@dataclass(frozen=True)
class FilesConfig:
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    start_at: str = field(default="end", metadata=_choice("beginning", "end"))
    attributes: dict[str, str] = field(default_factory=dict)
    path_attributes: str = field(default="", metadata=REGEX)  # regex with named groups, or "kubernetes"
    max_line_size: int = field(default=16 * 1024, metadata=SIZE)
    multiline_start: str = field(default="", metadata=REGEX)
    encoding: str = "utf-8"
    partial_line_timeout: float = field(default=5.0, metadata=DURATION)
    rescan_interval: float = field(default=10.0, metadata=DURATION)
    rotate_wait: float = field(default=5.0, metadata=DURATION)  # keep reading a renamed/deleted file this long
    poll_interval: float = field(default=1.0, metadata=DURATION)  # stat polling where inotify is unavailable


@dataclass(frozen=True)
class SyslogConfig:
    listen: str  # udp://HOST:PORT | tcp://HOST:PORT | unix://PATH (datagram) | unix-stream://PATH
    format: str = field(default="auto", metadata=_choice("auto", "rfc5424", "rfc3164"))
    max_message_size: int = field(default=16 * 1024, metadata=SIZE)  # longer messages are cut and marked
    max_connections: int = 256  # TCP and unix-stream: connections beyond are refused
    socket_mode: str = "0666"  # unix sockets: permissions (octal)
    socket_group: str = ""  # unix sockets: group owning the socket; empty: the agent's
    receive_buffer: int = field(default=0, metadata=SIZE)  # UDP and unix datagram SO_RCVBUF; 0: the system's


@dataclass(frozen=True)
class JournaldConfig:
    enabled: bool = False
    directory: str = ""  # empty: this machine's journal; else a journal directory to read
    units: tuple[str, ...] = ()  # only these units; empty: all
    min_priority: int = field(default=7, metadata=PRIORITY)  # debug
    matches: tuple[str, ...] = ()  # journalctl matches (FIELD=VALUE, or "+" for OR), ANDed with units
    system_only: bool = False  # only the system journal, not the users' journals
    start_at: str = field(default="beginning", metadata=_choice("beginning", "end"))  # with no stored cursor
    max_message_size: int = field(default=64 * 1024, metadata=SIZE)  # longer fields are cut and marked
    journalctl: str = field(default="journalctl", metadata=LOCAL_ONLY)  # a program the agent runs


@dataclass(frozen=True)
class SpoolConfig:
    max_size: int = field(default=64 * 1024**2, metadata=SIZE)
    durability: str = field(default="full", metadata=_choice("full", "normal"))
    journal: str = field(default="auto", metadata=_choice("auto", "wal", "exclusive", "rollback"))
    flush_interval: float = field(default=1.0, metadata=DURATION)
    chunk_max_records: int = 20000
    chunk_max_bytes: int = field(default=256 * 1024, metadata=SIZE)
    dead_letters_max: int = field(default=4 * 1024**2, metadata=SIZE)


@dataclass(frozen=True)
class UploadConfig:
    to: str = field(default="mqtt", metadata=_choice("mqtt", "otlp_http", "none"))
    window: int = 8
    max_rate: int = field(default=0, metadata=SIZE)  # bytes per second; 0 = unlimited
    retry_initial: float = field(default=1.0, metadata=DURATION)
    retry_max: float = field(default=300.0, metadata=DURATION)
    shutdown_timeout: float = field(default=5.0, metadata=DURATION)


@dataclass(frozen=True)
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    topic: str = "edgeagent/{device_id}/logs"
    status_topic: str = "edgeagent/{device_id}/status"
    client_id: str = field(default="", metadata=LOCAL_ONLY)  # default: device_id
    username: str = field(default="", metadata=LOCAL_ONLY)
    password: str = field(default="", metadata=SECRET)
    password_file: str = field(default="", metadata=LOCAL_ONLY)  # its content is a secret too (see secret_values)
    protocol: str = field(default="5", metadata=_choice("5", "3.1.1"))
    keepalive: float = field(default=60.0, metadata=DURATION)
    connect_timeout: float = field(default=10.0, metadata=DURATION)
    ack_timeout: float = field(default=120.0, metadata=DURATION)  # no PUBACK and nothing written: reconnect
    first_connect_delay: float = field(default=3.0, metadata=DURATION)  # random wait up to this before the first
    ca_file: str = field(default="", metadata=LOCAL_ONLY)
    cert_file: str = field(default="", metadata=LOCAL_ONLY)
    key_file: str = field(default="", metadata=LOCAL_ONLY)
    tls_insecure: bool = field(default=False, metadata=LOCAL_ONLY)


@dataclass(frozen=True)
class OtlpHttpConfig:
    endpoint: str = "http://127.0.0.1:4318/v1/logs"
    compression: str = field(default="zstd", metadata=_choice("zstd", "gzip", "none"))
    headers: dict[str, str] = field(default_factory=dict, metadata=SECRET)  # values may be tokens
    timeout: float = field(default=30.0, metadata=DURATION)
    connect_timeout: float = field(default=10.0, metadata=DURATION)
    max_request_size: int = field(default=4 * 1024**2, metadata=SIZE)
    ca_file: str = field(default="", metadata=LOCAL_ONLY)
    cert_file: str = field(default="", metadata=LOCAL_ONLY)
    key_file: str = field(default="", metadata=LOCAL_ONLY)
    tls_insecure: bool = field(default=False, metadata=LOCAL_ONLY)


DEFAULT_FLEET_ALLOW = ("log_level", "kmsg", "files", "spool.flush_interval", "upload.max_rate")


@dataclass(frozen=True)
class FleetConfig:
    """Remote config over MQTT (edgeagent/fleet/). Never remotely settable itself."""

    enabled: bool = False
    groups: tuple[str, ...] = ()
    trusted_keys: tuple[str, ...] = ()  # Ed25519 public key files; when set, only signed configs are accepted
    allow: tuple[str, ...] = DEFAULT_FLEET_ALLOW  # what remote config may set: "section" or "section.key"
    allowed_paths: tuple[str, ...] = ()  # globs that remote [[files]] includes must stay within
    probation: float = field(default=120.0, metadata=DURATION)
    probation_always: bool = False  # every apply on probation, not only those touching connectivity
    desired_topic: str = "edgeagent/{device_id}/config/desired"
    group_topic: str = "edgeagent/group/{group}/config/desired"
    status_topic: str = "edgeagent/{device_id}/config/status"


@dataclass(frozen=True)
class Config:
    device_id: str = field(default="", metadata=LOCAL_ONLY)
    state_dir: Path = field(default=DEFAULT_STATE_DIR, metadata=LOCAL_ONLY)
    log_level: str = field(default="info", metadata=_choice("debug", "info", "warning", "error"))
    # "journal": `<N>` priority prefix, no timestamp (systemd); "auto": journal when stderr is the journal
    log_format: str = field(default="auto", metadata=_choice("auto", "journal", "plain"))
    resource: dict[str, str] = field(default_factory=dict)
    kmsg: KmsgConfig = field(default_factory=KmsgConfig)
    files: tuple[FilesConfig, ...] = ()
    syslog: tuple[SyslogConfig, ...] = ()
    journald: JournaldConfig = field(default_factory=JournaldConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    otlp_http: OtlpHttpConfig = field(default_factory=OtlpHttpConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig, metadata=LOCAL_ONLY)
    source_path: str = field(default="", metadata={"internal": True})

    @property
    def spool_path(self) -> Path:
        return self.state_dir / "spool.db"

    @property
    def needs_mqtt_session(self) -> bool:
        """The one place that says who needs the MQTT session: logs over MQTT, or fleet config."""
        return self.upload.to == "mqtt" or self.fleet.enabled

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """The effective configuration, as TOML-ready plain data; secret values
        are replaced by REDACTED unless `redact` is false."""
        return _to_plain(self, redact)


def _to_plain(obj: Any, redact: bool, secret: bool = False) -> Any:
    if dataclasses.is_dataclass(obj):
        return {
            f.name: _to_plain(getattr(obj, f.name), redact, bool(f.metadata.get("secret")))
            for f in dataclasses.fields(obj)
            if not f.metadata.get("internal")
        }
    if isinstance(obj, tuple):
        return [_to_plain(x, redact, secret) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v, redact, secret) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if secret and redact and obj:
        return REDACTED
    return obj


SECTION_TYPES: dict[str, type] = {
    "kmsg": KmsgConfig,
    "files": FilesConfig,
    "syslog": SyslogConfig,
    "journald": JournaldConfig,
    "spool": SpoolConfig,
    "upload": UploadConfig,
    "mqtt": MqttConfig,
    "otlp_http": OtlpHttpConfig,
    "fleet": FleetConfig,
}


def _keys_marked(flag: str) -> frozenset[str]:
    """Dotted names ("mqtt.password", "state_dir") of the config keys whose metadata sets `flag`."""
    keys = {f.name for f in dataclasses.fields(Config) if f.metadata.get(flag)}
    for section, cls in SECTION_TYPES.items():
        keys.update(f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.metadata.get(flag))
    return frozenset(keys)


SECRET_KEYS = _keys_marked("secret")
LOCAL_ONLY_KEYS = _keys_marked("local_only")


def secret_values(config: Config) -> set[str]:
    """Every secret the config holds, for redacting output: the values of
    fields marked SECRET and the content of `mqtt.password_file`. Values
    shorter than 4 characters are left out: redacting them would mangle every
    log line that happens to contain those letters."""
    found: set[str] = set()

    def walk(obj: Any, secret: bool) -> None:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), secret or bool(f.metadata.get("secret")))
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                walk(item, secret)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item, secret)
        elif secret and isinstance(obj, str):
            found.add(obj)
            # "Bearer abc" is often echoed as just "abc" by a receiver.
            found.update(part for part in obj.split() if part != obj)

    walk(config, False)
    if config.mqtt.password_file:
        try:
            found.add(Path(config.mqtt.password_file).read_text(encoding="utf-8").rstrip("\r\n"))
        except (OSError, UnicodeDecodeError):
            pass
    return {value for value in found if len(value) >= 4}


# --- URLs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
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


# --- loading --------------------------------------------------------------------


def default_config_path() -> Path:
    env = os.environ.get("EDGEAGENT_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def default_device_id() -> str:
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
        if machine_id:
            return machine_id
    except OSError:
        pass
    return socket.gethostname()


def load(path: Path | str, overlay: dict[str, Any] | None = None) -> Config:
    """Read, validate and convert the config file at `path`.

    `overlay` (for example fleet config pushed over MQTT) is merged over the
    file's tables before validation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (set -c FILE or $EDGEAGENT_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    return loads(text, str(path), overlay, base_dir=path.parent)


def loads(
    text: str, source: str = "<config>", overlay: dict[str, Any] | None = None, base_dir: Path | None = None
) -> Config:
    """Parse config text. Relative paths (state_dir, files globs) are taken
    relative to `base_dir`, the config file's directory."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    if overlay:
        data = _merge(data, overlay)
    loader = _Loader(source, text)
    config: Config = loader.section(Config, data, "")
    if not config.device_id:
        config = dataclasses.replace(config, device_id=default_device_id())
    config = dataclasses.replace(config, source_path=source)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir.resolve())
    _check_cross_fields(config, loader)
    return config


def _resolve_paths(config: Config, base: Path) -> Config:
    def absolute(pattern: str) -> str:
        return pattern if pattern.startswith("/") else os.path.normpath(base / pattern)

    # `exclude` patterns are not paths: one without a "/" matches file names (docs/files.md).
    files = tuple(dataclasses.replace(f, include=tuple(map(absolute, f.include))) for f in config.files)
    fleet = dataclasses.replace(config.fleet, trusted_keys=tuple(map(absolute, config.fleet.trusted_keys)))
    return dataclasses.replace(config, state_dir=Path(absolute(str(config.state_dir))), files=files, fleet=fleet)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_cross_fields(config: Config, loader: _Loader) -> None:
    if config.upload.window < 1:
        loader.fail("upload.window", config.upload.window, "a whole number of chunks, at least 1")
    if config.spool.chunk_max_records < 1:
        loader.fail("spool.chunk_max_records", config.spool.chunk_max_records, "at least 1")
    if config.spool.max_size < 1024 * 1024:
        loader.fail("spool.max_size", config.spool.max_size, "at least 1MiB")
    # [mqtt] is the one connection for logs and fleet config: checked whatever upload.to says.
    for key, url, schemes, with_path in (
        ("mqtt.url", config.mqtt.url, ("mqtt", "mqtts"), False),
        ("otlp_http.endpoint", config.otlp_http.endpoint, ("http", "https"), True),
    ):
        try:
            parse_url(url, schemes, with_path)
        except ValueError as e:
            loader.fail(key, display_url(url), str(e))
    for i, files in enumerate(config.files):
        if not files.include:
            loader.fail(f"files[{i}].include", [], "at least one glob pattern")
        for pattern in files.include:
            if not pattern.startswith("/"):
                loader.fail(f"files[{i}].include", pattern, "absolute path patterns")
    _check_fleet(config.fleet, loader)
    _check_syslog(config, loader)


_TOPIC_LEVEL_RE = re.compile(r"^[^#+\x00/]+$")


def _check_fleet(fleet: FleetConfig, loader: _Loader) -> None:
    for group in fleet.groups:
        if not _TOPIC_LEVEL_RE.match(group):
            loader.fail("fleet.groups", group, "group names usable as one MQTT topic level (no '/', '+', '#')")
    for name in ("desired_topic", "group_topic", "status_topic"):
        topic = getattr(fleet, name)
        if not topic or "+" in topic or "#" in topic:
            loader.fail(f"fleet.{name}", topic, "an exact MQTT topic (no wildcards '+' or '#')")
    if "{group}" not in fleet.group_topic:
        loader.fail("fleet.group_topic", fleet.group_topic, "a topic containing {group}")
    known = {f.name: f.type for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    for entry in fleet.allow:
        section, _, key = entry.partition(".")
        sub = SECTION_TYPES.get(section)
        if section not in known or (key and (sub is None or key not in {f.name for f in dataclasses.fields(sub)})):
            loader.fail("fleet.allow", entry, "names of config sections or keys, like 'kmsg' or 'spool.flush_interval'")
    for pattern in fleet.allowed_paths:
        if not pattern.startswith("/"):
            loader.fail("fleet.allowed_paths", pattern, "absolute path patterns")
    if fleet.probation <= 0:
        loader.fail("fleet.probation", fleet.probation, "a duration above zero")


_LISTEN_RE = re.compile(r"^(udp|tcp)://(\[[0-9a-fA-F:.]+\]|[^/:\[\]]+):(\d{1,5})$|^(unix|unix-stream)://(/.+)$")


def parse_listen(listen: str) -> tuple[str, str, int]:
    """A [[syslog]] listen address as (transport, host or socket path, port or 0).
    Transports: "udp", "tcp", "unix" (datagram), "unix-stream". Raises ValueError."""
    m = _LISTEN_RE.match(listen)
    if m is None or (m.group(3) and not 0 < int(m.group(3)) <= 65535):
        raise ValueError("udp://HOST:PORT, tcp://HOST:PORT, unix:///PATH or unix-stream:///PATH")
    if m.group(1):
        return m.group(1), m.group(2).strip("[]"), int(m.group(3))
    return m.group(4), m.group(5), 0


def _check_syslog(config: Config, loader: _Loader) -> None:
    for i, syslog in enumerate(config.syslog):
        try:
            parse_listen(syslog.listen)
        except ValueError as e:
            loader.fail(f"syslog[{i}].listen", syslog.listen, str(e))
        if not re.fullmatch(r"0?[0-7]{3}", syslog.socket_mode):
            loader.fail(f"syslog[{i}].socket_mode", syslog.socket_mode, 'octal permissions like "0660"')
        if syslog.max_connections < 1:
            loader.fail(f"syslog[{i}].max_connections", syslog.max_connections, "at least 1")
        if syslog.max_message_size < 480:
            loader.fail(f"syslog[{i}].max_message_size", syslog.max_message_size, "at least 480 bytes (RFC 5424)")
    for match in config.journald.matches:
        if not re.fullmatch(r"[A-Z0-9_]+=.*|\+", match, re.DOTALL):
            loader.fail("journald.matches", match, 'FIELD=VALUE (upper-case field name), or "+" (OR)')
    if config.journald.max_message_size < 1024:
        loader.fail("journald.max_message_size", config.journald.max_message_size, "at least 1KiB")


class _Loader:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = text.splitlines()
        self._secret_keys: set[str] = set()

    def fail(self, key: str, value: Any, expected: str) -> typing.NoReturn:
        where = self._line_of(key)
        at = f":{where}" if where else ""
        secret = any(key == k or key.startswith(k + ".") for k in self._secret_keys)
        shown = REDACTED if secret else repr(value)
        raise ConfigError(f"{self.source}{at}: {key} = {shown}: expected {expected}")

    def _line_of(self, dotted: str) -> int | None:
        """Best-effort line number of a key: the first `name =` after its table header."""
        name = re.sub(r"\[\d+\]", "", dotted).split(".")
        leaf = name[-1]
        tables = ".".join(name[:-1])
        in_table = not tables
        for number, line in enumerate(self.lines, 1):
            stripped = line.strip()
            header = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", stripped)
            if header:
                in_table = header.group(1) == tables
                continue
            if in_table and re.match(rf'^"?{re.escape(leaf)}"?\s*=', stripped):
                return number
        if "." in dotted:  # a key inside an inline table: the line of the table's key
            return self._line_of(dotted.rsplit(".", 1)[0])
        return None

    def section(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, dict):
            self.fail(prefix.rstrip("."), data, "a table")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for key in data:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known = ", ".join(fields)
                where = self._line_of(prefix + key)
                at = f":{where}" if where else ""
                raise ConfigError(f"{self.source}{at}: unknown key {prefix + key!r}{hint}; known keys here: {known}")
        values = {}
        for name, f in fields.items():
            if name in data:
                values[name] = self.value(hints[name], f.metadata, data[name], prefix + name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(prefix + name, None, "this required key to be set")
        return cls(**values)

    def value(self, hint: Any, meta: Any, raw: Any, key: str) -> Any:
        kind = meta.get("kind")
        if meta.get("secret"):
            self._secret_keys.add(key)
        try:
            if kind == "duration":
                return parse_duration(raw)
            if kind == "size":
                return parse_size(raw)
            if kind == "priority":
                return parse_priority(raw)
            if kind == "choice":
                if raw not in meta["choices"]:
                    close = difflib.get_close_matches(str(raw), meta["choices"], n=1)
                    hint_text = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(" or ".join(repr(c) for c in meta["choices"]) + hint_text)
                return raw
            if kind == "regex":
                if not isinstance(raw, str):
                    raise ValueError("a regular expression string")
                if raw and raw != "kubernetes":
                    try:
                        re.compile(raw)
                    except re.error as e:
                        raise ValueError(f"a valid regular expression ({e})") from None
                return raw
        except ValueError as e:
            self.fail(key, raw, str(e))
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.section(hint, raw, key + ".")
        origin = typing.get_origin(hint)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            if isinstance(raw, str) and item is str:
                raw = [raw]
            if not isinstance(raw, list):
                self.fail(key, raw, "a list")
            return tuple(self.value(item, {}, x, f"{key}[{i}]") for i, x in enumerate(raw))
        if origin is dict:
            if not isinstance(raw, dict):
                self.fail(key, raw, "a table of strings")
            return {str(k): self.value(str, {}, v, f"{key}.{k}") for k, v in raw.items()}
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                self.fail(key, raw, "a path")
            return Path(raw)
        if hint is bool:
            if not isinstance(raw, bool):
                self.fail(key, raw, "true or false")
            return raw
        if hint is int:
            if not isinstance(raw, int) or isinstance(raw, bool):
                self.fail(key, raw, "a whole number")
            return raw
        if hint is float:
            if not isinstance(raw, (int, float)) or isinstance(raw, bool):
                self.fail(key, raw, "a number")
            return float(raw)
        if hint is str:
            if isinstance(raw, (int, float)) and not isinstance(raw, bool) and key.endswith("protocol"):
                raw = str(raw)
            if not isinstance(raw, str):
                self.fail(key, raw, "a string")
            return raw
        if isinstance(hint, types.UnionType):  # pragma: no cover - no unions in sections yet
            return raw
        raise ConfigError(f"{self.source}: internal: no converter for {key} ({hint})")


# --- checks that need the files a config names ----------------------------------------------------


def error_at(config: Config, key: str, value: Any, expected: str) -> ConfigError:
    """A ConfigError naming `key` at its line in the config file, like parse errors do."""
    try:
        text = Path(config.source_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    try:
        _Loader(config.source_path, text).fail(key, value, expected)
    except ConfigError as e:
        return e


def check_mqtt_files(config: Config) -> None:
    """What parsing cannot see in [mqtt]: the password file and the TLS files
    exist, can be read and hold what they should. Raises ConfigError."""
    mqtt = config.mqtt
    if mqtt.password and mqtt.password_file:
        raise error_at(config, "mqtt.password_file", mqtt.password_file, "either mqtt.password or mqtt.password_file")
    if mqtt.password_file:
        try:
            secret = Path(mqtt.password_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise error_at(config, "mqtt.password_file", mqtt.password_file, f"a readable file ({_why(e)})") from None
        if not secret:
            raise error_at(config, "mqtt.password_file", mqtt.password_file, "a file holding the password, not empty")
    tls_files = {"ca_file": mqtt.ca_file, "cert_file": mqtt.cert_file, "key_file": mqtt.key_file}
    address = parse_url(mqtt.url, ("mqtt", "mqtts"), False)
    if not address.tls:
        for name, path in tls_files.items():
            if path:
                raise error_at(
                    config, f"mqtt.{name}", path, "mqtt.url to start with mqtts:// (TLS) when TLS files are set"
                )
        return
    if mqtt.key_file and not mqtt.cert_file:
        raise error_at(config, "mqtt.key_file", mqtt.key_file, "mqtt.cert_file as well (the client certificate)")
    import ssl  # only here: ssl costs RAM, and most of the agent never needs it

    try:
        context = ssl.create_default_context(cafile=mqtt.ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise error_at(config, "mqtt.ca_file", mqtt.ca_file, f"a readable PEM file of CA certificates ({_why(e)})")
    if mqtt.cert_file:
        try:
            context.load_cert_chain(mqtt.cert_file, mqtt.key_file or None)
        except (OSError, ssl.SSLError) as e:
            raise error_at(
                config, "mqtt.cert_file", mqtt.cert_file, f"a readable client certificate matching its key ({_why(e)})"
            )


def _why(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__

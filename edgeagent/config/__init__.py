"""Configuration: the TOML file parsed once into frozen, validated objects.

Every section is a frozen dataclass; a field's `metadata["kind"]` says how its
TOML value is checked and converted (duration, size, choice, ...). Unknown keys
are errors with a did-you-mean. Every error names the file, the line where it
can be found, the dotted key, the bad value and what was expected.

This module holds the sections, `Config` and loading (`load`, `loads`, checks
across keys); `values` the value kinds, URLs and listen addresses; `loader`
the conversion of TOML tables and the errors at a key's line; `files` the
checks that need the files a config names. Every public name is importable
from `edgeagent.config`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.config.files import check_mqtt_files as check_mqtt_files
from edgeagent.config.loader import _Loader
from edgeagent.config.loader import error_at as error_at
from edgeagent.config.values import (
    DURATION,
    LOCAL_ONLY,
    PRIORITY,
    REDACTED,
    REGEX,
    SECRET,
    SIZE,
    _choice,
    display_url,
    parse_listen,
    parse_url,
)
from edgeagent.config.values import Address as Address
from edgeagent.config.values import parse_duration as parse_duration
from edgeagent.config.values import parse_priority as parse_priority
from edgeagent.config.values import parse_size as parse_size
from edgeagent.errors import ConfigError as ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/edgeagent/edgeagent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edgeagent")


# --- sections -------------------------------------------------------------------


@dataclass(frozen=True)
class KmsgConfig:
    """`[kmsg]`: the kernel log (/dev/kmsg) and the crash logs pstore kept from the last boot."""

    enabled: bool = True
    min_priority: int = field(default=6, metadata=PRIORITY)  # info
    path: str = field(default="/dev/kmsg", metadata=LOCAL_ONLY)
    pstore: bool = True
    pstore_dir: str = field(default="/sys/fs/pstore", metadata=LOCAL_ONLY)
    pstore_clear: bool = False


@dataclass(frozen=True)
class FilesConfig:
    """One `[[files]]` entry: log files to follow (globs), through rotation."""

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
    """One `[[syslog]]` entry: a syslog listener (UDP, TCP or a unix socket)."""

    listen: str  # udp://HOST:PORT | tcp://HOST:PORT | unix://PATH (datagram) | unix-stream://PATH
    format: str = field(default="auto", metadata=_choice("auto", "rfc5424", "rfc3164"))
    max_message_size: int = field(default=16 * 1024, metadata=SIZE)  # longer messages are cut and marked
    max_connections: int = 256  # TCP and unix-stream: connections beyond are refused
    socket_mode: str = "0666"  # unix sockets: permissions (octal)
    socket_group: str = ""  # unix sockets: group owning the socket; empty: the agent's
    receive_buffer: int = field(default=0, metadata=SIZE)  # UDP and unix datagram SO_RCVBUF; 0: the system's


@dataclass(frozen=True)
class JournaldConfig:
    """`[journald]`: the systemd journal, read through journalctl."""

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
    """`[spool]`: the on-disk spool (size cap, durability, chunking)."""

    max_size: int = field(default=64 * 1024**2, metadata=SIZE)
    durability: str = field(default="full", metadata=_choice("full", "normal"))
    journal: str = field(default="auto", metadata=_choice("auto", "wal", "exclusive", "rollback"))
    flush_interval: float = field(default=1.0, metadata=DURATION)
    # File lines (still in their files) may wait in RAM this long for delivery before they are written;
    # 0: never held, committed with their positions every flush_interval (exactly once across a crash).
    hold_file_lines: float = field(default=30.0, metadata=DURATION)
    # File lines are cut into chunks at this age when it is above flush_interval (metered links: fewer, better
    # compressed uploads); kernel messages and other records keep flush_interval.
    file_flush_interval: float = field(default=0.0, metadata=DURATION)
    chunk_max_records: int = 20000
    chunk_max_bytes: int = field(default=256 * 1024, metadata=SIZE)
    dead_letters_max: int = field(default=4 * 1024**2, metadata=SIZE)


@dataclass(frozen=True)
class UploadConfig:
    """`[upload]`: where chunks go and how fast, how retries back off."""

    to: str = field(default="mqtt", metadata=_choice("mqtt", "otlp_http", "none"))
    window: int = 8
    max_rate: int = field(default=0, metadata=SIZE)  # bytes per second; 0 = unlimited
    retry_initial: float = field(default=1.0, metadata=DURATION)
    retry_max: float = field(default=300.0, metadata=DURATION)
    shutdown_timeout: float = field(default=5.0, metadata=DURATION)


@dataclass(frozen=True)
class MqttConfig:
    """`[mqtt]`: the broker connection, its topics, credentials and TLS files."""

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
    """`[otlp_http]`: the OTLP/HTTP collector endpoint, its headers and TLS files."""

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
    """The whole configuration: top-level keys and one field per section."""

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

    @property
    def uses_tls(self) -> bool:
        """Whether an endpoint the agent talks to needs TLS (without it, `ssl` stays out: edgeagent.tls)."""
        mqtts = self.needs_mqtt_session and self.mqtt.url.lower().startswith("mqtts:")
        return mqtts or (self.upload.to == "otlp_http" and self.otlp_http.endpoint.lower().startswith("https:"))

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


_TOPIC_LEVEL_PATTERN = r"^[^#+\x00/]+$"  # matched with `re.match`: compiled only for fleet groups


def _check_fleet(fleet: FleetConfig, loader: _Loader) -> None:
    for group in fleet.groups:
        if not re.match(_TOPIC_LEVEL_PATTERN, group):
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
    _check_journald(config.journald, loader)


def _check_journald(journald: JournaldConfig, loader: _Loader) -> None:
    for unit in journald.units:
        # journalctl expands a pattern against the units already in the journal when it starts: a unit that
        # matches and logs for the first time later is not followed (its entries were lost, docs/journald.md).
        if not unit or re.search(r"[*?[]", unit):
            loader.fail("journald.units", unit, "a unit name (not a pattern: list each unit)")
    for match in journald.matches:
        if not re.fullmatch(r"[A-Z0-9_]+=.*|\+", match, re.DOTALL):
            loader.fail("journald.matches", match, 'FIELD=VALUE (upper-case field name), or "+" (OR)')
    if journald.max_message_size < 1024:
        loader.fail("journald.max_message_size", journald.max_message_size, "at least 1KiB")

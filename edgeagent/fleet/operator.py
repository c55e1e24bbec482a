"""The operator side: `edgeagent fleet keygen | push | status`.

A short-lived process on the operator's machine, so it drives paho directly
(its own network thread) and is never imported on the device path. Guarantees:

- `push` parses the config with the agent's own parser before publishing
  (an invalid file never reaches the fleet), signs it when given a key, picks
  a version one above the highest retained on that topic unless told, and
  publishes retained QoS 1, succeeding only on a PUBACK with a success code;
- `push --wait S` prints the devices' reports for exactly that scope and
  version; the exit code is 0 only if every report seen says `applied`
  (and, for `--device`, that device reported within S seconds);
- `status` lists one line per device whose retained status it finds.
"""

from __future__ import annotations

import json
import re
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgeagent.config import ConfigError, FleetConfig, loads
from edgeagent.errors import OperatorError
from edgeagent.fleet.envelope import Envelope, EnvelopeError, decode, generate_keypair, sign
from edgeagent.tls import TlsFileError, TlsFiles, client_context

TERMINAL = ("applied", "rejected", "failed", "rolled_back")
RETAINED_QUIET = 0.5  # retained messages arrive right after SUBACK; this much silence ends them


@dataclass(frozen=True)
class BrokerOptions:
    url: str
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password_file: str = ""


class Connection:
    """A paho MQTT 5 client on its own thread, with blocking helpers."""

    def __init__(self, options: BrokerOptions, timeout: float = 10.0) -> None:
        parts = urlsplit(options.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise OperatorError(f"--broker {options.url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        tls = parts.scheme == "mqtts"
        self.client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgeagent-operator-{time.time_ns():x}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if options.username:
            self.client.username_pw_set(options.username, _read_password(options.password_file))
        if tls or options.ca_file:
            # --key-file is used only with --cert-file (alone it has always been ignored here)
            files = TlsFiles(options.ca_file, options.cert_file, options.key_file if options.cert_file else "")
            try:
                self.client.tls_set_context(client_context(files))
            except TlsFileError as e:
                raise OperatorError(str(e)) from None
        self.messages: list[MQTTMessage] = []
        self.last_message = time.monotonic()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connect_error = ""
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        try:
            self.client.connect(parts.hostname, parts.port or (8883 if tls else 1883), keepalive=30)
        except (OSError, ssl.SSLError) as e:
            raise OperatorError(f"cannot connect to {options.url}: {e}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout) or self._connect_error:
            self.close()
            raise OperatorError(f"cannot connect to {options.url}: {self._connect_error or 'no CONNACK'}")

    def _on_connect(self, client: Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
        self._connected.set()

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)
            self.last_message = time.monotonic()

    def collect_retained(self, topic: str, timeout: float = 3.0) -> list[MQTTMessage]:
        """Subscribe and return what arrives until the topic goes quiet."""
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=1)
        done.wait(timeout)
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with self._lock:
                if time.monotonic() - max(self.last_message, started) > RETAINED_QUIET:
                    break
            time.sleep(0.05)
        with self._lock:
            return list(self.messages)

    def publish_retained(self, topic: str, payload: bytes, timeout: float = 30.0) -> None:
        acked = threading.Event()
        outcome: list[Any] = []

        def on_publish(client: Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
            if mid == info.mid:
                outcome.append(reason)
                acked.set()

        self.client.on_publish = on_publish
        info = self.client.publish(topic, payload, qos=1, retain=True)
        if not acked.wait(timeout):
            raise OperatorError(f"no PUBACK for {topic} within {timeout:g}s")
        if outcome[0].is_failure:
            raise OperatorError(f"the broker refused the publish on {topic}: {outcome[0]}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _read_password(path: str) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\n")
    except OSError as e:
        raise OperatorError(f"--password-file {path}: {e}") from None


def keygen(out: Path) -> str:
    try:
        private, public = generate_keypair(out)
    except FileExistsError:
        raise OperatorError(f"{out} exists; not overwriting a key") from None
    except EnvelopeError as e:
        raise OperatorError(str(e)) from None
    return (
        f"private key: {private} (mode 0600, keep it off the devices)\n"
        f"public key:  {public} (list it in [fleet] trusted_keys)"
    )


def push(
    options: BrokerOptions,
    config_file: Path,
    *,
    device: str = "",
    group: str = "",
    key: str = "",
    version: int = 0,
    wait: float = 0.0,
    topics: FleetConfig | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Publish a desired config; returns (version, the reports collected while waiting)."""
    topics = topics or FleetConfig()
    scope = f"device:{device}" if device else f"group:{group}"
    topic = topics.desired_topic.format(device_id=device) if device else topics.group_topic.format(group=group)
    try:
        text = config_file.read_text(encoding="utf-8")
        loads(text, str(config_file))
    except (OSError, UnicodeDecodeError) as e:
        raise OperatorError(f"{config_file}: {e}") from None
    except ConfigError as e:
        raise OperatorError(f"not pushed: {e}") from None
    conn = Connection(options)
    try:
        if wait:
            conn.client.subscribe(_wildcard(topics.status_topic), qos=1)
        if not version:
            retained = [m for m in conn.collect_retained(topic) if m.topic == topic]
            version = 1 + max([_version_of(m.payload) for m in retained] or [0])
        envelope = Envelope(scope, version, text)
        try:
            if key:
                envelope = sign(envelope, key)
            payload = envelope.encode()
        except EnvelopeError as e:
            raise OperatorError(str(e)) from None
        conn.publish_retained(topic, payload)
        reports = _wait_reports(conn, topics, scope, version, device, wait) if wait else []
    finally:
        conn.close()
    return version, reports


def _version_of(payload: bytes | bytearray) -> int:
    try:
        return decode(payload).version
    except EnvelopeError:
        return 0


def _wait_reports(
    conn: Connection, topics: FleetConfig, scope: str, version: int, device: str, wait: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + wait
    while True:
        reports = {
            r["device"]: r
            for r in _reports(conn, topics)
            if r.get("scope") == scope and r.get("version") == version and r.get("state") in TERMINAL
        }
        if (device and device in reports) or time.monotonic() > deadline:
            return sorted(reports.values(), key=lambda r: r["device"])
        time.sleep(0.1)


def _wildcard(status_topic: str) -> str:
    return status_topic.replace("{device_id}", "+")


def _reports(conn: Connection, topics: FleetConfig) -> list[dict[str, Any]]:
    """The newest report per device among the messages received so far."""
    pattern = re.compile("^" + re.escape(topics.status_topic).replace(re.escape("{device_id}"), "([^/]+)") + "$")
    newest: dict[str, dict[str, Any]] = {}
    with conn._lock:
        messages = list(conn.messages)
    for message in messages:
        match = pattern.match(message.topic)
        if not match:
            continue
        try:
            doc = json.loads(message.payload)
        except ValueError:
            continue
        if isinstance(doc, dict):
            newest[match.group(1)] = {"device": match.group(1), **doc}
    return list(newest.values())


def status(options: BrokerOptions, device: str = "", topics: FleetConfig | None = None) -> list[dict[str, Any]]:
    topics = topics or FleetConfig()
    conn = Connection(options)
    try:
        topic = topics.status_topic.format(device_id=device) if device else _wildcard(topics.status_topic)
        conn.collect_retained(topic)
        return sorted(_reports(conn, topics), key=lambda r: r["device"])
    finally:
        conn.close()


def format_reports(reports: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps(reports, indent=2, sort_keys=True)
    lines = [f"{'DEVICE':<24} {'STATE':<12} {'VERSION':>7} {'APPLIED':>7} {'LAST SEEN':<24} REASON"]
    for r in reports:
        lines.append(
            f"{r['device']:<24} {r.get('state', '?'):<12} {r.get('version', 0):>7} {r.get('applied_version', 0):>7} "
            f"{r.get('at', ''):<24} {r.get('reason', '')}"
        )
    return "\n".join(lines)


def main(args: Any) -> int:
    """Run one `edgeagent fleet` subcommand from parsed arguments; returns the exit code."""
    try:
        if args.fleet_command == "keygen":
            print(keygen(args.out))
            return 0
        options = BrokerOptions(
            args.broker, args.ca_file, args.cert_file, args.key_file, args.username, args.password_file
        )
        if args.fleet_command == "push":
            version, reports = push(
                options,
                args.config_file,
                device=args.device or "",
                group=args.group or "",
                key=args.key or "",
                version=args.version or 0,
                wait=args.wait or 0.0,
            )
            print(f"pushed version {version}", file=sys.stderr)
            if not args.wait:
                return 0
            print(format_reports(reports, False))
            if args.device and not reports:
                print(f"no report from {args.device} within {args.wait:g}s", file=sys.stderr)
                return 3
            return 0 if all(r["state"] == "applied" for r in reports) else 1
        print(format_reports(status(options, args.device or ""), args.json))
        return 0
    except OperatorError as e:
        print(f"edgeagent: error: {e}", file=sys.stderr)
        return 1

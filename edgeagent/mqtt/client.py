"""One paho client per connection, built from `[mqtt]`, and what a broker may not do to it.

Owns: the broker address (host, port, TLS from the URL, IPv6 literals too),
the CONNECT packet (client id, protocol, keepalive, credentials read from
their files at every attempt, the retained last will, and with MQTT 5 the
Maximum Packet Size and Receive Maximum the agent declares), the TLS files and
settings (verification always on; the session keeps the context, made again
when a file changed: `tls.ContextKeeper`), and the reconnect policy by
CONNACK/DISCONNECT reason code.

Guarantee: a packet the broker sends is never buffered beyond
`MAX_INCOMING_PACKET`. paho reads a packet whole (`recv(remaining length)` and
then a growing buffer) and does not check the Maximum Packet Size it declared
for us, so a hostile broker announcing a 250 MiB PUBLISH would make it
allocate all of it. `BoundedClient` refuses the packet as soon as its length
is known: the read fails, paho ends the connection, the session reconnects.

Per message, `BoundedClient` does less than paho: a success PUBACK in one of
its short forms is taken without paho's decoder (whose objects cost more than
the rest of the PUBACK); any other PUBACK goes through paho's decoder and its
checks, and one it cannot decode ends the connection with a reason naming it.
An outgoing packet is queued as a memoryview, so sending it never copies it.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import types
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


def _defer_import(name: str) -> None:
    """Let `import name` succeed at once and run the module's code only when one of its attributes is
    first used (a placeholder module whose PEP 562 `__getattr__` imports the real one and steps aside).

    paho imports `urllib.request` (with `http.client` and `email`: 2.6 MiB of RSS for as long as the agent
    runs) only to read proxy settings when PySocks is installed; without PySocks it never touches it.
    (`importlib.util.LazyLoader` cannot do this on Python 3.11: the import system reads the module's
    `__spec__`, which loads it; the placeholder's is None.)"""
    if name in sys.modules:
        return
    placeholder = types.ModuleType(name)
    placeholder.__spec__ = None

    def load(attribute: str) -> Any:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]
        __import__(name)
        return getattr(sys.modules[name], attribute)

    placeholder.__getattr__ = load  # type: ignore[method-assign]
    sys.modules[name] = placeholder
    parent, _, child = name.rpartition(".")
    __import__(parent)
    setattr(sys.modules[parent], child, placeholder)


_defer_import("urllib.request")

import paho.mqtt.client as paho_client  # noqa: E402
from paho.mqtt.client import Client  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402

# From `properties`, not `exception`: paho 2.2 moved it there and re-exports it; 2.0 and 2.1 (what Debian-based
# images and the QEMU guests install) have no `paho.mqtt.exception`, and the agent failed to start on them.
from paho.mqtt.properties import MalformedPacket, Properties  # noqa: E402
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402

from edgeagent import tls  # noqa: E402
from edgeagent.config import Config  # noqa: E402
from edgeagent.errors import PacketTooLarge  # noqa: E402

if paho_client.ssl is None:  # TLS kept out of this process (see edgeagent.tls)
    paho_client.ssl = tls.ssl_stand_in()

log = logging.getLogger("edgeagent.mqtt")

# What the agent declares in CONNECT (MQTT 5). Incoming messages are fleet configs (capped at
# 64 KiB by the fleet module) and the broker's own packets; nothing legitimate comes near this.
MAX_INCOMING_PACKET = 256 * 1024
# QoS 1/2 PUBLISHes the broker may have unacknowledged towards us at once.
RECEIVE_MAXIMUM = 8
# The smallest Maximum Packet Size taken from a broker (see `sane_max_packet_size`).
MIN_BROKER_PACKET = 4096
# paho asks the socket for this much at most per read (it would ask for the whole packet).
_READ_SIZE = 64 * 1024

# Reason codes (MQTT 5.0, 3.2.2.2 CONNACK and 3.14.2.1 DISCONNECT) that ask for a longer wait.
RC_SERVER_BUSY = 0x89
RC_QUOTA_EXCEEDED = 0x97
RC_USE_ANOTHER_SERVER = 0x9C
RC_SERVER_MOVED = 0x9D
RC_CONNECTION_RATE_EXCEEDED = 0x9F
SLOW_DOWN_CODES = {
    RC_SERVER_BUSY: "server busy",
    RC_QUOTA_EXCEEDED: "quota exceeded",
    RC_USE_ANOTHER_SERVER: "use another server",
    RC_SERVER_MOVED: "server moved",
    RC_CONNECTION_RATE_EXCEEDED: "connection rate exceeded",
}
# After one of those, the next attempt waits at least this long (jittered between half and all
# of it), never more than `[upload].retry_max`: OpAMP recommends 30 s as the minimum retry
# interval for an overloaded server; a cluster shedding load needs the fleet to spread out.
SLOW_DOWN_WAIT = 60.0


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is, from `[mqtt].url` (`broker_address`)."""

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def broker_address(url: str) -> BrokerAddress:
    """`mqtt://HOST[:PORT]` / `mqtts://...`; HOST may be an IPv6 literal in brackets."""
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883), tls)


def broker_url_for_display(url: str) -> str:
    """The broker URL without any user info (never show a password)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def connection_key(config: Config) -> tuple[Any, ...]:
    """Everything that goes into a connection (address, TLS, credentials, CONNECT, will).
    Two configs with the same key can share one live connection."""
    m = config.mqtt
    return (
        config.device_id,
        m.url,
        m.client_id,
        m.username,
        m.password,
        m.password_file,
        m.protocol,
        m.keepalive,
        m.status_topic,
        m.ca_file,
        m.cert_file,
        m.key_file,
        m.tls_insecure,
    )


class BoundedClient(Client):
    """paho's client, reading at most `_READ_SIZE` per call, refusing any incoming
    packet over `max_incoming`, and with the per-message shortcuts of the module
    docstring."""

    max_incoming = MAX_INCOMING_PACKET
    refused = ""  # why the client refused what the broker sent ("": nothing refused)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What on_publish gets for a success PUBACK: made once per connection, not once per PUBACK.
        self._success_codes = {code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in PUBACK_SUCCESS_CODES}
        self._no_properties = Properties(PacketTypes.PUBACK)

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if packet["have_remaining"] and packet["remaining_length"] > self.max_incoming:
            length = packet["remaining_length"]
            self.refused = f"the broker sent a {length}-byte packet, over the {self.max_incoming} bytes we accept"
            # paho turns an OSError from a read into "connection lost" and closes the socket.
            raise PacketTooLarge(f"the broker sent a {length}-byte packet (limit {self.max_incoming})")
        return super()._sock_recv(min(bufsize, _READ_SIZE))

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        """A PUBACK (or PUBCOMP): `short_success_puback` answers the common case; anything else goes to
        paho's decoder, and what it refuses is recorded in `refused`."""
        packet = self._in_packet["packet"]
        code = short_success_puback(packet, self._protocol == MQTTProtocolVersion.MQTTv5) if cmd == "PUBACK" else None
        if code is None:
            try:
                return super()._handle_pubackcomp(cmd)
            except MalformedPacket as e:
                shown = bytes(packet[:16]).hex(" ") + (" ..." if len(packet) > 16 else "")
                self.refused = f"the broker sent a malformed {cmd} (body: {shown or 'empty'}): {e}"
                raise
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, self._success_codes[code], self._no_properties)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def in_callback(self) -> bool:
        """Whether one of paho's callbacks is running (paho's own test before it writes at once)."""
        if self._in_callback_mutex.acquire(blocking=False):
            self._in_callback_mutex.release()
            return False
        return True

    def _packet_queue(self, command: int, packet: Any, mid: int, qos: int, info: Any = None) -> MQTTErrorCode:
        # paho sends `packet[pos:]`: a copy of the whole packet (a 70 KB chunk) unless it is a memoryview.
        # (Its annotation says bytes or bytearray; all it does with the packet is len(), slicing, send.)
        return super()._packet_queue(command, memoryview(packet), mid, qos, info)  # type: ignore[arg-type]


# PUBACK reason codes that mean the message was accepted (MQTT 5.0, 3.4.2.1): 0x00 success and
# 0x10 no matching subscribers.
PUBACK_SUCCESS_CODES = (0x00, 0x10)


def short_success_puback(body: bytes | bytearray, v5: bool) -> int | None:
    """The reason code of a PUBACK body (after the fixed header) in the forms a broker acknowledges
    with: the packet id alone (success), or with MQTT 5 a success reason code and no properties
    (MQTT 5.0, 3.4.2.1: the reason code and property length may be left out). None for any other
    body: a failure, properties, or something malformed, which paho's decoder judges."""
    size = len(body)
    if size == 2:
        return 0x00
    if v5 and (size == 3 or (size == 4 and body[3] == 0)) and body[2] in PUBACK_SUCCESS_CODES:
        return body[2]
    return None


def tls_context_keeper(config: Config) -> tls.ContextKeeper:
    """What makes the TLS context of `[mqtt]`'s connections (used when the URL is mqtts://)."""
    m = config.mqtt
    files = tls.TlsFiles(m.ca_file, m.cert_file, m.key_file, "mqtt")
    return tls.ContextKeeper(files, check_hostname=not m.tls_insecure)


def new_client(config: Config, max_queued: int, tls_context: tls.ContextKeeper) -> BoundedClient:
    """A fresh paho client for one connection, with `tls_context`'s context when the URL is mqtts://.
    Raises ValueError naming the config key when a credential or TLS file cannot be used."""
    m = config.mqtt
    v5 = m.protocol == "5"
    client = BoundedClient(
        CallbackAPIVersion.VERSION2,
        client_id=m.client_id or config.device_id,
        clean_session=None if v5 else True,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    client.connect_timeout = m.connect_timeout
    # The session's clients keep their own windows; the queue limit is paho's guard against a runaway
    # queue. No in-flight limit (0): under the queue limit it could never hold a message back, and with
    # one paho scans its messages for a queued one after every PUBACK.
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(max_queued)
    if m.username:
        client.username_pw_set(m.username, _password(config))
    if broker_address(m.url).tls:
        client.tls_set_context(tls_context.context())
        if m.tls_insecure:  # paho's own name check too: the chain is still verified
            client.tls_insecure_set(True)
    offline = json.dumps({"state": "offline", "device_id": config.device_id})
    client.will_set(status_topic(config), offline, qos=1, retain=True)
    return client


def connect_properties(config: Config) -> Properties | None:
    """MQTT 5 CONNECT properties: the limits the broker must respect towards us."""
    if config.mqtt.protocol != "5":
        return None
    properties = Properties(PacketTypes.CONNECT)
    properties.MaximumPacketSize = MAX_INCOMING_PACKET
    properties.ReceiveMaximum = RECEIVE_MAXIMUM
    return properties


def sane_max_packet_size(announced: int | None) -> int | None:
    """The broker's Maximum Packet Size as the agent uses it. A broker that announces
    less than `MIN_BROKER_PACKET` is taken to mean that much: below it nothing useful
    fits, and chunks would be split down to single records and dead-lettered on one
    broken (or hostile) CONNACK."""
    if announced is None:
        return None
    if announced < MIN_BROKER_PACKET:
        log.warning(
            "mqtt: the broker announces a maximum packet size of %d bytes; using %d", announced, MIN_BROKER_PACKET
        )
        return MIN_BROKER_PACKET
    return announced


def status_topic(config: Config) -> str:
    return config.mqtt.status_topic.replace("{device_id}", config.device_id)


def _password(config: Config) -> str | None:
    m = config.mqtt
    if m.password_file:
        try:
            with open(m.password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"mqtt.password_file = {m.password_file!r}: cannot read: {e}") from None
    return m.password or None


def slow_down_wait(code: int, retry_max: float) -> float | None:
    """The minimum wait before the next attempt after a CONNACK or DISCONNECT
    with `code`, or None when the normal backoff applies."""
    if code not in SLOW_DOWN_CODES:
        return None
    floor = min(SLOW_DOWN_WAIT, retry_max)
    return random.uniform(floor / 2, floor)


def properties_dict(properties: Properties | None) -> dict[str, Any]:
    """paho Properties as a plain dict (names as in paho: `ContentType`,
    `UserProperty` as a list of pairs, ...); empty for MQTT 3.1.1."""
    if properties is None:
        return {}
    try:
        return dict(properties.json())
    except Exception:  # a property paho parsed but cannot render: not worth a connection
        return {}


def publish_properties(values: dict[str, Any] | None) -> Properties | None:
    """A dict in the shape `properties_dict` returns, as PUBLISH properties."""
    if not values:
        return None
    properties = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        if name == "UserProperty":
            for pair in value:
                properties.UserProperty = tuple(pair)
        else:
            setattr(properties, name, value)
    return properties


class PackedProperties(Properties):
    """PUBLISH properties we packed ourselves (`packed_publish_properties`). paho only
    calls `pack()` on those of an outgoing PUBLISH, so neither `Properties`' attribute
    checks (about 0.2 ms per message) nor its `__init__` (tables of every property,
    built again for each object) are run: once per message, they cost more than
    the packing."""

    packed: bytes

    def __init__(self, packed: bytes) -> None:  # `Properties.__init__` is skipped on purpose (see above)
        # `Properties.__setattr__` takes only MQTT property names and its own table names.
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "packed", packed)

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:  # paho's debug log shows the properties of what it sends
        return f"PackedProperties({self.packed!r})"


def packed_publish_properties(content_type: str, user_properties: list[tuple[str, str]]) -> PackedProperties:
    """Content type and user properties as MQTT 5 encodes them (section 2.2.2): each property is its
    identifier (0x03 content type, 0x26 user property) and UTF-8 strings with a two-byte length; the
    whole is preceded by its length as a variable byte integer."""

    def utf8(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw

    body = b"\x03" + utf8(content_type) + b"".join(b"\x26" + utf8(k) + utf8(v) for k, v in user_properties)
    length = bytearray()
    n = len(body)
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            return PackedProperties(bytes(length) + body)


def publish_size(topic: str, payload: bytes, properties: Properties | None) -> int:
    """Bytes of a QoS 1 PUBLISH on the wire, at most: fixed header (1) + longest
    remaining length (4) + topic length (2) + packet id (2) + properties (with
    their length; one byte when empty) + payload."""
    size = 9 + len(topic.encode()) + len(payload)
    return size + (len(properties.pack()) if properties is not None else 1)

"""The agent's one MQTT connection, shared by every client (log uploader, fleet config).

Owns: connecting and reconnecting (capped exponential backoff with full
jitter, also after a connection that was up and then dropped; a random delay
before the first attempt; longer waits when the broker says it is busy,
over quota, moved or rate-limiting), the retained status topic and its last
will, the subscription table (sent again after every CONNACK; incoming
messages dispatched by exact topic), `publish()` resolving to the PUBACK's
outcome, and the watchdog.

One connection at a time (`link.Link`: a fresh paho client on the event
loop; the TLS context is kept from one attempt to the next and made again
only when a TLS file or the system CA store changed: `tls.ContextKeeper`).
Publishes that were not acknowledged when a connection ended resolve as
`connection_lost` and their owner (the spool, for logs) sends them again.
`publish()` never raises for network reasons.

Every paho callback body is wrapped (`link.guarded`): an exception is logged
and the connection rebuilt. The watchdog rebuilds it too when PUBACKs are outstanding, everything
is written and nothing has moved for `[mqtt].ack_timeout`. A handler's
exception is logged and ends nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent import __version__
from edgeagent.config import Config
from edgeagent.mqtt import client as mqttc
from edgeagent.mqtt.link import ConnectFailed, Link, Pending, guarded
from edgeagent.uploaders import Backoff

log = logging.getLogger("edgeagent.mqtt")


RC_NOT_AUTHORIZED = 0x87


@dataclass
class IncomingMessage:
    """A message on a subscribed topic, as its handler gets it."""

    topic: str
    payload: bytes
    retain: bool
    properties: dict[str, Any]


@dataclass
class PublishResult:
    """What became of one publish: acknowledged, refused (with the reason code), or unknown."""

    ok: bool
    reason_code: int | None  # the PUBACK's (or, with `connection_lost`, the DISCONNECT's) reason code
    reason: str
    connection_lost: bool = False  # the connection ended first; nothing is known about delivery
    credentials_problem: bool = False  # 0x87 not authorized: fix the ACL/credentials, the data is fine


@dataclass
class _Counters:
    """What `status()` counts for the session."""

    connections: int = 0
    published: int = 0
    acked: int = 0
    refused: int = 0
    incoming: int = 0
    incoming_dropped: int = 0


class MqttSession:
    """See the module docstring. Start with `run()` (a task), end with `close()`."""

    def __init__(self, config: Config, backlog: Callable[[], dict[str, Any]] | None = None) -> None:
        self.config = config
        self.address = mqttc.broker_address(config.mqtt.url)
        self.status_topic = mqttc.status_topic(config)
        self.backoff = Backoff(config.upload.retry_initial, config.upload.retry_max)
        self.counters = _Counters()
        self.since = time.time()
        self.last_error = ""  # kept after recovery: "last", not "current"; see last_error_at
        self.last_error_at = 0.0
        self.server_reference = ""
        self._backlog = backlog  # what the status message reports about the spool
        self._subscriptions: dict[str, tuple[Callable[[IncomingMessage], None], int]] = {}
        self._connected_callbacks: list[Callable[[], None]] = []
        self._link: Link | None = None  # the connection, or the attempt under way
        self._early: dict[int, ReasonCode] = {}
        self._event = asyncio.Event()  # something happened: the run loop looks again
        self._woken = False  # network up / asked: cut the offline wait short
        self._connected = asyncio.Event()
        self._closing = False
        self._last_slow_down: float | None = None  # the wait a DISCONNECT reason code asked for
        self._tls = mqttc.tls_context_keeper(config)  # TLS files and settings are in the connection key

    # --- the interface -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up() is not None

    @property
    def max_packet_size(self) -> int | None:
        """The broker's Maximum Packet Size from the last CONNACK (None: not announced)."""
        link = self._up()
        return link.max_packet_size if link is not None else None

    @property
    def receive_maximum(self) -> int | None:
        """The broker's Receive Maximum from the last CONNACK (None: not announced)."""
        link = self._up()
        return link.receive_maximum if link is not None else None

    def subscribe(self, topic: str, handler: Callable[[IncomingMessage], None], qos: int = 1) -> None:
        """Exact topic, no wildcards; sent again after every CONNACK."""
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"subscribe: {topic!r}: an exact topic is needed (no wildcards)")
        self._subscriptions[topic] = (handler, qos)
        if (link := self._up()) is not None:
            link.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        if self._subscriptions.pop(topic, None) is not None and (link := self._up()) is not None:
            link.client.unsubscribe(topic)

    def on_connected(self, callback: Callable[[], None]) -> None:
        """`callback()` after each successful CONNACK, once subscriptions were sent again."""
        self._connected_callbacks.append(callback)

    def remove_on_connected(self, callback: Callable[[], None]) -> None:
        if callback in self._connected_callbacks:
            self._connected_callbacks.remove(callback)

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            pass
        return self.connected

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> PublishResult:
        return await self.publish_nowait(topic, payload, qos=qos, retain=retain, properties=properties)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: dict[str, Any] | Properties | None = None,
    ) -> asyncio.Future[PublishResult]:
        """Hand a message to the connection now; the future resolves like `publish()`."""
        future: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
        link = self._up()
        if link is None:
            future.set_result(PublishResult(False, None, "not connected"))
            return future
        if isinstance(properties, dict):
            properties = mqttc.publish_properties(properties)
        if self.config.mqtt.protocol != "5":
            properties = None
        try:
            info = link.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as e:  # an invalid topic or payload: nothing was sent
            future.set_result(PublishResult(False, None, f"cannot publish on {topic!r}: {e}"))
            return future
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            future.set_result(PublishResult(False, None, "too many messages waiting in the MQTT client"))
            return future
        # MQTT_ERR_SUCCESS, or MQTT_ERR_NO_CONN: paho keeps the message either way; the PUBACK
        # (or the end of this connection) decides.
        self.counters.published += 1
        if not link.pending:  # the run loop times PUBACKs from now on (the watchdog)
            link.last_progress = time.monotonic()
            self._event.set()
        link.pending[info.mid] = Pending(future, len(payload))
        early = self._early.pop(info.mid, None)
        if early is not None or qos == 0:
            self._settle(link, info.mid, early)
        return future

    def status(self) -> dict[str, Any]:
        link = self._up()
        return {
            "broker": mqttc.broker_url_for_display(self.config.mqtt.url),
            "connected": link is not None,
            "since": self.since,
            "last_error": self.last_error or None,
            "last_error_at": self.last_error_at or None,
            "connections": self.counters.connections,
            "retry_failures": self.backoff.failures,
            "published": self.counters.published,
            "acked": self.counters.acked,
            "refused": self.counters.refused,
            "pending": len(link.pending) if link is not None else 0,
            "max_packet_size": self.max_packet_size,
            "receive_maximum": self.receive_maximum,
            "subscriptions": sorted(self._subscriptions),
            "incoming": self.counters.incoming,
            "incoming_dropped": self.counters.incoming_dropped,
            "server_reference": self.server_reference or None,
        }

    def wake(self) -> None:
        """The network came up or someone asked: try now instead of waiting out the backoff."""
        self._woken = True
        self._event.set()

    def update(self, config: Config) -> None:
        """A reload that keeps the connection (same `client.connection_key`): take the rest."""
        old = self.config.upload
        self.config = config
        if (old.retry_initial, old.retry_max) != (config.upload.retry_initial, config.upload.retry_max):
            self.backoff = Backoff(config.upload.retry_initial, config.upload.retry_max)

    def refresh_status(self) -> None:
        """Publish the retained online status again (the backlog it showed has changed)."""
        if (link := self._up()) is not None:
            self._publish_online(link)

    def _up(self) -> Link | None:
        """The connection, once the broker accepted it."""
        link = self._link
        return link if link is not None and link.up else None

    # --- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, stay connected, reconnect; until cancelled or closed."""
        first = random.uniform(0.0, self.config.mqtt.first_connect_delay)
        if first > 0:
            # Not cut short by a network-up event: after a power cut a whole site boots, and
            # its links come up, at the same moment; this is what spreads their connections.
            log.info("mqtt: first connection attempt in %.1fs (spreading a fleet's start-up)", first)
            deadline = time.monotonic() + first
            while (remaining := deadline - time.monotonic()) > 0 and not self._closing:
                await self._wait(remaining)
        while not self._closing:
            if self._link is None:
                slow_down = await self._connect()
                if self._link is None and not self._closing:
                    await self._sleep_offline(self._next_delay(slow_down))
                continue
            self._tick(self._link)
            if self._link is None:
                # The connection ended: wait before the next one, on the same schedule as failed
                # attempts, so a broker that accepts and then drops us cannot cause a storm.
                await self._sleep_offline(self._next_delay(self._last_slow_down))
                continue
            await self._wait(self._wait_timeout(self._link))

    async def close(self, timeout: float = 1.0) -> None:
        """Say goodbye on the status topic, disconnect, stop reconnecting."""
        self._closing = True
        self._event.set()
        link = self._up()
        if link is not None and link.client.is_connected():
            self._publish_status(link, {"state": "offline", "device_id": self.config.device_id, "reason": "shutdown"})
            link.client.disconnect()
            # The loop writes the status and the DISCONNECT; paho then closes the socket.
            end = time.monotonic() + timeout
            while link.client.socket() is not None and (remaining := end - time.monotonic()) > 0:
                await self._wait(remaining)
        self._drop("shutting down")

    def _next_delay(self, slow_down: float | None) -> float:
        self._last_slow_down = None
        delay = self.backoff.failed()
        return max(delay, slow_down) if slow_down is not None else delay

    async def _wait(self, timeout: float | None) -> None:
        self._event.clear()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass

    async def _sleep_offline(self, delay: float) -> None:
        """Wait `delay` before the next attempt, or less when the network came up or
        someone asked (`wake()`)."""
        log.debug("mqtt: next connection attempt in %.1fs", delay)
        deadline = time.monotonic() + delay
        while (remaining := deadline - time.monotonic()) > 0 and not self._closing and not self._woken:
            await self._wait(remaining)
        self._woken = False

    async def _connect(self) -> float | None:
        """One connection attempt. Returns the minimum wait the broker asked for, if any."""
        self._woken = False  # this attempt answers the wakes so far; later ones cut the next wait
        try:
            client = mqttc.new_client(self.config, self.config.upload.window + 8, self._tls)
        except ValueError as e:
            self._set_error(str(e))
            return None
        link = self._link = Link(client, self._event.set)
        for name in ("on_connect", "on_disconnect", "on_publish", "on_message"):
            setattr(client, name, guarded(getattr(self, "_" + name), link.fail))
        try:
            reason, properties = await link.open(self.config)
        except ConnectFailed as e:
            self._link = None
            self._set_error(str(e))
            return e.slow_down
        except BaseException:
            self._link = None
            raise
        if reason.is_failure or self._closing:
            link.close()
            self._link = None
            if self._closing:
                return None
            self._set_error(f"broker refused the connection: {reason} (0x{reason.value:02x})")
            self._note_server_reference(properties)
            return mqttc.slow_down_wait(reason.value, self.config.upload.retry_max)
        self._start_link(link, properties)
        return None

    def _start_link(self, link: Link, properties: Properties) -> None:
        now = time.monotonic()
        link.up = True
        link.connected_at = link.last_progress = now
        link.next_misc = now + link.misc_interval()
        link.max_packet_size = mqttc.sane_max_packet_size(getattr(properties, "MaximumPacketSize", None))
        link.receive_maximum = getattr(properties, "ReceiveMaximum", None)
        self.since = time.time()
        self.counters.connections += 1
        log.info(
            "mqtt: connected to %s (MQTT %s%s)",
            mqttc.broker_url_for_display(self.config.mqtt.url),
            self.config.mqtt.protocol,
            f", max packet {link.max_packet_size}" if link.max_packet_size else "",
        )
        for topic, (_, qos) in self._subscriptions.items():
            link.client.subscribe(topic, qos)
        self._publish_online(link)
        self._connected.set()
        for callback in list(self._connected_callbacks):
            try:
                callback()
            except Exception:
                log.exception("mqtt: on_connected callback %r failed", callback)

    def _drop(self, reason: str) -> None:
        """Leave the current connection; every publish still waiting resolves as lost."""
        link = self._link
        if link is None:
            return
        self._link = None
        self._connected.clear()
        link.close()
        self.since = time.time()
        if link.up and time.monotonic() - link.connected_at >= self.config.mqtt.keepalive:
            # It was up for a while: start the retry schedule afresh (full jitter from retry_initial).
            self.backoff.succeeded()
        self._last_slow_down = link.slow_down
        lost = PublishResult(False, link.lost_code or None, f"connection lost: {reason}", connection_lost=True)
        for pending in link.pending.values():
            if not pending.future.done():
                pending.future.set_result(lost)
        link.pending.clear()
        self._early.clear()
        log.info("mqtt: disconnected from %s: %s", mqttc.broker_url_for_display(self.config.mqtt.url), reason)

    # --- the connected loop ----------------------------------------------------------

    def _tick(self, link: Link) -> None:
        """One turn while connected: keepalive, health checks."""
        link.run_misc()
        if not link.broken and link.client.socket() is None:
            link.fail("connection closed")
        if link.broken:
            self._set_error(link.broken)
            self._drop(link.broken)
            return
        if link.pending and not link.client.want_write():
            deadline = self._ack_deadline(link)
            if time.monotonic() - link.last_progress > deadline:
                self._set_error(f"no PUBACK for {len(link.pending)} messages within {deadline:.0f}s; reconnecting")
                self._drop("watchdog: no progress")

    def _ack_deadline(self, link: Link) -> float:
        """How long outstanding PUBACKs may take: `ack_timeout`, plus the time the
        rate cap needs to let them out."""
        extra = 0.0
        if self.config.upload.max_rate:
            extra = sum(p.size for p in link.pending.values()) / self.config.upload.max_rate
        return self.config.mqtt.ack_timeout + extra

    def _wait_timeout(self, link: Link) -> float:
        wake_at = link.next_misc
        if link.pending:
            wake_at = min(wake_at, link.last_progress + self._ack_deadline(link) + 0.01)
        return max(0.0, wake_at - time.monotonic())

    def _settle(self, link: Link, mid: int, reason: ReasonCode | None) -> None:
        pending = link.pending.pop(mid, None)
        if pending is None or pending.future.done():
            return
        link.last_progress = time.monotonic()
        if reason is None or not reason.is_failure:  # QoS 0, 0x00 success, 0x10 no matching subscribers
            self.counters.acked += 1
            pending.future.set_result(PublishResult(True, reason.value if reason is not None else 0, "accepted"))
            return
        self.counters.refused += 1
        code = reason.value
        pending.future.set_result(
            PublishResult(False, code, f"{reason} (0x{code:02x})", credentials_problem=code == RC_NOT_AUTHORIZED)
        )

    def _publish_online(self, link: Link) -> None:
        status: dict[str, Any] = {
            "state": "online",
            "device_id": self.config.device_id,
            "version": __version__,
            "since": self.since,
        }
        if self._backlog is not None:
            backlog = self._backlog()
            status["backlog"] = {k: backlog[k] for k in ("chunks", "records", "bytes", "oldest_ns")}
        self._publish_status(link, status)

    def _publish_status(self, link: Link, status: dict[str, Any]) -> None:
        link.client.publish(self.status_topic, json.dumps(status), qos=1, retain=True)

    def _note_server_reference(self, properties: Properties | None) -> None:
        """0x9C/0x9D name another server. It is logged and shown, not followed: the
        broker is untrusted input, and following it would hand the credentials and
        the device's data to a host the operator never configured (the TLS check
        would be against a name the broker chose). Moving a fleet is a config change."""
        reference = getattr(properties, "ServerReference", None)
        if reference:
            self.server_reference = str(reference)[:200]
            log.warning("mqtt: the broker names another server: %r (not followed; change [mqtt] url)", reference)

    # --- paho callbacks (loop thread) ---------------------------------------------------

    def _live(self, client: Client) -> Link | None:
        """The link `client` belongs to, if it is the current one (on the loop thread)."""
        link = self._link
        return link if link is not None and link.owns(client) else None

    def _on_connect(
        self, client: Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode, properties: Properties
    ) -> None:
        link = self._live(client)
        if link is not None and not link.connack.done():
            link.connack.set_result((reason, properties))

    def _on_disconnect(
        self, client: Client, userdata: Any, flags: DisconnectFlags, reason: ReasonCode, properties: Properties
    ) -> None:
        link = self._live(client)
        if link is None:
            return
        why = getattr(client, "refused", "") or str(reason)  # what the client refused, if that ended it
        link.lost_code = reason.value
        if flags.is_disconnect_packet_from_server:
            self._note_server_reference(properties)
            link.slow_down = mqttc.slow_down_wait(reason.value, self.config.upload.retry_max)
            why = f"broker closed: {why} (0x{reason.value:02x})"
        else:
            why = f"connection closed: {why}"
        link.fail(why)

    def _on_publish(self, client: Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties) -> None:
        link = self._live(client)
        if link is None:
            return
        if mid in link.pending:
            self._settle(link, mid, reason)
        else:  # reported before publish() returned its mid (QoS 0 written at once)
            self._early[mid] = reason
        # The run loop is not woken: its next turn reads the progress this PUBACK made.

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        if self._live(client) is None:
            return
        self.counters.incoming += 1
        entry = self._subscriptions.get(message.topic)
        if entry is None:
            self.counters.incoming_dropped += 1
            log.debug("mqtt: message on %r, which nobody subscribed to; dropped", message.topic)
            return
        incoming = IncomingMessage(
            message.topic,
            bytes(message.payload),
            bool(message.retain),
            mqttc.properties_dict(getattr(message, "properties", None)),
        )
        try:
            entry[0](incoming)
        except Exception:
            log.exception("mqtt: the handler for %r failed on a message", message.topic)

    def _set_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("mqtt: %s", message)
        self.last_error = message
        self.last_error_at = time.time()

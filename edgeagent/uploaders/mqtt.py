"""The MQTT uploader: drains the spool to a broker, one QoS 1 PUBLISH per chunk.

Owns the MQTT connection for logs: connecting (plain or TLS, optionally with a
client certificate), publishing the oldest chunks within a window, deleting a
chunk only when its PUBACK carries a success reason code, handling failure
codes by meaning, the retained status topic with its last will, and the retry
schedule while the broker cannot be reached.

How paho is driven. paho-mqtt runs inside the agent's one event loop: its
socket is watched with `loop.add_reader`/`add_writer` (paho's
`on_socket_register_write` / `on_socket_unregister_write` / `on_socket_close`
callbacks keep the writer registration in step) and `loop_misc` runs from the
uploader's own wait timeout for keepalive. Only the blocking part of a connect
(DNS, TCP, TLS handshake, sending CONNECT) runs in `asyncio.to_thread`, on a
client object no loop callback touches until the thread has returned.

Every connection uses a fresh paho client. paho resends everything it holds
after a reconnect, all at once and past its in-flight limit; with a fresh
client it holds nothing, and the spool (the only queue) supplies the window
again. A chunk handed to paho is therefore never re-queued from the spool
while that client lives (a `publish()` answered `MQTT_ERR_NO_CONN` is still
held by paho), and a client that is dropped takes its unsent copies with it.

Every paho callback body is wrapped: an exception escaping into paho ends its
packet handling silently, so instead it is logged and the connection is
rebuilt. A watchdog rebuilds it too when PUBACKs are outstanding but nothing
has moved for `[mqtt].ack_timeout`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import zstandard
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent import __version__, otlp
from edgeagent.config import Config
from edgeagent.pipeline import WAKE_DATA, UploaderContext
from edgeagent.spool import StoredChunk
from edgeagent.uploaders import Backoff

log = logging.getLogger(__name__)

# Reason codes (MQTT 5.0, 3.4.2.1 and 3.14.2.1) that need more than "retry later".
RC_MALFORMED_PACKET = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_NOT_AUTHORIZED = 0x87
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_TOO_LARGE = 0x95
RC_QUOTA_EXCEEDED = 0x97
RC_PAYLOAD_FORMAT_INVALID = 0x99
# The broker refuses these for good: retrying the same message cannot succeed.
PERMANENT_FAILURES = {
    RC_NOT_AUTHORIZED: "not authorized",
    RC_TOPIC_NAME_INVALID: "topic name invalid",
    RC_PAYLOAD_FORMAT_INVALID: "payload format invalid",
}

# A connection ended with one of these while chunks were in flight: a packet we sent may be
# what the broker (or paho reading the broker's answer) could not take. mosquitto answers an
# oversized PUBLISH with PUBACK 0x95, which MQTT 5 does not allow in a PUBACK, so paho drops
# the connection as a protocol error instead of reporting the reason code.
REFUSED_PACKET_CODES = {RC_MALFORMED_PACKET, RC_PROTOCOL_ERROR, RC_PACKET_TOO_LARGE}

CONTENT_TYPE = "application/x-protobuf"
# Fixed header (1) + longest remaining length (4) + topic length (2) + packet id (2).
_PUBLISH_OVERHEAD = 9

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True)
class _InFlight:
    """A chunk handed to paho on the current connection, keyed by its mid."""

    chunk: StoredChunk  # with the payload as sent (after any time correction)
    size: int


@dataclass(slots=True)
class _Counters:
    sent: int = 0
    acked: int = 0
    acked_records: int = 0
    failed: int = 0
    dead_letters: int = 0
    splits: int = 0
    connections: int = 0


def broker_url_for_display(url: str) -> str:
    """The broker URL without any user info (never show a password)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


class MqttUploader:
    """`pipeline.Uploader` for `[upload] to = "mqtt"`. See the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mqtt = config.mqtt
        self.upload = config.upload
        parts = urlsplit(self.mqtt.url)
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if self.tls else 1883)
        self.topic = self.mqtt.topic.replace("{device_id}", config.device_id)
        self.status_topic = self.mqtt.status_topic.replace("{device_id}", config.device_id)
        self.client_id = self.mqtt.client_id or config.device_id
        self.v5 = self.mqtt.protocol == "5"
        self.keepalive = max(1, round(self.mqtt.keepalive))
        self.backoff = Backoff(self.upload.retry_initial, self.upload.retry_max)

        self._ctx: UploaderContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._client: Client | None = None  # the live connection; None while offline
        self._connecting: Client | None = None  # a client whose CONNACK is awaited
        self._connack: asyncio.Future[tuple[ReasonCode, Properties]] | None = None
        self._inflight: dict[int, _InFlight] = {}
        self._outcomes: list[tuple[int, ReasonCode]] = []  # (mid, PUBACK reason) from paho, handled by the loop
        self._progress = asyncio.Event()
        self._cursor = 0  # highest spool id handed to paho on this connection
        self._receive_maximum = self.upload.window  # the window, lowered to the broker's Receive Maximum
        self._window = self.upload.window  # the receive maximum, or 1 while probing
        self._probing = False  # one chunk at a time, to find the one the broker cannot take
        self._lost_code = 0  # reason code of the last connection loss
        self._max_packet = 0  # the broker's Maximum Packet Size (0 = not announced)
        self._paused_until = 0.0  # monotonic; quota exceeded or a retryable failure
        self._last_progress = 0.0  # monotonic: last PUBACK, completed write or publish
        self._next_misc = 0.0  # monotonic: next paho loop_misc (keepalive)
        self._broken = ""  # why the current connection must be rebuilt
        self._draining = False
        self._tokens = float(self.upload.max_rate)
        self._tokens_at = time.monotonic()
        self._connected_at = 0.0  # monotonic
        self._status_backlog = 0  # backlog chunks in the last retained status published

        self.connected = False
        self.since = time.time()
        self.last_error = ""  # kept after recovery: "last", not "current"; see last_error_at
        self.last_error_at = 0.0
        self.counters = _Counters()

    # --- the uploader protocol ----------------------------------------------------

    async def run(self, ctx: UploaderContext) -> None:
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        while True:
            if self._draining:
                # Shutting down: drain() owns the connection; publish nothing new.
                await ctx.wait_for_work(None)
                continue
            if self._client is None:
                if not await self._connect():
                    await self._sleep_offline(self.backoff.failed())
                continue
            self._step()
            if self._client is None:
                # The connection ended: wait before the next one, on the same schedule as
                # failed attempts (reset only by acknowledgements), so a broker that accepts
                # and then drops us cannot cause a reconnect storm.
                await self._sleep_offline(self.backoff.failed())
                continue
            await ctx.wait_for_work(self._wait_timeout())

    async def drain(self, timeout: float) -> None:
        """Publish nothing new, wait up to `timeout` for outstanding PUBACKs,
        then say goodbye on the status topic and disconnect. What is still
        unacknowledged stays in the spool and is sent again next time."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self._client is not None and self._inflight:
            self._handle_outcomes()
            self._run_misc()
            remaining = deadline - time.monotonic()
            if not self._inflight or self._client is None or remaining <= 0:
                break
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), min(remaining, self._misc_interval()))
            except TimeoutError:
                pass
        self._handle_outcomes()
        if self._inflight:
            log.warning(
                "mqtt: stopping with %d chunks unacknowledged; they stay in the spool and are sent again",
                len(self._inflight),
            )
        client = self._client
        if client is not None and client.is_connected():
            self._publish_status(client, {"state": "offline", "device_id": self.config.device_id, "reason": "shutdown"})
            client.disconnect()
            # The loop writes the status and the DISCONNECT; paho then reports the
            # disconnect (which sets `_progress`) and closes the socket.
            end = time.monotonic() + max(0.0, min(1.0, deadline - time.monotonic()))
            while client.socket() is not None and (remaining := end - time.monotonic()) > 0:
                self._progress.clear()
                try:
                    await asyncio.wait_for(self._progress.wait(), remaining)
                except TimeoutError:
                    break
        self._drop_client("shutting down")

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "protocol": "mqtt",
            "broker": broker_url_for_display(self.mqtt.url),
            "topic": self.topic,
            "connected": self.connected,
            "since": self.since,
            "last_error": self.last_error or None,
            "last_error_at": self.last_error_at or None,
            "sent": c.sent,
            "acked": c.acked,
            "acked_records": c.acked_records,
            "failed": c.failed,
            "dead_letters": c.dead_letters,
            "splits": c.splits,
            "connections": c.connections,
            "in_flight": len(self._inflight),
            "retry_failures": self.backoff.failures,
        }

    # --- connecting ---------------------------------------------------------------

    def _new_client(self) -> Client:
        """A fresh paho client for one connection (raises ValueError naming the
        config key when a credential or TLS file cannot be used)."""
        protocol = MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311
        client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if self.v5 else True,
            protocol=protocol,
            reconnect_on_failure=False,
        )
        client.connect_timeout = self.mqtt.connect_timeout
        # Room for one window of chunks plus the status message; the window itself
        # is enforced here, this is paho's own guard against a runaway queue.
        client.max_inflight_messages_set(self.upload.window + 1)
        client.max_queued_messages_set(self.upload.window + 2)
        if self.mqtt.username:
            client.username_pw_set(self.mqtt.username, self._password())
        if self.tls:
            client.tls_set_context(self._tls_context())
            if self.mqtt.tls_insecure:
                client.tls_insecure_set(True)
        offline = json.dumps({"state": "offline", "device_id": self.config.device_id})
        client.will_set(self.status_topic, offline, qos=1, retain=True)
        client.on_connect = self._guard(self._on_connect)
        client.on_disconnect = self._guard(self._on_disconnect)
        client.on_publish = self._guard(self._on_publish)
        client.on_socket_close = self._guard(self._on_socket_close)
        client.on_socket_register_write = self._guard(self._on_socket_register_write)
        client.on_socket_unregister_write = self._guard(self._on_socket_unregister_write)
        return client

    def _password(self) -> str | None:
        if self.mqtt.password_file:
            try:
                with open(self.mqtt.password_file, encoding="utf-8") as f:
                    return f.read().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"mqtt.password_file = {self.mqtt.password_file!r}: cannot read: {e}") from None
        return self.mqtt.password or None

    def _tls_context(self) -> ssl.SSLContext:
        """Verification on: the broker's chain against `ca_file` (or the system
        store), and its name unless `tls_insecure`."""
        try:
            context = ssl.create_default_context(cafile=self.mqtt.ca_file or None)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"mqtt.ca_file = {self.mqtt.ca_file!r}: cannot load: {e}") from None
        if self.mqtt.cert_file or self.mqtt.key_file:
            try:
                context.load_cert_chain(self.mqtt.cert_file, self.mqtt.key_file or None)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(
                    f"mqtt.cert_file = {self.mqtt.cert_file!r} / mqtt.key_file = {self.mqtt.key_file!r}: "
                    f"cannot load the client certificate: {e}"
                ) from None
        if self.mqtt.tls_insecure:
            context.check_hostname = False
        return context

    async def _connect(self) -> bool:
        """One connection attempt; True once the broker accepted it."""
        assert self._loop is not None
        try:
            client = self._new_client()
        except ValueError as e:
            self._set_error(str(e))
            return False
        if self.v5:
            client.connect_async(self.host, self.port, self.keepalive, clean_start=True)
        else:
            client.connect_async(self.host, self.port, self.keepalive)
        # reconnect() resolves, connects, does the TLS handshake and queues CONNECT:
        # blocking, so it runs in a thread. No loop callback touches this client
        # until the thread is done (callbacks check `client is self._connecting`).
        attempt = asyncio.ensure_future(asyncio.to_thread(client.reconnect))
        limit = self.mqtt.connect_timeout + 5.0  # paho's own timeout covers TCP/TLS, not DNS
        try:
            done, _ = await asyncio.wait({attempt}, timeout=limit)
        except asyncio.CancelledError:
            attempt.add_done_callback(functools.partial(_close_abandoned, client))
            raise
        if not done:
            # The thread cannot be stopped; the client is abandoned and closed when it returns.
            attempt.add_done_callback(functools.partial(_close_abandoned, client))
            self._set_error(f"connecting to {self.host}:{self.port} did not finish within {limit:.0f}s")
            return False
        try:
            rc = attempt.result()
        except (OSError, ssl.SSLError, ssl.CertificateError, ValueError) as e:
            self._set_error(f"cannot connect to {self.host}:{self.port}: {_describe(e)}")
            _close_quietly(client)
            return False
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._set_error(f"cannot connect to {self.host}:{self.port}: {rc.name}")
            _close_quietly(client)
            return False

        self._connecting = client
        self._connack = self._loop.create_future()
        self._attach(client)
        try:
            reason, properties = await asyncio.wait_for(self._connack, self.mqtt.connect_timeout)
        except TimeoutError:
            self._set_error(f"no CONNACK from {self.host}:{self.port} within {self.mqtt.connect_timeout:.0f}s")
            self._detach(client)
            self._connecting = None
            return False
        except ConnectionError as e:
            self._set_error(f"{self.host}:{self.port} closed the connection before CONNACK: {e}")
            self._detach(client)
            self._connecting = None
            return False
        except asyncio.CancelledError:
            self._detach(client)
            self._connecting = None
            raise
        finally:
            self._connack = None
        self._connecting = None
        if reason.is_failure:
            self._set_error(f"broker refused the connection: {reason} (0x{reason.value:02x})")
            self._detach(client)
            return False
        if self._draining:  # shutdown began while connecting
            self._detach(client)
            return False

        self._client = client
        self._inflight.clear()
        self._outcomes.clear()
        self._cursor = 0
        self._broken = ""
        self._lost_code = 0
        self._paused_until = 0.0
        self._receive_maximum = max(1, min(self.upload.window, getattr(properties, "ReceiveMaximum", 65535)))
        self._window = 1 if self._probing else self._receive_maximum
        self._max_packet = getattr(properties, "MaximumPacketSize", 0) or 0
        now = time.monotonic()
        self._connected_at = self._last_progress = now
        self._next_misc = now + self._misc_interval()
        self.connected = True
        self.since = time.time()
        self.counters.connections += 1
        log.info(
            "mqtt: connected to %s (MQTT %s, window %d%s)",
            broker_url_for_display(self.mqtt.url),
            self.mqtt.protocol,
            self._window,
            f", max packet {self._max_packet}" if self._max_packet else "",
        )
        self._publish_online(client)
        return True

    def _attach(self, client: Client) -> None:
        """Watch the socket of a client whose reconnect() returned (loop thread)."""
        assert self._loop is not None
        sock = client.socket()
        if sock is None:
            return
        self._loop.add_reader(sock, self._on_readable, client)
        if client.want_write():
            self._loop.add_writer(sock, self._on_writable, client)

    def _detach(self, client: Client) -> None:
        """Stop watching and close a client's socket, without telling paho: the
        client object is dropped with everything it still holds."""
        sock = client.socket()
        if sock is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        _close_quietly(client)

    def _drop_client(self, reason: str, refused_packet: bool = False) -> None:
        """Leave the current connection. Chunks without their PUBACK stay in the
        spool and are published again, from the spool, on the next connection.

        `refused_packet`: the connection ended because of a packet the broker (or
        paho) could not handle. With one chunk in flight that chunk is split; with
        more, the next connection sends one at a time until the culprit shows."""
        self._handle_outcomes()
        if refused_packet and len(self._inflight) == 1:
            (entry,) = self._inflight.values()
            self._split(entry.chunk, f"the connection ended ({reason}) with only this chunk in flight")
            self._probing = True  # the parts may still be too large: one at a time until one is acknowledged
        elif refused_packet and self._inflight:
            self._probing = True
        client = self._client
        self._client = None
        self._inflight.clear()
        self._outcomes.clear()
        if client is not None:
            self._detach(client)
        if self.connected:
            self.connected = False
            self.since = time.time()
            if time.monotonic() - self._connected_at > max(self.keepalive, self.upload.retry_max):
                # It was a good connection for long enough: start the retry schedule afresh.
                self.backoff.succeeded()
            log.info("mqtt: disconnected from %s: %s", broker_url_for_display(self.mqtt.url), reason)

    async def _sleep_offline(self, delay: float) -> None:
        """Wait `delay` before the next attempt, or less when the network came up
        or someone asked (`edgeagent wake`, SIGUSR1). New chunks alone do not cut
        the wait short: the broker was unreachable a moment ago, and retrying on
        every commit would be a reconnect storm."""
        assert self._ctx is not None
        ctx = self._ctx
        log.debug("mqtt: next connection attempt in %.1fs", delay)
        deadline = time.monotonic() + delay
        while (remaining := deadline - time.monotonic()) > 0 and not self._draining:
            reasons = await ctx.wait_for_work(remaining)
            if reasons != {WAKE_DATA}:
                return  # the time is up, the network came up, someone asked, or shutdown

    # --- the connected loop -------------------------------------------------------

    def _step(self) -> None:
        """One turn while connected: settle PUBACKs, check health, fill the window."""
        client = self._client
        assert client is not None
        self._handle_outcomes()
        self._run_misc()
        if self._broken:
            self._set_error(self._broken)
            self._drop_client(self._broken, refused_packet=self._lost_code in REFUSED_PACKET_CODES)
            return
        if self._client is None:
            return
        if not client.is_connected():
            return  # on_disconnect is on its way
        now = time.monotonic()
        if self._inflight and not client.want_write() and now - self._last_progress > self._ack_deadline():
            self._set_error(
                f"no PUBACK for {len(self._inflight)} chunks within {self._ack_deadline():.0f}s; reconnecting"
            )
            self._drop_client("watchdog: no progress")
            return
        self._fill_window(client)
        if not self._inflight and self._status_backlog and self._ctx is not None and not self._ctx.spool.chunk_count:
            # The backlog drained: refresh the retained status so it does not keep showing the old one.
            self._publish_online(client)

    def _fill_window(self, client: Client) -> None:
        if self._draining or self._ctx is None:
            return
        now = time.monotonic()
        if now < self._paused_until:
            return
        ctx = self._ctx
        while len(self._inflight) < self._window:
            chunks = ctx.spool.oldest(self._window - len(self._inflight), after_id=self._cursor)
            if not chunks:
                return
            sent_ids = {entry.chunk.id for entry in self._inflight.values()}
            for chunk in chunks:
                if chunk.id in sent_ids:
                    self._cursor = max(self._cursor, chunk.id)
                    continue
                if not self._take_tokens(len(chunk.payload)):
                    return
                self._cursor = max(self._cursor, chunk.id)
                if not self._publish_chunk(client, chunk):
                    return

    def _publish_chunk(self, client: Client, chunk: StoredChunk) -> bool:
        """Hand one chunk to paho; False when nothing more should be published now."""
        assert self._ctx is not None
        try:
            payload = self._ctx.payload(chunk)
        except (zstandard.ZstdError, otlp.DecodeError) as e:
            self._dead_letter(chunk, f"chunk payload is corrupt and cannot be sent: {e}")
            return True
        if payload is not chunk.payload:
            chunk = dataclasses.replace(chunk, payload=payload, clock_synced=True)
        properties = self._properties(chunk) if self.v5 else None
        if self._max_packet:
            size = _PUBLISH_OVERHEAD + len(self.topic.encode()) + len(payload)
            if properties is not None:
                size += len(properties.pack())
            if size > self._max_packet:
                self._split(chunk, f"{size} bytes exceed the broker's maximum packet size {self._max_packet}")
                return True
        info: MQTTMessageInfo = client.publish(self.topic, payload, qos=1, properties=properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            # paho refused to hold it (should not happen within the window): try again later.
            self._cursor = min(self._cursor, chunk.id - 1)
            return False
        # MQTT_ERR_SUCCESS, or MQTT_ERR_NO_CONN: paho keeps the message either way and the
        # PUBACK (or this client's end) decides; never re-queue it from the spool here.
        self._inflight[info.mid] = _InFlight(chunk, len(payload))
        self.counters.sent += 1
        if len(self._inflight) == 1:
            self._last_progress = time.monotonic()
        return True

    def _properties(self, chunk: StoredChunk) -> Properties:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = CONTENT_TYPE
        properties.UserProperty = ("content-encoding", "zstd")
        properties.UserProperty = ("chunk-id", chunk.chunk_id)
        return properties

    def _handle_outcomes(self) -> None:
        """Settle the PUBACKs paho reported: delete, split, dead-letter or retry."""
        if not self._outcomes or self._ctx is None:
            return
        outcomes, self._outcomes = self._outcomes, []
        spool = self._ctx.spool
        acked: list[_InFlight] = []
        for mid, reason in outcomes:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue  # the status message, or a chunk of a connection already dropped
            if not reason.is_failure:  # 0x00 success, 0x10 no matching subscribers
                acked.append(entry)
                continue
            self.counters.failed += 1
            code = reason.value
            what = f"broker answered {reason} (0x{code:02x}) for chunk {entry.chunk.chunk_id}"
            if code in PERMANENT_FAILURES:
                self._dead_letter(entry.chunk, f"{what} on topic {self.topic!r}")
            elif code == RC_PACKET_TOO_LARGE:
                self._split(entry.chunk, what)
            else:
                # Quota exceeded: back off as the broker asks. Anything else: retry later, same schedule.
                delay = self.backoff.failed()
                self._paused_until = time.monotonic() + delay
                self._cursor = min(self._cursor, entry.chunk.id - 1)
                self._set_error(f"{what}; retrying in {delay:.1f}s")
        if acked:
            spool.ack([entry.chunk.id for entry in acked])
            self.counters.acked += len(acked)
            self.counters.acked_records += sum(entry.chunk.records for entry in acked)
            self.backoff.succeeded()
            if self._probing:
                self._probing = False
                self._window = self._receive_maximum

    def _dead_letter(self, chunk: StoredChunk, reason: str) -> None:
        assert self._ctx is not None
        self._ctx.reject([chunk.id], reason)
        self.counters.dead_letters += 1
        self._set_error(f"dead letter: {reason}")

    def _split(self, chunk: StoredChunk, reason: str) -> None:
        """Replace a chunk the broker finds too large by two halves, sent later."""
        assert self._ctx is not None
        try:
            request = zstandard.ZstdDecompressor().decompress(chunk.payload)
            halves = otlp.split_request(request)
        except (ValueError, zstandard.ZstdError) as e:  # one record, or a corrupt chunk: it can never fit
            self._dead_letter(chunk, f"{reason}; cannot split: {e}")
            return
        compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
        parts = [(compressor.compress(half), otlp.count_records(half)) for half in halves]
        self._ctx.spool.split(chunk, parts)
        self.counters.splits += 1
        log.warning("mqtt: %s; split chunk %s into %d parts", reason, chunk.chunk_id, len(parts))

    def _publish_online(self, client: Client) -> None:
        assert self._ctx is not None
        backlog = self._ctx.spool.backlog()
        self._publish_status(
            client,
            {
                "state": "online",
                "device_id": self.config.device_id,
                "version": __version__,
                "since": self.since,
                "backlog": {k: backlog[k] for k in ("chunks", "records", "bytes", "oldest_ns")},
            },
        )
        self._status_backlog = backlog["chunks"]

    def _publish_status(self, client: Client, status: dict[str, Any]) -> None:
        client.publish(self.status_topic, json.dumps(status), qos=1, retain=True)

    # --- timing -------------------------------------------------------------------

    def _misc_interval(self) -> float:
        """How often paho's keepalive bookkeeping runs: a quarter of the keepalive
        (the broker allows 1.5x; it may have set its own in CONNACK), at most
        every 15 s so an idle agent rarely wakes."""
        keepalive = self._client.keepalive if self._client is not None else self.keepalive
        return max(0.25, min(keepalive / 4, 15.0))

    def _ack_deadline(self) -> float:
        """How long outstanding PUBACKs may take: `ack_timeout`, plus the time the
        rate cap needs to let the window out."""
        extra = 0.0
        if self.upload.max_rate:
            extra = sum(entry.size for entry in self._inflight.values()) / self.upload.max_rate
        return self.mqtt.ack_timeout + extra

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        wake_at = [self._next_misc]
        if self._paused_until > now:
            wake_at.append(self._paused_until)
        if self._inflight:
            wake_at.append(self._last_progress + self._ack_deadline() + 0.01)
        if self.upload.max_rate and self._tokens < 0:
            wake_at.append(now + -self._tokens / self.upload.max_rate)
        return max(0.0, min(wake_at) - now)

    def _run_misc(self) -> None:
        client = self._client
        if client is None:
            return
        now = time.monotonic()
        if now >= self._next_misc:
            self._next_misc = now + self._misc_interval()
            client.loop_misc()

    def _take_tokens(self, size: int) -> bool:
        """Token bucket for `[upload].max_rate`: a chunk may go when the bucket is
        not in debt; its size is then charged, so the average stays under the cap."""
        rate = self.upload.max_rate
        if not rate:
            return True
        now = time.monotonic()
        self._tokens = min(float(rate), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 0:
            return False
        self._tokens -= size
        return True

    # --- paho callbacks (loop thread) -----------------------------------------------

    def _guard(self, callback: F) -> F:
        """Never let an exception reach paho (it would stop handling packets
        silently): log it and rebuild the connection instead."""

        @functools.wraps(callback)
        def guarded(*args: Any) -> Any:
            try:
                return callback(*args)
            except Exception as e:
                log.exception("mqtt: internal error in %s", callback.__name__)
                self._broken = f"internal error in {callback.__name__}: {_describe(e)}"
                self._poke()
                return None

        return guarded  # type: ignore[return-value]

    def _poke(self) -> None:
        self._progress.set()
        if self._ctx is not None:
            self._ctx.wake("progress")

    def _ours(self, client: Client) -> bool:
        """Callbacks act only for the live (or connecting) client, on the loop thread:
        the connect thread's own calls and dropped clients are ignored."""
        return threading.get_ident() == self._loop_thread and client in (self._client, self._connecting)

    def _on_readable(self, client: Client) -> None:
        try:
            if not self._ours(client):
                return
            rc = client.loop_read()
            # TLS may hold decrypted bytes the kernel no longer shows as readable.
            sock = client.socket()
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
                rc = client.loop_read()
                sock = client.socket()
        except Exception as e:
            log.exception("mqtt: internal error reading from the broker")
            self._broken = f"internal error reading from the broker: {_describe(e)}"
            self._poke()

    def _on_writable(self, client: Client) -> None:
        try:
            if not self._ours(client):
                return
            client.loop_write()
            self._last_progress = time.monotonic()
        except Exception as e:
            log.exception("mqtt: internal error writing to the broker")
            self._broken = f"internal error writing to the broker: {_describe(e)}"
            self._poke()

    def _on_socket_register_write(self, client: Client, userdata: Any, sock: Any) -> None:
        if self._ours(client) and self._loop is not None:
            self._loop.add_writer(sock, self._on_writable, client)

    def _on_socket_unregister_write(self, client: Client, userdata: Any, sock: Any) -> None:
        if self._ours(client) and self._loop is not None:
            self._loop.remove_writer(sock)

    def _on_socket_close(self, client: Client, userdata: Any, sock: Any) -> None:
        if self._ours(client) and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_connect(
        self, client: Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode, properties: Properties
    ) -> None:
        if client is self._connecting and self._connack is not None and not self._connack.done():
            self._connack.set_result((reason, properties))

    def _on_disconnect(
        self,
        client: Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        if client is self._connecting and self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError(str(reason)))
            return
        if client is not self._client:
            return
        by = "broker" if flags.is_disconnect_packet_from_server else "connection"
        self._broken = f"{by} closed: {reason}"
        self._lost_code = reason.value
        self._poke()

    def _on_publish(self, client: Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties) -> None:
        # May run before publish() returned the mid: only record it; the loop settles it.
        if client is self._client:
            self._outcomes.append((mid, reason))
            self._last_progress = time.monotonic()
            self._poke()

    def _set_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("mqtt: %s", message)
        self.last_error = message
        self.last_error_at = time.time()


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if type(e).__name__ in text else f"{type(e).__name__}: {text}"


def _close_quietly(client: Client) -> None:
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _close_abandoned(client: Client, attempt: asyncio.Future[Any]) -> None:
    """A connect that outlived its timeout finished after all: close what it opened."""
    if not attempt.cancelled():
        attempt.exception()  # retrieve it so asyncio does not log it as unhandled
    _close_quietly(client)

"""One MQTT connection: a fresh paho client driven from the agent's event loop.

How paho is driven. paho runs inside the agent's one event loop: its socket is
watched with `loop.add_reader`; a packet paho queues is written at once (paho's
`on_socket_register_write`), and `loop.add_writer` watches the socket only for
what the kernel could not take yet (`on_socket_unregister_write` /
`on_socket_close` keep that registration in step); `loop_misc` runs from the
session's timer for keepalive. Only the blocking part of a connect (DNS, TCP,
TLS handshake, sending CONNECT) runs in `asyncio.to_thread`, on a client object
no loop callback touches until the thread has returned.

Every connection uses a fresh client: paho resends everything it holds after
a reconnect, all at once and past its in-flight limit; a fresh client holds
nothing, and a dropped one takes its unsent copies with it.

An exception escaping into paho ends its packet handling silently, so every
callback is wrapped (`guarded`): the error is logged and the link marked
broken, which makes the session leave it and connect again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeagent.config import Config
from edgeagent.errors import ConnectFailed
from edgeagent.mqtt import client as mqttc

log = logging.getLogger("edgeagent.mqtt")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Pending:
    """A publish waiting for its PUBACK: the future it resolves, and its payload size (the watchdog's
    deadline allows for the rate cap)."""

    future: asyncio.Future[Any]
    size: int


def guarded(callback: F, on_error: Callable[[str], None]) -> F:
    """`callback`, with any exception logged and reported instead of reaching paho."""

    @functools.wraps(callback)
    def wrapper(*args: Any) -> Any:
        try:
            return callback(*args)
        except Exception as e:
            log.exception("mqtt: internal error in %s", callback.__name__)
            on_error(f"internal error in {callback.__name__}: {describe(e)}")
            return None

    return wrapper  # type: ignore[return-value]


class Link:
    """One connection attempt and, once the CONNACK accepted it, the connection."""

    def __init__(self, client: mqttc.BoundedClient, on_event: Callable[[], None]) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.connack: asyncio.Future[tuple[ReasonCode, Properties]] = self.loop.create_future()
        self.connack.add_done_callback(_retrieve)  # an error after the wait ended is not "unhandled"
        self.up = False  # the broker accepted the CONNECT
        self.pending: dict[int, Pending] = {}  # mid -> publish waiting for its PUBACK
        self.connected_at = 0.0  # monotonic
        self.last_progress = 0.0  # monotonic: last PUBACK or completed write
        self.next_misc = 0.0  # monotonic: next loop_misc (keepalive)
        self.broken = ""  # why this connection must be left
        self.lost_code = 0  # the reason code it ended with
        self.slow_down: float | None = None  # the wait a DISCONNECT reason code asked for
        self.max_packet_size: int | None = None
        self.receive_maximum: int | None = None
        self.watching_write = False  # the loop's writer is registered for the socket
        self._on_event = on_event
        client.on_socket_close = guarded(self._on_socket_close, self.fail)
        client.on_socket_register_write = guarded(self._on_socket_register_write, self.fail)
        client.on_socket_unregister_write = guarded(self._on_socket_unregister_write, self.fail)

    def owns(self, client: Any) -> bool:
        """Callbacks act only for this link's client, on the loop thread (not the connect thread's)."""
        return client is self.client and threading.get_ident() == self.loop_thread

    def fail(self, why: str) -> None:
        """Mark the link broken (the first reason wins) and wake the session."""
        if not self.broken:
            self.broken = why
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(why))
        self._on_event()

    async def open(self, config: Config) -> tuple[ReasonCode, Properties]:
        """Connect and wait for the CONNACK; raises ConnectFailed."""
        address = mqttc.broker_address(config.mqtt.url)
        client = self.client
        keepalive = max(1, round(config.mqtt.keepalive))
        if config.mqtt.protocol == "5":
            properties = mqttc.connect_properties(config)
            client.connect_async(address.host, address.port, keepalive, clean_start=True, properties=properties)
        else:
            client.connect_async(address.host, address.port, keepalive)
        # reconnect() resolves, connects, does the TLS handshake and queues CONNECT: blocking,
        # so it runs in a thread. No loop callback touches this client until the thread is done.
        attempt = asyncio.ensure_future(asyncio.to_thread(client.reconnect))
        limit = config.mqtt.connect_timeout + 5.0  # paho's own timeout covers TCP/TLS, not DNS
        try:
            done, _ = await asyncio.wait({attempt}, timeout=limit)
        except asyncio.CancelledError:
            attempt.add_done_callback(functools.partial(_close_abandoned, client))
            raise
        if not done:
            attempt.add_done_callback(functools.partial(_close_abandoned, client))
            raise ConnectFailed(f"connecting to {address} did not finish within {limit:.0f}s")
        try:
            rc = attempt.result()
        except (OSError, ValueError) as e:  # ssl's errors are OSErrors
            self.close()
            raise ConnectFailed(f"cannot connect to {address}: {describe(e)}") from None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.close()
            raise ConnectFailed(f"cannot connect to {address}: {rc.name}")
        self._attach()
        try:
            return await asyncio.wait_for(asyncio.shield(self.connack), config.mqtt.connect_timeout)
        except TimeoutError:
            self.close()
            hint = ""
            if config.mqtt.protocol == "5":
                hint = '; the broker may not speak MQTT 5: set [mqtt] protocol = "3.1.1" if it only speaks 3.1.1'
            raise ConnectFailed(f"no CONNACK from {address} within {config.mqtt.connect_timeout:.0f}s{hint}") from None
        except ConnectionError as e:
            self.close()
            raise ConnectFailed(f"{address} closed the connection before CONNACK: {e}") from None
        except asyncio.CancelledError:
            self.close()
            raise

    def _attach(self) -> None:
        """Watch the socket of a client whose reconnect() returned."""
        sock = self.client.socket()
        if sock is None:
            return
        self.loop.add_reader(sock, self._on_readable)
        self._watch_writable(sock, self.client.want_write())

    def close(self) -> None:
        """Stop watching and close the socket, without telling paho: the client
        object is dropped with everything it still holds."""
        sock = self.client.socket()
        if sock is None:
            return
        self.loop.remove_reader(sock)
        self._watch_writable(sock, False)
        _close_quietly(self.client)

    def misc_interval(self) -> float:
        """How often paho's keepalive bookkeeping runs: a quarter of the keepalive
        (the broker allows 1.5x; it may have set its own in CONNACK), at most
        every 15 s so an idle agent rarely wakes."""
        return max(0.25, min(self.client.keepalive / 4, 15.0))

    def run_misc(self) -> None:
        now = time.monotonic()
        if now >= self.next_misc:
            self.next_misc = now + self.misc_interval()
            self.client.loop_misc()

    def _on_readable(self) -> None:
        client = self.client
        try:
            rc = client.loop_read()
            # TLS may hold decrypted bytes the kernel no longer shows as readable.
            sock = client.socket()
            ssl = sys.modules.get("ssl")  # None where TLS is kept out (edgeagent.tls)
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and ssl and isinstance(sock, ssl.SSLSocket) and sock.pending():
                rc = client.loop_read()
                sock = client.socket()
        except Exception as e:
            # Something paho's parser did not expect: the broker is untrusted input.
            log.warning("mqtt: cannot handle what the broker sent: %s", describe(e))
            self.fail(f"cannot handle what the broker sent: {describe(e)}")

    def _on_writable(self) -> None:
        try:
            self.client.loop_write()
            self.last_progress = time.monotonic()
        except Exception as e:
            log.exception("mqtt: internal error writing to the broker")
            self.fail(f"internal error writing to the broker: {describe(e)}")

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        """paho queued a packet: write now, as paho does without an external loop. The kernel
        usually takes it all, and then no writer is registered (and removed) for it; the socket is
        watched only for what it could not take, and for what is queued inside one of paho's
        callbacks (writing there could re-enter paho's callback lock)."""
        if self.owns(client):
            if not client.in_callback():
                self._on_writable()
            self._watch_writable(sock, client.want_write() and client.socket() is sock)

    def _on_socket_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self.owns(client):
            self._watch_writable(sock, False)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        if self.owns(client):
            self.loop.remove_reader(sock)
            self._watch_writable(sock, False)
            self._on_event()  # on_disconnect follows with the reason; the session checks the socket

    def _watch_writable(self, sock: Any, watch: bool) -> None:
        """Register or remove the loop's writer for `sock`, only when that changes something."""
        if watch and not self.watching_write:
            self.loop.add_writer(sock, self._on_writable)
        elif not watch and self.watching_write:
            self.loop.remove_writer(sock)
        self.watching_write = watch


def describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if type(e).__name__ in text else f"{type(e).__name__}: {text}"


def _close_quietly(client: Any) -> None:
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _close_abandoned(client: Any, attempt: asyncio.Future[Any]) -> None:
    """A connect that outlived its timeout finished after all: close what it opened."""
    if not attempt.cancelled():
        attempt.exception()  # retrieve it so asyncio does not log it as unhandled
    _close_quietly(client)

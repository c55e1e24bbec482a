"""The MQTT session on its own: subscriptions that come back after every
CONNACK, dispatch by exact topic, publish outcomes, the limits declared in
CONNECT and enforced on what a broker sends, reconnect policy by reason code,
IPv6 brokers. Real mosquitto where it can show the behaviour; a raw-socket
broker for what mosquitto will not do (busy, moved, hostile)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, wait_for
from mqtt_helpers import (
    RawBroker,
    UploaderHarness,
    connack,
    mqtt_packet,
    read_packet,
    rss_kib,
    utf8,
    v5_properties,
    varint,
)
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_mqtt_uploader import config_text

from edgeagent.config import loads
from edgeagent.mqtt import IncomingMessage, MqttSession, session_needed
from edgeagent.mqtt.client import MAX_INCOMING_PACKET, RECEIVE_MAXIMUM, broker_url_for_display

DESIRED = "edgeagent/gw-7/config/desired"


def publisher(port: int, host: str = "127.0.0.1") -> Client:
    client = Client(CallbackAPIVersion.VERSION2, client_id="operator", protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    return client


def publish_and_wait(client: Client, topic: str, payload: bytes, retain: bool = False) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)


def test_subscriptions_come_back_after_every_connack_and_handlers_cannot_hurt_the_session(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness]
) -> None:
    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url))
    harnesses.append(h)
    got: list[IncomingMessage] = []
    connected: list[float] = []

    def explode(message: IncomingMessage) -> None:
        raise RuntimeError("a bug in a handler")

    def setup() -> None:
        h.session.subscribe(DESIRED, got.append)
        h.session.subscribe("edgeagent/gw-7/explodes", explode)
        h.session.on_connected(lambda: connected.append(time.monotonic()))

    h.call(setup)
    with pytest.raises(ValueError, match="exact topic"):
        h.call(h.session.subscribe, "edgeagent/+/config", got.append)
    operator = publisher(mosquitto.port)
    try:
        publish_and_wait(operator, DESIRED, b"version 1", retain=True)
        h.start()
        wait_for(lambda: len(got) == 1, what="the retained message, after the first CONNACK")
        assert got[0].topic == DESIRED and got[0].payload == b"version 1" and got[0].retain
        publish_and_wait(operator, "edgeagent/gw-7/explodes", b"boom")
        publish_and_wait(operator, DESIRED + "/deeper", b"not subscribed")
        publish_and_wait(operator, DESIRED, b"version 2")
        wait_for(lambda: len(got) == 2, what="the live message")
        assert got[1].payload == b"version 2" and not got[1].retain
        assert got[1].properties == {} or isinstance(got[1].properties, dict)
        st = h.call(h.session.status)
        assert st["connections"] == 1 and st["connected"] and st["incoming"] == 3
        assert st["subscriptions"] == [DESIRED, "edgeagent/gw-7/explodes"]

        result = h.run(h.session.publish("edgeagent/gw-7/config/status", b"{}", retain=True))
        assert result.ok and result.reason_code == 0x10  # accepted; nobody subscribed to it

        mosquitto.stop()
        wait_for(lambda: not h.call(lambda: h.session.connected), what="the session noticed")
        offline = h.run(h.session.publish("edgeagent/gw-7/config/status", b"{}"))
        assert not offline.ok and offline.reason == "not connected"
        mosquitto.start()  # persistence is off: the retained message is gone
        h.wake()
        assert h.run(h.session.wait_connected(30))
        operator.reconnect()
        publish_and_wait(operator, DESIRED, b"version 3", retain=True)
        wait_for(lambda: len(got) == 3, what="delivered on the re-sent subscription")
        assert got[2].payload == b"version 3" and len(connected) == 2

        h.call(h.session.unsubscribe, DESIRED)
        publish_and_wait(operator, DESIRED, b"version 4")
        publish_and_wait(operator, "edgeagent/gw-7/explodes", b"boom")
        wait_for(lambda: h.call(h.session.status)["incoming"] >= 4, what="the second exploding message")
        assert len(got) == 3
    finally:
        operator.disconnect()
        operator.loop_stop()


def test_connect_declares_maximum_packet_size_and_receive_maximum(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness], raw_brokers: list[RawBroker]
) -> None:
    """What the agent declares in CONNECT, read from the wire; and a real broker
    honouring it: a message over the limit is not sent to us, the connection stays."""

    def record_connect(conn: Any, reader: Any, n: int) -> None:
        packet = read_packet(reader)
        if packet is not None:
            raw.connects.append(packet[1])

    raw = RawBroker(record_connect)
    raw_brokers.append(raw)
    probe = UploaderHarness(
        tmp_path / "probe", config_text(raw.url).replace('connect_timeout = "3s"', 'connect_timeout = "1s"')
    )
    harnesses.append(probe)
    probe.start()
    wait_for(lambda: raw.connects, what="a CONNECT")
    body = raw.connects[0]
    assert body[:7] == b"\x00\x04MQTT\x05"  # MQTT 5
    declared = Properties(PacketTypes.CONNECT)
    declared.unpack(body[10:])
    assert declared.MaximumPacketSize == MAX_INCOMING_PACKET == 256 * 1024
    assert declared.ReceiveMaximum == RECEIVE_MAXIMUM

    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url))
    harnesses.append(h)
    got: list[IncomingMessage] = []
    h.call(h.session.subscribe, DESIRED, got.append)
    h.start()
    assert h.run(h.session.wait_connected(30))
    wait_for(lambda: h.call(h.session.status)["subscriptions"], what="subscribed")
    operator = publisher(mosquitto.port)
    try:
        publish_and_wait(operator, DESIRED, b"x" * (300 * 1024))  # over what we declared
        publish_and_wait(operator, DESIRED, b"small")
        wait_for(lambda: got, what="the small message")
    finally:
        operator.disconnect()
        operator.loop_stop()
    assert [m.payload for m in got] == [b"small"]
    assert h.call(h.session.status)["connections"] == 1


def test_the_brokers_maximum_packet_size_is_known(tmp_path: Path, harnesses: list[UploaderHarness]) -> None:
    broker = Broker(tmp_path, "max_packet_size 6000\n")
    broker.start()
    try:
        h = UploaderHarness(tmp_path / "state", config_text(broker.url))
        harnesses.append(h)
        h.start()
        assert h.run(h.session.wait_connected(30))
        assert h.call(lambda: h.session.max_packet_size) == 6000
        assert h.status()["max_packet_size"] == 6000
    finally:
        broker.stop()


def serve_huge_publish(sent: list[int], size: int) -> Callable[[Any, Any, int], None]:
    """CONNACK, then a PUBLISH announcing `size` bytes, then as much of it as the client reads."""
    block = b"\x00" * (1024 * 1024)

    def serve(conn: Any, reader: Any, n: int) -> None:
        if read_packet(reader) is None:
            return
        conn.sendall(connack())
        if n > 0:
            time.sleep(30)  # later connections: a quiet, healthy broker
            return
        conn.sendall(b"\x30" + varint(size))
        conn.settimeout(10)
        total = 0
        while total < size:
            conn.sendall(block)  # raises once the client has closed the connection
            total += len(block)
            sent[0] = total

    return serve


def test_a_250_mib_publish_from_the_broker_is_refused_not_buffered(
    tmp_path: Path, harnesses: list[UploaderHarness], raw_brokers: list[RawBroker]
) -> None:
    """paho reads a packet whole and trusts the announced length; before, a
    250 MiB PUBLISH took the agent's RSS to about 800 MB. Now the read fails as
    soon as the length is known, the connection is dropped and made again."""
    sent = [0]
    raw = RawBroker(serve_huge_publish(sent, 250 * 1024 * 1024))
    raw_brokers.append(raw)
    h = UploaderHarness(tmp_path / "state", config_text(raw.url))
    harnesses.append(h)
    before = rss_kib()
    h.start()
    wait_for(lambda: raw.connections >= 2, 30, what="dropped and connected again")
    grown = rss_kib() - before
    error = h.call(h.session.status)["last_error"] or ""
    assert f"{250 * 1024 * 1024}-byte packet" in error and str(MAX_INCOMING_PACKET) in error
    assert grown < 32 * 1024, f"RSS grew by {grown} KiB"
    assert sent[0] < 64 * 1024 * 1024  # what the kernel buffers took before the client hung up


def test_no_connack_under_mqtt5_names_the_311_setting(
    tmp_path: Path, harnesses: list[UploaderHarness], raw_brokers: list[RawBroker]
) -> None:
    """A 3.1.1-only broker may never answer an MQTT 5 CONNECT (issue 9)."""
    raw = RawBroker(lambda conn, reader, n: (read_packet(reader), time.sleep(10)))
    raw_brokers.append(raw)
    h = UploaderHarness(
        tmp_path / "state", config_text(raw.url).replace('connect_timeout = "3s"', 'connect_timeout = "1s"')
    )
    harnesses.append(h)
    h.start()
    wait_for(lambda: h.status()["last_error"], what="the timeout")
    error = h.status()["last_error"]
    assert "no CONNACK" in error and "may not speak MQTT 5" in error and 'protocol = "3.1.1"' in error


def record_delays(h: UploaderHarness) -> list[float]:
    """The waits the session asks for before each reconnect."""
    delays: list[float] = []
    sleep = h.session._sleep_offline

    async def recorded(delay: float) -> None:
        delays.append(delay)
        await sleep(delay)

    h.session._sleep_offline = recorded  # type: ignore[method-assign]
    return delays


@pytest.mark.parametrize(
    "code", [0x89, 0x97, 0x9F, 0x9C], ids=["server-busy", "quota-exceeded", "rate-exceeded", "use-another-server"]
)
def test_a_broker_asking_to_slow_down_gets_a_longer_wait(
    tmp_path: Path, code: int, harnesses: list[UploaderHarness], raw_brokers: list[RawBroker]
) -> None:
    """CONNACK with server busy / quota exceeded / connection rate exceeded /
    use another server: the next attempt waits at least half of min(60 s,
    retry_max) (here 2 s), where a plain failure waits up to retry_initial
    (200 ms) at first."""

    def refuse(conn: Any, reader: Any, n: int) -> None:
        if read_packet(reader) is not None:
            reference = (0x1C, utf8("other.example.net:1883"))
            conn.sendall(connack(code, v5_properties(reference) if code == 0x9C else b"\x00"))

    raw = RawBroker(refuse)
    raw_brokers.append(raw)
    h = UploaderHarness(tmp_path / "state", config_text(raw.url))
    harnesses.append(h)
    delays = record_delays(h)
    h.start()
    wait_for(lambda: len(delays) >= 2, 30, what="two refused attempts")
    assert all(delay >= 1.0 for delay in delays), delays
    st = h.call(h.session.status)
    assert f"0x{code:02x}" in st["last_error"] and not st["connected"]
    if code == 0x9C:  # logged and shown, never followed: every attempt went to the configured broker
        assert st["server_reference"] == "other.example.net:1883" and raw.connections >= 2


def test_server_moved_disconnect_is_shown_not_followed(
    tmp_path: Path, harnesses: list[UploaderHarness], raw_brokers: list[RawBroker]
) -> None:
    def move(conn: Any, reader: Any, n: int) -> None:
        if read_packet(reader) is None:
            return
        conn.sendall(connack())
        conn.sendall(mqtt_packet(0xE0, b"\x9d" + v5_properties((0x1C, utf8("new-broker.example.net")))))

    raw = RawBroker(move)
    raw_brokers.append(raw)
    h = UploaderHarness(tmp_path / "state", config_text(raw.url))
    harnesses.append(h)
    delays = record_delays(h)
    h.start()
    wait_for(lambda: raw.connections >= 2, 30, what="a second connection to the same broker")
    st = h.call(h.session.status)
    assert st["server_reference"] == "new-broker.example.net" and "Server moved" in st["last_error"]
    assert delays and delays[0] >= 1.0


def test_backoff_keeps_growing_when_the_broker_accepts_and_then_drops_us(
    tmp_path: Path, harnesses: list[UploaderHarness], raw_brokers: list[RawBroker]
) -> None:
    """A successful CONNACK does not reset the schedule (issue 11): only a
    connection that stayed up for a keepalive does. Otherwise a broker that
    kicks every client at once gets them all back at once, forever."""

    def accept_and_drop(conn: Any, reader: Any, n: int) -> None:
        if read_packet(reader) is not None:
            conn.sendall(connack())

    raw = RawBroker(accept_and_drop)
    raw_brokers.append(raw)
    h = UploaderHarness(tmp_path / "state", config_text(raw.url))
    harnesses.append(h)
    h.start()
    wait_for(lambda: h.call(h.session.status)["connections"] >= 4, 60, what="four short connections")
    assert h.call(h.session.status)["retry_failures"] >= 3


def test_first_connection_waits_a_random_delay_that_a_network_event_does_not_cut(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness]
) -> None:
    h = UploaderHarness(
        tmp_path / "state",
        config_text(mosquitto.url).replace('first_connect_delay = "0s"', 'first_connect_delay = "1h"'),
    )
    harnesses.append(h)
    h.start()
    h.wake()  # a link coming up at boot
    for _ in range(20):
        h.call(lambda: None)  # let the loop run whatever the wake leads to
    assert h.call(h.session.status)["connections"] == 0


def test_connects_to_an_ipv6_literal(tmp_path: Path) -> None:
    broker = Broker(tmp_path, port=None)
    broker.host = "::1"
    try:
        broker.start()
    except RuntimeError as e:  # no IPv6 on loopback in this environment
        pytest.skip(f"mosquitto cannot listen on ::1: {e}")
    url = f"mqtt://[::1]:{broker.port}"
    config = loads(config_text(url).replace("{state_dir}", str(tmp_path / "state")))
    assert broker_url_for_display(url) == url

    async def publish_once() -> Any:
        session = MqttSession(config)
        task = asyncio.create_task(session.run())
        try:
            assert await session.wait_connected(30), session.status()["last_error"]
            return await session.publish("edgeagent/gw-7/logs", b"over IPv6")
        finally:
            await session.close()
            await asyncio.gather(task, return_exceptions=True)

    try:
        result = asyncio.run(publish_once())
    finally:
        broker.stop()
    assert result.ok


def test_who_needs_a_session() -> None:
    assert session_needed(loads('[upload]\nto = "mqtt"\n'))
    assert not session_needed(loads('[upload]\nto = "otlp_http"\n'))
    assert not session_needed(loads('[upload]\nto = "none"\n'))
    assert session_needed(loads('[upload]\nto = "otlp_http"\n[fleet]\nenabled = true\n'))
    assert session_needed(loads('[upload]\nto = "none"\n[fleet]\nenabled = true\n'))

"""What the MQTT client does per message: the PUBACK shortcut (`client.short_success_puback`) against
paho's own decoder, over every short body and on the wire (success forms, failure codes, malformed and
oversized PUBACKs from a raw-socket broker), the shortcut in use with the real mosquitto, and outgoing
packets that take many writes."""

from __future__ import annotations

import ast
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, wait_for
from mqtt_helpers import (
    RawBroker,
    Subscriber,
    UploaderHarness,
    connack,
    read_packet,
    read_varint,
    utf8,
    v5_properties,
    varint,
)
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from test_mqtt_uploader import config_text

from edgeagent.mqtt import IncomingMessage
from edgeagent.mqtt.client import MAX_INCOMING_PACKET, short_success_puback

TOPIC = "edgeagent/gw-7/logs"
MID = b"\x12\x34"


def paho_decodes(body: bytes, v5: bool) -> tuple[int, int, dict[str, Any]] | None:
    """(packet id, reason code, properties) as paho decodes a PUBACK body; None if paho refuses it."""
    protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    try:
        decoded = _packet.decode_puback(0x40, bytearray(body), protocol)
    except MalformedPacket:
        return None
    return decoded.mid, decoded.reason.value, decoded.properties.json()


SHORT_BODIES = [
    MID + bytes([reason]) + tail
    for reason in range(256)
    for tail in (b"", b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\x00\x00", b"\x03\x1f\x00\x00")
] + [b"", b"\x00", MID]


@pytest.mark.parametrize("v5", [True, False])
def test_the_puback_shortcut_agrees_with_pahos_decoder_on_every_short_body(v5: bool) -> None:
    """Whatever the shortcut takes, paho decodes to the same success with no properties; whatever paho
    decodes to a success without properties in 2 to 4 bytes, the shortcut takes. Everything else (failure
    codes, properties, codes a PUBACK cannot have, truncated bodies) is left to paho."""
    taken = 0
    for body in SHORT_BODIES:
        ours = short_success_puback(body, v5)
        by_paho = paho_decodes(body, v5)
        if ours is not None:
            taken += 1
            assert by_paho == (0x1234, ours, {}), body.hex()
        elif by_paho is not None and len(body) <= 4:
            _, reason, properties = by_paho
            assert reason >= 0x80 or properties, f"{body.hex()}: paho reads a success the shortcut left"
    assert taken == (5 if v5 else 1)  # 2 bytes; with MQTT 5 also 00, 10, 00 00, 10 00 after the id


class PubackBroker(RawBroker):
    """A minimal MQTT 5 server answering each QoS 1 PUBLISH on `TOPIC` with the PUBACK body that
    `answer(connection, packet_id)` returns (raw bytes after the fixed header); other topics (the
    status) get a plain success. Records the payload of every PUBLISH on `TOPIC`."""

    def __init__(self, answer: Callable[[int, bytes], bytes], pause_first_read: float = 0.0) -> None:
        self.answer = answer
        self.pause_first_read = pause_first_read
        self.payloads: list[bytes] = []
        super().__init__(self._serve)

    def _serve(self, conn: Any, reader: Any, n: int) -> None:
        while (packet := read_packet(reader)) is not None:
            header, body = packet
            kind = header >> 4
            if kind == 1:
                conn.sendall(connack())
                time.sleep(self.pause_first_read if n == 0 else 0)
            elif kind == 3:
                topic_len = int.from_bytes(body[:2], "big")
                topic = body[2 : 2 + topic_len].decode()
                packet_id = body[2 + topic_len : 4 + topic_len]
                properties_len, at = read_varint(body, 4 + topic_len)
                if topic != TOPIC:
                    conn.sendall(b"\x40\x02" + packet_id)
                    continue
                with self._lock:
                    self.payloads.append(body[at + properties_len :])
                answer = self.answer(n, packet_id)
                conn.sendall(b"\x40" + varint(len(answer)) + answer)
            elif kind == 12:
                conn.sendall(b"\xd0\x00")
            elif kind == 14:
                return


def session_harness(tmp_path: Path, broker: RawBroker, harnesses: list[UploaderHarness]) -> UploaderHarness:
    h = UploaderHarness(tmp_path / "state", config_text(broker.url))
    harnesses.append(h)
    h.start()  # the session, and an uploader with nothing to send
    assert h.run(h.session.wait_connected(30))
    return h


@pytest.mark.parametrize(
    ("tail", "ok", "reason_code"),
    [
        (b"", True, 0x00),
        (b"\x00", True, 0x00),
        (b"\x10", True, 0x10),
        (b"\x00\x00", True, 0x00),
        (b"\x10\x00", True, 0x10),
        (b"\x00" + v5_properties((0x1F, utf8("stored"))), True, 0x00),  # properties: paho's decoder
        (b"\x97", False, 0x97),
        (b"\x87" + v5_properties((0x1F, utf8("not in the ACL"))), False, 0x87),
    ],
)
def test_puback_forms_on_the_wire(
    tail: bytes,
    ok: bool,
    reason_code: int,
    tmp_path: Path,
    harnesses: list[UploaderHarness],
    raw_brokers: list[RawBroker],
) -> None:
    broker = PubackBroker(lambda n, packet_id: packet_id + tail)
    raw_brokers.append(broker)
    h = session_harness(tmp_path, broker, harnesses)
    for _ in range(3):  # the same outcome every time (nothing kept from one PUBACK to the next)
        result = h.run(h.session.publish(TOPIC, b"payload"))
        assert (result.ok, result.reason_code, result.connection_lost) == (ok, reason_code, False)
        assert result.credentials_problem == (reason_code == 0x87)
    assert h.call(h.session.status)["connections"] == 1


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"", "malformed PUBACK (body: empty): wrong size of packet"),
        (b"\x00", "malformed PUBACK (body: 00): wrong size of packet"),
        (MID + b"\x95", "malformed PUBACK (body: 12 34 95)"),  # 0x95 is no PUBACK reason code
        (MID + b"\x00\x7f", "malformed PUBACK (body: 12 34 00 7f)"),  # properties longer than the packet
        (MID + b"\x00" + varint(200) + b"\x1f\x00\x05abc", "malformed PUBACK (body: 12 34 00 c8 01 1f 00 05 61 62 63)"),
        (MID + b"\x00\x03\x1f\x00\x09ab", "malformed PUBACK (body: 12 34 00 03 1f 00 09 61 62)"),
        (MID + b"\x00" + b"\x00" * MAX_INCOMING_PACKET, f"{MAX_INCOMING_PACKET + 3}-byte packet"),
    ],
)
def test_a_malformed_or_oversized_puback_ends_the_connection_naming_it_and_nothing_is_lost(
    body: bytes, named: str, tmp_path: Path, harnesses: list[UploaderHarness], raw_brokers: list[RawBroker]
) -> None:
    """The broker is untrusted: a PUBACK paho cannot decode, or one over the size we accept, ends the
    connection with an error that says what came; the message counts as not delivered and goes again."""
    broker = PubackBroker(lambda n, packet_id: body if n == 0 else packet_id)
    raw_brokers.append(broker)
    h = session_harness(tmp_path, broker, harnesses)
    first = h.run(h.session.publish(TOPIC, b"payload"))
    assert not first.ok and first.connection_lost
    error = h.call(h.session.status)["last_error"] or ""
    assert named in error, error
    assert h.run(h.session.wait_connected(30))
    again = h.run(h.session.publish(TOPIC, b"payload"))
    assert again.ok and h.call(h.session.status)["connections"] == 2


def test_success_pubacks_from_mosquitto_take_the_shortcut(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """mosquitto acknowledges with a short success PUBACK: none of them reaches paho's decoder (which
    builds a reason code and a properties object for each). Fails if paho's internals move."""
    decoded = []
    decode_puback = _packet.decode_puback

    def counting(*args: Any) -> Any:
        decoded.append(args)
        return decode_puback(*args)

    monkeypatch.setattr(_packet, "decode_puback", counting)
    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url))
    harnesses.append(h)
    h.add_lines(0, 2000, 100)
    h.start()
    wait_for(lambda: h.backlog()["chunks"] == 0, what="delivered")
    assert h.status()["acked"] >= 1 and decoded == []


def test_a_publish_many_times_the_socket_buffers_arrives_whole(
    tmp_path: Path, harnesses: list[UploaderHarness], raw_brokers: list[RawBroker]
) -> None:
    """Outgoing packets are sent from a memoryview: the many partial writes of a packet far larger than
    the socket buffers (the broker does not read for a while) put it on the wire byte for byte."""
    payload = os.urandom(24 * 1024 * 1024)
    broker = PubackBroker(lambda n, packet_id: packet_id, pause_first_read=1.0)
    raw_brokers.append(broker)
    h = session_harness(tmp_path, broker, harnesses)
    result = h.run(h.session.publish(TOPIC, payload), timeout=120)
    assert result.ok
    assert len(broker.payloads) == 1 and broker.payloads[0] == payload


def test_what_a_message_handler_publishes_goes_out_without_blocking_the_loop(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness], subscribers: list[Subscriber]
) -> None:
    """Packets are written as soon as they are queued, except inside one of paho's callbacks (a handler
    runs inside on_message): writing a QoS 0 PUBLISH there would take paho's callback lock again and
    hang the event loop. Those wait for the socket to be writable and go out all the same."""
    requests, replies = "edgeagent/gw-7/requests", "edgeagent/gw-7/replies"
    listener = Subscriber(mosquitto.port, replies)
    subscribers.append(listener)
    results: list[Any] = []

    def answer(message: IncomingMessage) -> None:
        for qos in (0, 1):
            results.append(h.session.publish_nowait(replies, message.payload + b" qos %d" % qos, qos=qos))

    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url))
    harnesses.append(h)
    h.call(h.session.subscribe, requests, answer)
    operator = Subscriber(mosquitto.port, "edgeagent/gw-7/unused", client_id="operator")
    subscribers.append(operator)
    operator.client.publish(requests, b"ping", qos=1, retain=True).wait_for_publish(10)
    h.start()
    wait_for(lambda: len(listener.received()) == 2, what="both replies")
    assert sorted(m.payload for m in listener.received()) == [b"ping qos 0", b"ping qos 1"]
    outcomes = h.call(lambda: [f.done() and f.result().ok for f in results])
    assert outcomes == [True, True] and h.call(h.session.status)["connections"] == 1


def test_the_agent_imports_only_paho_modules_that_paho_2_0_and_2_1_have() -> None:
    """pyproject allows paho-mqtt >= 2.0, and Debian-based images and the QEMU guests install 2.1, which has no
    `paho.mqtt.exception` (2.2 moved `MalformedPacket` there): importing it stopped the agent at start."""
    available = {"client", "enums", "matcher", "packettypes", "properties", "publish", "reasoncodes", "subscribe"}
    available |= {"subscribeoptions"}  # the modules of paho-mqtt 2.1.0
    package = Path(__file__).resolve().parent.parent / "edgeagent"
    used = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            used |= {(source.name, n) for n in names if n.startswith("paho.mqtt.")}
    assert {(f, n) for f, n in used if n.split(".")[2] not in available} == set()

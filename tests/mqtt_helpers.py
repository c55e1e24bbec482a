"""Test helpers for the MQTT session and uploader: both running in-process on their
own event loop (in a thread, so the test can stop and start brokers
meanwhile), a real paho subscriber, and an OTLP decoder built on the official
opentelemetry-proto messages."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import zstandard
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.config import Config, loads
from edgeagent.mqtt import MqttSession
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import WAKE_NETWORK, Batcher, UploaderContext
from edgeagent.records import Batch, Record
from edgeagent.spool import Spool
from edgeagent.uploaders.mqtt import MqttUploader

T = TypeVar("T")
BOOT_ID = "0b00700b-0000-4000-8000-000000000001"


class UploaderHarness:
    """Spool + batcher + MqttSession + MqttUploader on an event loop in a background thread.

    Everything that touches the spool or the uploader runs on that loop
    (`call`), as in the agent; the test thread only controls brokers and reads.
    """

    def __init__(self, state_dir: Path, config_text: str) -> None:
        self.config: Config = loads(config_text.replace("{state_dir}", str(state_dir)))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="uploader-loop", daemon=True)
        self.thread.start()
        self.task: asyncio.Task[None] | None = None
        self.session_task: asyncio.Task[None] | None = None
        self.call(self._setup)

    def _setup(self) -> None:
        config = self.config
        self.spool = Spool.open(config.spool_path, max_size=config.spool.max_size)
        self.ctx = UploaderContext(self.spool, config)
        encoder = ChunkEncoder({"device.id": config.device_id, "host.name": "test-host", "os.type": "linux"}, "test")
        self.batcher = Batcher(self.spool, encoder, BOOT_ID, config.spool, on_commit=self.ctx.wake)
        self.session = MqttSession(config, self.spool.backlog)
        self.uploader = MqttUploader(config, self.session)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the loop thread and return its result."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as e:
                done.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return done.result(60)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        """Await `coro` on the loop thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        def start_task() -> None:
            if self.session is not None:  # None: an uploader without one (see contract_backends)
                self.session_task = self.loop.create_task(self.session.run())
            self.task = self.loop.create_task(self.uploader.run(self.ctx))

        self.call(start_task)

    def add(self, batches: list[Batch]) -> None:
        def add_all() -> None:
            for batch in batches:
                self.batcher.add(batch)
            self.batcher.flush()

        self.call(add_all)

    def add_lines(self, first: int, count: int, per_chunk: int, source: str = "test") -> None:
        """Lines `line <n> ...` for n in [first, first+count), `per_chunk` per chunk."""
        for start in range(first, first + count, per_chunk):
            end = min(start + per_chunk, first + count)
            lines = [line_text(n) for n in range(start, end)]
            self.add([Batch(source, lines, 1_000_000_000 + start, BOOT_ID, {"log.file.path": "/var/log/app.log"})])

    def status(self) -> dict[str, Any]:
        return self.call(self.uploader.status)

    def backlog(self) -> dict[str, int]:
        return self.call(self.spool.backlog)

    def counters(self) -> dict[str, int]:
        return self.call(self.spool.counters)

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.call(self.spool.dead_letters)

    def chunk_ids(self) -> list[str]:
        return self.call(lambda: [c.chunk_id for c in self.spool.oldest(10**6)])

    def wake(self) -> None:
        """What the network watch does when a link comes up."""

        def wake() -> None:
            if self.session is not None:
                self.session.wake()
            self.ctx.wake(WAKE_NETWORK)

        self.call(wake)

    def drain(self, timeout: float) -> None:
        """What the agent does at a stop: the uploader waits for acks, then the session says goodbye."""

        async def stop() -> None:
            await self.uploader.drain(timeout)
            if self.session is not None:
                await self.session.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout + 30)

    def close(self) -> None:
        if self.task is not None:
            self.drain(2.0)
            self.call(self.task.cancel)
        if self.session_task is not None:
            self.call(self.session_task.cancel)
        self.call(self.spool.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def line_text(n: int) -> bytes:
    # Varied enough that zstd cannot squeeze 100,000 lines into a few bytes.
    return f"line {n:07d} sensor={n * 7919 % 10007:05d} state={'ok' if n % 3 else 'degraded'} seq={n}".encode()


@dataclass
class Received:
    topic: str
    payload: bytes
    content_type: str | None
    user_properties: dict[str, str]
    retain: bool


class Subscriber:
    """A real paho client subscribed at QoS 1 (paho's own network thread is fine
    in a test). With `persistent`, its session survives a broker restart
    (the broker must run with persistence on)."""

    def __init__(self, port: int, topic: str, persistent: bool = False, client_id: str = "test-subscriber") -> None:
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.topic = topic
        self.subscribed = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.reconnect_delay_set(1, 2)
        properties = None
        if persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, keepalive=10, clean_start=not persistent, properties=properties)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise AssertionError("subscriber did not get its SUBACK")

    def _on_connect(self, client: Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: Client, userdata: Any, message: Any) -> None:
        props = getattr(message, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        with self.lock:
            self.messages.append(
                Received(message.topic, message.payload, getattr(props, "ContentType", None), user, message.retain)
            )

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def decode(payload: bytes) -> ExportLogsServiceRequest:
    """What any receiver does: one zstd frame, then the official protobuf message."""
    request = ExportLogsServiceRequest()
    request.ParseFromString(zstandard.ZstdDecompressor().decompress(payload))
    return request


def bodies(payload: bytes) -> list[str]:
    request = decode(payload)
    return [
        record.body.string_value
        for resource_logs in request.resource_logs
        for scope_logs in resource_logs.scope_logs
        for record in scope_logs.log_records
    ]


def line_numbers(messages: list[Received]) -> list[list[int]]:
    """The line numbers of each message, in message order."""
    return [[int(body.split()[1]) for body in bodies(m.payload)] for m in messages]


def record_example() -> list[Batch]:
    """Records with severities and attributes, for the decode test."""
    return [
        Batch(
            "kmsg",
            [
                Record("usb 1-1: new high-speed USB device", 9, "INFO", {"kernel.subsystem": "usb"}, 5_000_000_000),
                Record("EXT4-fs error (device mmcblk0p2)", 17, "ERR", {"kernel.facility": 0}, 6_000_000_000),
                Record("Out of memory: Killed process 812", 21, "CRIT", None, 7_000_000_000),
            ],
            7_500_000_000,
            BOOT_ID,
        )
    ]


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property length)."""
    encoded = bytearray()
    while True:
        byte, n = n % 128, n // 128
        encoded.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(encoded)


def mqtt_packet(first_byte: int, body: bytes) -> bytes:
    """One MQTT packet: fixed header, remaining length, body."""
    return bytes([first_byte]) + varint(len(body)) + body


def v5_properties(*pairs: tuple[int, bytes]) -> bytes:
    """MQTT 5 properties (identifier, encoded value), with their length in front."""
    data = b"".join(bytes([ident]) + value for ident, value in pairs)
    return varint(len(data)) + data


def utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, offset after it) of the variable byte integer at `at`."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def utf8_at(data: bytes, at: int) -> tuple[str, int]:
    """(text, offset after it) of the length-prefixed UTF-8 string at `at`."""
    length = int.from_bytes(data[at : at + 2], "big")
    return data[at + 2 : at + 2 + length].decode(), at + 2 + length


def connack(reason: int = 0, properties: bytes = b"\x00") -> bytes:
    return mqtt_packet(0x20, b"\x00" + bytes([reason]) + properties)


def read_packet(reader: Any) -> tuple[int, bytes] | None:
    """(first byte, body) of the next packet from a socket file, None at the end."""
    header = reader.read(1)
    if not header:
        return None
    length = shift = 0
    while True:
        raw = reader.read(1)
        if not raw:
            return None
        length |= (raw[0] & 0x7F) << shift
        shift += 7
        if not raw[0] & 0x80:
            break
    body = reader.read(length)
    return (header[0], body) if len(body) == length else None


class RawBroker:
    """A TCP server on 127.0.0.1 that hands every connection to `serve(conn, reader, n)`
    (n counts connections from 0): a broker that misbehaves as the test scripts."""

    def __init__(self, serve: Callable[[Any, Any, int], None]) -> None:
        import socket

        self.serve = serve
        self.connections = 0
        self.connects: list[bytes] = []  # the body of each CONNECT received (if `serve` records it)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                n = self.connections
                self.connections += 1
            threading.Thread(target=self._run, args=(conn, n), daemon=True).start()

    def _run(self, conn: Any, n: int) -> None:
        with conn, contextlib.suppress(OSError):
            self.serve(conn, conn.makefile("rb"), n)

    def close(self) -> None:
        self._server.close()


def rss_kib() -> int:
    """This process's resident set size, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


class ScriptedBroker(RawBroker):
    """A minimal MQTT 5 server whose PUBACK reason codes the test scripts, for
    answers mosquitto cannot be made to give (quota exceeded, unspecified
    error) and for a broker that stays alive (answers pings) but never
    acknowledges. `answer(topic, n)` returns the reason code for the n-th
    PUBLISH on `topic` (from 0), or None to never acknowledge it."""

    def __init__(self, answer: Callable[[str, int], int | None]) -> None:
        self.answer = answer
        self.publishes: list[tuple[str, int | None]] = []  # (topic, reason answered)
        self._bodies: list[bytes] = []  # each PUBLISH's variable header and payload, as received
        self._counts: dict[str, int] = {}
        super().__init__(self._serve)

    def received_publishes(self) -> list[tuple[str, bytes, int | None]]:
        """(topic, variable header and payload, reason answered) of every PUBLISH, in order."""
        with self._lock:
            return [(topic, body, reason) for (topic, reason), body in zip(self.publishes, self._bodies, strict=True)]

    def _serve(self, conn: Any, reader: Any, n: int) -> None:
        while (packet := read_packet(reader)) is not None:
            header, body = packet
            kind = header >> 4
            if kind == 1:  # CONNECT -> CONNACK, success, no properties
                conn.sendall(connack())
            elif kind == 3:  # PUBLISH
                qos = (header >> 1) & 3
                topic_len = int.from_bytes(body[:2], "big")
                topic = body[2 : 2 + topic_len].decode()
                with self._lock:
                    count = self._counts.get(topic, 0)
                    self._counts[topic] = count + 1
                    reason = self.answer(topic, count)
                    self.publishes.append((topic, reason))
                    self._bodies.append(body)
                if qos and reason is not None:
                    packet_id = body[2 + topic_len : 4 + topic_len]
                    conn.sendall(b"\x40\x03" + packet_id + bytes([reason]))
            elif kind == 12:  # PINGREQ -> PINGRESP
                conn.sendall(b"\xd0\x00")
            elif kind == 14:  # DISCONNECT
                return

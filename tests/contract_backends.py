"""The two uploaders as interchangeable backends for tests/test_uploader_contract.py.

Each backend owns a real receiver and knows how to make it behave as a contract
test needs: take data but not acknowledge (`hold`), refuse packets too large,
refuse a chunk for good, refuse the credentials until `fix_credentials`. MQTT
uses a real mosquitto wherever mosquitto can produce the behaviour (ACLs,
`message_size_limit`, SIGSTOP) and the scripted broker only for a permanent
refusal (a PUBACK 0x99 mosquitto never sends); OTLP/HTTP uses the real local
receiver of tests/otlp_server.py with scripted answers.

`deliveries()` is what the receiver got, in arrival order, resends included,
as (chunk id, records) pairs: a receiver that drops resends by chunk id keeps
the first of each.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker
from mqtt_helpers import BOOT_ID, ScriptedBroker, Subscriber, UploaderHarness, decode, read_varint, utf8_at
from otlp_server import Answer, OtlpServer

from edgeagent.clock import monotonic_ns
from edgeagent.config import Config
from edgeagent.mqtt import MqttSession
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import AGENT_SOURCE, Batcher, Uploader, UploaderContext
from edgeagent.records import Batch, Record
from edgeagent.spool import Spool

DEVICE = "gw-contract"
TOPIC = f"edgeagent/{DEVICE}/logs"
# Packets (MQTT) or request bodies (HTTP) above this are refused by the "too_large" receivers.
SIZE_LIMIT = 6000
RC_PAYLOAD_FORMAT_INVALID = 0x99

COMMON = f"""
device_id = "{DEVICE}"
state_dir = "{{state_dir}}"
[kmsg]
enabled = false
[spool]
flush_interval = "200ms"
"""


@dataclass
class Delivery:
    chunk_id: str
    records: list[Any]  # opentelemetry.proto.logs.v1.LogRecord

    def lines(self) -> list[str]:
        return [r.body.string_value for r in self.records]


def attributes(record: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value") or "string_value") for kv in record.attributes}


class ContractHarness(UploaderHarness):
    """`UploaderHarness` with the uploader a backend builds, and loss records
    shipped through the batcher as the agent ships them (`Agent._ship_loss`)."""

    def __init__(self, state_dir: Path, config_text: str, backend: Backend) -> None:
        self.backend = backend
        super().__init__(state_dir, config_text)

    def _setup(self) -> None:
        config = self.config
        self.spool = Spool.open(config.spool_path, max_size=config.spool.max_size)
        self.ctx = UploaderContext(self.spool, config, on_loss=self._ship_loss)
        encoder = ChunkEncoder({"device.id": config.device_id, "host.name": "test-host", "os.type": "linux"}, "test")
        self.batcher = Batcher(self.spool, encoder, BOOT_ID, config.spool, on_commit=self.ctx.wake)
        self.session, self.uploader = self.backend.build(config, self.spool)  # type: ignore[assignment]

    def _ship_loss(self, record: Record, counters: dict[str, int]) -> None:
        self.batcher.add(Batch(AGENT_SOURCE, [record], monotonic_ns(), BOOT_ID))
        if counters:
            self.batcher.count(counters)


class Backend:
    """What a contract test needs from an uploader and its receiver."""

    name = ""
    sent_key = ""  # uploader status: chunks handed to the transport
    refused_key = ""  # uploader status: attempts the receiver refused
    splits_key = ""  # uploader status: chunks split
    credentials_words = ""  # in status' credentials_error

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.tmp_path = tmp_path
        self.request = request

    def receiver(self, kind: str = "plain") -> None:
        """Start the receiver: "plain", "too_large", "refuses_for_good" (the first
        chunk, then it accepts everything) or "refuses_credentials"."""
        raise NotImplementedError

    def config(self) -> str:
        raise NotImplementedError

    def build(self, config: Config, spool: Spool) -> tuple[MqttSession | None, Uploader]:
        raise NotImplementedError

    def deliveries(self) -> list[Delivery]:
        raise NotImplementedError

    def ready(self, status: dict[str, Any]) -> bool:
        """The uploader can send now (MQTT: connected)."""
        return True

    def hold(self) -> None:
        """From now on the receiver takes what is sent but does not answer."""
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def unacknowledged(self, status: dict[str, Any]) -> bool:
        """Something was sent and its acknowledgement has not come."""
        raise NotImplementedError

    def fix_credentials(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MqttBackend(Backend):
    name = "mqtt"
    sent_key = "sent"
    refused_key = "failed"
    splits_key = "splits"
    credentials_words = "Not authorized (0x87)"

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        super().__init__(tmp_path, request)
        self.broker: Broker | None = None
        self.scripted: ScriptedBroker | None = None
        self.subscriber: Subscriber | None = None
        self.acl = tmp_path / "acl"
        self._own_broker = False

    def receiver(self, kind: str = "plain") -> None:
        if kind == "refuses_for_good":
            self.scripted = ScriptedBroker(
                lambda topic, n: RC_PAYLOAD_FORMAT_INVALID if topic == TOPIC and n == 0 else 0
            )
            return
        if kind == "plain":
            self.broker = self.request.getfixturevalue("mosquitto")
        else:
            extra = f"message_size_limit {SIZE_LIMIT}\n"
            if kind == "refuses_credentials":
                # Subscribers may read the logs; the agent may write only its status topic.
                self.acl.write_text("topic read edgeagent/#\ntopic readwrite edgeagent/+/status\n")
                extra = f"acl_file {self.acl}\n"
            workdir = self.tmp_path / f"broker-{kind}"
            workdir.mkdir()
            self.broker = Broker(workdir, extra)
            self.broker.start()
            self._own_broker = True
        self.subscriber = Subscriber(self.broker.port, TOPIC, client_id="contract-subscriber")

    @property
    def url(self) -> str:
        if self.scripted is not None:
            return self.scripted.url
        assert self.broker is not None
        return self.broker.url

    def config(self) -> str:
        return COMMON + (
            '[upload]\nto = "mqtt"\nwindow = 4\nretry_initial = "200ms"\nretry_max = "2s"\nshutdown_timeout = "2s"\n'
            f'[mqtt]\nurl = "{self.url}"\nconnect_timeout = "3s"\nfirst_connect_delay = "0s"\n'
        )

    def build(self, config: Config, spool: Spool) -> tuple[MqttSession | None, Uploader]:
        from edgeagent.uploaders.mqtt import MqttUploader

        session = MqttSession(config, spool.backlog)
        return session, MqttUploader(config, session)

    def deliveries(self) -> list[Delivery]:
        if self.scripted is not None:
            return [
                _scripted_delivery(body)
                for topic, body, reason in self.scripted.received_publishes()
                if topic == TOPIC and reason == 0
            ]
        assert self.subscriber is not None
        return [
            Delivery(m.user_properties["chunk-id"], _records(decode(m.payload))) for m in self.subscriber.received()
        ]

    def ready(self, status: dict[str, Any]) -> bool:
        return bool(status.get("connected"))

    def hold(self) -> None:
        assert self.broker is not None and self.broker.proc is not None
        self.broker.proc.send_signal(signal.SIGSTOP)  # bytes reach its socket; no PUBACK comes

    def release(self) -> None:
        assert self.broker is not None and self.broker.proc is not None
        self.broker.proc.send_signal(signal.SIGCONT)

    def unacknowledged(self, status: dict[str, Any]) -> bool:
        return status.get("in_flight", 0) >= 1

    def fix_credentials(self) -> None:
        assert self.broker is not None and self.broker.proc is not None
        self.acl.write_text("topic readwrite edgeagent/#\n")
        self.broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads its ACL

    def close(self) -> None:
        if self.subscriber is not None:
            self.subscriber.close()
        if self.scripted is not None:
            self.scripted.close()
        if self.broker is not None and self.broker.proc is not None:
            self.broker.proc.send_signal(signal.SIGCONT)
            if self._own_broker:
                self.broker.stop()


class OtlpBackend(Backend):
    name = "otlp_http"
    sent_key = "sent_chunks"
    refused_key = "failed_requests"
    splits_key = "split_chunks"
    credentials_words = "HTTP 401"

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        super().__init__(tmp_path, request)
        self.server = OtlpServer()
        self._release = threading.Event()

    def receiver(self, kind: str = "plain") -> None:
        if kind == "too_large":
            self.server.max_request_size = SIZE_LIMIT
        elif kind == "refuses_for_good":
            self.server.answer(Answer(400, b"field 5 is invalid"))
        elif kind == "refuses_credentials":
            self.server.default = Answer(401, b"token expired")
        self.server.start()

    def config(self) -> str:
        return COMMON + (
            '[upload]\nto = "otlp_http"\nretry_initial = "100ms"\nretry_max = "1s"\nshutdown_timeout = "1s"\n'
            f'[otlp_http]\nendpoint = "{self.server.url}"\ntimeout = "30s"\nconnect_timeout = "2s"\n'
        )

    def build(self, config: Config, spool: Spool) -> tuple[MqttSession | None, Uploader]:
        from edgeagent.uploaders.otlp_http import OtlpHttpUploader

        return None, OtlpHttpUploader(config)

    def deliveries(self) -> list[Delivery]:
        with self.server.lock:
            answered = [r for r in self.server.received if r.answered is not None and 200 <= r.answered < 300]
        return [
            Delivery(chunk_id, [r for sl in group.scope_logs for r in sl.log_records])
            for received in answered
            for chunk_id, group in zip(received.chunk_ids, received.request.resource_logs, strict=True)
        ]

    def hold(self) -> None:
        self.server.answer(Answer(hold=self._release))

    def release(self) -> None:
        self._release.set()

    def unacknowledged(self, status: dict[str, Any]) -> bool:
        return self.server.count() >= 1 and status.get("state") == "sending"

    def fix_credentials(self) -> None:
        self.server.default = Answer()

    def close(self) -> None:
        self.server.stop()


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Backend]] = {
    "mqtt": MqttBackend,
    "otlp_http": OtlpBackend,
}


def _records(request: Any) -> list[Any]:
    return [r for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records]


def _scripted_delivery(body: bytes) -> Delivery:
    """A QoS 1 MQTT 5 PUBLISH's variable header and payload, as the scripted broker got it."""
    _, at = utf8_at(body, 0)  # topic
    at += 2  # packet identifier
    length, at = read_varint(body, at)
    end, chunk_id = at + length, ""
    while at < end:
        ident = body[at]
        at += 1
        if ident == 0x26:  # user property: key, value
            key, at = utf8_at(body, at)
            value, at = utf8_at(body, at)
            chunk_id = value if key == "chunk-id" else chunk_id
        elif ident == 0x03:  # content type
            _, at = utf8_at(body, at)
        else:
            raise AssertionError(f"unexpected PUBLISH property 0x{ident:02x}")
    return Delivery(chunk_id, _records(decode(body[end:])))

"""The MQTT uploader against a real mosquitto: delivery, TLS and mutual TLS,
delete-only-on-PUBACK, broker restarts and outages, dead letters for
permanent refusals, splitting what the broker finds too large, and the wire
format decoded with the official opentelemetry-proto messages."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, free_port, wait_for
from mqtt_helpers import (
    Received,
    ScriptedBroker,
    Subscriber,
    UploaderHarness,
    decode,
    line_numbers,
    record_example,
)
from tls import Pki, make_pki, mosquitto_tls_listener

from edgeagent.uploaders.mqtt import broker_url_for_display

TOPIC = "edgeagent/gw-7/logs"
STATUS_TOPIC = "edgeagent/gw-7/status"
# mosquitto drops to the "mosquitto" user when started as root and then cannot read
# files under pytest's private tmp dirs (ACL, certificates, persistence).


def config_text(url: str, extra_mqtt: str = "", extra_upload: str = "", chunk_records: int = 2000) -> str:
    return f"""
device_id = "gw-7"
state_dir = "{{state_dir}}"
[kmsg]
enabled = false
[spool]
chunk_max_records = {chunk_records}
[upload]
window = 4
retry_initial = "200ms"
retry_max = "2s"
{extra_upload}
[mqtt]
url = "{url}"
keepalive = "2s"
connect_timeout = "3s"
first_connect_delay = "0s"
{extra_mqtt}
"""


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    brokers: list[Broker] = []

    def factory(extra_config: str = "", name: str = "broker") -> Broker:
        workdir = tmp_path / name
        workdir.mkdir()
        broker = Broker(workdir, extra_config.replace("{workdir}", str(workdir)))
        broker.start()
        brokers.append(broker)
        return broker

    yield factory
    for broker in brokers:
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
        broker.stop()


def all_lines_arrived(subscriber: Subscriber, count: int) -> bool:
    seen = {n for numbers in line_numbers(subscriber.received()) for n in numbers}
    return len(seen) == count and min(seen) == 0 and max(seen) == count - 1


def check_every_line_once_or_more(subscriber: Subscriber, count: int) -> None:
    check_lines(subscriber.received(), count)


def check_lines(messages: list[Received], count: int) -> None:
    """Lines 0..count-1 all arrived (at least once), in order inside every message."""
    per_message = line_numbers(messages)
    for numbers in per_message:
        assert numbers == sorted(numbers), "lines inside a chunk must keep their order"
    assert {n for numbers in per_message for n in numbers} == set(range(count))


def test_delivers_chunks_in_the_documented_wire_format(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness], subscribers: list[Subscriber]
) -> None:
    logs = Subscriber(mosquitto.port, TOPIC)
    status = Subscriber(mosquitto.port, STATUS_TOPIC, client_id="status-watcher")
    subscribers += [logs, status]
    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url, chunk_records=2500))
    harnesses.append(h)
    h.add(record_example())
    h.add_lines(0, 5000, 2500)
    chunk_ids = h.chunk_ids()
    assert len(chunk_ids) == 3
    h.start()
    wait_for(lambda: len(logs.received()) == 3, what="three messages")
    wait_for(lambda: h.backlog()["chunks"] == 0, what="spool drained")

    messages = logs.received()
    assert [m.user_properties["chunk-id"] for m in messages] == chunk_ids  # oldest first
    for m in messages:
        assert m.topic == TOPIC
        assert m.content_type == "application/x-protobuf"
        assert m.user_properties["content-encoding"] == "zstd"

    # The first chunk, decoded the way any receiver would: zstd, then opentelemetry-proto.
    request = decode(messages[0].payload)
    resource = {kv.key: kv.value.string_value for kv in request.resource_logs[0].resource.attributes}
    assert resource["device.id"] == "gw-7"
    scope_logs = request.resource_logs[0].scope_logs[0]
    assert scope_logs.scope.name == "edgeagent/kmsg"
    records = scope_logs.log_records
    assert [r.body.string_value for r in records] == [
        "usb 1-1: new high-speed USB device",
        "EXT4-fs error (device mmcblk0p2)",
        "Out of memory: Killed process 812",
    ]
    assert [(r.severity_number, r.severity_text) for r in records] == [(9, "INFO"), (17, "ERR"), (21, "CRIT")]
    assert {kv.key: kv.value.string_value for kv in records[0].attributes}["kernel.subsystem"] == "usb"
    assert {kv.key: kv.value.int_value for kv in records[1].attributes}["kernel.facility"] == 0
    assert records[1].time_unix_nano - records[0].time_unix_nano == 1_000_000_000
    file_scope = decode(messages[1].payload).resource_logs[0].scope_logs[0]
    # A file's path is common to its lines: written once, on the scope.
    assert {kv.key: kv.value.string_value for kv in file_scope.scope.attributes} == {
        "log.file.path": "/var/log/app.log"
    }
    assert not any(r.attributes for r in file_scope.log_records)
    check_lines(messages[1:], 5000)

    st = h.status()
    assert st["connected"] is True
    assert st["acked"] == 3 and st["acked_records"] == 5003 and st["in_flight"] == 0
    assert st["broker"] == mosquitto.url and st["dead_letters"] == 0

    wait_for(lambda: any(json.loads(m.payload).get("state") == "online" for m in status.received()))
    online = [json.loads(m.payload) for m in status.received()][-1]
    assert online["version"] and online["device_id"] == "gw-7" and "chunks" in online["backlog"]

    # A clean stop leaves a retained "offline" behind.
    h.drain(5.0)
    wait_for(lambda: json.loads(status.received()[-1].payload)["state"] == "offline", what="offline status")
    late = Subscriber(mosquitto.port, STATUS_TOPIC, client_id="late-status-watcher")
    subscribers.append(late)
    wait_for(lambda: late.received(), what="retained status")
    assert late.received()[0].retain and json.loads(late.received()[0].payload)["state"] == "offline"


def test_mqtt_311_delivers_without_properties(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness], subscribers: list[Subscriber]
) -> None:
    logs = Subscriber(mosquitto.port, TOPIC)
    subscribers.append(logs)
    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url, 'protocol = "3.1.1"'))
    harnesses.append(h)
    h.add_lines(0, 3000, 1000)
    h.start()
    wait_for(lambda: h.backlog()["chunks"] == 0 and all_lines_arrived(logs, 3000), what="all lines")
    check_every_line_once_or_more(logs, 3000)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls(
    tmp_path: Path,
    pki: Pki,
    mutual: bool,
    make_broker: Callable[..., Broker],
    harnesses: list[UploaderHarness],
    subscribers: list[Subscriber],
) -> None:
    tls_port = free_port()
    broker = make_broker(mosquitto_tls_listener(pki, tls_port, mutual))
    logs = Subscriber(broker.port, TOPIC)  # the plain listener of the same broker
    subscribers.append(logs)
    url = f"mqtts://127.0.0.1:{tls_port}"
    client_cert = f'cert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n' if mutual else ""

    # A CA that did not sign the broker's certificate: refused, nothing deleted.
    wrong = UploaderHarness(tmp_path / "wrong", config_text(url, f'ca_file = "{pki.other_ca_cert}"\n' + client_cert))
    harnesses.append(wrong)
    wrong.add_lines(0, 100, 100)
    wrong.start()
    wait_for(lambda: "certificate verify failed" in (wrong.status()["last_error"] or ""), what="TLS refusal")
    assert wrong.backlog()["chunks"] == 1 and not wrong.status()["connected"]

    if mutual:
        # The right CA but no client certificate: the broker refuses.
        anonymous = UploaderHarness(tmp_path / "anon", config_text(url, f'ca_file = "{pki.ca_cert}"\n'))
        harnesses.append(anonymous)
        anonymous.add_lines(0, 100, 100)
        anonymous.start()
        wait_for(lambda: anonymous.status()["last_error"], what="refusal without a client certificate")
        assert anonymous.backlog()["chunks"] == 1 and anonymous.status()["acked"] == 0

    h = UploaderHarness(tmp_path / "state", config_text(url, f'ca_file = "{pki.ca_cert}"\n' + client_cert))
    harnesses.append(h)
    h.add_lines(0, 6000, 2000)
    h.start()
    wait_for(lambda: h.backlog()["chunks"] == 0 and all_lines_arrived(logs, 6000), what="all lines over TLS")
    check_every_line_once_or_more(logs, 6000)
    assert h.status()["broker"] == url


def test_nothing_is_deleted_before_its_puback(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness], subscribers: list[Subscriber]
) -> None:
    logs = Subscriber(mosquitto.port, TOPIC)
    subscribers.append(logs)
    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url))
    harnesses.append(h)
    h.start()
    wait_for(lambda: h.status()["connected"], what="connected")
    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)  # the broker takes bytes into its socket but never answers
    h.add_lines(0, 8000, 2000)
    chunk_ids = h.chunk_ids()
    wait_for(lambda: h.status()["sent"] >= 4, what="chunks published")
    assert h.backlog()["chunks"] == 4 and h.status()["acked"] == 0
    # The keepalive notices the silent broker; reconnects fail (no CONNACK); nothing is deleted meanwhile.
    wait_for(lambda: not h.status()["connected"] and h.status()["retry_failures"] >= 2, what="broker given up on")
    assert h.chunk_ids() == chunk_ids and h.counters().get("acked_chunks", 0) == 0
    mosquitto.proc.send_signal(signal.SIGCONT)
    h.wake()
    wait_for(lambda: h.backlog()["chunks"] == 0 and all_lines_arrived(logs, 8000), 60, what="delivery after SIGCONT")
    check_every_line_once_or_more(logs, 8000)
    assert {m.user_properties["chunk-id"] for m in logs.received()} == set(chunk_ids)
    assert h.dead_letters() == []


def persistent_broker(make_broker: Callable[..., Broker]) -> Broker:
    # Persistence keeps the subscriber's session and queued messages across the restart,
    # so what the broker acknowledged before it went down still reaches the subscriber.
    return make_broker("persistence true\npersistence_location {workdir}/\nautosave_interval 0\n")


def test_broker_restart_in_the_middle_of_a_100k_line_drain_loses_nothing(
    tmp_path: Path,
    make_broker: Callable[..., Broker],
    harnesses: list[UploaderHarness],
    subscribers: list[Subscriber],
) -> None:
    broker = persistent_broker(make_broker)
    logs = Subscriber(broker.port, TOPIC, persistent=True)
    subscribers.append(logs)
    # A rate cap so the drain takes a few seconds and the restart lands in its middle.
    h = UploaderHarness(tmp_path / "state", config_text(broker.url, extra_upload='max_rate = "400KiB"'))
    harnesses.append(h)
    h.add_lines(0, 100_000, 2000)
    total_chunks = h.backlog()["chunks"]
    assert total_chunks == 50
    h.start()
    wait_for(lambda: h.counters().get("acked_chunks", 0) >= 5, what="first acknowledgements")
    broker.stop()
    remaining = h.backlog()["chunks"]
    assert 0 < remaining < total_chunks
    wait_for(lambda: not h.status()["connected"], what="uploader noticed the broker is gone")
    broker.start()
    wait_for(lambda: h.backlog()["chunks"] == 0, 120, what="spool drained after the restart")
    wait_for(lambda: all_lines_arrived(logs, 100_000), 60, what="every line at the subscriber")
    check_every_line_once_or_more(logs, 100_000)
    assert h.status()["connections"] >= 2 and h.dead_letters() == []


def outage_during_drain(
    tmp_path: Path,
    make_broker: Callable[..., Broker],
    harnesses: list[UploaderHarness],
    subscribers: list[Subscriber],
    outage_seconds: float,
) -> None:
    """Stop the broker mid-drain for a while; lines keep arriving meanwhile."""
    broker = persistent_broker(make_broker)
    logs = Subscriber(broker.port, TOPIC, persistent=True)
    subscribers.append(logs)
    h = UploaderHarness(
        tmp_path / "state",
        config_text(broker.url, extra_upload='max_rate = "400KiB"\nretry_max = "20s"').replace(
            'retry_max = "2s"\n', ""
        ),
    )
    harnesses.append(h)
    h.add_lines(0, 60_000, 2000)
    h.start()
    wait_for(lambda: h.counters().get("acked_chunks", 0) >= 3, what="first acknowledgements")
    broker.stop()
    outage_end = time.monotonic() + outage_seconds
    next_line = 60_000
    while time.monotonic() < outage_end or h.status()["retry_failures"] < 2:
        h.add_lines(next_line, 1000, 1000)  # the device keeps logging while offline
        next_line += 1000
        time.sleep(min(1.0, max(0.05, outage_end - time.monotonic())))
    assert h.counters().get("acked_chunks", 0) < h.counters()["spooled_chunks"]
    broker.start()
    h.wake()  # what the network watch does when the link comes back
    wait_for(lambda: h.backlog()["chunks"] == 0, 120, what="spool drained after the outage")
    wait_for(lambda: all_lines_arrived(logs, next_line), 60, what="every line at the subscriber")
    check_every_line_once_or_more(logs, next_line)
    assert h.dead_letters() == []


def test_short_outage_in_the_middle_of_a_drain_loses_nothing(
    tmp_path: Path,
    make_broker: Callable[..., Broker],
    harnesses: list[UploaderHarness],
    subscribers: list[Subscriber],
) -> None:
    outage_during_drain(tmp_path, make_broker, harnesses, subscribers, outage_seconds=3.0)


@pytest.mark.slow
def test_five_minute_outage_in_the_middle_of_a_drain_loses_nothing(
    tmp_path: Path,
    make_broker: Callable[..., Broker],
    harnesses: list[UploaderHarness],
    subscribers: list[Subscriber],
) -> None:
    outage_during_drain(tmp_path, make_broker, harnesses, subscribers, outage_seconds=300.0)


def test_offline_waits_out_its_backoff_despite_new_data_but_wakes_on_request(
    tmp_path: Path, harnesses: list[UploaderHarness], make_broker: Callable[..., Broker]
) -> None:
    port = free_port()
    h = UploaderHarness(tmp_path / "state", config_text(f"mqtt://127.0.0.1:{port}"))
    harnesses.append(h)
    # A fixed long delay instead of the jittered one, so the test does not depend on chance;
    # after the wake a short one, so an attempt that times out on a loaded machine is retried.
    woken = threading.Event()
    h.session.backoff.failed = lambda retry_after=None: 0.2 if woken.is_set() else 3600.0  # type: ignore[method-assign]
    attempts: list[float] = []
    connect = h.session._connect

    async def counted_connect() -> float | None:
        attempts.append(time.monotonic())  # on the loop thread, before any await
        return await connect()

    h.session._connect = counted_connect  # type: ignore[method-assign]
    h.start()
    wait_for(lambda: h.status()["last_error"], what="first failed attempt")
    for first in range(0, 3000, 1000):
        h.add_lines(first, 1000, 1000)  # each commit wakes the uploader
    for _ in range(10):
        h.call(lambda: None)  # let the loop run the wake-ups through to wherever they lead
    assert len(attempts) == 1 and not h.status()["connected"]  # new data alone: no new attempt
    broker = make_broker(f"listener {port} 127.0.0.1\n")  # the configured port now answers
    woken.set()
    h.wake()  # network up / SIGUSR1
    wait_for(lambda: h.backlog()["chunks"] == 0, what="drained right after the wake")
    assert broker.proc is not None


def test_not_authorised_keeps_the_data_retries_and_delivers_once_the_acl_is_fixed(
    tmp_path: Path, make_broker: Callable[..., Broker], harnesses: list[UploaderHarness]
) -> None:
    """0x87 means "fix the ACL or the credentials", not "the data is bad" (issue 9):
    the chunks stay in the spool, are retried with backoff, status says why, and
    nothing becomes a dead letter. (Before: two dead letters, the lines gone.)"""
    acl = tmp_path / "acl"
    acl.write_text("topic read edgeagent/#\ntopic readwrite edgeagent/+/status\ntopic readwrite allowed/#\n")
    broker = make_broker(f"acl_file {acl}\n")
    denied = UploaderHarness(tmp_path / "denied", config_text(broker.url))
    harnesses.append(denied)
    denied.add_lines(0, 4000, 2000)
    denied.start()
    wait_for(lambda: denied.status()["failed"] >= 4, what="refusals, retried")
    assert denied.dead_letters() == [] and denied.backlog()["chunks"] == 2
    st = denied.status()
    assert st["dead_letters"] == 0 and st["acked"] == 0 and "0x87" in st["last_error"]
    assert "Not authorized (0x87)" in st["credentials_error"] and "ACL" in st["credentials_error"]

    allowed = UploaderHarness(tmp_path / "allowed", config_text(broker.url, 'topic = "allowed/{device_id}"'))
    harnesses.append(allowed)
    allowed.add_lines(0, 4000, 2000)
    allowed.start()
    wait_for(lambda: allowed.backlog()["chunks"] == 0)
    assert allowed.dead_letters() == [] and allowed.status()["acked"] == 2

    # The operator fixes the ACL (mosquitto re-reads it on SIGHUP): the kept chunks go out.
    logs = Subscriber(broker.port, TOPIC)
    try:
        acl.write_text("topic readwrite edgeagent/#\ntopic readwrite allowed/#\n")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)
        denied.wake()
        wait_for(lambda: denied.backlog()["chunks"] == 0, 60, what="delivered after the ACL fix")
        wait_for(lambda: all_lines_arrived(logs, 4000), what="every line")
    finally:
        logs.close()
    st = denied.status()
    assert st["acked"] == 2 and st["dead_letters"] == 0 and st["credentials_error"] is None


def test_mqtt_311_cannot_see_a_refusal(
    tmp_path: Path, make_broker: Callable[..., Broker], harnesses: list[UploaderHarness]
) -> None:
    """Documented limitation: MQTT 3.1.1 PUBACKs carry no reason code, so a
    broker that denies the topic still acknowledges. This is why 5 is the default."""
    acl = tmp_path / "acl"
    acl.write_text("topic read edgeagent/#\n")
    broker = make_broker(f"acl_file {acl}\n")
    h = UploaderHarness(tmp_path / "state", config_text(broker.url, 'protocol = "3.1.1"'))
    harnesses.append(h)
    h.add_lines(0, 1000, 1000)
    h.start()
    wait_for(lambda: h.backlog()["chunks"] == 0)
    assert h.dead_letters() == [] and h.status()["acked"] == 1


@pytest.mark.parametrize(
    "limit",
    ["max_packet_size 6000\n", "message_size_limit 6000\n"],
    ids=["announced-in-connack", "refused-after-publish"],
)
def test_chunks_too_large_for_the_broker_are_split_and_delivered(
    tmp_path: Path,
    limit: str,
    make_broker: Callable[..., Broker],
    harnesses: list[UploaderHarness],
    subscribers: list[Subscriber],
) -> None:
    broker = make_broker(limit)
    logs = Subscriber(broker.port, TOPIC)
    subscribers.append(logs)
    h = UploaderHarness(tmp_path / "state", config_text(broker.url))
    harnesses.append(h)
    h.add_lines(0, 4000, 2000)  # two chunks of about 15 KB
    h.start()
    wait_for(lambda: h.backlog()["chunks"] == 0, 60, what="all parts delivered")
    wait_for(lambda: all_lines_arrived(logs, 4000), what="every line")
    check_every_line_once_or_more(logs, 4000)
    assert h.status()["splits"] >= 2 and h.dead_letters() == []
    assert all(len(m.payload) < 6000 for m in logs.received())
    # Parts keep the original chunk id with a suffix, so receivers can still deduplicate.
    assert all("." in m.user_properties["chunk-id"] for m in logs.received())


def test_drain_waits_for_acks_then_leaves_the_rest_in_the_spool(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness]
) -> None:
    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url))
    harnesses.append(h)
    h.start()
    wait_for(lambda: h.status()["connected"])
    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)
    h.add_lines(0, 4000, 2000)
    wait_for(lambda: h.status()["in_flight"] == 2)
    h.drain(1.0)
    assert h.backlog()["chunks"] == 2 and not h.status()["connected"]
    mosquitto.proc.send_signal(signal.SIGCONT)


def test_status_never_shows_credentials() -> None:
    assert broker_url_for_display("mqtts://user:secret@broker.example.net:8883") == "mqtts://broker.example.net:8883"


@pytest.mark.parametrize(
    "code", [0x97, 0x80, 0x83], ids=["quota-exceeded", "unspecified-error", "implementation-specific"]
)
def test_transient_refusals_are_retried_later_not_dead_lettered(
    tmp_path: Path, code: int, harnesses: list[UploaderHarness]
) -> None:
    broker = ScriptedBroker(lambda topic, n: code if topic == TOPIC and n < 2 else 0)
    try:
        h = UploaderHarness(tmp_path / "state", config_text(broker.url))
        harnesses.append(h)
        h.add_lines(0, 1000, 1000)
        h.start()
        wait_for(lambda: h.backlog()["chunks"] == 0, what="acknowledged on the third try")
        answers = [reason for topic, reason in broker.publishes if topic == TOPIC]
        assert answers == [code, code, 0]
        st = h.status()
        assert st["failed"] == 2 and st["acked"] == 1 and st["dead_letters"] == 0
        assert h.dead_letters() == []
    finally:
        broker.close()


def test_watchdog_reconnects_when_puback_never_comes(tmp_path: Path, harnesses: list[UploaderHarness]) -> None:
    """The broker answers pings (paho sees a healthy connection) but never
    acknowledges: the watchdog rebuilds the connection; nothing is deleted."""
    acknowledge = threading.Event()
    broker = ScriptedBroker(lambda topic, n: 0 if topic != TOPIC or acknowledge.is_set() else None)
    try:
        h = UploaderHarness(tmp_path / "state", config_text(broker.url, 'ack_timeout = "1s"'))
        harnesses.append(h)
        h.add_lines(0, 1000, 1000)
        h.start()
        wait_for(lambda: h.status()["connections"] >= 2, what="watchdog reconnect")
        assert "no PUBACK" in h.status()["last_error"]
        assert h.backlog()["chunks"] == 1 and h.counters().get("acked_chunks", 0) == 0
        acknowledge.set()
        wait_for(lambda: h.backlog()["chunks"] == 0, what="acknowledged after the reconnect")
    finally:
        broker.close()


def test_an_exception_in_a_callback_rebuilds_the_connection(
    tmp_path: Path, mosquitto: Broker, harnesses: list[UploaderHarness]
) -> None:
    """paho would swallow it and stop settling PUBACKs; the guard logs it and reconnects."""

    exploded: list[int] = []

    h = UploaderHarness(tmp_path / "state", config_text(mosquitto.url))
    harnesses.append(h)
    h.start()
    wait_for(lambda: h.status()["connected"])
    settle = h.session._settle

    def settle_exploding_once(link: Any, mid: int, reason: Any) -> None:  # what on_publish calls for a PUBACK
        if not exploded:
            exploded.append(mid)
            raise RuntimeError("simulated bug in on_publish")
        settle(link, mid, reason)

    h.call(setattr, h.session, "_settle", settle_exploding_once)
    h.add_lines(0, 1000, 1000)
    wait_for(lambda: h.backlog()["chunks"] == 0, what="delivered after the rebuilt connection")
    assert exploded and h.status()["connections"] >= 2


@pytest.mark.parametrize("chunk_id", ["", "0123456789abcdef" * 2, "é" * 90])
def test_packed_publish_properties_are_the_bytes_paho_would_pack(chunk_id: str) -> None:
    """The uploader packs its PUBLISH properties itself (paho's attribute machinery was a tenth of its CPU):
    byte for byte what paho packs, including a properties length over 127 bytes (two-byte length)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edgeagent.mqtt.client import packed_publish_properties

    by_paho = Properties(PacketTypes.PUBLISH)
    by_paho.ContentType = "application/x-protobuf"
    by_paho.UserProperty = ("content-encoding", "zstd")
    by_paho.UserProperty = ("chunk-id", chunk_id)
    ours = packed_publish_properties("application/x-protobuf", [("content-encoding", "zstd"), ("chunk-id", chunk_id)])
    assert ours.pack() == by_paho.pack()
    assert isinstance(ours, Properties)  # what paho's publish() requires

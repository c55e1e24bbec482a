"""The direct OTLP encoder, checked by decoding every form it emits with the
official opentelemetry-proto messages."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from edgeagent.otlp import ChunkEncoder, DecodeError, decode_request, shift_times, split_request
from edgeagent.records import Batch, Record

OFFSET = 1_790_000_000 * 10**9
RESOURCE = {"device.id": "gw-1", "host.name": "gw", "host.arch": "arm64"}


def decode(payload: bytes) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest.FromString(payload)


def any_value(v):  # type: ignore[no-untyped-def]
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def test_line_batches_decode_with_opentelemetry_proto() -> None:
    lines = [b"first", b"", "ünïcode ✓".encode(), b"x" * 20000]
    batch = Batch("files", lines, 5_000, "boot", {"log.file.path": "/var/log/a.log", "log.file.name": "a.log"})
    request = decode(ChunkEncoder(RESOURCE, "1.2.3").encode([batch], OFFSET, True))
    (resource_logs,) = request.resource_logs
    assert {a.key: any_value(a.value) for a in resource_logs.resource.attributes} == RESOURCE
    (scope_logs,) = resource_logs.scope_logs
    assert scope_logs.scope.name == "edgeagent/files" and scope_logs.scope.version == "1.2.3"
    # The batch's common attributes are written once, on the scope, not on every record.
    assert {a.key: any_value(a.value) for a in scope_logs.scope.attributes} == {
        "log.file.path": "/var/log/a.log",
        "log.file.name": "a.log",
    }
    records = scope_logs.log_records
    assert [r.body.string_value for r in records] == [line.decode() for line in lines]
    for r in records:
        assert r.observed_time_unix_nano == OFFSET + 5_000
        assert r.time_unix_nano == 0  # unknown event time: receivers use the observed time
        assert r.severity_number == 0
        assert list(r.attributes) == []


def test_each_set_of_common_attributes_gets_its_scope_and_decode_merges_them() -> None:
    a, b = {"log.file.path": "/var/log/a.log"}, {"log.file.path": "/var/log/b.log"}
    batches = [
        Batch("files", [b"a1"], 1, "boot", a),
        Batch("files", [b"b1"], 2, "boot", b),
        Batch("files", [b"a2"], 3, "boot", dict(a)),
        Batch("kmsg", [Record("k1", 9, attributes={"log.file.path": "own"})], 4, "boot", a),
    ]
    payload = ChunkEncoder({}, "v").encode(batches, 0, True)
    scopes = decode(payload).resource_logs[0].scope_logs
    assert [
        (
            s.scope.name,
            {x.key: any_value(x.value) for x in s.scope.attributes},
            [r.body.string_value for r in s.log_records],
        )
        for s in scopes
    ] == [("edgeagent/files", a, ["a1", "a2"]), ("edgeagent/files", b, ["b1"]), ("edgeagent/kmsg", a, ["k1"])]
    decoded = {r["body"]: r for r in decode_request(payload)}
    assert decoded["a2"]["attributes"] == a and decoded["a2"]["scope_attributes"] == a
    assert decoded["b1"]["attributes"] == b
    assert decoded["k1"]["attributes"] == {"log.file.path": "own"}  # a record's own attribute wins


def test_rich_records_keep_time_severity_and_typed_attributes() -> None:
    record = Record(
        "usb 1-1: new device",
        17,
        "ERR",
        {"s": "text", "b": True, "f": False, "i": 42, "neg": -7, "big": 2**40, "d": 1.25},
        time_mono_ns=123_456_789,
    )
    request = decode(ChunkEncoder({}, "v").encode([Batch("kmsg", [record], 200_000_000, "boot")], OFFSET, True))
    (r,) = request.resource_logs[0].scope_logs[0].log_records
    assert r.time_unix_nano == OFFSET + 123_456_789
    assert r.observed_time_unix_nano == OFFSET + 200_000_000
    assert (r.severity_number, r.severity_text) == (17, "ERR")
    attrs = {a.key: any_value(a.value) for a in r.attributes}
    assert attrs == {"s": "text", "b": True, "f": False, "i": 42, "neg": -7, "big": 2**40, "d": 1.25}


def test_repeated_attribute_values_do_not_confuse_bool_and_int() -> None:
    encoder = ChunkEncoder({}, "v")
    records = [
        Record("a", attributes={"x": True}),
        Record("b", attributes={"x": 1}),
        Record("c", attributes={"x": True}),
    ]
    request = decode(encoder.encode([Batch("kmsg", records, 1, "boot")], 0, True))
    values = [r.attributes[0].value for r in request.resource_logs[0].scope_logs[0].log_records]
    assert [v.WhichOneof("value") for v in values] == ["bool_value", "int_value", "bool_value"]


def test_sources_get_their_own_scope_in_arrival_order() -> None:
    batches = [
        Batch("files", [b"f1"], 1, "boot"),
        Batch("kmsg", [Record("k1", 9)], 2, "boot"),
        Batch("files", [b"f2"], 3, "boot"),
    ]
    request = decode(ChunkEncoder({}, "v").encode(batches, 0, True))
    scopes = request.resource_logs[0].scope_logs
    assert [(s.scope.name, [r.body.string_value for r in s.log_records]) for s in scopes] == [
        ("edgeagent/files", ["f1", "f2"]),
        ("edgeagent/kmsg", ["k1"]),
    ]


def test_unsynced_clock_marks_records_and_shift_corrects_them() -> None:
    batch = Batch("kmsg", [Record("early", 9, "INFO", None, 1_000), Record("no time")], 2_000, "boot")
    payload = ChunkEncoder({}, "v").encode([batch], 0, False)
    before = decode(payload).resource_logs[0].scope_logs[0].log_records
    assert all({a.key: any_value(a.value) for a in r.attributes}["edgeagent.clock"] == "unsynced" for r in before)
    fixed = decode(shift_times(payload, OFFSET)).resource_logs[0].scope_logs[0].log_records
    assert fixed[0].time_unix_nano == OFFSET + 1_000
    assert fixed[0].observed_time_unix_nano == OFFSET + 2_000
    assert fixed[1].time_unix_nano == 0  # unknown stays unknown
    assert all({a.key: any_value(a.value) for a in r.attributes}["edgeagent.clock"] == "adjusted" for r in fixed)


def test_split_keeps_every_record_once_in_order_with_resource_and_scope() -> None:
    batches = [Batch("files", [b"line %d" % i for i in range(7)], 1, "boot"), Batch("kmsg", [Record("k")], 2, "boot")]
    payload = ChunkEncoder(RESOURCE, "v").encode(batches, 0, True)
    first, second = split_request(payload)
    bodies = []
    for part in (first, second):
        request = decode(part)
        assert {a.key for a in request.resource_logs[0].resource.attributes} == set(RESOURCE)
        for scope_logs in request.resource_logs[0].scope_logs:
            assert scope_logs.scope.name.startswith("edgeagent/")
            bodies += [r.body.string_value for r in scope_logs.log_records]
    assert bodies == [f"line {i}" for i in range(7)] + ["k"]
    with pytest.raises(ValueError, match="fewer than two"):
        split_request(ChunkEncoder({}, "v").encode([Batch("files", [b"one"], 1, "boot")], 0, True))


def test_own_decoder_agrees_with_opentelemetry_proto() -> None:
    rng = random.Random(3)
    lines = [bytes(rng.randrange(32, 127) for _ in range(rng.randrange(0, 300))) for _ in range(500)]
    payload = ChunkEncoder(RESOURCE, "v").encode([Batch("files", lines, 9, "boot", {"k": "v"})], OFFSET, True)
    ours = list(decode_request(payload))
    assert [r["body"] for r in ours] == [line.decode() for line in lines]
    assert ours[0]["resource"] == RESOURCE and ours[0]["attributes"] == {"k": "v"}
    with pytest.raises(DecodeError):
        list(decode_request(payload[:-3]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(max_size=400).map(lambda b: b.decode("utf-8", "replace").encode()), min_size=1, max_size=50),
    st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.one_of(st.text(max_size=30), st.booleans(), st.integers(-(2**63), 2**63 - 1)),
        max_size=4,
    ),
)
def test_any_lines_and_attributes_round_trip(lines: list[bytes], attributes: dict) -> None:  # type: ignore[type-arg]
    payload = ChunkEncoder({}, "v").encode([Batch("files", lines, 1, "boot", attributes)], 0, True)
    (scope_logs,) = decode(payload).resource_logs[0].scope_logs
    assert [r.body.string_value.encode() for r in scope_logs.log_records] == lines
    assert {a.key: any_value(a.value) for a in scope_logs.scope.attributes} == attributes
    assert all(r["attributes"] == attributes for r in decode_request(payload))

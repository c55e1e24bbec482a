"""Golden tests of the syslog parser and the TCP framer: messages as real senders write them
(util-linux logger, glibc syslog(), rsyslog's forward format, OpenWrt logd, the RFC examples)."""

from __future__ import annotations

import calendar
import time
from typing import Any

import pytest

from edgeagent.config import ConfigError, loads, parse_listen
from edgeagent.sources.syslog import Framer
from edgeagent.sources.syslog_parse import parse_message

OFFSET = 10**18  # CLOCK_REALTIME - CLOCK_MONOTONIC in these tests
NOW = calendar.timegm((2026, 11, 30, 12, 0, 0))  # "now" for BSD timestamps without a year


def utc(*fields: int, ns: int = 0) -> int:
    return calendar.timegm((*fields, 0, 0, 0)) * 10**9 + ns


def local(*fields: int) -> int:
    return int(time.mktime((*fields, 0, 0, -1))) * 10**9


GOLDEN: list[tuple[bytes, str, int, dict[str, Any], int]] = [
    # RFC 5424 section 6.5, example 1 (BOM before MSG, NILVALUE PROCID)
    (
        b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \xef\xbb\xbf'su root' failed",
        "'su root' failed",
        21,
        {
            "syslog.facility": "auth",
            "syslog.level": 2,
            "host.name": "mymachine.example.com",
            "syslog.app_name": "su",
            "syslog.msg_id": "ID47",
        },
        utc(2003, 10, 11, 22, 14, 15, ns=3_000_000),
    ),
    # RFC 5424 example 3: structured data with several elements, escapes
    (
        b"<165>1 2003-10-11T22:14:15.003000-07:00 mymachine.example.com evntslog 1234 ID47 "
        b'[exampleSDID@32473 iut="3" eventSource="App\\"lic\\]ation\\\\" eventID="1011"][examplePriority@32473 '
        b'class="high"] An application event',
        "An application event",
        10,
        {
            "syslog.facility": "local4",
            "syslog.level": 5,
            "host.name": "mymachine.example.com",
            "syslog.app_name": "evntslog",
            "process.pid": 1234,
            "syslog.msg_id": "ID47",
            "syslog.sd.exampleSDID@32473.iut": "3",
            "syslog.sd.exampleSDID@32473.eventSource": 'App"lic]ation\\',
            "syslog.sd.exampleSDID@32473.eventID": "1011",
            "syslog.sd.examplePriority@32473.class": "high",
        },
        utc(2003, 10, 12, 5, 14, 15, ns=3_000_000),
    ),
    # RFC 5424 with every header field nil and no MSG; SD element without params; repeated params
    (b"<14>1 - - - - - -", "", 9, {"syslog.facility": "user", "syslog.level": 6}, 0),
    (
        b'<14>1 - - - - - [origin][meta a="1" a="2"] m',
        "m",
        9,
        {"syslog.facility": "user", "syslog.level": 6, "syslog.sd.origin": True, "syslog.sd.meta.a": "1,2"},
        0,
    ),
    # util-linux logger --rfc5424 over the network (time quality SD, fractional seconds)
    (
        b'<13>1 2026-11-30T00:53:33.857612+00:00 vm udptag - - [timeQuality tzKnown="1" isSynced="0"] udp msg',
        "udp msg",
        10,
        {
            "syslog.facility": "user",
            "syslog.level": 5,
            "host.name": "vm",
            "syslog.app_name": "udptag",
            "syslog.sd.timeQuality.tzKnown": "1",
            "syslog.sd.timeQuality.isSynced": "0",
        },
        utc(2026, 11, 30, 0, 53, 33, ns=857_612_000),
    ),
    # util-linux logger --rfc3164 over the network: HOSTNAME and TAG
    (
        b"<13>Nov 30 00:53:33 vm root[123]: hello world",
        "hello world",
        10,
        {
            "syslog.facility": "user",
            "syslog.level": 5,
            "host.name": "vm",
            "syslog.app_name": "root",
            "process.pid": 123,
        },
        local(2026, 11, 30, 0, 53, 33),
    ),
    # glibc syslog() / logger --socket to /dev/log: no HOSTNAME
    (
        b"<38>Nov 30 00:53:33 sshd[4242]: Accepted publickey for root",
        "Accepted publickey for root",
        9,
        {"syslog.facility": "auth", "syslog.level": 6, "syslog.app_name": "sshd", "process.pid": 4242},
        local(2026, 11, 30, 0, 53, 33),
    ),
    # OpenWrt logd forwarding (ctime's space-padded day, hostname, kernel lines tagged "kernel")
    (
        b"<30>Dec  3 07:01:02 OpenWrt netifd: Interface 'wan' is now up",
        "Interface 'wan' is now up",
        9,
        {"syslog.facility": "daemon", "syslog.level": 6, "host.name": "OpenWrt", "syslog.app_name": "netifd"},
        local(2025, 12, 3, 7, 1, 2),  # "now" is 2026-11-30: last December, not next week
    ),
    (
        b"<4>Jan  1 00:00:09 OpenWrt kernel: [    9.123456] br-lan: port 1(lan1) entered forwarding state\n",
        "[    9.123456] br-lan: port 1(lan1) entered forwarding state",
        13,
        {"syslog.facility": "kern", "syslog.level": 4, "host.name": "OpenWrt", "syslog.app_name": "kernel"},
        local(2026, 1, 1, 0, 0, 9),
    ),
    # rsyslog's RSYSLOG_ForwardFormat: RFC 3339 timestamp in a BSD message
    (
        b"<134>2026-11-30T01:02:03.123456+01:00 gw-7 plc-bridge[88]:  cycle 4 ok",
        "cycle 4 ok",
        9,
        {
            "syslog.facility": "local0",
            "syslog.level": 6,
            "host.name": "gw-7",
            "syslog.app_name": "plc-bridge",
            "process.pid": 88,
        },
        utc(2026, 11, 30, 0, 2, 3, ns=123_456_000),
    ),
    # BSD timestamp with a year and milliseconds
    (
        b"<11>Nov 30 2025 10:00:00.250 host app: x",
        "x",
        17,
        {"syslog.facility": "user", "syslog.level": 3, "host.name": "host", "syslog.app_name": "app"},
        local(2025, 11, 30, 10, 0, 0) + 250_000_000,
    ),
    # no timestamp, no hostname: TAG only
    (
        b"<15>myapp: started",
        "started",
        5,
        {"syslog.facility": "user", "syslog.level": 7, "syslog.app_name": "myapp"},
        0,
    ),
    # no TAG: the whole rest is the message (a word before it is not taken for a hostname)
    (
        b"<13>Nov 30 00:53:33 just some words",
        "just some words",
        10,
        {"syslog.facility": "user", "syslog.level": 5},
        local(2026, 11, 30, 0, 53, 33),
    ),
    # no PRI at all: severity unknown, text kept
    (b"plain text line", "plain text line", 0, {}, 0),
    # PRI out of range: not a PRI
    (b"<999>x", "<999>x", 0, {}, 0),
    # invalid UTF-8 is replaced, never fatal
    (
        b"<13>app: caf\xe9 \xff",
        "caf\ufffd \ufffd",
        10,
        {"syslog.facility": "user", "syslog.level": 5, "syslog.app_name": "app"},
        0,
    ),
]


@pytest.mark.parametrize(("raw", "body", "severity", "attributes", "wall_ns"), GOLDEN)
def test_golden(raw: bytes, body: str, severity: int, attributes: dict[str, Any], wall_ns: int) -> None:
    record = parse_message(raw, "auto", OFFSET, NOW)
    assert record.body == body
    assert record.severity == severity
    assert record.attributes == attributes
    assert (record.time_mono_ns + OFFSET if record.time_mono_ns else 0) == wall_ns


@pytest.mark.parametrize(
    ("raw", "fmt", "reason"),
    [
        (b"<13>1 2026-11-30T00:00:00Z host", "auto", "RFC 5424 header needs"),
        (b"<13>1 yesterday host app - - - m", "auto", "is not RFC 3339"),
        (b'<13>1 - host app - - [unclosed a="1"', "auto", "not closed by ']'"),
        (b'<13>1 - host app - - [x a="1" m]', "auto", "without '=\"'"),
        (b'<13>1 - host app - - [x a="1] m', "auto", "not closed by '\"'"),
        (b"<13>1 - host app - - x m", "auto", "must be '-' or start with '['"),
        (b"<13>Nov 30 00:00:00 host app: m", "rfc5424", "RFC 5424 header needs"),
        (b"no pri", "rfc5424", "no <PRI>"),
    ],
)
def test_malformed_is_kept_whole_and_marked(raw: bytes, fmt: str, reason: str) -> None:
    record = parse_message(raw, fmt, OFFSET, NOW)
    assert record.body == raw.decode()
    assert record.attributes is not None and reason in str(record.attributes.pop("syslog.malformed"))
    assert set(record.attributes) <= {"syslog.facility", "syslog.level"}  # nothing half-parsed


def test_bsd_timestamp_at_new_year_is_last_year() -> None:
    just_after_new_year = time.mktime((2027, 1, 1, 0, 5, 0, 0, 0, -1))
    record = parse_message(b"<13>Dec 31 23:59:58 host app: m", "auto", OFFSET, just_after_new_year)
    assert record.time_mono_ns + OFFSET == local(2026, 12, 31, 23, 59, 58)


def test_format_rfc3164_does_not_read_5424() -> None:
    record = parse_message(b"<13>1 - - - - - - m", "rfc3164", OFFSET, NOW)
    assert record.body == "1 - - - - - - m"
    assert "syslog.malformed" not in (record.attributes or {})


def test_framer_octet_counting_across_reads_and_oversize() -> None:
    framer = Framer(max_size=480)
    big = b"<13>" + b"x" * 1000
    stream = b"11 <13>app: a1" + b"2 b\n" + b"%d " % len(big) + big + b"9 <13>app:Z"
    out = []
    for i in range(0, len(stream), 7):  # a byte stream arrives in arbitrary pieces
        out += framer.feed(stream[i : i + 7])
    out += framer.finish()
    assert framer.octet_counting is True
    # "12 b\n" frames are not all well formed: the "2 b\n" after the first frame is a 2-byte frame "b\n"
    assert out[0] == (b"<13>app: a1", 0)
    assert out[1] == (b"b\n", 0)
    assert out[2] == (big[:480], 1004)
    assert out[3] == (b"<13>app:Z", 0)
    assert len(out) == 4


def test_framer_newline_and_nul_framing_cut_long_lines() -> None:
    framer = Framer(max_size=480)
    long_line = "é".encode() * 400  # 800 bytes, cut not inside a character
    out = framer.feed(b"<13>a: one\r\n\n<13>a: two\x00" + long_line + b"\n<13>a: three")
    assert framer.octet_counting is False
    assert out[:2] == [(b"<13>a: one", 0), (b"<13>a: two", 0)]
    assert out[2] == ("é".encode() * 240, 800)
    assert framer.finish() == [(b"<13>a: three", 0)]
    # a line with no end in sight is cut as soon as it passes the limit, the rest dropped up to its end
    framer = Framer(max_size=480)
    assert framer.feed(b"<" + b"y" * 600) == [(b"<" + b"y" * 479, -1)]
    assert framer.feed(b"y" * 5000) == []
    assert framer.feed(b"yyy\n<13>a: next\n") == [(b"<13>a: next", 0)]


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('listen = "udp://127.0.0.1"', "syslog[0].listen"),
        ('listen = "tcp://127.0.0.1:70000"', "syslog[0].listen"),
        ('listen = "unix://relative/log"', "syslog[0].listen"),
        ('listen = "tcp://127.0.0.1:514"\nsocket_mode = "rw"', "syslog[0].socket_mode"),
        ('listen = "tcp://127.0.0.1:514"\nmax_connections = 0', "syslog[0].max_connections"),
        ('listen = "tcp://127.0.0.1:514"\nmax_message_size = "100B"', "syslog[0].max_message_size"),
        ('listen = "tcp://127.0.0.1:514"\nframing = "octet"', "syslog[0].framing"),
    ],
)
def test_config_errors_name_the_key_and_line(line: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(f"[kmsg]\nenabled = false\n[[syslog]]\n{line}\n", "edgeagent.toml")
    assert key in str(e.value) or key.rsplit(".", 1)[1] in str(e.value)
    assert "edgeagent.toml:" in str(e.value)


def test_config_listen_forms() -> None:
    assert parse_listen("udp://0.0.0.0:514") == ("udp", "0.0.0.0", 514)
    assert parse_listen("tcp://[::1]:6514") == ("tcp", "::1", 6514)
    assert parse_listen("unix:///dev/log") == ("unix", "/dev/log", 0)
    assert parse_listen("unix-stream:///run/edgeagent/syslog.sock") == ("unix-stream", "/run/edgeagent/syslog.sock", 0)

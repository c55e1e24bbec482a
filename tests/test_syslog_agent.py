"""The syslog source in a real agent process, fed by real clients nobody here wrote: util-linux `logger`
over every transport and rsyslog forwarding (counted at a real mosquitto). Thousands of messages each."""

from __future__ import annotations

import collections
import grp
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, spool_records, wait_for
from mqtt_helpers import Subscriber, bodies

LOGGER = shutil.which("logger")
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
N = 2000

BASE = """
device_id = "syslog-test"
state_dir = "{state_dir}"
[kmsg]
enabled = false
[spool]
flush_interval = "100ms"
"""

SPOOL_ONLY = BASE + '[upload]\nto = "none"\n'

pytestmark = pytest.mark.skipif(LOGGER is None, reason="util-linux logger is not installed")


def syslog_records(state_dir: Path) -> list[dict[str, Any]]:
    return [r for r in spool_records(state_dir) if r["scope"] == "edgeagent/syslog"]


def numbered(records: list[dict[str, Any]], tag: str) -> list[int]:
    """The numbers of the test lines `<tag> <n> ...` among `records` (from the body)."""
    out = []
    for r in records:
        parts = r["body"].split()
        if len(parts) >= 2 and parts[0] == tag:
            out.append(int(parts[1]))
    return out


def write_lines(path: Path, tag: str, count: int) -> Path:
    path.write_text("".join(f"{tag} {n} payload={n * 7919 % 10007:05d} {'x' * (n % 40)}\n" for n in range(count)))
    return path


def run_logger(*args: str) -> None:
    assert LOGGER is not None
    subprocess.run([LOGGER, *args], check=True, timeout=120, capture_output=True)


def start_listening(agent: Any) -> None:
    agent.start()
    wait_for(
        lambda: agent.status().get("sources", {}).get("syslog", {}).get("state") == "running", 30, what="listeners"
    )


def counters(agent: Any) -> dict[str, int]:
    return agent.status().get("counters", {})


def test_logger_thousands_per_transport(make_agent: Any, tmp_path: Path) -> None:
    """2000 messages per transport, RFC 3164 and 5424, from util-linux logger: every one is in the spool once
    (UDP: or counted as dropped, with a loss record), with its transport, severity and app name."""
    udp, tcp = free_port(), free_port()
    dgram, stream = tmp_path / "log.sock", tmp_path / "log-stream.sock"
    agent = make_agent(
        SPOOL_ONLY
        + f"""
[[syslog]]
listen = "udp://127.0.0.1:{udp}"
receive_buffer = "4MiB"
[[syslog]]
listen = "tcp://127.0.0.1:{tcp}"
[[syslog]]
listen = "unix://{dgram}"
socket_mode = "0620"
[[syslog]]
listen = "unix-stream://{stream}"
format = "rfc3164"
"""
    )
    start_listening(agent)
    assert os.stat(dgram).st_mode & 0o777 == 0o620
    assert os.stat(stream).st_mode & 0o777 == 0o666
    senders = {
        "udp3164": ["-n", "127.0.0.1", "-P", str(udp), "-d", "--rfc3164", "-p", "local3.err"],
        "udp5424": ["-n", "127.0.0.1", "-P", str(udp), "-d", "--rfc5424", "-p", "user.warning"],
        "tcpoctet": ["-n", "127.0.0.1", "-P", str(tcp), "-T", "--octet-count", "--rfc5424", "-p", "daemon.info"],
        "tcpnewline": ["-n", "127.0.0.1", "-P", str(tcp), "-T", "--rfc3164", "-p", "daemon.notice"],
        "unixdgram": ["-u", str(dgram), "-d", "-p", "auth.crit"],
        "unixstream": ["-u", str(stream), "-T", "-p", "local7.debug"],
    }
    for tag, args in senders.items():
        run_logger(*args, "-t", f"app-{tag}", "-f", str(write_lines(tmp_path / f"{tag}.txt", tag, N)))

    def complete() -> bool:
        records = syslog_records(agent.state_dir)
        dropped = counters(agent).get("syslog_dropped", 0)
        got = {tag: len(numbered(records, tag)) for tag in senders}
        udp_total = got["udp3164"] + got["udp5424"]
        return all(got[t] == N for t in senders if not t.startswith("udp")) and udp_total + dropped == 2 * N

    wait_for(complete, 120, interval=0.5, what=f"{N} messages per transport in the spool")
    records = syslog_records(agent.state_dir)
    expected = {
        "udp3164": ("udp", 17, "local3"),
        "udp5424": ("udp", 13, "user"),
        "tcpoctet": ("tcp", 9, "daemon"),
        "tcpnewline": ("tcp", 10, "daemon"),
        "unixdgram": ("unix", 21, "auth"),
        "unixstream": ("unix", 5, "local7"),
    }
    for tag, (transport, severity, facility) in expected.items():
        mine = [r for r in records if r["body"].startswith(tag + " ")]
        numbers = [int(r["body"].split()[1]) for r in mine]
        assert len(numbers) == len(set(numbers)), f"{tag}: duplicates"
        if not tag.startswith("udp"):
            assert sorted(numbers) == list(range(N)), f"{tag}: missing {set(range(N)) - set(numbers)}"
        first = mine[0]
        assert first["attributes"]["network.transport"] == transport
        assert first["attributes"]["syslog.app_name"] == f"app-{tag}"
        assert first["attributes"]["syslog.facility"] == facility
        assert first["severity_number"] == severity
        assert first["time_unix_nano"] > 0
    dropped = counters(agent).get("syslog_dropped", 0)
    if dropped:
        loss = [r for r in records if r["attributes"].get("edgeagent.loss.reason") == "syslog_dropped"]
        assert sum(r["attributes"]["edgeagent.loss.records"] for r in loss) == dropped
    assert agent.stop() == 0
    assert not dgram.exists() and not stream.exists()


def stuck_records(agent: Any) -> list[dict[str, Any]]:
    return [r for r in syslog_records(agent.state_dir) if r["attributes"].get("syslog.app_name") == "stuck"]


def test_stuck_clients_do_not_block_others_and_connections_are_limited(make_agent: Any, tmp_path: Path) -> None:
    """Two clients that stall mid-frame hold only their own connections; logger's 2000 messages arrive.
    A connection beyond max_connections is closed at once and counted; a half frame left at close is kept,
    marked truncated."""
    tcp = free_port()
    agent = make_agent(
        SPOOL_ONLY
        + f"""
[[syslog]]
listen = "tcp://127.0.0.1:{tcp}"
max_connections = 3
"""
    )
    start_listening(agent)
    stuck = [socket.create_connection(("127.0.0.1", tcp)) for _ in range(2)]
    stuck[0].sendall(b"100 <13>stuck: half a frame")
    stuck[1].sendall(b"<13>stuck: no newline yet")
    run_logger(
        "-n",
        "127.0.0.1",
        "-P",
        str(tcp),
        "-T",
        "--octet-count",
        "-t",
        "fast",
        "-f",
        str(write_lines(tmp_path / "fast.txt", "fast", N)),
    )
    wait_for(
        lambda: len(numbered(syslog_records(agent.state_dir), "fast")) == N,
        120,
        interval=0.5,
        what="the fast client's messages",
    )
    third = socket.create_connection(("127.0.0.1", tcp))
    wait_for(
        lambda: agent.status()["sources"]["syslog"]["listeners"][0]["connections"] == 3, 20, what="three connections"
    )
    fourth = socket.create_connection(("127.0.0.1", tcp))
    fourth.settimeout(20)
    assert fourth.recv(10) == b"", "the connection over the limit is closed"
    assert counters(agent).get("syslog_connections_refused") == 1 or wait_for(
        lambda: counters(agent).get("syslog_connections_refused") == 1, 10, what="the refusal counted"
    )
    for s in (*stuck, third, fourth):
        s.close()
    wait_for(
        lambda: len(stuck_records(agent)) == 2,
        20,
        what="the half frames",
    )
    halves = {r["body"]: r["attributes"] for r in stuck_records(agent)}
    assert halves["half a frame"]["edgeagent.line.truncated"] is True
    assert halves["half a frame"]["edgeagent.line.original_bytes"] == 100
    assert "edgeagent.line.truncated" not in halves["no newline yet"]
    assert agent.stop() == 0


def test_over_long_and_invalid_messages_are_cut_marked_and_counted(make_agent: Any, tmp_path: Path) -> None:
    """Over-long messages on UDP, TCP octet counting and TCP newline framing are cut, marked and counted; invalid
    UTF-8 is replaced and counted. The TCP listener is on IPv6 loopback."""
    udp, tcp = free_port(), free_port()
    agent = make_agent(
        SPOOL_ONLY
        + f"""
[[syslog]]
listen = "udp://127.0.0.1:{udp}"
max_message_size = "1KiB"
[[syslog]]
listen = "tcp://[::1]:{tcp}"
max_message_size = "1KiB"
"""
    )
    start_listening(agent)
    run_logger("-n", "127.0.0.1", "-P", str(udp), "-d", "--size", "8192", "-t", "big", "udp " + "u" * 3000)
    run_logger("-n", "::1", "-P", str(tcp), "-T", "--octet-count", "--size", "8192", "-t", "big", "octet " + "o" * 5000)
    with socket.create_connection(("::1", tcp)) as s:
        s.sendall(b"<13>big: newline " + "é".encode() * 3000 + b"\n<13>big: after \xff\xfe bytes\n")
    wait_for(lambda: len(syslog_records(agent.state_dir)) == 4, 30, what="four records")
    records = {r["body"].split()[0]: r for r in syslog_records(agent.state_dir)}
    for word in ("udp", "octet", "newline"):
        attrs = records[word]["attributes"]
        assert attrs["edgeagent.line.truncated"] is True
        assert len(records[word]["body"].encode()) <= 1024 - 10  # what is left after the header
    assert records["newline"]["attributes"]["edgeagent.line.original_bytes"] == len(b"<13>big: newline ") + 6000
    assert records["newline"]["attributes"]["network.peer.address"] == "::1"
    assert records["after"]["body"] == "after \ufffd\ufffd bytes"
    assert "edgeagent.line.truncated" not in records["after"]["attributes"]
    wait_for(
        lambda: counters(agent).get("syslog_truncated") == 3 and counters(agent).get("syslog_invalid_utf8") == 1,
        20,
        what="syslog_truncated = 3, syslog_invalid_utf8 = 1",
    )
    assert agent.stop() == 0


RSYSLOG_CONF = """
global(workDirectory="{workdir}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{socket}" RateLimit.Interval="0" CreatePath="on")
action(type="omfwd" target="127.0.0.1" port="{tcp}" protocol="tcp" TCP_Framing="octet-counted"
       template="RSYSLOG_SyslogProtocol23Format" queue.type="LinkedList" action.resumeRetryCount="-1")
action(type="omfwd" target="127.0.0.1" port="{tcp}" protocol="tcp" template="RSYSLOG_ForwardFormat"
       queue.type="LinkedList" action.resumeRetryCount="-1")
action(type="omfwd" target="127.0.0.1" port="{udp}" protocol="udp" template="RSYSLOG_TraditionalForwardFormat"
       queue.type="LinkedList" queue.dequeueSlowdown="300")
"""


@pytest.mark.skipif(not Path(RSYSLOGD).exists(), reason="rsyslog is not installed (apt-get install rsyslog)")
def test_rsyslog_forwards_to_the_agent_counted_at_the_broker(make_agent: Any, mosquitto: Any, tmp_path: Path) -> None:
    """rsyslog (its own config and pid file, not the system service) takes 2000 messages on a unix socket and
    forwards each three ways: TCP octet-counted RFC 5424, TCP newline-framed RFC 3339 forward format and UDP
    traditional format. Every TCP message reaches the broker once; UDP ones arrive or are counted dropped."""
    udp, tcp = free_port(), free_port()
    topic = "edgeagent/syslog-test/logs"
    agent = make_agent(
        BASE
        + f"""
[upload]
to = "mqtt"
[mqtt]
url = "{mosquitto.url}"
[[syslog]]
listen = "udp://127.0.0.1:{udp}"
receive_buffer = "4MiB"
[[syslog]]
listen = "tcp://127.0.0.1:{tcp}"
"""
    )
    logs = Subscriber(mosquitto.port, topic)
    start_listening(agent)
    workdir = tmp_path / "rsyslog"
    workdir.mkdir()
    rsyslog_socket = workdir / "in.sock"
    conf = workdir / "rsyslog.conf"
    conf.write_text(RSYSLOG_CONF.format(workdir=workdir, socket=rsyslog_socket, tcp=tcp, udp=udp))
    rsyslog = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(workdir / "rsyslog.pid")],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "stderr", "wb"),  # noqa: SIM115 - closed with the process
    )
    try:
        wait_for(rsyslog_socket.exists, 30, what="rsyslog's input socket")
        run_logger(
            "-u", str(rsyslog_socket), "-d", "-t", "viarsyslog", "-f", str(write_lines(tmp_path / "rs.txt", "rs", N))
        )

        def by_transport() -> collections.Counter[str]:
            seen: collections.Counter[str] = collections.Counter()
            for message in logs.received():
                for body in bodies(message.payload):
                    # rsyslog keeps the space after "TAG:" in %msg%, so its RFC 5424 MSG starts with one
                    if body.lstrip(" ").startswith("rs "):
                        seen[body.lstrip(" ")] += 1
            return seen

        def complete() -> bool:
            seen = by_transport()
            dropped = counters(agent).get("syslog_dropped", 0)
            return sum(seen.values()) + dropped == 3 * N and all(seen[b] >= 2 for b in seen) and len(seen) == N

        try:
            wait_for(complete, 180, interval=1.0, what=f"3 x {N} forwarded messages at the broker")
        except AssertionError:
            raise AssertionError(
                f"at the broker: {collections.Counter(by_transport().values())}, agent counters: {counters(agent)}"
            ) from None
        seen = by_transport()
        assert len(seen) == N and all(2 <= count <= 3 for count in seen.values())
    finally:
        rsyslog.terminate()
        rsyslog.wait(30)
        logs.close()
    assert agent.stop() == 0


def test_a_listener_that_cannot_open_does_not_stop_the_others(make_agent: Any, tmp_path: Path) -> None:
    """A unix socket path that is a regular file is never deleted: that listener reports the error and retries;
    the other listeners run. The socket of a working unix listener gets the configured mode and group."""
    not_a_socket = tmp_path / "not-a-socket"
    not_a_socket.write_text("precious\n")
    stream = tmp_path / "stream.sock"
    agent = make_agent(
        SPOOL_ONLY
        + f"""
[[syslog]]
listen = "unix-stream://{not_a_socket}"
[[syslog]]
listen = "unix-stream://{stream}"
socket_mode = "0660"
socket_group = "nogroup"
"""
    )
    agent.start()

    def listeners() -> list[dict[str, Any]]:
        return agent.status().get("sources", {}).get("syslog", {}).get("listeners", [])

    wait_for(lambda: [x["state"] for x in listeners()] == ["error", "running"], 30, what="one error, one running")
    assert "exists and is not a socket" in listeners()[0]["error"]
    assert not_a_socket.read_text() == "precious\n"
    assert os.stat(stream).st_mode & 0o777 == 0o660
    assert os.stat(stream).st_gid == grp.getgrnam("nogroup").gr_gid
    run_logger("-u", str(stream), "-T", "-t", "ok", "still working")
    wait_for(lambda: [r["body"] for r in syslog_records(agent.state_dir)] == ["still working"], 30, what="the record")
    assert agent.stop() == 0


def test_udp_syslog_loses_nothing_while_a_file_backlog_is_delivered_from_ram(
    make_agent: Any, mosquitto: Any, tmp_path: Path
) -> None:
    """Datagrams arriving while a file backlog goes through RAM to a real mosquitto: every one arrives, none
    is counted dropped. (The RAM tier pauses only file sources; a syslog socket drops what it reads while the
    spool is not `accepting`: tests/test_holding.py checks that a full RAM tier leaves `accepting` True.)"""
    udp = free_port()
    topic = "edgeagent/syslog-test/logs"
    backlog = tmp_path / "backlog.log"
    backlog.write_bytes(b"".join(b"backlog %08d %s\n" % (n, b"y" * 100) for n in range(400_000)))
    agent = make_agent(
        BASE
        + f"""
[[files]]
include = ["{backlog}"]
start_at = "beginning"
[upload]
to = "mqtt"
[mqtt]
url = "{mosquitto.url}"
first_connect_delay = "0s"
[[syslog]]
listen = "udp://127.0.0.1:{udp}"
"""
    )
    logs = Subscriber(mosquitto.port, topic)
    start_listening(agent)

    def seen() -> tuple[set[int], int]:
        udp_numbers, backlog_lines = set(), 0
        for message in logs.received():
            for body in bodies(message.payload):
                parts = body.split()
                if len(parts) >= 2 and parts[0] == "udp":
                    udp_numbers.add(int(parts[1]))
                elif parts and parts[0] == "backlog":
                    backlog_lines += 1
        return udp_numbers, backlog_lines

    sent = 0
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # a datagram every 10 ms for as long as the backlog is being delivered (most chunks hold only lines)
        deadline = time.monotonic() + 120
        while seen()[1] < 400_000 and time.monotonic() < deadline:
            for _ in range(10):
                sender.sendto(f"<14>udp {sent} during the backlog".encode(), ("127.0.0.1", udp))
                sent += 1
                time.sleep(0.01)
    finally:
        sender.close()
    wait_for(lambda: len(seen()[0]) + counters(agent).get("syslog_dropped", 0) >= sent, 60)
    assert counters(agent).get("syslog_dropped", 0) == 0
    assert seen()[0] == set(range(sent))
    assert counters(agent).get("acked_from_ram_chunks", 0) > 0  # the backlog took the RAM path

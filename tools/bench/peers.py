"""Peers on the same work: rsyslog and syslog-ng, file -> disk queue -> TCP sink.

Each peer runs in the foreground with its own config, state and queue files
in a run dir under tools/bench/out/runs/ (never the system's /etc or
/var/log), reads the corpus from the beginning and forwards every line over
TCP to a local counting sink; done when the sink has counted every line.
It is measured like the agent (wall, CPU, peak RSS, disk written, bytes on
the wire = bytes the sink received) and stopped with SIGTERM.

rsyslog and syslog-ng-core conflict as Debian packages; `--setup-peers`
installs syslog-ng-core with apt and unpacks the rsyslog package into
tools/bench/out/peers/rsyslog (apt-get download + dpkg -x), where this module
finds it when rsyslogd is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from common import OUT, BenchError, CountingSink, Measured, NotAvailable, wait_until
from scenarios import Work, generous_timeout, run_dir

UNPACKED_RSYSLOG = OUT / "peers" / "rsyslog"


def setup_peers() -> None:
    """Install the peers from Debian without starting them as services."""
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "syslog-ng-core"],
        check=False,
        env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    if shutil.which("rsyslogd") is None and not (UNPACKED_RSYSLOG / "usr/sbin/rsyslogd").exists():
        # rsyslog's library dependencies come with apt; the package itself is
        # unpacked beside syslog-ng-core, which it conflicts with.
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "libestr0", "libfastjson4", "liblognorm5"],
            check=False,
        )
        peers = OUT / "peers"
        peers.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "rsyslog"], cwd=peers, check=True)
        deb = sorted(peers.glob("rsyslog_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(UNPACKED_RSYSLOG)], check=True)


def rsyslogd() -> tuple[str, list[str]]:
    """The rsyslogd binary and the arguments pointing it at its modules."""
    system = shutil.which("rsyslogd") or (Path("/usr/sbin/rsyslogd") if Path("/usr/sbin/rsyslogd").exists() else None)
    if system:
        return str(system), []
    unpacked = UNPACKED_RSYSLOG / "usr/sbin/rsyslogd"
    if unpacked.exists():
        return str(unpacked), ["-M", str(UNPACKED_RSYSLOG / "usr/lib/x86_64-linux-gnu/rsyslog")]
    raise NotAvailable("rsyslogd is not installed (tools/bench/run --setup-peers)")


def syslog_ng() -> str:
    path = shutil.which("syslog-ng") or "/usr/sbin/syslog-ng"
    if not Path(path).exists():
        raise NotAvailable("syslog-ng is not installed (tools/bench/run --setup-peers)")
    return path


def rsyslog_config(work: Path, corpus: Path, port: int, queue_type: str) -> str:
    return f"""
global(workDirectory="{work}/spool" maxMessageSize="64k")
module(load="imfile" mode="inotify")
input(type="imfile" file="{corpus}" tag="bench" freshStartTail="off" ruleset="forward")
ruleset(name="forward") {{
  action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp"
         queue.type="{queue_type}" queue.filename="forward" queue.saveOnShutdown="on"
         queue.maxDiskSpace="2g" queue.size="100000" action.resumeRetryCount="-1")
}}
"""


def syslog_ng_config(work: Path, corpus: Path, port: int) -> str:
    return f"""@version: 3.38
options {{ stats-freq(0); }};
source s_corpus {{ file("{corpus}" flags(no-parse) follow-freq(1) log-iw-size(10000) log-fetch-limit(1000)); }};
destination d_sink {{
  network("127.0.0.1" port({port}) transport("tcp")
          disk-buffer(reliable(yes) disk-buf-size(2147483648) mem-buf-size(16777216) dir("{work}/buffer")));
}};
log {{ source(s_corpus); destination(d_sink); flags(flow-control); }};
"""


def run_peer(name: str, w: Work) -> dict[str, Any]:
    work = run_dir(f"peer-{name}")
    sink = CountingSink()
    if name.startswith("rsyslog"):
        binary, extra = rsyslogd()
        queue_type = "Disk" if name == "rsyslog-disk" else "LinkedList"
        (work / "spool").mkdir()
        conf = work / "rsyslog.conf"
        conf.write_text(rsyslog_config(work, w.corpus, sink.port, queue_type))
        argv = [binary, "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid"), *extra]
    elif name == "syslog-ng":
        binary = syslog_ng()
        (work / "buffer").mkdir()
        conf = work / "syslog-ng.conf"
        conf.write_text(syslog_ng_config(work, w.corpus, sink.port))
        argv = [
            binary,
            "-F",
            "--no-caps",
            "-f",
            str(conf),
            "-R",
            str(work / "syslog-ng.persist"),
            "-p",
            str(work / "syslog-ng.pid"),
            "-c",
            str(work / "syslog-ng.ctl"),
        ]
    else:
        raise BenchError(f"unknown peer {name}")
    peer = Measured(argv, cwd=work, stderr_path=work / "stderr.log").start()
    try:

        def delivered() -> bool:
            peer.check_alive(name)
            return sink.lines >= w.lines

        wait_until(delivered, generous_timeout(w.lines) * 4, f"{w.lines} lines at the sink from {name}")
        wall = peer.mark()
    finally:
        final = peer.stop()
        sink.close()
    assert peer.marked is not None
    return {
        "wall_s": wall,
        "lines_per_s": w.lines / wall,
        "cpu_s": peer.marked.cpu_s,
        "peak_rss_mib": final["peak_rss_kib"] / 1024,
        "disk_write_bytes": final["write_bytes_total"],
        "disk_per_raw": final["write_bytes_total"] / w.raw_bytes,
        "wire_bytes": sink.bytes,
        "wire_per_raw": sink.bytes / w.raw_bytes,
        "delivered_records": sink.lines,
    }


PEERS = ("rsyslog", "rsyslog-disk", "syslog-ng")


def fluent_bit_config(work: Path, log_file: Path, port: int) -> str:
    """Fluent Bit 5 as ../shared/notes/peers.md builds it: tail (from the head, its position database synced
    normally) -> filesystem storage (not synced per chunk) -> out_opentelemetry, uncompressed protobuf, retried
    without limit; for the compare and trickle scenarios alike."""
    return f"""[SERVICE]
    flush 1
    log_level warn
    storage.path {work}/storage
    storage.sync normal
    storage.checksum off
    storage.max_chunks_up 128
    storage.backlog.mem_limit 5M

[INPUT]
    name tail
    path {log_file}
    read_from_head true
    db {work}/tail.db
    db.sync normal
    storage.type filesystem

[OUTPUT]
    name opentelemetry
    match *
    host 127.0.0.1
    port {port}
    logs_uri /v1/logs
    log_response_payload false
    retry_limit no_limits
"""

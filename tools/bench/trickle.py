"""The trickle scenario: a device's real workload, a few lines a second.

A writer appends ~70-byte lines to a tailed file at 5 and at 50 lines/s for
`seconds` (300 in BENCHMARKS.md), link up and link down, into edgeagent
(default config, MQTT through a byte-counting proxy to mosquitto) and, when its
binary exists, Fluent Bit (tail -> filesystem storage -> OTLP/HTTP through the
same kind of proxy to a local receiver that answers 200).

Every figure is a count, not a time, so a busy machine does not spoil it, and
the variants run side by side (one thread each):
- flash dirtied per line: the process's `write_bytes - cancelled_write_bytes`
  from /proc/PID/io over the window (bytes it dirtied in the page cache of a
  block device, i.e. what will reach flash), divided by the lines written;
- syncs per minute: fsync/fdatasync/msync/sync_file_range calls counted by
  `strace -c -f` attached for the window (`syscw` from /proc/PID/io too);
- wire bytes per raw byte: bytes the client sent through the proxy (protocol
  framing included, TCP/IP headers not) over the raw bytes of the lines;
- delivered: records the subscriber received (edgeagent, link up), to show the
  figures were taken while the data really flowed.
The window starts after a warm-up (the agent connected, the first lines
delivered) and ends before the agent is stopped: start-up and shutdown writes
are not counted.
"""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    REPO,
    VENV_PYTHON,
    Broker,
    CountingProxy,
    Measured,
    NotAvailable,
    Subscriber,
    count_records,
    cpu_times,
    free_port,
    machine_share,
    wait_until,
)
from peers import fluent_bit_config
from scenarios import TOPIC, agent_config, run_dir

FLUENT_BIT = Path(os.environ.get("FLUENT_BIT", "/work/peers/fluent-bit-build/bin/fluent-bit"))
RATES = (5, 50)
LINKS = ("up", "down")
WARMUP_S = 10.0
SYNC_CALLS = "fsync,fdatasync,msync,sync_file_range"
METERED = '[spool]\nfile_flush_interval = "30s"\n'


def line_text(i: int) -> bytes:
    """A ~70-byte application log line, varied like a sensor gateway's."""
    t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    return (
        f"{t}Z gwapp[812]: sensor={i % 17:02d} temp={20 + (i * 7) % 100 / 10:.1f}C rssi=-{60 + i % 31} seq={i:07d}\n"
    ).encode()


class Writer:
    """Appends `line_text` lines to `path` at `rate` per second (one write each) until stopped."""

    def __init__(self, path: Path, rate: float) -> None:
        self.path = path
        self.rate = rate
        self.lines = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = time.monotonic()
            while not self._stop.is_set():
                data = line_text(self.lines)
                os.write(fd, data)
                self.lines += 1
                self.bytes += len(data)
                self._stop.wait(max(0.0, start + self.lines / self.rate - time.monotonic()))
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def proc_io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, _, v in (line.partition(":") for line in f) if v.strip()}


class SyncCounter:
    """`strace -c -f` attached to a process for a window: sync calls by name."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["strace", "-c", "-f", "-e", f"trace={SYNC_CALLS}", "-o", str(out), "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        counts: dict[str, int] = {}
        for line in self.out.read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m and m.group(2) != "total":
                counts[m.group(2)] = int(m.group(1))
        return counts


class OtlpReceiver:
    """A minimal OTLP/HTTP logs receiver on 127.0.0.1: 200 with an empty
    ExportLogsServiceResponse for every POST (the wire is counted by the proxy in front)."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def edgeagent_config(log_file: Path, port: int, extra: str) -> str:
    return (
        "[kmsg]\nenabled = false\n"
        f'[[files]]\ninclude = ["{log_file}"]\nstart_at = "beginning"\n'
        '[upload]\nto = "mqtt"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\ntopic = "{TOPIC}"\nfirst_connect_delay = "0s"\n' + extra
    )


def _window(m: Measured, writer: Writer, seconds: float, work: Path) -> dict[str, Any]:
    """Measure `m` for `seconds` while `writer` writes; the counts of the window."""
    strace = SyncCounter(m.pid, work / "strace.txt")
    time.sleep(0.5)  # strace attaches to every thread
    io0, lines0, bytes0, cpu0 = proc_io(m.pid), writer.lines, writer.bytes, cpu_times()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        m.check_alive("the measured process")
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    io1, lines1, bytes1, cpu1 = proc_io(m.pid), writer.lines, writer.bytes, cpu_times()
    syncs = strace.stop()
    lines, raw = lines1 - lines0, bytes1 - bytes0
    dirtied = (io1["write_bytes"] - io0["write_bytes"]) - (io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"])
    return {
        "window_s": seconds,
        "lines": lines,
        "raw_bytes": raw,
        "write_bytes": io1["write_bytes"] - io0["write_bytes"],
        "cancelled_write_bytes": io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"],
        "flash_per_line": dirtied / max(lines, 1),
        "flash_bytes_per_day": dirtied / seconds * 86400,
        "syncs_per_min": sum(syncs.values()) * 60 / seconds,
        "syncs": syncs,
        "write_syscalls_per_min": (io1["syscw"] - io0["syscw"]) * 60 / seconds,
        **machine_share(cpu0, cpu1),
        "_raw0": bytes0,
    }


def edgeagent_once(rate: int, link: str, seconds: float, extra_config: str = "", tag: str = "") -> dict[str, Any]:
    work = run_dir(f"trickle-edgeagent-{rate}-{link}{tag}")
    log_file = work / "app.log"
    log_file.touch()
    broker = Broker(work / "broker")
    broker.start()
    proxy = CountingProxy(broker.port) if link == "up" else None
    port = proxy.port if proxy else free_port()  # link down: nothing listens there
    sub = Subscriber(broker.port, TOPIC)
    config = work / "agent.toml"
    config.write_text(agent_config(work / "state", edgeagent_config(log_file, port, extra_config)))
    agent = Measured(
        [str(VENV_PYTHON), "-m", "edgeagent", "run", "-c", str(config)],
        cwd=REPO,
        stderr_path=work / "agent.stderr",
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    ).start()
    writer = Writer(log_file, rate).start()
    try:
        if link == "up":
            wait_until(lambda: agent.check_alive("the agent") or sub.payloads, 60, "the first delivery")
        time.sleep(WARMUP_S)
        wire0 = proxy.up_bytes if proxy else 0
        figures = _window(agent, writer, seconds, work)
        wire = (proxy.up_bytes - wire0) if proxy else 0
    finally:
        writer.stop()
        if link == "up":
            # Everything written is delivered before the agent stops (bounded wait).
            try:
                wait_until(lambda: count_records(list(sub.payloads)) >= writer.lines, 60, "all lines delivered")
            except Exception as e:  # reported below as delivered < written
                print(f"bench: trickle: {e}")
        agent.stop()
        sub.close()
        if proxy:
            proxy.close()
        broker.stop()
    _add_wire(figures, wire, writer)
    figures["delivered_records"] = count_records(sub.payloads) if link == "up" else 0
    figures["messages"] = len(sub.payloads)
    return figures


def _add_wire(figures: dict[str, Any], wire: int, writer: Writer) -> None:
    """The window's wire bytes (what the client sent through the proxy), per line and per raw byte."""
    figures.pop("_raw0")
    figures["wire_bytes"] = wire
    figures["wire_per_line"] = wire / max(figures["lines"], 1)
    figures["wire_per_raw"] = wire / max(figures["raw_bytes"], 1)
    figures["written_lines"] = writer.lines


def fluent_bit_once(rate: int, link: str, seconds: float) -> dict[str, Any]:
    if not FLUENT_BIT.exists():
        raise NotAvailable(f"Fluent Bit is not built ({FLUENT_BIT} is missing)")
    work = run_dir(f"trickle-fluent-bit-{rate}-{link}")
    log_file = work / "app.log"
    log_file.touch()
    receiver = OtlpReceiver()
    proxy = CountingProxy(receiver.port) if link == "up" else None
    port = proxy.port if proxy else free_port()
    conf = work / "fluent-bit.conf"
    conf.write_text(fluent_bit_config(work, log_file, port))
    peer = Measured([str(FLUENT_BIT), "-c", str(conf)], cwd=work, stderr_path=work / "stderr.log").start()
    writer = Writer(log_file, rate).start()
    try:
        if proxy:
            wait_until(lambda: peer.check_alive("fluent-bit") or proxy.up_bytes, 60, "the first delivery")
        time.sleep(WARMUP_S)
        wire0 = proxy.up_bytes if proxy else 0
        figures = _window(peer, writer, seconds, work)
        wire = (proxy.up_bytes - wire0) if proxy else 0
    finally:
        writer.stop()
        peer.stop()
        if proxy:
            proxy.close()
        receiver.close()
    _add_wire(figures, wire, writer)
    return figures


def variants(seconds: float, agents: tuple[str, ...] = ("edgeagent", "fluent-bit")) -> dict[str, Any]:
    """Every (agent, rate, link) variant once, side by side; name -> figures or why not."""
    results: dict[str, Any] = {}

    def one(name: str, fn: Any) -> None:
        try:
            results[name] = {"status": "ok", **fn()}
        except NotAvailable as e:
            results[name] = {"status": "not available", "reason": str(e)}
        except Exception as e:
            results[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}

    threads = []
    for rate in RATES:
        for link in LINKS:
            if "edgeagent" in agents:
                fn = lambda r=rate, li=link: edgeagent_once(r, li, seconds)  # noqa: E731
                threads.append(threading.Thread(target=one, args=(f"edgeagent {rate}/s link {link}", fn)))
            if "fluent-bit" in agents:
                fn = lambda r=rate, li=link: fluent_bit_once(r, li, seconds)  # noqa: E731
                threads.append(threading.Thread(target=one, args=(f"fluent-bit {rate}/s link {link}", fn)))
    if "edgeagent" in agents:  # the metered-link setting: one upload of file lines per 30 s
        fn = lambda: edgeagent_once(5, "up", seconds, METERED, "-metered")  # noqa: E731
        threads.append(threading.Thread(target=one, args=("edgeagent 5/s link up, metered", fn)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(sorted(results.items()))


CURVE_FLUSH_INTERVALS = ("0.5s", "1s", "2s", "5s", "10s", "30s")


def curve(seconds: float) -> dict[str, Any]:
    """Link down, 5 lines/s, `hold_file_lines = "0s"` (file lines committed and
    synced every flush_interval, as kernel messages are while unacknowledged),
    for each flush_interval, side by side: the flash cost of a loss window of
    flush_interval for records no input keeps."""
    results: dict[str, Any] = {}

    def one(interval: str) -> None:
        extra = f'[spool]\nflush_interval = "{interval}"\nhold_file_lines = "0s"\n'
        try:
            results[interval] = {"status": "ok", **edgeagent_once(5, "down", seconds, extra, f"-curve-{interval}")}
        except Exception as e:
            results[interval] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}

    threads = [threading.Thread(target=one, args=(interval,)) for interval in CURVE_FLUSH_INTERVALS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {k: results[k] for k in CURVE_FLUSH_INTERVALS}


def render(results: dict[str, Any]) -> list[str]:
    """The trickle table (Markdown lines) from `variants()`."""
    out = [
        "| agent, rate, link | flash dirtied per line | flash per day | syncs per minute | write calls per minute "
        "| wire per line | wire / raw | delivered / written | machine busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if r.get("status") != "ok":
            out.append(f"| {name} | {r.get('status')}: {r.get('reason', '')} | | | | | | | |")
            continue
        wire = f"{r['wire_per_line']:.1f} B | {r['wire_per_raw']:.2f}x" if r["wire_bytes"] else "- | -"
        delivered = f"{r['delivered_records']:,} / {r['written_lines']:,}" if r.get("delivered_records") else "-"
        out.append(
            f"| {name} | {r['flash_per_line']:,.0f} B | {r['flash_bytes_per_day'] / 1e6:,.0f} MB "
            f"| {r['syncs_per_min']:.1f} | {r['write_syscalls_per_min']:.0f} | {wire} | {delivered} "
            f"| {r['machine_busy_pct']:.0f}% |"
        )
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="the trickle scenario alone (see the module docstring)")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--agents", default="edgeagent,fluent-bit")
    parser.add_argument("--curve", action="store_true", help="flush_interval curve instead (link down, 5 lines/s)")
    args = parser.parse_args()
    if args.curve:
        points = curve(args.seconds)
        print(json.dumps(points, indent=1))
        print("| flush_interval (= loss window) | flash dirtied per line | flash per day | syncs per minute |")
        print("|---|---|---|---|")
        for interval, r in points.items():
            if r["status"] == "ok":
                print(
                    f"| {interval} | {r['flash_per_line']:,.0f} B | {r['flash_bytes_per_day'] / 1e6:,.0f} MB "
                    f"| {r['syncs_per_min']:.1f} |"
                )
        raise SystemExit(0)
    results = variants(args.seconds, tuple(args.agents.split(",")))
    print(json.dumps(results, indent=1))
    print("\n".join(render(results)))

"""Shared machinery of the benchmark harness: paths, the corpus, measuring a
child process, a local mosquitto, a byte-counting TCP proxy, a counting TCP
sink and a QoS 1 subscriber.

How a process is measured (`Measured`): it is started with Popen; a sampler
thread reads /proc/PID/{stat,status,io} every `SAMPLE_INTERVAL`; `mark()`
snapshots the counters at the moment a scenario's goal is reached; after it
exits it is waited for with `waitid(WNOWAIT)` first, so /proc/PID/io can still
be read from the zombie (the final write_bytes, including the shutdown
checkpoint), then reaped with `wait4` for its rusage (user+sys of all threads,
peak RSS = the highest VmHWM sampled, see `stop`).
"""

from __future__ import annotations

import itertools
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent.parent
OUT = BENCH / "out"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
GEN_CORPUS = REPO.parent / "shared" / "bench" / "gen_corpus.py"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.05


class BenchError(Exception):
    """A scenario cannot run or did not reach its goal."""


class NotAvailable(BenchError):
    """What a scenario needs is not there (a program, a feature of the agent)."""


def corpus(lines: int) -> Path:
    """The deterministic corpus of `lines` lines, generated once by the shared generator."""
    path = OUT / f"corpus-{lines}.log"
    if path.exists():
        return path
    if not GEN_CORPUS.exists():
        raise SystemExit(
            f"bench: the corpus generator {GEN_CORPUS} (../shared/bench/gen_corpus.py from the repo) is missing; "
            "it writes the exact corpus the figures in BENCHMARKS.md were measured on"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    subprocess.run([sys.executable, str(GEN_CORPUS), str(tmp), str(lines)], check=True)
    tmp.rename(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def machine() -> dict[str, str]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    python = subprocess.run([str(VENV_PYTHON), "-V"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_kib // 1024} MiB",
        "kernel": platform.release(),
        "python": python,
        "filesystem": _fs_of(OUT),
    }


def _fs_of(path: Path) -> str:
    best, best_type = "", "?"
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mount_point, fs_type = parts[4], parts[parts.index("-") + 1]
            if (target == mount_point or target.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(
                best
            ):
                best, best_type = mount_point, fs_type
    return best_type


# --- measuring a process ------------------------------------------------------


@dataclass
class Snapshot:
    cpu_s: float = 0.0
    hwm_kib: int = 0
    rss_kib: int = 0
    write_bytes: int = 0
    cancelled_write_bytes: int = 0
    ctxt_switches: int = 0
    minor_faults: int = 0


def read_proc(pid: int) -> Snapshot | None:
    """CPU (all threads, and the children it waited for), VmHWM/VmRSS, write_bytes and context switches of `pid`."""
    snap = Snapshot()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime + stime of every thread, and of the children it waited for: the agent creates a new spool's
        # schema in a child process (sqlite-utils stays out of the daemon), about 0.17 CPU s once per spool.
        snap.cpu_s = sum(int(f) for f in fields[11:15]) / CLK_TCK
        snap.minor_faults = int(fields[7])
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "VmHWM":
                    snap.hwm_kib = int(value.split()[0])
                elif key == "VmRSS":
                    snap.rss_kib = int(value.split()[0])
                elif key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                    snap.ctxt_switches += int(value)
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "write_bytes":
                    snap.write_bytes = int(value)
                elif key == "cancelled_write_bytes":
                    snap.cancelled_write_bytes = int(value)
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None
    return snap


@dataclass
class Measured:
    """A child process under measurement. See the module docstring."""

    argv: list[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    stderr_path: Path | None = None
    stdout_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    last: Snapshot = field(default_factory=Snapshot)
    peak_rss_kib: int = 0
    marked: Snapshot | None = None
    marked_at: float = 0.0
    final: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _sampler: threading.Thread | None = None

    def start(self) -> Measured:
        stderr = open(self.stderr_path, "ab") if self.stderr_path else subprocess.DEVNULL  # noqa: SIM115
        stdout = open(self.stdout_path, "wb") if self.stdout_path else subprocess.DEVNULL  # noqa: SIM115
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd
        )
        for stream in (stdout, stderr):
            if not isinstance(stream, int):
                stream.close()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _sample(self) -> None:
        # The first samples come quickly: short-lived processes (start-up,
        # --version) would otherwise exit before the first one.
        interval = 0.002
        while not self._stop.wait(interval):
            interval = min(interval * 2, SAMPLE_INTERVAL)
            snap = read_proc(self.pid)
            if snap is None:
                return
            self.last = snap
            self.peak_rss_kib = max(self.peak_rss_kib, snap.hwm_kib)

    def alive(self) -> bool:
        assert self.proc is not None
        try:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return result is None

    def check_alive(self, what: str) -> None:
        if not self.alive():
            tail = self.stderr_path.read_text(errors="replace")[-3000:] if self.stderr_path else ""
            raise BenchError(f"{what} exited early (see {self.stderr_path}):\n{tail}")

    def snapshot(self) -> Snapshot:
        return read_proc(self.pid) or self.last

    def mark(self) -> float:
        """Snapshot the counters now (the scenario's goal was reached); returns wall seconds since start."""
        self.marked_at = time.perf_counter() - self.started
        self.marked = self.snapshot()
        self.peak_rss_kib = max(self.peak_rss_kib, self.marked.hwm_kib)
        return self.marked_at

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> dict[str, Any]:
        """Signal, wait, read the zombie's final I/O counters, reap with rusage."""
        assert self.proc is not None
        if self.alive():
            snap = read_proc(self.pid)
            if snap is not None:
                self.peak_rss_kib = max(self.peak_rss_kib, snap.hwm_kib)
            self.proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                self.proc.kill()
                deadline = time.monotonic() + 10
            time.sleep(0.01)
        self._stop.set()
        final_io = read_proc(self.pid)
        _, status, usage = os.wait4(self.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.final = {
            "exit_code": self.proc.returncode,
            "cpu_total_s": usage.ru_utime + usage.ru_stime,
            # Not ru_maxrss: exec records the forking parent's high-water mark
            # there, so it is the harness's RSS for any small child. VmHWM is
            # per address space and starts afresh at exec.
            "peak_rss_kib": self.peak_rss_kib,
            "write_bytes_total": final_io.write_bytes if final_io else self.last.write_bytes,
            "cancelled_write_bytes": final_io.cancelled_write_bytes if final_io else self.last.cancelled_write_bytes,
        }
        return self.final


def run_measured(argv: list[str], stdout_path: Path | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run to completion; wall, CPU, peak RSS and disk written of the whole run."""
    m = Measured(argv, cwd=cwd, stdout_path=stdout_path).start()
    assert m.proc is not None
    os.waitid(os.P_PID, m.pid, os.WEXITED | os.WNOWAIT)
    wall = time.perf_counter() - m.started
    final = m.stop()
    if final["exit_code"] != 0:
        raise BenchError(f"{' '.join(argv)} exited with {final['exit_code']}")
    return {
        "wall_s": wall,
        "cpu_s": final["cpu_total_s"],
        "peak_rss_kib": final["peak_rss_kib"],
        "disk_write_bytes": final["write_bytes_total"],
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median of numeric values (other values from the first run)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
        else:
            out[key] = values[0]
    out["runs"] = len(runs)
    return out


# --- network helpers ----------------------------------------------------------


class Broker:
    """A mosquitto on 127.0.0.1 with its own config in `workdir`."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not Path(MOSQUITTO).exists():
            raise NotAvailable("mosquitto is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\npersistence false\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\n"
            "max_queued_messages 0\nmax_inflight_messages 100\nmessage_size_limit 0\n"
            "sys_interval 1\n"
        )
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._accepting, 10, f"mosquitto on port {self.port}")

    def _accepting(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"mosquitto exited with {self.proc.returncode}; see {self.workdir}/mosquitto.log")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class CountingProxy:
    """A TCP proxy on 127.0.0.1 counting the bytes each way (the wire cost of
    the client, protocol framing included, TCP/IP headers excluded). While the
    upstream is down, accepted connections are closed at once, as a broker
    that is down would refuse them."""

    def __init__(self, upstream_port: int, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.up_bytes = 0  # client -> upstream
        self.down_bytes = 0  # upstream -> client
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        peers: dict[socket.socket, tuple[socket.socket, bool]] = {}
        while not self._done:
            for key, _ in sel.select():
                sock = key.fileobj
                if key.data == "wake":
                    continue
                if sock is self._listener:
                    try:
                        client, _ = self._listener.accept()
                    except BlockingIOError:
                        continue
                    try:
                        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
                    except OSError:
                        client.close()
                        continue
                    for s in (client, upstream):
                        s.setblocking(False)
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    peers[client] = (upstream, True)
                    peers[upstream] = (client, False)
                    sel.register(client, selectors.EVENT_READ, "peer")
                    sel.register(upstream, selectors.EVENT_READ, "peer")
                    continue
                assert isinstance(sock, socket.socket)
                if sock not in peers:
                    continue
                other, from_client = peers[sock]
                try:
                    data = sock.recv(1 << 20)
                except OSError:
                    data = b""
                if data:
                    if from_client:
                        self.up_bytes += len(data)
                    else:
                        self.down_bytes += len(data)
                    try:
                        other.setblocking(True)
                        other.sendall(data)
                        other.setblocking(False)
                        continue
                    except OSError:
                        pass
                for s in (sock, other):
                    if s in peers:
                        sel.unregister(s)
                        del peers[s]
                        s.close()
        for s in peers:
            s.close()
        sel.close()

    def close(self) -> None:
        self._done = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()


class CountingSink:
    """A TCP listener on 127.0.0.1 that counts bytes and newlines received
    (the local sink of the syslog peers)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bytes = 0
        self.lines = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._done = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._done:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.bytes += len(data)
                    self.lines += data.count(b"\n")

    def close(self) -> None:
        self._done = True
        self._listener.close()
        self._thread.join(2)


def tcp_bytes_sent(pid: int, port: int) -> list[int]:
    """Bytes `pid` has sent on each of its established TCP connections to 127.0.0.1:`port` (the kernel's
    `tcpi_bytes_sent`, read with `ss`: protocol framing included, TCP/IP headers excluded, retransmits
    included, as the counting proxy counted), with no process in the data path."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    sent = []
    for socket_line, info in itertools.pairwise(out):
        if f"pid={pid}," in socket_line:
            match = re.search(r"\bbytes_sent:(\d+)", info)
            if match is None:
                raise BenchError(f"ss shows no bytes_sent for pid {pid}'s connection to port {port}: {info!r}")
            sent.append(int(match.group(1)))
    return sent


class Subscriber:
    """A QoS 1 MQTT subscriber (straight to the broker) that keeps every
    payload; `found.is_set()` tells whether one contains `needle` (the last
    line of the corpus, found with a C-level substring search after zstd
    decompression)."""

    def __init__(self, port: int, topic: str, needle: bytes | None = None) -> None:
        import paho.mqtt.client as mqtt
        import zstandard

        self.payloads: list[bytes] = []
        dctx = zstandard.ZstdDecompressor()
        self.found = NeedleSearch(
            self.payloads, needle, lambda payload: dctx.decompress(payload, max_output_size=256 * 1024**2)
        )
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}", protocol=5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = lambda c, u, message: self.payloads.append(message.payload)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise BenchError("the bench subscriber could not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class NeedleSearch:
    """Whether an item received so far (an MQTT payload, an HTTP body) holds `needle` once `decode`d,
    decoding as few as the harness can: the receiver is the harness's tap, not part of what is measured, and
    every CPU second it spends during a run is taken from the agent on this 2-core machine (decompressing
    each of a million lines' payloads as it arrived cost about 0.15 CPU s inside the window; the newest one
    at every 10 ms poll, about 0.05). One session's messages arrive in order, so the last line arrives in the
    newest item, and it is the last to arrive: nothing is searched while items keep coming (one came since
    the last poll); once a poll sees none new, the ones not searched yet are, newest first. The goal is seen
    one to two polls (10-20 ms) after the last item arrived, when the agent is idle. An item `decode` refuses
    with ValueError is skipped (the receiver reports it after the run)."""

    def __init__(self, items: list[Any], needle: bytes | None, decode: Callable[[Any], bytes]) -> None:
        self._items = items
        self._needle = needle
        self._decode = decode
        self._searched: set[int] = set()
        self._seen = 0  # items there were at the last poll
        self._found = False

    def is_set(self) -> bool:
        if self._found or self._needle is None:
            return self._found
        count = len(self._items)
        arriving, self._seen = count > self._seen, count
        if arriving:
            return False
        for i in range(count - 1, -1, -1):
            if i not in self._searched:
                self._searched.add(i)
                try:
                    if self._needle in self._decode(self._items[i]):
                        self._found = True
                        break
                except ValueError:
                    continue
        return self._found


def count_records(payloads: list[bytes]) -> int:
    """Records in zstd-compressed OTLP payloads (after the timed window)."""
    import zstandard

    from edgeagent.otlp import iter_fields

    dctx = zstandard.ZstdDecompressor()
    total = 0
    for payload in payloads:
        buf = dctx.decompress(payload, max_output_size=256 * 1024**2)
        for f1, _, s1, e1 in iter_fields(buf):
            if f1 != 1:
                continue
            for f2, _, s2, e2 in iter_fields(buf, s1, e1):
                if f2 != 2:
                    continue
                for f3, _, _, _ in iter_fields(buf, s2, e2):
                    if f3 == 2:
                        total += 1
    return total


# --- the machine while a run is measured ----------------------------------------


def cpu_times() -> tuple[int, int, int]:
    """(total, idle + iowait, steal) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    guest = sum(values[8:10])  # guest time is already counted in user/nice
    return sum(values) - guest, values[3] + values[4], values[7]


def machine_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> dict[str, float]:
    """Over a measured window: the share of all CPUs' time that was busy (anyone's work, ours included) and
    stolen by the hypervisor. A busy machine or steal explains a slow run."""
    total = max(1, after[0] - before[0])
    return {
        "machine_busy_pct": 100 * (total - (after[1] - before[1])) / total,
        "steal_pct": 100 * (after[2] - before[2]) / total,
    }

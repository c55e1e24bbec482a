"""The agent scenarios and the references they are compared with.

Each scenario function runs once and returns a flat dict of figures; the
runner repeats it and keeps the median. A scenario that cannot run because a
part of the agent it needs is not there raises `NotAvailable`.

Agent runs use a fresh state dir under tools/bench/out/runs/, the agent's
defaults (durability "full", zstd, chunk size, upload window) except where a
scenario needs otherwise (said in its docstring and in BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    OUT,
    REPO,
    VENV_PYTHON,
    BenchError,
    Broker,
    CountingProxy,
    Measured,
    NotAvailable,
    Subscriber,
    count_records,
    run_measured,
    wait_until,
)

REFERENCES = Path(__file__).resolve().parent / "references.py"
TOPIC = "bench/logs"
MIB = 1024 * 1024


@dataclass
class Work:
    corpus: Path
    lines: int
    raw_bytes: int
    last_line: bytes
    idle_seconds: float
    kmsg_messages: int


def run_dir(name: str) -> Path:
    path = OUT / "runs" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def last_line_of(corpus: Path) -> bytes:
    with open(corpus, "rb") as f:
        f.seek(max(0, corpus.stat().st_size - 4096))
        return f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]


def need_modules(*names: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise NotAvailable(f"the agent has no {', '.join(missing)} yet")


class SpoolPeek:
    """Read-only look into a running agent's spool (no agent CLI process per poll)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self._conn: sqlite3.Connection | None = None

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        if self._conn is None:
            if not self.db.exists():
                return None
            self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None, timeout=5)
        try:
            return self._conn.execute(sql, args).fetchone()
        except sqlite3.OperationalError:
            return None  # schema not created yet

    def chunks(self) -> int | None:
        row = self._query("SELECT COUNT(*) FROM chunks")
        return None if row is None else row[0]

    def counter(self, name: str) -> int:
        row = self._query("SELECT value FROM counters WHERE name = ?", (name,))
        return 0 if row is None else row[0]

    def counters(self) -> dict[str, int]:
        if self._query("SELECT 1") is None or self._conn is None:
            return {}
        try:
            return dict(self._conn.execute("SELECT name, value FROM counters").fetchall())
        except sqlite3.OperationalError:
            return {}

    def status(self, key: str) -> dict[str, Any]:
        row = self._query("SELECT value FROM status WHERE key = ?", (key,))
        return json.loads(row[0]) if row else {}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def spool_disk_bytes(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in state_dir.glob("spool.db*") if p.is_file())


def agent_config(state_dir: Path, body: str) -> str:
    return f'device_id = "bench"\nstate_dir = "{state_dir}"\nlog_level = "warning"\n' + body


def files_mqtt_config(corpus: Path, mqtt_port: int) -> str:
    # first_connect_delay: the random wait (up to 3 s by default) that spreads a fleet's first connections
    # is not what these scenarios measure; with it, the wall time of a 2 s run depended on a dice roll.
    return (
        "[kmsg]\nenabled = false\n"
        f'[[files]]\ninclude = ["{corpus}"]\nstart_at = "beginning"\n'
        '[spool]\nmax_size = "512MiB"\n'
        '[upload]\nto = "mqtt"\nretry_initial = "200ms"\nretry_max = "1s"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{mqtt_port}"\ntopic = "{TOPIC}"\nfirst_connect_delay = "0s"\n'
    )


def start_agent(work: Path, config_text: str) -> tuple[Measured, Path]:
    state_dir = work / "state"
    config = work / "agent.toml"
    config.write_text(agent_config(state_dir, config_text))
    agent = Measured(
        [str(VENV_PYTHON), "-m", "edgeagent", "run", "-c", str(config)],
        cwd=REPO,
        stderr_path=work / "agent.stderr",
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    ).start()
    return agent, state_dir


def wait_agent(agent: Measured, predicate: Any, timeout: float, what: str) -> None:
    def check() -> Any:
        agent.check_alive("the agent")
        return predicate()

    wait_until(check, timeout, what)


def generous_timeout(lines: int) -> float:
    return 60 + lines / 5000  # 20x slower than the target still finishes


# --- references ---------------------------------------------------------------


def check_reference_defaults() -> None:
    """The references cut chunks and keep a window as the agent does by default: refuse to run them if the
    agent's defaults moved (the sqlite reference's chunk size once stayed at 2 MiB after the agent's went
    to 256 KiB, which made it cheaper by an eighth of the transactions)."""
    import references

    from edgeagent.config import SpoolConfig, UploadConfig

    agent = (SpoolConfig().chunk_max_bytes, SpoolConfig().chunk_max_records, UploadConfig().window)
    ours = (references.CHUNK_MAX_BYTES, references.CHUNK_MAX_RECORDS, references.WINDOW)
    if agent != ours:
        raise BenchError(f"references.py cuts chunks as {ours} (bytes, records, window), the agent as {agent}")


def reference(name: str, corpus: Path, *extra: str) -> dict[str, Any]:
    check_reference_defaults()
    out = OUT / "runs" / f"ref-{name}.json"
    figures = run_measured([str(VENV_PYTHON), str(REFERENCES), name, str(corpus), *extra], stdout_path=out)
    inner = json.loads(out.read_text())
    figures["process_wall_s"] = figures.pop("wall_s")
    figures.update(inner)
    return figures


def references(w: Work) -> dict[str, dict[str, Any]]:
    """All references once; the runner takes medians over runs."""
    refs: dict[str, dict[str, Any]] = {}
    refs["read_split"] = reference("read_split", w.corpus)
    zst = OUT / "runs" / "corpus.zst"
    refs["zstd_cli"] = run_measured(["zstd", "-3", "-q", "-f", "-o", str(zst), str(w.corpus)])
    refs["zstd_cli"]["zstd_bytes"] = zst.stat().st_size
    refs["zstd_cli"]["ratio"] = zst.stat().st_size / w.raw_bytes
    zst.unlink()
    refs["zstd_batches"] = reference("zstd_batches", w.corpus)
    work = run_dir("ref-sqlite")
    refs["sqlite"] = reference("sqlite", w.corpus, str(work / "ref.db"))
    shutil.rmtree(work)
    work = run_dir("ref-paho")
    broker = Broker(work / "broker")
    broker.start()
    proxy = CountingProxy(broker.port)
    try:
        refs["paho_publish"] = reference("paho_publish", w.corpus, str(proxy.port))
        refs["paho_publish"]["wire_bytes"] = proxy.up_bytes
    finally:
        proxy.close()
        broker.stop()
    for name in ("read_split", "zstd_cli", "zstd_batches", "sqlite", "paho_publish"):
        refs[name]["lines_per_s"] = w.lines / refs[name]["wall_s"]
    refs["python_bare"] = run_measured([str(VENV_PYTHON), "-c", "import time; time.sleep(1)"])
    refs["python_start"] = run_measured([str(VENV_PYTHON), "-c", "pass"])
    return refs


# --- scenario 1: ingest and forward ------------------------------------------


def ingest_and_forward(w: Work) -> dict[str, Any]:
    """The corpus, read from the beginning, spooled and delivered at QoS 1.
    Done when the subscriber has seen the last line and the spool is empty
    (every chunk acknowledged and deleted)."""
    need_modules("edgeagent.sources.files", "edgeagent.uploaders.mqtt")
    work = run_dir("s1-ingest")
    broker = Broker(work / "broker")
    broker.start()
    proxy = CountingProxy(broker.port)
    sub = Subscriber(broker.port, TOPIC, needle=w.last_line)
    agent, state_dir = start_agent(work, files_mqtt_config(w.corpus, proxy.port))
    peek = SpoolPeek(state_dir / "spool.db")
    try:
        timeout = generous_timeout(w.lines)
        wait_agent(agent, sub.found.is_set, timeout, "the last line at the subscriber")
        wait_agent(agent, lambda: peek.chunks() == 0, timeout, "an empty spool (all chunks acknowledged)")
        wall = agent.mark()
        counters = peek.counters()
    finally:
        peek.close()
        final = agent.stop()
        sub.close()
        proxy.close()
        broker.stop()
    assert agent.marked is not None
    delivered = count_records(sub.payloads)
    return {
        "wall_s": wall,
        "lines_per_s": w.lines / wall,
        "cpu_s": agent.marked.cpu_s,
        "cpu_total_s": final["cpu_total_s"],
        "peak_rss_mib": final["peak_rss_kib"] / 1024,
        "disk_write_bytes": final["write_bytes_total"],
        "disk_per_raw": final["write_bytes_total"] / w.raw_bytes,
        "wire_bytes": proxy.up_bytes,
        "wire_per_raw": proxy.up_bytes / w.raw_bytes,
        "delivered_records": delivered,
        "messages": len(sub.payloads),
        "spooled_records": counters.get("spooled_records", 0),
    }


def profile_ingest(w: Work) -> dict[str, Any]:
    """Scenario 1 once more under py-spy (sampling, so the figures of this run are not used)."""
    need_modules("edgeagent.sources.files", "edgeagent.uploaders.mqtt")
    pyspy = REPO / ".venv" / "bin" / "py-spy"
    if not pyspy.exists():
        raise NotAvailable("py-spy is not installed in .venv (.venv/bin/pip install py-spy)")
    work = run_dir("s1-profile")
    broker = Broker(work / "broker")
    broker.start()
    sub = Subscriber(broker.port, TOPIC, needle=w.last_line)
    agent, state_dir = start_agent(work, files_mqtt_config(w.corpus, broker.port))
    raw = work / "profile.txt"
    command = [str(pyspy), "record", "--pid", str(agent.pid), "--rate", "250", "--format", "raw", "-o", str(raw)]
    spy = subprocess.Popen([*command, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peek = SpoolPeek(state_dir / "spool.db")
    try:
        timeout = generous_timeout(w.lines) * 3
        wait_agent(agent, sub.found.is_set, timeout, "the last line at the subscriber")
        wait_agent(agent, lambda: peek.chunks() == 0, timeout, "an empty spool")
    finally:
        peek.close()
        agent.stop()
        spy.wait(30)
        sub.close()
        broker.stop()
    return {"command": " ".join([*command[:3], "PID", *command[4:-1], "profile.txt"]), "hot": hot_spots(raw)}


def hot_spots(raw: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares of the samples per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        # Inclusive shares only for the agent's own work below the event loop
        # and the supervisor, which every sample passes through.
        for name in set(frames):
            if "(edgeagent/" in name and not name.startswith(_PLUMBING):
                inclusive[name] = inclusive.get(name, 0) + count
    if not total:
        return {"self": [], "inclusive": []}

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"self": share(own), "inclusive": share(inclusive), "samples": [("total", float(total))]}


_PLUMBING = ("<module>", "main (", "cmd_run (", "run (edgeagent/agent.py)", "Agent._supervise", "_run (")


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:LINE)"
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in ("/edgeagent/", "/site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


# --- scenario 2: offline backlog then drain ----------------------------------


def backlog_then_drain(w: Work) -> dict[str, Any]:
    """The corpus spooled while the broker is unreachable (the proxy refuses
    connections), then the broker comes back: the proxy lets connections
    through and the agent gets SIGUSR1 (what a "network is up" hotplug event
    does). Drain time runs from then until the spool is empty."""
    need_modules("edgeagent.sources.files", "edgeagent.uploaders.mqtt")
    work = run_dir("s2-backlog")
    broker = Broker(work / "broker")
    proxy = CountingProxy(broker.port)  # upstream not started: connections are closed at once
    agent, state_dir = start_agent(work, files_mqtt_config(w.corpus, proxy.port))
    peek = SpoolPeek(state_dir / "spool.db")
    sub: Subscriber | None = None
    try:
        timeout = generous_timeout(w.lines)
        wait_agent(agent, lambda: peek.counter("spooled_records") >= w.lines, timeout, "the corpus in the spool")
        spool_wall = agent.mark()
        assert agent.marked is not None
        offline = agent.marked
        spool_bytes = spool_disk_bytes(state_dir)
        offline_up = proxy.up_bytes
        broker.start()
        sub = Subscriber(broker.port, TOPIC, needle=w.last_line)
        t0 = time.perf_counter()
        os.kill(agent.pid, signal.SIGUSR1)
        wait_agent(agent, sub.found.is_set, timeout, "the last line at the subscriber")
        wait_agent(agent, lambda: peek.chunks() == 0, timeout, "an empty spool (all chunks acknowledged)")
        drain_wall = time.perf_counter() - t0
        drained = agent.snapshot()
    finally:
        peek.close()
        final = agent.stop()
        if sub is not None:
            sub.close()
        proxy.close()
        broker.stop()
    delivered = count_records(sub.payloads) if sub is not None else 0
    return {
        "spool_wall_s": spool_wall,
        "spool_lines_per_s": w.lines / spool_wall,
        "spool_cpu_s": offline.cpu_s,
        "spool_disk_write_bytes": offline.write_bytes,
        "spool_size_bytes": spool_bytes,
        "spool_size_per_raw": spool_bytes / w.raw_bytes,
        "offline_wire_bytes": offline_up,
        "drain_wall_s": drain_wall,
        "drain_lines_per_s": w.lines / drain_wall,
        "drain_cpu_s": drained.cpu_s - offline.cpu_s,
        "drain_disk_write_bytes": drained.write_bytes - offline.write_bytes,
        "peak_rss_mib": final["peak_rss_kib"] / 1024,
        "disk_write_bytes": final["write_bytes_total"],
        "disk_per_raw": final["write_bytes_total"] / w.raw_bytes,
        "wire_bytes": proxy.up_bytes,
        "wire_per_raw": proxy.up_bytes / w.raw_bytes,
        "delivered_records": delivered,
    }


# --- scenario 3: idle ---------------------------------------------------------

IDLE_SETTLE_S = 5.0  # start-up work (kmsg backlog, first status write) finishes well within this


def idle_config(work: Path, mqtt_port: int) -> str:
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    for name in ("app.log", "daemon.log", "sensor.log"):
        (logs / name).write_bytes(b"")
    return (
        "[kmsg]\nenabled = true\n"
        f'[[files]]\ninclude = ["{logs}/*.log"]\n'
        f'[upload]\nto = "mqtt"\n[mqtt]\nurl = "mqtt://127.0.0.1:{mqtt_port}"\ntopic = "{TOPIC}"\n'
    )


def idle(w: Work) -> dict[str, Any]:
    """kmsg and three empty files watched, connected to the broker, nothing
    happening: RSS and wakeups (voluntary + involuntary context switches of
    all threads) per second over `--idle-seconds`, after `IDLE_SETTLE_S`."""
    need_modules("edgeagent.sources.kmsg", "edgeagent.sources.files", "edgeagent.uploaders.mqtt")
    work = run_dir("s3-idle")
    broker = Broker(work / "broker")
    broker.start()
    agent, state_dir = start_agent(work, idle_config(work, broker.port))
    peek = SpoolPeek(state_dir / "spool.db")
    try:
        wait_agent(agent, lambda: peek.status("agent").get("state") == "running", 30, "the agent ready")
        time.sleep(IDLE_SETTLE_S)
        agent.check_alive("the agent")
        before = agent.snapshot()
        threads_before = len(os.listdir(f"/proc/{agent.pid}/task"))
        others_kmsg = KmsgCounter()  # records other processes write to /dev/kmsg wake the agent (kmsg is on)
        time.sleep(w.idle_seconds)
        agent.check_alive("the agent")
        after = agent.snapshot()
        kmsg_records = others_kmsg.close()
    finally:
        peek.close()
        final = agent.stop()
        broker.stop()
    return {
        "rss_mib": after.rss_kib / 1024,
        "peak_rss_mib": final["peak_rss_kib"] / 1024,
        "wakeups_per_s": (after.ctxt_switches - before.ctxt_switches) / w.idle_seconds,
        "cpu_s_per_hour": (after.cpu_s - before.cpu_s) / w.idle_seconds * 3600,
        "disk_write_bytes_idle": after.write_bytes - before.write_bytes,
        "kmsg_records_by_others": kmsg_records,
        "threads": threads_before,
        "seconds": w.idle_seconds,
    }


class KmsgCounter:
    """Counts the records written to /dev/kmsg from now until `close()` (-1: /dev/kmsg not readable)."""

    def __init__(self) -> None:
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = -1

    def close(self) -> int:
        if self.fd < 0:
            return -1
        count = 0
        try:
            while True:
                try:
                    os.read(self.fd, 8192)
                    count += 1
                except BrokenPipeError:  # overwritten records: the next read goes on
                    continue
        except BlockingIOError:
            pass
        finally:
            os.close(self.fd)
        return count


# --- scenario 4: start-up ------------------------------------------------------


def startup(w: Work) -> dict[str, Any]:
    """exec -> status "running" in the spool, with the idle configuration:
    first start (fresh state dir: schema creation) and restart (existing
    spool). Plus `edgeagent --version`."""
    need_modules("edgeagent.sources.kmsg", "edgeagent.sources.files", "edgeagent.uploaders.mqtt")
    work = run_dir("s4-startup")
    broker = Broker(work / "broker")
    broker.start()
    config_text = idle_config(work, broker.port)
    figures: dict[str, Any] = {}
    try:
        for phase in ("first_start", "restart"):
            agent, state_dir = start_agent(work, config_text)
            peek = SpoolPeek(state_dir / "spool.db")
            try:

                def ready(agent: Measured = agent, peek: SpoolPeek = peek) -> bool:
                    st = peek.status("agent")
                    return st.get("state") == "running" and st.get("pid") == agent.pid

                wait_agent(agent, ready, 30, "the agent ready")
                figures[f"{phase}_s"] = agent.mark()
                assert agent.marked is not None
                figures[f"{phase}_cpu_s"] = agent.marked.cpu_s
                figures[f"{phase}_rss_mib"] = agent.marked.rss_kib / 1024
            finally:
                peek.close()
                agent.stop()
    finally:
        broker.stop()
    version = run_measured([str(VENV_PYTHON), "-m", "edgeagent", "--version"], cwd=REPO)
    figures["version_s"] = version["wall_s"]
    figures["version_rss_mib"] = version["peak_rss_kib"] / 1024
    return figures


# --- scenario 5: kernel burst ---------------------------------------------------

KMSG_READER = r"""
import errno, os, sys
tag, total = sys.argv[1].encode(), int(sys.argv[2])
last = tag + b" %d" % (total - 1)
fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
os.lseek(fd, 0, os.SEEK_END)
print("ready", flush=True)
seen = gaps = 0
import select
poll = select.poll(); poll.register(fd, select.POLLIN)
while True:
    try:
        rec = os.read(fd, 8192)
    except BlockingIOError:
        poll.poll(5000); continue
    except OSError as e:
        if e.errno == errno.EPIPE:
            gaps += 1; continue
        raise
    if tag in rec:
        seen += 1
        if rec.rstrip(b"\n").endswith(last):
            break
print(seen, gaps, flush=True)
"""


def write_burst(tag: str, total: int) -> float:
    """Write `total` messages to /dev/kmsg as fast as one Python loop can; returns seconds."""
    fd = os.open("/dev/kmsg", os.O_WRONLY)
    write = os.write
    t0 = time.perf_counter()
    try:
        for i in range(total):
            write(fd, b"<6>%s %d\n" % (tag.encode(), i))  # without the newline the kernel holds the last one back
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def kmsg_preflight() -> None:
    if os.geteuid() != 0:
        raise NotAvailable("writing /dev/kmsg needs root")
    try:
        mode = Path("/proc/sys/kernel/printk_devkmsg").read_text().strip()
    except OSError:
        mode = "?"
    if mode != "on":
        raise NotAvailable(f"kernel.printk_devkmsg is {mode!r}; set it to 'on' (sysctl kernel.printk_devkmsg=on)")


def kmsg_reference(w: Work) -> dict[str, Any]:
    """A bare Python reader of /dev/kmsg during the same burst: what the ring buffer lets through."""
    kmsg_preflight()
    tag = f"edgeagent-bench-ref-{time.time_ns()}"
    reader = subprocess.Popen(
        [str(VENV_PYTHON), "-c", KMSG_READER, tag, str(w.kmsg_messages)], stdout=subprocess.PIPE, text=True
    )
    assert reader.stdout is not None
    reader.stdout.readline()
    seconds = write_burst(tag, w.kmsg_messages)
    seen, gaps = (int(x) for x in reader.communicate(timeout=120)[0].split())
    return {"written": w.kmsg_messages, "write_s": seconds, "arrived": seen, "gap_events": gaps}


def kernel_burst(w: Work) -> dict[str, Any]:
    """`--kmsg-messages` messages written to /dev/kmsg in one loop while the
    agent (kmsg only, upload "none") runs; then how many are in the spool and
    how many the agent reported lost (counters kmsg_lost / kmsg_gaps)."""
    need_modules("edgeagent.sources.kmsg")
    kmsg_preflight()
    work = run_dir("s5-kmsg")
    agent, state_dir = start_agent(work, '[kmsg]\nenabled = true\npstore = false\n[upload]\nto = "none"\n')
    peek = SpoolPeek(state_dir / "spool.db")
    tag = f"edgeagent-bench-{time.time_ns()}"
    try:
        wait_agent(agent, lambda: peek.status("agent").get("state") == "running", 30, "the agent ready")
        # The fresh agent first reads the ring buffer's existing records (and
        # reports those overwritten since boot); the burst starts after that.
        wait_agent(agent, _settled(peek, 2.0), 120, "the agent to read the existing ring buffer")
        lost_before, gaps_before = peek.counter("kmsg_lost"), peek.counter("kmsg_gaps")
        seconds = write_burst(tag, w.kmsg_messages)
        wait_agent(agent, _settled(peek, 3.0), 120, "the spool to stop growing")
        counters = peek.counters()
    finally:
        peek.close()
        final = agent.stop()
    arrived = _count_tagged(state_dir, tag)
    lost = counters.get("kmsg_lost", 0) - lost_before
    return {
        "written": w.kmsg_messages,
        "write_s": seconds,
        "arrived": arrived,
        "reported_lost": lost,
        "gap_events": counters.get("kmsg_gaps", 0) - gaps_before,
        "unaccounted": w.kmsg_messages - arrived - lost,
        "cpu_total_s": final["cpu_total_s"],
        "peak_rss_mib": final["peak_rss_kib"] / 1024,
    }


def _settled(peek: SpoolPeek, quiet_s: float) -> Any:
    """A predicate: spooled + lost records have not changed for `quiet_s` (flushes come every second)."""
    last = {"value": -1, "since": time.monotonic()}

    def settled() -> bool:
        value = peek.counter("spooled_records") + peek.counter("kmsg_lost")
        if value != last["value"]:
            last["value"], last["since"] = value, time.monotonic()
        return time.monotonic() - last["since"] > quiet_s

    return settled


def _count_tagged(state_dir: Path, tag: str) -> int:
    import zstandard

    db = sqlite3.connect(f"file:{state_dir / 'spool.db'}?mode=ro", uri=True)
    try:
        payloads = [row[0] for row in db.execute("SELECT payload FROM chunks")]
    finally:
        db.close()
    dctx = zstandard.ZstdDecompressor()
    needle = tag.encode() + b" "
    return sum(dctx.decompress(p, max_output_size=256 * MIB).count(needle) for p in payloads)


SCENARIOS = {
    "ingest": ingest_and_forward,
    "backlog": backlog_then_drain,
    "idle": idle,
    "startup": startup,
    "kmsg": kernel_burst,
}

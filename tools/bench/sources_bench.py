"""Scenarios 6 and 7: throughput of the syslog and journald sources (issue 14).

6. syslog: one agent per sender variant, one `[[syslog]]` listener, `upload.to = "none"` (like the kernel
   burst: the figure is the source's ingest into the spool, not the uploader's). The first `--lines` lines of
   the corpus are sent by util-linux `logger -f` (one datagram or one frame per line) or, to see whether
   logger is the limit, by a Python sender that `sendfile`s a pre-framed file over one TCP connection. The
   clock and the agent's CPU run from the sender's start to the goal: every message is in the spool
   (`spooled_records`), or for UDP spooled + counted as dropped = sent. A sender that loses messages without
   the agent counting them does not hang the run: once the sender has exited and the counters have been
   quiet for `QUIET_S`, the run ends and `unaccounted` says how many.
7. journald: a journal file written once by `systemd-journal-remote` from export-format entries built from the
   corpus lines (outside the clock), read by the agent with `[journald] directory`, `start_at = "beginning"`.
   The clock runs from the agent's exec (start-up included, as in scenario 1) to `spooled_records` = entries.
   journalctl, the agent's child, is measured too (CPU and peak RSS at the goal).

Every run records what else the machine did meanwhile (`others_busy_pct`: the share of both CPUs used by
processes other than the agent, its child, the sender and the harness; `steal_pct`) and marks itself `disturbed` when
that is 10 % or more, or steal is 5 % or more.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from common import (
    OUT,
    VENV_PYTHON,
    BenchError,
    Measured,
    NotAvailable,
    cpu_times,
    free_port,
    machine_share,
    read_proc,
    wait_until,
)
from scenarios import MIB, SpoolPeek, Work, need_modules, run_dir, start_agent, wait_agent

LOGGER = shutil.which("logger") or "/usr/bin/logger"
JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
JOURNALCTL = shutil.which("journalctl") or "/usr/bin/journalctl"
QUIET_S = 3.0
DISTURBED_OTHERS_PCT, DISTURBED_STEAL_PCT = 10.0, 5.0
SPOOL_ONLY = '[kmsg]\nenabled = false\n[spool]\nmax_size = "512MiB"\n[upload]\nto = "none"\n'

# variant -> (transport, receive_buffer, sender, sender arguments)
SYSLOG_VARIANTS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "udp-rfc3164-logger": ("udp", "0", "logger", ("-d", "--rfc3164")),
    "udp-rfc5424-logger": ("udp", "0", "logger", ("-d", "--rfc5424")),
    "udp-rfc5424-logger-8MiB": ("udp", "8MiB", "logger", ("-d", "--rfc5424")),
    "tcp-octet-rfc5424-logger": ("tcp", "0", "logger", ("-T", "--octet-count", "--rfc5424")),
    "tcp-newline-rfc3164-logger": ("tcp", "0", "logger", ("-T", "--rfc3164")),
    "tcp-octet-rfc5424-python": ("tcp", "0", "python", ()),
}

# Sends a pre-framed file over one TCP connection with sendfile(2): no per-message work in the sender.
PYTHON_SENDER = r"""
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s, open(sys.argv[2], "rb") as f:
    s.sendfile(f)
"""


def framed_rfc5424(w: Work) -> Path:
    """The corpus as RFC 5424 messages with RFC 6587 octet counting, as logger would frame them, built once."""
    path = OUT / f"framed-rfc5424-{w.lines}.bin"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with open(w.corpus, "rb") as src, open(tmp, "wb") as out:
        for n, line in enumerate(src):
            message = b"<14>1 2026-11-30T03:00:00.%06dZ edge-gw-07 bench %d - - %s" % (
                n % 1_000_000,
                1000 + n % 50,
                line.rstrip(b"\n"),
            )
            out.write(b"%d %s" % (len(message), message))
    tmp.rename(path)
    return path


def sender_argv(variant: str, w: Work, port: int) -> list[str]:
    _, _, sender, args = SYSLOG_VARIANTS[variant]
    if sender == "python":
        return [str(VENV_PYTHON), "-c", PYTHON_SENDER, str(port), str(framed_rfc5424(w))]
    if not Path(LOGGER).exists():
        raise NotAvailable("util-linux logger is not installed")
    return [LOGGER, "-n", "127.0.0.1", "-P", str(port), *args, "-t", "bench", "-p", "user.info", "-f", str(w.corpus)]


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def _wait_listening(agent: Measured, peek: SpoolPeek, source: str) -> None:
    # Only a running agent has its SIGUSR2 handler: before, the signal would kill it.
    wait_agent(agent, lambda: peek.status("agent").get("state") == "running", 60, "the agent ready")

    def ready() -> bool:
        os.kill(agent.pid, signal.SIGUSR2)  # the agent writes its status now (else every 5 s)
        return peek.status("sources").get(source, {}).get("state") == "running"

    wait_until(ready, 60, f"the {source} source running")


class _Quiet:
    """True once `value()` has not changed for `QUIET_S` (and `ready()` holds)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.last: Any = None
        self.since = time.monotonic()

    def __call__(self) -> bool:
        value = self.value()
        if value != self.last:
            self.last, self.since = value, time.monotonic()
        return time.monotonic() - self.since > QUIET_S


def harness_cpu_s() -> float:
    """This process's CPU (the polling of the spool, the samplers): not a disturbance."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _disturbance(window: dict[str, float], ours_cpu_s: float, wall_s: float) -> dict[str, Any]:
    """`ours_cpu_s`: the CPU the agent, its child, the sender and the harness used in the window."""
    ncpu = os.cpu_count() or 1
    others = window["machine_busy_pct"] - 100 * ours_cpu_s / (wall_s * ncpu)
    return {
        **window,
        "others_busy_pct": max(0.0, others),
        "disturbed": others >= DISTURBED_OTHERS_PCT or window["steal_pct"] >= DISTURBED_STEAL_PCT,
    }


def _loss_records(state_dir: Path) -> int:
    """The agent's loss records for dropped datagrams (spooled records that are not messages)."""
    import zstandard

    db = sqlite3.connect(f"file:{state_dir / 'spool.db'}?mode=ro", uri=True)
    try:
        payloads = [row[0] for row in db.execute("SELECT payload FROM chunks")]
    finally:
        db.close()
    dctx = zstandard.ZstdDecompressor()
    return sum(dctx.decompress(p, max_output_size=256 * MIB).count(b"syslog datagrams received on") for p in payloads)


def syslog_once(variant: str, w: Work) -> dict[str, Any]:
    """One sender variant against a fresh agent (see the module docstring)."""
    need_modules("edgeagent.sources.syslog")
    transport, receive_buffer, _, _ = SYSLOG_VARIANTS[variant]
    work = run_dir(f"s6-syslog-{variant}")
    port = free_port()
    argv = sender_argv(variant, w, port)
    listener = f'[[syslog]]\nlisten = "{transport}://127.0.0.1:{port}"\nreceive_buffer = "{receive_buffer}"\n'
    agent, state_dir = start_agent(work, SPOOL_ONLY + listener)
    peek = SpoolPeek(state_dir / "spool.db")
    sender: Measured | None = None
    try:
        _wait_listening(agent, peek, "syslog")
        before, machine_before, harness_before = agent.snapshot(), cpu_times(), harness_cpu_s()
        t0 = time.perf_counter()
        sender = Measured(argv, stderr_path=work / "sender.stderr").start()
        progress = _Quiet(lambda: (peek.counter("spooled_records"), peek.counter("syslog_dropped")))

        def done() -> bool:
            spooled, dropped = progress.value()
            return spooled + dropped >= w.lines or (not sender.alive() and progress())

        wait_agent(agent, done, 120 + w.lines / 1000, "every message in the spool or counted as dropped")
        wall = time.perf_counter() - t0
        at_goal, machine_after, harness = agent.snapshot(), cpu_times(), harness_cpu_s() - harness_before
    finally:
        sender_final = sender.stop() if sender is not None else {}
        peek.close()
        final = agent.stop()
    if sender_final.get("exit_code"):
        raise BenchError(f"the sender exited with {sender_final['exit_code']}; see {work / 'sender.stderr'}")
    counters = _final_counters(state_dir)
    loss_records = _loss_records(state_dir) if transport == "udp" else 0
    received = counters.get("spooled_records", 0) - loss_records
    dropped = counters.get("syslog_dropped", 0)
    cpu = at_goal.cpu_s - before.cpu_s
    ours = cpu + sender_final.get("cpu_total_s", 0) + harness
    return {
        "sent": w.lines,
        "wall_s": wall,
        "messages_per_s": received / wall,
        "received": received,
        "dropped": dropped,
        "unaccounted": w.lines - received - dropped,
        "cpu_s": cpu,
        "cpu_s_per_million": cpu * 1e6 / max(1, received),
        "peak_rss_mib": final["peak_rss_kib"] / 1024,
        "sender_cpu_s": sender_final.get("cpu_total_s", 0.0),
        "sender_peak_rss_mib": sender_final.get("peak_rss_kib", 0) / 1024,
        **_disturbance(machine_share(machine_before, machine_after), ours, wall),
    }


def _final_counters(state_dir: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{state_dir / 'spool.db'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT name, value FROM counters").fetchall())
    finally:
        db.close()


# --- journald ---------------------------------------------------------------------------------------------


def _export_entry(n: int, line: bytes, now_us: int, mono_us: int) -> bytes:
    """A journal entry as journald writes one for a syslog-ish daemon (the usual trusted fields)."""
    pid = 1000 + n % 50
    return b"".join(
        (
            b"__REALTIME_TIMESTAMP=%d\n__MONOTONIC_TIMESTAMP=%d\n" % (now_us + n * 10, mono_us + n * 10),
            b"_BOOT_ID=0123456789abcdef0123456789abcdef\n_MACHINE_ID=fedcba9876543210fedcba9876543210\n",
            b"_HOSTNAME=edge-gw-07\n_TRANSPORT=syslog\nPRIORITY=%d\nSYSLOG_FACILITY=3\n" % (3 + n % 5),
            b"SYSLOG_IDENTIFIER=modbus-gw\n_PID=%d\n_UID=0\n_GID=0\n_COMM=modbus-gw\n" % pid,
            b"_EXE=/usr/bin/modbus-gw\n_CMDLINE=/usr/bin/modbus-gw --config /etc/modbus-gw.conf\n",
            b"_SYSTEMD_UNIT=modbus-gw.service\n_SYSTEMD_CGROUP=/system.slice/modbus-gw.service\n",
            b"MESSAGE=%s\n\n" % line.rstrip(b"\n"),
        )
    )


def journal_directory(w: Work) -> Path:
    """A journal directory with one entry per corpus line, written once by systemd-journal-remote."""
    if not Path(JOURNAL_REMOTE).exists() or not Path(JOURNALCTL).exists():
        raise NotAvailable("needs journalctl and systemd-journal-remote (apt-get install systemd-journal-remote)")
    directory = OUT / f"journal-{w.lines}"
    if (directory / "complete").exists():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    now_us, mono_us = int(time.time() * 1e6) - w.lines * 10, 1_000_000
    remote = subprocess.Popen(
        [JOURNAL_REMOTE, "-o", str(directory / "bench.journal"), "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert remote.stdin is not None and remote.stderr is not None
    with open(w.corpus, "rb") as corpus:
        for n, line in enumerate(corpus):
            remote.stdin.write(_export_entry(n, line, now_us, mono_us))
    remote.stdin.close()
    error = remote.stderr.read().decode(errors="replace")
    if remote.wait() != 0:
        raise BenchError(f"systemd-journal-remote exited with {remote.returncode}: {error[-500:]}")
    (directory / "complete").write_text(f"{w.lines}\n")
    return directory


def journald_once(w: Work) -> dict[str, Any]:
    """The journal directory read from the beginning (see the module docstring)."""
    need_modules("edgeagent.sources.journald")
    directory = journal_directory(w)
    work = run_dir("s7-journald")
    journald = f'[journald]\nenabled = true\ndirectory = "{directory}"\nstart_at = "beginning"\n'
    config = SPOOL_ONLY + journald + f'journalctl = "{JOURNALCTL}"\n'
    machine_before, harness_before = cpu_times(), harness_cpu_s()
    agent, state_dir = start_agent(work, config)
    peek = SpoolPeek(state_dir / "spool.db")
    child_peak_kib, child = 0, None

    def done() -> bool:
        nonlocal child_peak_kib, child
        for pid in _children(agent.pid):  # journalctl (sampled here: it is the agent's child, not ours)
            snap = read_proc(pid)
            if snap is not None:
                child, child_peak_kib = (pid, snap), max(child_peak_kib, snap.hwm_kib)
        return peek.counter("spooled_records") >= w.lines

    try:
        wait_agent(agent, done, 120 + w.lines / 1000, "every journal entry in the spool")
        wall = agent.mark()
        machine_after, harness = cpu_times(), harness_cpu_s() - harness_before
        child_now = read_proc(child[0]) if child else None
        child_cpu = (child_now or child[1]).cpu_s if child else 0.0
    finally:
        peek.close()
        final = agent.stop()
    assert agent.marked is not None
    spooled = _final_counters(state_dir).get("spooled_records", 0)
    cpu = agent.marked.cpu_s
    return {
        "entries": w.lines,
        "spooled": spooled,
        "wall_s": wall,
        "entries_per_s": w.lines / wall,
        "cpu_s": cpu,
        "cpu_s_per_million": cpu * 1e6 / w.lines,
        "journalctl_cpu_s": child_cpu,
        "total_cpu_s_per_million": (cpu + child_cpu) * 1e6 / w.lines,
        "peak_rss_mib": final["peak_rss_kib"] / 1024,
        "journalctl_peak_rss_mib": child_peak_kib / 1024,
        "journal_bytes": sum(p.stat().st_size for p in directory.glob("*.journal")),
        **_disturbance(machine_share(machine_before, machine_after), cpu + child_cpu + harness, wall),
    }

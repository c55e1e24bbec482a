"""Scenario `compare` (issue 15): edgeagent over MQTT and over OTLP/HTTP, the minimal Python reference and
Fluent Bit, on the same work, interleaved in one invocation.

Each round runs every subject once, in the same order; `--runs` rounds. Before each run the harness reads the
corpus into the page cache (`cache_file`: every subject reads it from memory, as a log file just written is
read; Fluent Bit's tail evicts it) and waits for a quiet machine (`wait_quiet`: under `QUIET_BUSY_PCT` of
both CPUs busy for `QUIET_S` seconds in a row, at most `--quiet-wait` seconds), then records over the
measured window the share of both CPUs that was busy, what of it was not ours (the subject, the broker, the
harness with its sink/proxy/subscriber threads: `others_busy_pct`) and the hypervisor's steal. A run with
others >= 10 % or steal >= 5 % is **disturbed** (the rule of scenarios 6 and 7); medians are taken over the
undisturbed runs only, and the report says how many there were.

Subjects (all read the corpus file from the beginning; the goal is every line delivered and acknowledged):
- `edgeagent-mqtt`: scenario 1's agent (MQTT 5 QoS 1, straight to mosquitto; its wire bytes are the kernel's
  count for its connection, read after the window); goal: the subscriber saw the last line and the spool
  holds no chunk.
- `edgeagent-otlp`: the same agent with `upload.to = "otlp_http"` (zstd) to the harness's OTLP/HTTP sink;
  goal: the sink received the last line and the spool holds no chunk.
- `edgeagent-mqtt-spooled`: edgeagent-mqtt with `[spool] hold_file_lines = "0s"`: every chunk is written to
  the spool, synced, and read back before it is sent (no delivery from RAM), as a link that does not keep up.
- `before-mqtt`, `before-otlp`: the same two with the agent's code at `--before REV` (a `git archive` of that
  revision under OUT/before-REV, run from there with the same venv), when `--before` is given.
- `reference`: `references.py sqlite` (read + split + zstd-3 in agent-sized chunks + SQLite WAL FULL, one
  transaction per chunk, select + delete each): the minimal Python that does the durable part.
- `fluent-bit`: tail -> filesystem storage -> out_opentelemetry (uncompressed protobuf, the plugin's default)
  to the same sink, configured as in ../shared/notes/peers.md; goal: the sink counted every record. Skipped
  when the binary (`--fluent-bit`, default /work/peers/fluent-bit-build/bin/fluent-bit) is not there.

The sink decodes bodies the way the OpenTelemetry Collector does (a zstd stream of any number of frames,
then protobuf), answers 200 with an empty ExportLogsServiceResponse and counts the request bytes (request
line, headers, body) as the wire.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common import (
    OUT,
    REPO,
    VENV_PYTHON,
    BenchError,
    Broker,
    Measured,
    NeedleSearch,
    NotAvailable,
    Subscriber,
    count_records,
    cpu_times,
    machine_share,
    read_proc,
    tcp_bytes_sent,
    wait_until,
)
from peers import fluent_bit_config
from scenarios import (
    TOPIC,
    SpoolPeek,
    Work,
    agent_config,
    files_mqtt_config,
    generous_timeout,
    hot_spots,
    reference,
    run_dir,
    wait_agent,
)
from sources_bench import DISTURBED_OTHERS_PCT, DISTURBED_STEAL_PCT, harness_cpu_s

FLUENT_BIT = Path("/work/peers/fluent-bit-build/bin/fluent-bit")
QUIET_BUSY_PCT = 12.5  # a quarter of one of the two CPUs
QUIET_S = 3.0
SUBJECTS = (
    "edgeagent-mqtt",
    "edgeagent-otlp",
    "edgeagent-mqtt-spooled",
    "before-mqtt",
    "before-otlp",
    "reference",
    "fluent-bit",
)


# --- a quiet machine ------------------------------------------------------------------


def cache_file(path: Path) -> None:
    """Read `path` so that it is in the page cache when the next subject starts: every subject reads the corpus
    as a log file just written is read, from memory. Fluent Bit's tail drops each file it read from the page
    cache (`posix_fadvise(POSIX_FADV_DONTNEED)`), so until stop 24 the subject after it in a round read the
    corpus from disk: edgeagent-mqtt, first in the next round, took +0.15-0.3 CPU s in every invocation that ran
    Fluent Bit (BENCHMARKS.md, "Issue 15, stop 24")."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * 1024 * 1024):
            pass


def wait_quiet(max_wait: float) -> dict[str, Any]:
    """Wait until the machine has been quiet for `QUIET_S` seconds in a row (at most `max_wait`)."""
    t0 = time.monotonic()
    quiet_since = None
    last = cpu_times()
    while True:
        time.sleep(0.5)
        now = cpu_times()
        total = max(1, now[0] - last[0])
        busy = 100 * (total - (now[1] - last[1])) / total
        last = now
        if busy < QUIET_BUSY_PCT:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET_S:
                return {"quiet_wait_s": time.monotonic() - t0, "quiet_reached": True}
        else:
            quiet_since = None
        if time.monotonic() - t0 > max_wait:
            return {"quiet_wait_s": time.monotonic() - t0, "quiet_reached": False}


class Window:
    """The machine over one measured run: busy, steal, and what of it was not ours."""

    def __init__(self, *helper_pids: int) -> None:
        self.helper_pids = helper_pids
        self.t0 = time.perf_counter()
        self.machine = cpu_times()
        self.harness = harness_cpu_s()
        self.helpers = self._helpers_cpu()

    def _helpers_cpu(self) -> float:
        return sum((snap.cpu_s if (snap := read_proc(pid)) else 0.0) for pid in self.helper_pids)

    def close(self, subject_cpu_s: float) -> dict[str, Any]:
        wall = max(1e-3, time.perf_counter() - self.t0)
        share = machine_share(self.machine, cpu_times())
        ours = subject_cpu_s + (harness_cpu_s() - self.harness) + (self._helpers_cpu() - self.helpers)
        others = share["machine_busy_pct"] - 100 * ours / (wall * (os.cpu_count() or 1))
        return {
            **share,
            "others_busy_pct": max(0.0, others),
            "disturbed": others >= DISTURBED_OTHERS_PCT or share["steal_pct"] >= DISTURBED_STEAL_PCT,
        }


# --- an OTLP/HTTP sink ----------------------------------------------------------------


class OtlpSink:
    """OTLP/HTTP logs endpoint on 127.0.0.1: keeps every request body as received with its arrival time,
    answers 200, and decodes afterwards.

    During the run it only reads and keeps bodies: decoding each as it came (as the sink once did) took
    about 0.15 CPU s inside the window from the subject on this 2-core machine. `found.is_set()` searches
    `needle` as the MQTT subscriber does (`common.NeedleSearch`): nothing while bodies keep coming, then the
    newest first.
    zstd bodies are decoded as one stream across frames (what the OpenTelemetry Collector's confighttp
    decoder, klauspost/compress zstd, does), then protobuf."""

    def __init__(self, needle: bytes) -> None:
        self.needle = needle
        self.raw: list[tuple[float, str, bytes]] = []  # arrival, Content-Encoding, body as received
        self.found = NeedleSearch(self.raw, needle, lambda item: self.decode(item[1], item[2]))
        self.wire_bytes = 0
        self.requests = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                head = len(self.raw_requestline) + len(str(self.headers))
                sink.raw.append((time.perf_counter(), self.headers.get("Content-Encoding", ""), raw))
                sink.wire_bytes += head + length
                sink.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def decode(encoding: str, raw: bytes) -> bytes:
        """The protobuf of a body, as the Collector decodes it; ValueError names what is wrong."""
        import zstandard

        if encoding == "zstd":
            try:
                return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True).read()
            except zstandard.ZstdError as e:
                raise ValueError(f"zstd: {e}") from None
        if encoding in ("", "identity"):
            return raw
        raise ValueError(f"unexpected Content-Encoding {encoding!r}")

    @property
    def frames(self) -> int:
        """zstd magic numbers in the zstd bodies: about the frames sent."""
        return sum(raw.count(b"\x28\xb5\x2f\xfd") for _, encoding, raw in self.raw if encoding == "zstd")

    def records(self, start: int = 0, end: int | None = None) -> int:
        """Log records in the bodies received from `start` to `end`; BenchError names a body that cannot be
        decoded."""
        bodies = []
        for index, (_, encoding, raw) in enumerate(self.raw[start:end], start):
            try:
                bodies.append(self.decode(encoding, raw))
            except ValueError as e:
                raise BenchError(f"the sink could not decode body {index}: {e}") from None
        return count_plain_records(bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def count_plain_records(bodies: list[bytes]) -> int:
    """Log records in decoded ExportLogsServiceRequest bodies (opentelemetry-proto, upb)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    total = 0
    for body in bodies:
        request = ExportLogsServiceRequest.FromString(body)
        total += sum(len(s.log_records) for r in request.resource_logs for s in r.scope_logs)
    return total


# --- subjects -------------------------------------------------------------------------


def before_tree(rev: str) -> Path:
    """The agent's code at `rev`, exported once (never a worktree of the repository)."""
    tree = OUT / f"before-{rev}"
    if not (tree / "edgeagent" / "__init__.py").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "edgeagent"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


# Set by `profile()`: attach a profiler to each agent started (argv prefix + output path per run).
PROFILERS: list[list[str]] = []
RUNNING_PROFILERS: list[tuple[subprocess.Popen[bytes], Path]] = []


def _start(work: Path, body: str, code: Path) -> tuple[Measured, Path]:
    state_dir = work / "state"
    config = work / "agent.toml"
    config.write_text(agent_config(state_dir, body))
    agent = Measured(
        [str(VENV_PYTHON), "-m", "edgeagent", "run", "-c", str(config)],
        cwd=code,  # `-m` finds the package in the working directory first
        stderr_path=work / "agent.stderr",
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    ).start()
    for argv in PROFILERS:
        out = work / ("perf.data" if "perf" in argv[0] else "pyspy.txt")
        argv = [a.replace("PID", str(agent.pid)).replace("OUTPUT", str(out)) for a in argv]
        with open(work / "profiler.stderr", "ab") as err:
            RUNNING_PROFILERS.append((subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err), out))
    return agent, state_dir


def compile_tree(code: Path) -> None:
    """Byte-compile the agent's modules once, as a package install does (pip, opkg and Yocto ship .pyc):
    without it every start compiles from source (CPU, and about 2 MiB of RSS the compiler leaves behind)."""
    subprocess.run(
        [str(VENV_PYTHON), "-m", "compileall", "-q", str(code / "edgeagent")], check=True, stdout=subprocess.DEVNULL
    )


def profile(w: Work, tool: str, code: Path = REPO) -> dict[str, Any]:
    """One run of each edgeagent subject under py-spy (`--native`: time in zstd and SQLite shows as their C
    functions) or perf; figures of these runs are not used. Outputs stay in each run dir."""
    if tool == "py-spy":
        pyspy = REPO / ".venv" / "bin" / "py-spy"
        if not pyspy.exists():
            raise NotAvailable("py-spy is not installed in .venv (.venv/bin/pip install py-spy)")
        PROFILERS[:] = [
            [
                str(pyspy),
                "record",
                "--pid",
                "PID",
                "--rate",
                "250",
                "--native",
                "--format",
                "raw",
                "-o",
                "OUTPUT",
            ]
        ]
    else:
        PROFILERS[:] = [["perf", "record", "-F", "999", "-g", "-p", "PID", "-o", "OUTPUT"]]
    results: dict[str, Any] = {}
    try:
        for name, run in (("edgeagent-mqtt", agent_mqtt), ("edgeagent-otlp", agent_otlp)):
            figures = run(w, code, f"profile-{name}")
            proc, out = RUNNING_PROFILERS.pop()
            proc.wait(60)
            figures["profile"] = str(out)
            if tool == "py-spy":
                figures["hot"] = hot_spots(out, top=25)
            results[name] = figures
    finally:
        PROFILERS.clear()
    return results


def _until_delivered(
    w: Work, agent: Measured, state_dir: Path, found: Callable[[], bool], window: Window
) -> tuple[float, dict[str, Any]]:
    """Wait until the receiver has seen the last line and the spool holds no chunk; wall and machine share."""
    peek = SpoolPeek(state_dir / "spool.db")
    try:
        timeout = generous_timeout(w.lines)
        wait_agent(agent, found, timeout, "the last line at the receiver")
        wait_agent(agent, lambda: peek.chunks() == 0, timeout, "an empty spool (all chunks acknowledged)")
        wall = agent.mark()
        assert agent.marked is not None
        return wall, window.close(agent.marked.cpu_s)
    finally:
        peek.close()


def agent_mqtt(w: Work, code: Path, name: str, spool_keys: str = "") -> dict[str, Any]:
    work = run_dir(f"compare-{name}")
    broker = Broker(work / "broker")
    broker.start()
    assert broker.proc is not None
    sub = Subscriber(broker.port, TOPIC, needle=w.last_line)
    window = Window(broker.proc.pid)
    config = files_mqtt_config(w.corpus, broker.port).replace("[spool]\n", "[spool]\n" + spool_keys)
    agent, state_dir = _start(work, config, code)
    try:
        wall, machine = _until_delivered(w, agent, state_dir, sub.found.is_set, window)
        wire = _mqtt_wire_bytes(agent, state_dir, broker.port)
    finally:
        final = agent.stop()
        sub.close()
        broker.stop()
    delivered = count_records(sub.payloads)
    if delivered != w.lines:
        raise BenchError(f"{name}: the subscriber got {delivered} records, not {w.lines}")
    return _figures(w, wall, agent, final, wire, len(sub.payloads), machine)


def _mqtt_wire_bytes(agent: Measured, state_dir: Path, broker_port: int) -> int:
    """What the agent sent to the broker, read from the kernel after the window (no proxy in the path: a
    Python proxy forwarding every byte took CPU from the agent on this 2-core machine). Only the open
    connection is counted, so a run whose agent connected more than once is refused."""
    sent = tcp_bytes_sent(agent.pid, broker_port)
    peek = SpoolPeek(state_dir / "spool.db")
    try:
        connections = wait_until(lambda: peek.status("mqtt").get("connections"), 10, "the agent's MQTT status")
    finally:
        peek.close()
    if len(sent) != 1 or connections != 1:
        raise BenchError(
            f"the agent made {connections} MQTT connection(s), {len(sent)} open: its wire bytes cannot be counted"
        )
    return sent[0]


def agent_otlp(w: Work, code: Path, name: str) -> dict[str, Any]:
    work = run_dir(f"compare-{name}")
    sink = OtlpSink(w.last_line)
    body = (
        "[kmsg]\nenabled = false\n"
        f'[[files]]\ninclude = ["{w.corpus}"]\nstart_at = "beginning"\n'
        '[spool]\nmax_size = "512MiB"\n'
        '[upload]\nto = "otlp_http"\nretry_initial = "200ms"\nretry_max = "1s"\n'
        f'[otlp_http]\nendpoint = "http://127.0.0.1:{sink.port}/v1/logs"\ncompression = "zstd"\n'
    )
    window = Window()
    agent, state_dir = _start(work, body, code)
    try:
        wall, machine = _until_delivered(w, agent, state_dir, sink.found.is_set, window)
    finally:
        final = agent.stop()
        sink.close()
    delivered = sink.records()
    if delivered != w.lines:
        raise BenchError(f"{name}: the sink got {delivered} records, not {w.lines}")
    figures = _figures(w, wall, agent, final, sink.wire_bytes, sink.requests, machine)
    figures["zstd_frames_per_request"] = sink.frames / max(1, sink.requests)
    return figures


def fluent_bit(w: Work, binary: Path) -> dict[str, Any]:
    if not binary.exists():
        raise NotAvailable(f"Fluent Bit is not built ({binary})")
    work = run_dir("compare-fluent-bit")
    sink = OtlpSink(w.last_line)
    conf = work / "fluent-bit.conf"
    conf.write_text(fluent_bit_config(work, w.corpus, sink.port))
    window = Window()
    peer = Measured([str(binary), "-c", str(conf)], cwd=work, stderr_path=work / "stderr.log").start()
    counted = [0, 0]  # bodies counted, records in them

    def all_delivered() -> bool:
        peer.check_alive("fluent-bit")
        if not sink.found.is_set():
            return False
        n = len(sink.raw)
        counted[1] += sink.records(counted[0], n) if n > counted[0] else 0
        counted[0] = n
        return counted[1] >= w.lines

    try:
        wait_until(all_delivered, generous_timeout(w.lines) * 4, f"{w.lines} records at the sink from Fluent Bit", 0.05)
        # Wall: the arrival of the body that completed the count (counting happens after it arrived).
        wall = sink.raw[counted[0] - 1][0] - peer.started
        peer.mark()
        assert peer.marked is not None
        machine = window.close(peer.marked.cpu_s)
    finally:
        final = peer.stop()
        sink.close()
    return _figures(w, wall, peer, final, sink.wire_bytes, sink.requests, machine) | {"delivered_records": counted[1]}


def reference_run(w: Work) -> dict[str, Any]:
    work = run_dir("compare-reference")
    window = Window()
    figures = reference("sqlite", w.corpus, str(work / "ref.db"))
    machine = window.close(figures["cpu_s"])
    shutil.rmtree(work)
    return {
        "wall_s": figures["wall_s"],
        "lines_per_s": w.lines / figures["wall_s"],
        "cpu_s": figures["cpu_s"],
        "peak_rss_mib": figures["peak_rss_kib"] / 1024,
        "disk_write_bytes": figures["disk_write_bytes"],
        "disk_per_raw": figures["disk_write_bytes"] / w.raw_bytes,
        **machine,
    }


def _figures(
    w: Work, wall: float, proc: Measured, final: dict[str, Any], wire: int, messages: int, machine: dict[str, Any]
) -> dict[str, Any]:
    assert proc.marked is not None
    return {
        "wall_s": wall,
        "lines_per_s": w.lines / wall,
        "cpu_s": proc.marked.cpu_s,
        "minor_faults": proc.marked.minor_faults,
        "peak_rss_mib": final["peak_rss_kib"] / 1024,
        "disk_write_bytes": final["write_bytes_total"],
        "disk_per_raw": final["write_bytes_total"] / w.raw_bytes,
        "wire_bytes": wire,
        "wire_per_raw": wire / w.raw_bytes,
        "messages": messages,
        "delivered_records": w.lines,
        **machine,
    }


SPOOL_EVERY_CHUNK = 'hold_file_lines = "0s"\n'  # a key of the config's [spool] table

# --- the interleaved rounds -----------------------------------------------------------


def subjects(before: str | None, fluent_bit_binary: Path) -> dict[str, Any]:
    """name -> run(w), in the order each round runs them."""
    chosen: dict[str, Any] = {
        "edgeagent-mqtt": lambda w: agent_mqtt(w, REPO, "edgeagent-mqtt"),
        "edgeagent-otlp": lambda w: agent_otlp(w, REPO, "edgeagent-otlp"),
        # Every chunk written to the spool, synced, before it is sent (the path of a link that does not keep up).
        "edgeagent-mqtt-spooled": lambda w: agent_mqtt(w, REPO, "edgeagent-mqtt-spooled", SPOOL_EVERY_CHUNK),
    }
    if before:
        tree = before_tree(before)
        chosen["before-mqtt"] = lambda w: agent_mqtt(w, tree, "before-mqtt")
        chosen["before-otlp"] = lambda w: agent_otlp(w, tree, "before-otlp")
    chosen["reference"] = reference_run
    chosen["fluent-bit"] = lambda w: fluent_bit(w, fluent_bit_binary)
    return chosen


def compare(
    w: Work, runs: int, before: str | None, fluent_bit_binary: Path, quiet_wait: float, names: list[str]
) -> dict[str, Any]:
    import sys

    unknown = set(names) - set(SUBJECTS)
    if unknown:
        raise SystemExit(f"bench: unknown compare subjects {sorted(unknown)}; choose from {','.join(SUBJECTS)}")
    chosen = {name: run for name, run in subjects(before, fluent_bit_binary).items() if name in names}
    compile_tree(REPO)
    if before:
        compile_tree(before_tree(before))
    runs_of: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    skipped: dict[str, str] = {}
    for round_no in range(runs):
        for name, run in chosen.items():
            if name in skipped:
                continue
            cache_file(w.corpus)
            quiet = wait_quiet(quiet_wait)
            print(
                f"bench: compare round {round_no + 1}/{runs} {name} (waited {quiet['quiet_wait_s']:.0f} s for quiet)",
                file=sys.stderr,
                flush=True,
            )
            load = os.getloadavg()[0]
            try:
                figures = run(w)
            except NotAvailable as e:
                skipped[name] = str(e)
                print(f"bench: compare: {name} not available: {e}", file=sys.stderr, flush=True)
                continue
            except BenchError as e:
                figures = {"failed": str(e)[:500]}
                print(f"bench: compare: {name} failed: {e}", file=sys.stderr, flush=True)
            figures.update(quiet, round=round_no + 1, loadavg_1m_before=load)
            if "failed" not in figures:
                mark = " DISTURBED" if figures["disturbed"] else ""
                print(
                    f"bench:   {figures['wall_s']:.2f} s wall, {figures['cpu_s']:.2f} CPU s, "
                    f"{figures['peak_rss_mib']:.1f} MiB, others {figures['others_busy_pct']:.0f} %, "
                    f"steal {figures['steal_pct']:.1f} %{mark}",
                    file=sys.stderr,
                    flush=True,
                )
            runs_of[name].append(figures)
    return {
        "status": "ok",
        "subjects": {name: summarize(all_runs) for name, all_runs in runs_of.items() if name not in skipped},
        "skipped": skipped,
    }


def summarize(all_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the undisturbed runs (over all of them, marked, when every run was disturbed)."""
    from common import median_of

    ok = [r for r in all_runs if "failed" not in r]
    clean = [r for r in ok if not r["disturbed"]]
    basis = clean or ok
    out: dict[str, Any] = {
        "runs": len(all_runs),
        "failed": len(all_runs) - len(ok),
        "undisturbed": len(clean),
        "all": all_runs,
    }
    if basis:
        median = median_of([{k: v for k, v in r.items() if not isinstance(v, bool)} for r in basis])
        out["median"] = median
        out["median_of"] = "undisturbed runs" if clean else "ALL RUNS DISTURBED"
    return out

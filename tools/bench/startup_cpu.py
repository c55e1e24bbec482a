"""Start-up CPU of `edgeagent run` (issue 15): the CPU the agent has spent when its first line reaches the
broker, for one or more source trees, interleaved in one invocation.

Usage (from the repository root; the trees share this repository's .venv):

    git worktree add --detach /tmp/startup-base main      # or: git archive main | tar -x -C /tmp/startup-base
    .venv/bin/python tools/bench/startup_cpu.py --rounds 15 /tmp/startup-base .

    --config bench   (default) one file from the beginning, kmsg off, MQTT: the config of the issue 15 runs
    --config demo    what `tools/run` starts (examples/demo.toml): kmsg on (min_priority info) and a file, MQTT
    --quiet-wait S   before each run, wait up to S s for a quiet machine (compare.py's rule: 3 s in a row; default 5)

Each round runs every tree once, in the order given, then the next round in the reverse order (so neither
tree always runs right after the other). One run: the tree's modules are byte-compiled once beforehand
(`compare.compile_tree`, as a package install ships .pyc); a fresh state dir and a fresh topic; a QoS 0
subscriber on this harness's own mosquitto (a free loopback port) is subscribed before the agent starts;
`python -m edgeagent run -c CONFIG` is started with the tree as working directory (so `-m` imports that
tree's package); when the first message arrives, the subscriber's thread reads the agent's CPU at once:
the sum of the first field of /proc/PID/task/*/schedstat (ns on CPU of every live thread). The agent is
then stopped with SIGTERM. Also recorded: utime+stime+cutime+cstime from /proc/PID/stat at the same moment
(10 ms ticks; includes children the agent waited for, e.g. a schema migration child) and the wall time from
Popen to the first message.

Printed: per tree, min, lower quartile (q1) and median (ms) of the schedstat CPU, the stat CPU and the wall
time, over the rounds; the per-run figures go to tools/bench/out/startup-cpu/runs.jsonl. The machine is
shared: quote the min and the median together, with the time of day (printed); on a busy machine the median
moves by 10-20 ms from one invocation to the next, and the min and q1 are the steadier figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from common import CLK_TCK, OUT, REPO, VENV_PYTHON, BenchError, Broker
from compare import compile_tree, wait_quiet

WORK = OUT / "startup-cpu"
FIRST_LINE_TIMEOUT_S = 30.0


def bench_config(work: Path, port: int, topic: str) -> str:
    log = work / "one.log"
    log.write_text("startup bench: the first line\n")
    return (
        f'device_id = "bench"\nstate_dir = "{work / "state"}"\nlog_level = "warning"\n'
        "[kmsg]\nenabled = false\n"
        f'[[files]]\ninclude = ["{log}"]\nstart_at = "beginning"\n'
        '[spool]\nmax_size = "512MiB"\n'
        '[upload]\nto = "mqtt"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\ntopic = "{topic}"\nfirst_connect_delay = "0s"\n'
    )


def demo_config(work: Path, port: int, topic: str) -> str:
    """examples/demo.toml with this run's paths, broker and topic (and no random first-connect wait)."""
    (work / "demo").mkdir()
    (work / "demo" / "demo.log").write_text("startup bench: the demo log's first line\n")
    return (
        f'device_id = "bench"\nstate_dir = "{work / "state"}"\n'
        '[kmsg]\nenabled = true\nmin_priority = "info"\n'
        f'[[files]]\ninclude = ["{work / "demo"}/*.log"]\nstart_at = "beginning"\n'
        'attributes = { "demo" = "true" }\n'
        '[spool]\nmax_size = "64MiB"\n'
        '[upload]\nto = "mqtt"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\ntopic = "{topic}"\nfirst_connect_delay = "0s"\n'
    )


CONFIGS = {"bench": bench_config, "demo": demo_config}


def schedstat_ns(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return total


def stat_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime


class FirstMessage:
    """A QoS 0 subscriber to `topic` that, on the first message, reads the CPU of the process in `pid`."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.pid = 0
        self.started = 0.0
        self.figures: dict[str, float] = {}
        self.arrived = threading.Event()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"startup-sub-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=0)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise BenchError("the bench subscriber could not subscribe")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self.arrived.is_set() or not self.pid:
            return
        self.figures = {
            "cpu_ms": schedstat_ns(self.pid) / 1e6,
            "stat_cpu_ms": stat_ticks(self.pid) * 1000 / CLK_TCK,
            "wall_ms": (time.perf_counter() - self.started) * 1000,
        }
        self.arrived.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def one_run(tree: Path, config: str, port: int, index: int) -> dict[str, float]:
    work = WORK / f"run-{index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    topic = f"startup-bench/{os.getpid()}/{index}"
    config_path = work / "agent.toml"
    config_path.write_text(CONFIGS[config](work, port, topic))
    subscriber = FirstMessage(port, topic)
    try:
        with open(work / "agent.stderr", "wb") as stderr:
            subscriber.started = time.perf_counter()
            agent = subprocess.Popen(
                [str(VENV_PYTHON), "-m", "edgeagent", "run", "-c", str(config_path)],
                cwd=tree,  # `-m` finds the tree's package in the working directory first
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
            subscriber.pid = agent.pid
            try:
                if not subscriber.arrived.wait(FIRST_LINE_TIMEOUT_S):
                    raise BenchError(f"no message from the agent of {tree} in {FIRST_LINE_TIMEOUT_S} s; see {work}")
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(30)
    finally:
        subscriber.close()
    return subscriber.figures


def summary(runs: list[dict[str, Any]]) -> str:
    parts = []
    for key in ("cpu_ms", "stat_cpu_ms", "wall_ms"):
        values = sorted(r[key] for r in runs)
        quartile = values[(len(values) - 1) // 4]
        parts.append(f"{key} min {values[0]:6.1f} q1 {quartile:6.1f} median {statistics.median(values):6.1f}")
    quiet = sum(1 for r in runs if r["quiet_reached"])
    return "   ".join(parts) + f"   ({len(runs)} runs, {quiet} after a quiet wait)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", type=Path, default=[REPO], help="source trees (default: this one)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench")
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    for tree in trees:
        if not (tree / "edgeagent" / "__init__.py").exists():
            raise SystemExit(f"{tree} has no edgeagent package")
        compile_tree(tree)
    WORK.mkdir(parents=True, exist_ok=True)
    broker = Broker(WORK / "broker")
    broker.start()
    runs: dict[Path, list[dict[str, Any]]] = {tree: [] for tree in trees}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        with open(WORK / "runs.jsonl", "a") as log:
            for round_ in range(args.rounds):
                for tree in trees if round_ % 2 == 0 else trees[::-1]:
                    quiet = wait_quiet(args.quiet_wait)
                    figures = one_run(tree, args.config, broker.port, sum(map(len, runs.values())))
                    runs[tree].append({**figures, **quiet})
                    log.write(json.dumps({"tree": str(tree), "config": args.config, **figures, **quiet}) + "\n")
    finally:
        broker.stop()
    ended = time.strftime("%H:%M:%S UTC", time.gmtime())
    print(f"startup_cpu --config {args.config}, {args.rounds} rounds, {started} to {ended}")
    for tree in trees:
        print(f"{tree}: {summary(runs[tree])}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What running on both cores costs in CPU seconds on this machine (issue 15): two measurements in pairs, so
that the machine's drift (the same work took 0.9 to 1.3 CPU s within an hour) cancels out.

1. `machine`: the minimal reference (`references.py sqlite`) alone, then two copies of it at once. Both cores
   busy with independent processes: how much slower each gets (shared caches, the hypervisor's placement).
2. `agent`: `edgeagent run` over the corpus to a local mosquitto as `tools/bench/run --scenarios compare` runs
   it (edgeagent-mqtt), with its chunks compressed behind on the second thread (as shipped) and, alternated,
   compressed on the loop thread (`codec.BackgroundCompressor.submit` replaced in the process by a call that
   compresses at once: this script re-executes itself as the agent's wrapper for that). CPU s of all the
   agent's threads when the last line reached the subscriber, and wall time.
3. `agent --one-cpu`: the same pairs with the agent started under `taskset -c N` (one CPU to run on, as on a
   single-core device). As shipped, the agent then compresses inline by itself (`codec.usable_cpus`); the
   other run of each pair forces the compressing thread (`usable_cpus` replaced in the process), to show
   what that thread would cost there.

Each pair's difference is reported, and the median of the differences. No quiet-machine wait: the pairs are
what makes the figures comparable; a pair with other load on the machine moves both of its runs.

usage: tools/bench/parallel_cost.py [--pairs N] [--lines N] [--only machine|agent] [--one-cpu]
       (run `tools/bench/run` once first: it makes the corpus)
"""

from __future__ import annotations

import argparse
import os
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

INLINE_WRAPPER = "--as-agent-compressing-inline"
THREAD_WRAPPER = "--as-agent-compressing-on-its-thread"


def _agent_as(wrapper: str, argv: list[str]) -> None:
    """This process becomes `edgeagent run ARGV`, compressing each chunk where it was encoded (INLINE_WRAPPER)
    or on the compressing thread whatever the CPUs (THREAD_WRAPPER)."""
    from concurrent.futures import Future

    from edgeagent import codec

    def submit(self: codec.BackgroundCompressor, requests: list[bytes]) -> Future[list[bytes]]:
        done: Future[list[bytes]] = Future()
        done.set_result(self._compress(requests))
        return done

    if wrapper == INLINE_WRAPPER:
        codec.BackgroundCompressor.submit = submit  # type: ignore[method-assign]
    else:
        codec.usable_cpus = lambda: 2
    sys.argv = ["edgeagent", "run", *argv]
    runpy.run_module("edgeagent", run_name="__main__")


if len(sys.argv) > 1 and sys.argv[1] in (INLINE_WRAPPER, THREAD_WRAPPER):
    _agent_as(sys.argv[1], sys.argv[2:])
    sys.exit(0)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import OUT, REPO, VENV_PYTHON, Broker, Measured, Subscriber, wait_until  # noqa: E402
from compare import compile_tree  # noqa: E402
from scenarios import REFERENCES, TOPIC, agent_config, files_mqtt_config, generous_timeout, last_line_of  # noqa: E402


def _children_cpu(argvs: list[list[str]]) -> list[float]:
    """Run the commands at once; CPU s (user + sys) of each."""
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for argv in argvs]
    cpu = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"{argvs[0]} exited with {proc.returncode}")
        cpu.append(usage.ru_utime + usage.ru_stime)
    return cpu


def machine_pairs(corpus: Path, pairs: int) -> None:
    work = OUT / "runs" / "parallel-machine"

    def argv(i: int) -> list[str]:
        db = work / f"ref{i}" / "ref.db"
        shutil.rmtree(db.parent, ignore_errors=True)
        db.parent.mkdir(parents=True)
        return [str(VENV_PYTHON), str(REFERENCES), "sqlite", str(corpus), str(db)]

    slower = []
    for pair in range(1, pairs + 1):
        (alone,) = _children_cpu([argv(0)])
        together = _children_cpu([argv(1), argv(2)])
        slower += [t / alone - 1 for t in together]
        print(f"machine pair {pair}: alone {alone:.3f} CPU s, two at once {together[0]:.3f} and {together[1]:.3f}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: each of two at once took {100 * statistics.median(slower):+.1f} % CPU (median of {len(slower)})")


def _agent_run(corpus: Path, last_line: bytes, lines: int, wrapper: str, prefix: list[str]) -> tuple[float, float]:
    """CPU s and wall s of the agent (as shipped with `wrapper` "", else through it) until the last line."""
    work = OUT / "runs" / "parallel-agent"
    shutil.rmtree(work, ignore_errors=True)
    broker = Broker(work / "broker")
    broker.start()
    sub = Subscriber(broker.port, TOPIC, needle=last_line)
    config = work / "agent.toml"
    config.write_text(agent_config(work / "state", files_mqtt_config(corpus, broker.port)))
    command = [str(Path(__file__).resolve()), wrapper] if wrapper else ["-m", "edgeagent", "run"]
    agent = Measured(
        [*prefix, str(VENV_PYTHON), *command, "-c", str(config)],
        cwd=REPO,
        stderr_path=work / "agent.stderr",
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    ).start()
    try:
        timeout = generous_timeout(lines)
        wait_until(lambda: agent.check_alive("the agent") or sub.found.is_set(), timeout, "the last line")
        wall = agent.mark()
        assert agent.marked is not None
        return agent.marked.cpu_s, wall
    finally:
        agent.stop()
        sub.close()
        broker.stop()


def agent_pairs(corpus: Path, pairs: int, one_cpu: bool) -> None:
    compile_tree(REPO)
    # (label, wrapper) of the two runs of a pair: compressing on the thread, then inline.
    if one_cpu:
        prefix = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
        runs = (("one CPU, thread forced", THREAD_WRAPPER), ("one CPU, inline (as shipped)", ""))
    else:
        prefix, runs = [], (("compressing behind", ""), ("inline", INLINE_WRAPPER))
    last_line = last_line_of(corpus)
    with open(corpus, "rb") as f:
        lines = sum(1 for _ in f)
    cpu_diff, wall_diff = [], []
    for pair in range(1, pairs + 1):
        behind_cpu, behind_wall = _agent_run(corpus, last_line, lines, runs[0][1], prefix)
        inline_cpu, inline_wall = _agent_run(corpus, last_line, lines, runs[1][1], prefix)
        cpu_diff.append(behind_cpu - inline_cpu)
        wall_diff.append(behind_wall - inline_wall)
        print(
            f"agent pair {pair}: {runs[0][0]} {behind_cpu:.2f} CPU s, {behind_wall:.2f} s wall; "
            f"{runs[1][0]} {inline_cpu:.2f} CPU s, {inline_wall:.2f} s wall"
        )
    print(
        f"agent: {runs[0][0]} costs {statistics.median(cpu_diff):+.3f} CPU s and "
        f"{statistics.median(wall_diff):+.3f} s wall against {runs[1][0]} (medians of {pairs} pairs' differences)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("machine", "agent"))
    parser.add_argument("--one-cpu", action="store_true", help="the agent pairs on one CPU (taskset)")
    args = parser.parse_args()
    corpus = OUT / f"corpus-{args.lines}.log"
    if not corpus.exists():
        raise SystemExit(f"{corpus} is missing: run tools/bench/run once first")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    started = time.strftime("%H:%M UTC", time.gmtime())
    print(f"parallel_cost: {args.pairs} pairs, {args.lines} lines, from {started}")
    if args.only in (None, "machine"):
        machine_pairs(corpus, args.pairs)
    if args.only in (None, "agent"):
        agent_pairs(corpus, args.pairs, args.one_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())

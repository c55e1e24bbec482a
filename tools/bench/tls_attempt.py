"""CPU per MQTT connection attempt over mqtts:// while the link is down: source trees side by side.

Usage (from the repository root; the trees share this repository's .venv):

    git archive main edgeagent | tar -x -C /tmp/tls-before
    .venv/bin/python tools/bench/tls_attempt.py --rounds 3 /tmp/tls-before .

Each run: a fresh state dir; `python -m edgeagent run` started with the tree as working directory, kmsg off
and no file watched, `[mqtt] url = "mqtts://127.0.0.1:PORT"` where nothing listens (every attempt is refused
at TCP, as when a cellular link is down), `retry_initial` and `retry_max` at `--retry` (so the attempts come
back to back, about two per retry interval) and `log_level = "debug"` (one line per failed attempt: "mqtt:
next connection attempt in ..."). After `--warmup` attempts the harness reads the agent's CPU (the first
field of /proc/PID/task/*/schedstat, ns on CPU of every thread) and counts the attempts for `--seconds`;
the figure is the CPU of that window divided by the attempts in it (the idle agent's own ~0.2 ms/s is in it,
the same for every tree). Variants (`--variants`), with the certificates tls_idle.py makes:

    system     `ca_file` empty: the system CA store, a copy of this machine's (/etc/ssl/certs) plus the bench
               CA, laid out as Debian does, given by SSL_CERT_FILE and SSL_CERT_DIR
    ca_file    `ca_file` = the bench CA alone

The store and the CA file are made before the first run and left older than the 3 s a kept TLS context
waits for (edgeagent.tls.SETTLED). Each round runs every (tree, variant) once, then the next in reverse
order. Before each run the harness waits up to --quiet-wait s for a quiet machine (compare.py's rule) and
records others' share of both CPUs over the window (the machine's busy share minus the agent's); a run over
10 % is marked disturbed. Printed: one line per run and per (tree, variant) the median; runs go to
tools/bench/out/tls-attempt/runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from common import OUT, REPO, VENV_PYTHON, BenchError, cpu_times, free_port, wait_until
from compare import compile_tree
from startup_cpu import schedstat_ns
from tls_idle import interleaved_rounds, make_pki, make_system_store, print_medians

WORK = OUT / "tls-attempt"
DISTURBED_OTHERS_PCT = 10.0
SETTLED = 3.0  # edgeagent.tls.SETTLED: younger files are read at every attempt by any tree
ATTEMPT_LINE = b"mqtt: next connection attempt in"


def agent_config(work: Path, port: int, ca_file: str, retry: str) -> str:
    ca = f'ca_file = "{ca_file}"\n' if ca_file else ""
    return (
        f'device_id = "bench"\nstate_dir = "{work / "state"}"\nlog_level = "debug"\n'
        "[kmsg]\nenabled = false\n"
        f'[upload]\nto = "mqtt"\nretry_initial = "{retry}"\nretry_max = "{retry}"\n'
        f'[mqtt]\nurl = "mqtts://127.0.0.1:{port}"\ntopic = "tls-attempt"\nfirst_connect_delay = "0s"\n{ca}'
    )


def attempts(stderr: Path) -> int:
    return stderr.read_bytes().count(ATTEMPT_LINE)


def one_run(tree: Path, variant: str, setup: dict[str, Any], index: int, args: argparse.Namespace) -> dict[str, Any]:
    work = WORK / f"run-{index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SSL_CERT_FILE=str(setup["bundle"]), SSL_CERT_DIR=str(setup["capath"]))
    ca_file = str(setup["pki"] / "bench-ca.crt") if variant == "ca_file" else ""
    config = work / "agent.toml"
    config.write_text(agent_config(work, setup["port"], ca_file, args.retry))
    stderr_path = work / "agent.stderr"
    with open(stderr_path, "wb") as stderr:
        agent = subprocess.Popen(
            [str(VENV_PYTHON), "-m", "edgeagent", "run", "-c", str(config)],
            cwd=tree, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
        )  # fmt: skip
    try:
        wait_until(lambda: attempts(stderr_path) >= args.warmup or agent.poll() is not None, 30, "the first attempts")
        if agent.poll() is not None:
            raise BenchError(f"the agent of {tree} exited; see {stderr_path}")
        machine_before, cpu_before, count_before, t0 = (
            cpu_times(),
            schedstat_ns(agent.pid),
            attempts(stderr_path),
            time.monotonic(),
        )
        time.sleep(args.seconds)
        machine_after, cpu_after, count_after = cpu_times(), schedstat_ns(agent.pid), attempts(stderr_path)
        window = time.monotonic() - t0
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    count = count_after - count_before
    if count <= 0:
        raise BenchError(f"no attempt in {args.seconds} s; see {stderr_path}")
    total = max(1, machine_after[0] - machine_before[0])
    busy_pct = 100 * (total - (machine_after[1] - machine_before[1])) / total
    agent_pct = 100 * (cpu_after - cpu_before) / 1e9 / (window * (os.cpu_count() or 1))
    return {
        "attempts": count,
        "cpu_ms": (cpu_after - cpu_before) / 1e6,
        "ms_per_attempt": (cpu_after - cpu_before) / 1e6 / count,
        "others_pct": max(0.0, busy_pct - agent_pct),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", type=Path, default=[REPO], help="source trees (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--retry", default="200ms", help="retry_initial and retry_max")
    parser.add_argument("--variants", default="system,ca_file")
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    make_pki(WORK / "pki")
    bundle, capath = make_system_store(WORK / "pki", WORK / "store")
    made = time.time()
    setup = {"pki": WORK / "pki", "bundle": bundle, "capath": capath, "port": free_port()}  # nothing listens
    for tree in args.trees:
        compile_tree(tree)
    time.sleep(max(0.0, SETTLED + 0.5 - (time.time() - made)))
    pairs = [(tree, variant) for variant in args.variants.split(",") for tree in args.trees]
    runs: list[dict[str, Any]] = []
    print(f"tls attempt bench at {time.strftime('%H:%M UTC', time.gmtime())}, retry {args.retry}", flush=True)
    try:
        interleaved_rounds(
            pairs,
            args.rounds,
            args.quiet_wait,
            lambda tree, variant, index: one_run(tree, variant, setup, index, args),
            lambda figures: figures["others_pct"] > DISTURBED_OTHERS_PCT,
            lambda figures: (
                f"{figures['ms_per_attempt']:6.2f} ms per attempt ({figures['attempts']} attempts, "
                f"{figures['cpu_ms']:.0f} ms CPU) others {figures['others_pct']:4.1f} %"
            ),
            runs,
        )
    finally:
        with open(WORK / "runs.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in runs)
    print_medians(runs, pairs, "ms_per_attempt", "ms")


if __name__ == "__main__":
    main()

"""Idle RSS of an agent connected over mqtts:// (stop 23): source trees and CA set-ups side by side, interleaved.

Usage (from the repository root; the trees share this repository's .venv):

    git archive main edgeagent | tar -x -C /tmp/tls-before
    .venv/bin/python tools/bench/tls_idle.py --rounds 2 /tmp/tls-before .

Each run: a fresh state dir; `python -m edgeagent run` started with the tree as working directory, with the
idle scenario's config (kmsg on, one empty file watched) and `[mqtt] url = "mqtts://127.0.0.1:PORT"` to this
harness's mosquitto (a TLS listener with a server certificate made here by the openssl command line, and a
plain listener for the subscriber); one line is appended to the file, and once it has arrived (the TLS
connection is up and verified) the agent is left idle for `--idle-seconds`, then VmRSS, RssAnon and RssFile
are read from /proc/PID/status. Variants (`--variants`):

    plain      mqtt:// to the plain listener: no TLS at all (the agent keeps ssl out of its process)
    system     `ca_file` empty: the system CA store, which here is a copy of this machine's
               (/etc/ssl/certs/ca-certificates.crt and its hashed directory, ~140 certificates) with the
               bench CA added, laid out as Debian does (a bundle file and a hashed directory, `openssl rehash`),
               given to the agent by SSL_CERT_FILE and SSL_CERT_DIR
    ca_file    `ca_file` = the bench CA alone

Each round runs every (tree, variant) once, in the order given, then the next round in the reverse order.
Before each run the harness waits up to --quiet-wait s for a quiet machine (compare.py's rule) and records how
busy both CPUs were over the run; a run with others' work over 10 % of the machine is marked disturbed.
Printed: one line per run and per (tree, variant) the median VmRSS; runs go to
tools/bench/out/tls-idle/runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import MOSQUITTO, OUT, REPO, VENV_PYTHON, BenchError, Subscriber, cpu_times, free_port, wait_until
from compare import compile_tree, wait_quiet

WORK = OUT / "tls-idle"
DISTURBED_BUSY_PCT = 10.0  # others' share of both CPUs over a run (the idle agent itself uses ~0)
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SYSTEM_DIR = Path("/etc/ssl/certs")


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"openssl {' '.join(args)}: {result.stderr}")


def make_pki(directory: Path) -> None:
    """bench-ca.crt and a server certificate for 127.0.0.1 signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=directory)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-days", "2", "-subj", "/CN=bench-ca", "-out", "bench-ca.crt",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            cwd=directory)  # fmt: skip
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key", cwd=directory)
    openssl("req", "-new", "-key", "server.key", "-subj", "/CN=server", "-out", "server.csr", cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "bench-ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "server.ext", "-out", "server.crt", cwd=directory)  # fmt: skip


def make_system_store(pki: Path, store: Path) -> tuple[Path, Path]:
    """This machine's CA store plus the bench CA, as Debian lays it out: (bundle file, hashed directory)."""
    certs = store / "certs"
    certs.mkdir(parents=True)
    for link in SYSTEM_DIR.iterdir():
        if re.fullmatch(r"[0-9a-f]{8}\.\d+", link.name):
            shutil.copy(link.resolve(), certs / f"{link.name}.pem")
    shutil.copy(pki / "bench-ca.crt", certs / "bench-ca.pem")
    openssl("rehash", str(certs), cwd=store)
    bundle = store / "ca-certificates.crt"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + (pki / "bench-ca.crt").read_bytes())
    return bundle, certs


def start_broker(work: Path, pki: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    plain, tls = free_port(), free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        ("user root\n" if os.geteuid() == 0 else "")  # as root mosquitto would switch users: these files are ours
        + f"allow_anonymous true\npersistence false\nlog_dest file {work / 'mosquitto.log'}\n"
        f"listener {plain} 127.0.0.1\n"
        f"listener {tls} 127.0.0.1\ncafile {pki / 'bench-ca.crt'}\ncertfile {pki / 'server.crt'}\n"
        f"keyfile {pki / 'server.key'}\n"
    )
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting() -> bool:
        if broker.poll() is not None:
            raise BenchError(f"mosquitto exited; see {work / 'mosquitto.log'}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", tls)) == 0

    wait_until(accepting, 10, "mosquitto's TLS listener")
    return broker, plain, tls


def agent_config(work: Path, url: str, ca_file: str, topic: str) -> str:
    (work / "logs").mkdir()
    (work / "logs" / "app.log").write_bytes(b"")
    ca = f'ca_file = "{ca_file}"\n' if ca_file else ""
    return (
        f'device_id = "bench"\nstate_dir = "{work / "state"}"\nlog_level = "warning"\n'
        "[kmsg]\nenabled = true\n"
        f'[[files]]\ninclude = ["{work / "logs"}/*.log"]\n'
        '[upload]\nto = "mqtt"\n'
        f'[mqtt]\nurl = "{url}"\ntopic = "{topic}"\nfirst_connect_delay = "0s"\n{ca}'
    )


def proc_status(pid: int) -> dict[str, float]:
    figures = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                figures[key] = int(value.split()[0]) / 1024
    return figures


def one_run(tree: Path, variant: str, setup: dict[str, Any], index: int, idle_s: float) -> dict[str, Any]:
    work = WORK / f"run-{index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    topic = f"tls-idle/{os.getpid()}/{index}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if variant == "plain":
        url, ca_file = f"mqtt://127.0.0.1:{setup['plain']}", ""
    else:
        url = f"mqtts://127.0.0.1:{setup['tls']}"
        ca_file = str(setup["pki"] / "bench-ca.crt") if variant == "ca_file" else ""
        env.update(SSL_CERT_FILE=str(setup["bundle"]), SSL_CERT_DIR=str(setup["capath"]))
    config = work / "agent.toml"
    config.write_text(agent_config(work, url, ca_file, topic))
    subscriber = Subscriber(setup["plain"], topic, needle=b"tls idle bench: connected")
    try:
        with open(work / "agent.stderr", "wb") as stderr:
            agent = subprocess.Popen(
                [str(VENV_PYTHON), "-m", "edgeagent", "run", "-c", str(config)],
                cwd=tree, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
            )  # fmt: skip
        try:
            time.sleep(1)
            with open(work / "logs" / "app.log", "ab") as log:
                log.write(b"tls idle bench: connected\n")
            wait_until(lambda: subscriber.found.is_set() or agent.poll() is not None, 30, "the line over TLS")
            if agent.poll() is not None:
                raise BenchError(f"the agent of {tree} exited; see {work / 'agent.stderr'}")
            before = cpu_times()
            time.sleep(idle_s)
            after = cpu_times()
            figures = proc_status(agent.pid)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
    finally:
        subscriber.close()
    total = max(1, after[0] - before[0])
    return {**figures, "machine_busy_pct": 100 * (total - (after[1] - before[1])) / total}


def interleaved_rounds(
    pairs: list[tuple[Path, str]],
    rounds: int,
    quiet_wait: float,
    measure: Callable[[Path, str, int], dict[str, Any]],
    disturbed: Callable[[dict[str, Any]], bool],
    shown: Callable[[dict[str, Any]], str],
    runs: list[dict[str, Any]],
) -> None:
    """Every (tree, variant) of `pairs` once per round, the order reversed every other round, each run
    after waiting up to `quiet_wait` s for a quiet machine; appended to `runs` and printed as they come.
    `measure(tree, variant, index)` runs one; a run is disturbed when `disturbed(figures)` or no quiet came."""
    for round_no in range(rounds):
        for tree, variant in pairs if round_no % 2 == 0 else list(reversed(pairs)):
            quiet = wait_quiet(quiet_wait)
            figures = measure(tree, variant, len(runs))
            marked = disturbed(figures) or not quiet["quiet_reached"]
            runs.append({"tree": str(tree), "variant": variant, "round": round_no + 1, **quiet, **figures,
                         "disturbed": marked, "at": time.strftime("%H:%M:%S", time.gmtime())})  # fmt: skip
            mark = "  DISTURBED" if marked else ""
            print(f"round {round_no + 1} {variant:8} {tree!s:24} {shown(figures)}{mark}", flush=True)


def print_medians(runs: list[dict[str, Any]], pairs: list[tuple[Path, str]], key: str, unit: str) -> None:
    for tree, variant in pairs:
        values = [r[key] for r in runs if r["tree"] == str(tree) and r["variant"] == variant]
        if values:
            print(f"median {variant:8} {tree!s:24} {key} {statistics.median(values):6.2f} {unit} ({len(values)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", type=Path, default=[REPO], help="source trees (default: this one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--variants", default="plain,system,ca_file")
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    args = parser.parse_args()
    variants = args.variants.split(",")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    make_pki(WORK / "pki")
    bundle, capath = make_system_store(WORK / "pki", WORK / "store")
    broker_dir = WORK / "broker"
    broker_dir.mkdir()
    broker, plain, tls = start_broker(broker_dir, WORK / "pki")
    setup = {"pki": WORK / "pki", "bundle": bundle, "capath": capath, "plain": plain, "tls": tls}
    for tree in args.trees:
        compile_tree(tree)
    pairs = [(tree, variant) for variant in variants for tree in args.trees]
    runs: list[dict[str, Any]] = []
    print(f"tls idle bench at {time.strftime('%H:%M UTC', time.gmtime())}, idle {args.idle_seconds:g} s", flush=True)
    try:
        interleaved_rounds(
            pairs,
            args.rounds,
            args.quiet_wait,
            lambda tree, variant, index: one_run(tree, variant, setup, index, args.idle_seconds),
            lambda figures: figures["machine_busy_pct"] > DISTURBED_BUSY_PCT,
            lambda figures: (
                f"VmRSS {figures['VmRSS']:5.1f} MiB (anon {figures['RssAnon']:4.1f}, file {figures['RssFile']:4.1f}) "
                f"machine busy {figures['machine_busy_pct']:4.1f} %"
            ),
            runs,
        )
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(10)
        with open(WORK / "runs.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in runs)
    print_medians(runs, pairs, "VmRSS", "MiB")


if __name__ == "__main__":
    main()

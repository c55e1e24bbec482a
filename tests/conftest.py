"""Shared fixtures: a real mosquitto on a free loopback port, a real agent
process, and readers of what a spool holds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
KMSG = Path("/dev/kmsg")
PRINTK_DEVKMSG = Path("/proc/sys/kernel/printk_devkmsg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def until(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    """`wait_for` for code running inside the event loop under test."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def devkmsg() -> Iterator[None]:
    """Lets every userspace write into the ring buffer (the default
    "ratelimit" silently drops most of a test's lines); restored afterwards."""
    if os.geteuid() != 0 or not KMSG.exists():
        pytest.skip("needs root and the real /dev/kmsg")
    old = PRINTK_DEVKMSG.read_text().strip()
    PRINTK_DEVKMSG.write_text("on\n")
    yield
    PRINTK_DEVKMSG.write_text(old + "\n")


def write_kmsg(level: int, text: str) -> None:
    """One record, as userspace writes it (facility user). The newline
    matters: without it the kernel keeps the record open for a continuation
    and readers see it only when the next record arrives."""
    fd = os.open(KMSG, os.O_WRONLY)
    try:
        os.write(fd, f"<{level}>{text}\n".encode())
    finally:
        os.close(fd)


def end_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM `proc` if it still runs, and reap it; SIGKILL it if it is not gone within `timeout` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Broker:
    """A mosquitto process on 127.0.0.1; `stop()`/`start()` keep the port."""

    def __init__(self, workdir: Path, extra_config: str = "", port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            # As root, mosquitto would switch to its own user and could not
            # write its log or read ACL and certificate files in pytest's temp dirs.
            + ("user root\n" if os.geteuid() == 0 else "")
            + "allow_anonymous true\n"
            "persistence false\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 100000\n" + self.extra_config
        )
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._accepting, 10, what=f"mosquitto on port {self.port}")

    def _accepting(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"mosquitto exited: {err} {self.log.read_text() if self.log.exists() else ''}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, 5)
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed (tools/setup-env installs it)")
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Broker(workdir)
    broker.start()
    yield broker
    broker.stop()


class AgentProcess:
    """`edgeagent run` as a real child process."""

    def __init__(self, config_path: Path, state_dir: Path) -> None:
        self.config_path = config_path
        self.state_dir = state_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = config_path.with_suffix(".stderr")
        self.runs = 0
        self.status_failure = ""  # why the last `status()` returned {}
        self.prefix: list[str] = []  # run under this command (e.g. nsenter into a namespace the test made)

    def start(self, wait_ready: bool = True) -> None:
        self.runs += 1
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "edgeagent", "run", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
            cwd=REPO,
        )
        if wait_ready:
            wait_for(self.ready, 20, what="agent ready (status.agent.pid)")

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            code = self.proc.returncode if self.proc is not None else None
            raise AssertionError(f"agent exited early (exit code {code}):\n{self.stderr()}")
        st = self.status()
        return st.get("agent", {}).get("pid") == self.proc.pid and st.get("agent", {}).get("state") == "running"

    def status(self) -> dict[str, Any]:
        """`edgeagent status --json`; {} when it fails (why is kept in `status_failure`)."""
        out = subprocess.run(
            [sys.executable, "-m", "edgeagent", "status", "--json", "-c", str(self.config_path)],
            capture_output=True,
            cwd=REPO,
            timeout=30,
        )
        if out.returncode != 0:
            self.status_failure = f"`status` exited {out.returncode}: {out.stderr.decode(errors='replace').strip()}"
            return {}
        self.status_failure = ""
        return json.loads(out.stdout)

    def wait_status(self, check: Callable[[dict[str, Any]], Any], timeout: float = 20.0, what: str = "") -> Any:
        """The first status for which `check(status)` is true, asked again until `timeout`: a key `check`
        reads may be missing while the agent (re)builds a component (a reload moving the MQTT session),
        which is "not yet", not an error. Fails showing the last status (or why `status` failed)."""
        last: dict[str, Any] = {}

        def passes() -> bool:
            nonlocal last
            last = self.status()
            try:
                return bool(check(last))
            except (KeyError, TypeError):
                return False

        try:
            wait_for(passes, timeout, 0.1, what=what or "the status")
        except AssertionError as e:
            shown = self.status_failure or json.dumps(last, sort_keys=True, default=str)
            raise AssertionError(f"{e}; the last status: {shown}") from None
        return last

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"agent did not stop within {timeout}s after SIGTERM:\n{self.stderr()}") from None
        self.proc = None
        return code

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Any]:
    """make_agent(config_toml) -> AgentProcess (not started). `{state_dir}` in the
    text is replaced by a fresh state dir under tmp_path."""
    agents: list[AgentProcess] = []

    def factory(config_text: str, name: str = "agent") -> AgentProcess:
        state_dir = tmp_path / f"{name}-state"
        config_path = tmp_path / f"{name}.toml"
        config_path.write_text(config_text.replace("{state_dir}", str(state_dir)))
        agent = AgentProcess(config_path, state_dir)
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        if agent.proc is not None:
            agent.kill()


def _closed_after_the_test() -> Iterator[list[Any]]:
    running: list[Any] = []
    yield running
    for item in running:
        item.close()


@pytest.fixture
def harnesses() -> Iterator[list[Any]]:
    """In-process session/uploader harnesses (mqtt_helpers.UploaderHarness) a test starts; closed after it."""
    yield from _closed_after_the_test()


@pytest.fixture
def subscribers() -> Iterator[list[Any]]:
    """MQTT subscribers (mqtt_helpers.Subscriber) a test starts; closed after it."""
    yield from _closed_after_the_test()


@pytest.fixture
def raw_brokers() -> Iterator[list[Any]]:
    """Scripted brokers (mqtt_helpers.RawBroker) a test starts; closed after it."""
    yield from _closed_after_the_test()


def spool_records(state_dir: Path) -> list[dict[str, Any]]:
    """Every record still in the spool at `state_dir`, oldest first, decoded."""
    import zstandard

    from edgeagent.otlp import decode_request
    from edgeagent.spool import Spool

    spool = Spool.open_readonly(state_dir / "spool.db")
    if spool is None:
        return []
    out: list[dict[str, Any]] = []
    dctx = zstandard.ZstdDecompressor()
    try:
        for chunk in spool.oldest(10**9):
            for record in decode_request(dctx.decompress(chunk.payload)):
                record["chunk_id"] = chunk.chunk_id
                out.append(record)
    finally:
        spool.close()
    return out

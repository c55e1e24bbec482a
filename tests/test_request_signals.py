"""Request signals (SIGHUP: reload, SIGUSR1: `wake`, SIGUSR2: `status`) are the loop thread's alone.

The kernel gives a process's signal to any thread that does not block it. When the loop stops serving them it
blocks them for a moment while it sets them to ignored; a worker thread that did not block them would then
take one with its default action, which ends the agent. So every worker thread blocks them from its start:
the compressing thread and the threads of `asyncio.to_thread` (the MQTT connect), seen here in a real agent
through /proc."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from conftest import Broker, wait_for
from test_mqtt_agent import agent_config, uploader_status

from edgeagent.codec import usable_cpus

REQUESTS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def blocked_signals(pid: int, tid: int) -> set[int]:
    """The signals thread `tid` of `pid` blocks (SigBlk in its status)."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError(f"no SigBlk for thread {tid}")


def test_only_the_loop_thread_takes_request_signals(tmp_path: Path, mosquitto: Broker, make_agent: Any) -> None:
    log_file = tmp_path / "app.log"
    # More than a chunk (256 KiB) at once: the batcher hands it to its compressing thread.
    log_file.write_bytes(b"".join(b"line %07d of a file read in bulk by the agent\n" % i for i in range(20000)))
    agent = make_agent(agent_config(mosquitto, log_file))
    agent.start()
    wait_for(lambda: uploader_status(agent).get("acked_records", 0) >= 20000, 60, what="every line acknowledged")
    pid = agent.proc.pid
    threads = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    workers = [tid for tid in threads if tid != pid]
    names = {tid: Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() for tid in threads}
    expected = 2 if usable_cpus() >= 2 else 1  # with one CPU, chunks are compressed on the loop's thread
    assert len(workers) >= expected, f"expected the compressing and the connecting threads, got {names}"
    assert not blocked_signals(pid, pid) & set(REQUESTS), "the loop thread must take them"
    for tid in workers:
        assert set(REQUESTS) <= blocked_signals(pid, tid), f"worker thread {tid} ({names[tid]}) takes them"
    for sig in REQUESTS:  # and the loop still serves every one of them
        os.kill(pid, sig)
    wait_for(agent.ready, 30, 0.2, what="the agent running after the signals")
    assert agent.stop() == 0

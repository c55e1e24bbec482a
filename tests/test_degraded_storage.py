"""Issue 9, "Done when": a degraded-storage run of the real agent. The state
dir is a real small tmpfs filled to ENOSPC at start-up, mid-run and while
acknowledgements come in, with kill -9 of `edgeagent run` in between; once
space returns every line reaches a real mosquitto exactly once (a chunk sent
again after a kill keeps its chunk-id, which is how receivers drop it), and
the agent's RSS stays bounded throughout."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, wait_for
from disk import fill, tmpfs
from mqtt_helpers import Subscriber, bodies, line_text

TOPIC = "edgeagent/degraded/logs"


def config(state_dir: Path, log_file: Path, broker: Broker | None) -> str:
    # hold_file_lines = 0: every line goes through the spool, so a full disk stalls it while lines come and
    # a kill -9 leaves nothing delivered from RAM ahead of its stored position (exactly once by chunk id).
    upload = (
        f'[upload]\nto = "mqtt"\nretry_initial = "200ms"\nretry_max = "1s"\nshutdown_timeout = "2s"\n'
        f'[mqtt]\nurl = "{broker.url}"\nconnect_timeout = "3s"\n'
        if broker
        else '[upload]\nto = "none"\n'
    )
    return f"""
device_id = "degraded"
state_dir = "{state_dir}"
[kmsg]
enabled = false
[spool]
flush_interval = "100ms"
hold_file_lines = "0s"
[[files]]
include = ["{log_file}"]
start_at = "beginning"
{upload}"""


class RssWatch:
    """Samples VmRSS of whichever agent process runs, every 50 ms."""

    def __init__(self) -> None:
        self.pid = 0
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def rss() -> Iterator[RssWatch]:
    watch = RssWatch()
    yield watch
    watch.close()


def append(path: Path, start: int, count: int) -> int:
    with open(path, "ab") as f:
        for base in range(start, start + count, 5000):
            f.write(b"".join(line_text(n) + b"\n" for n in range(base, min(base + 5000, start + count))))
    return start + count


def delivered(subscriber: Subscriber) -> dict[str, list[int]]:
    """Line numbers per chunk-id (a resent chunk counts once)."""
    chunks: dict[str, list[int]] = {}
    for m in subscriber.received():
        chunks.setdefault(m.user_properties["chunk-id"], [int(b.split()[1]) for b in bodies(m.payload)])
    return chunks


def all_lines(subscriber: Subscriber) -> list[int]:
    return sorted(n for numbers in delivered(subscriber).values() for n in numbers)


def spool_state(agent: Any) -> str:
    return str(agent.status().get("agent", {}).get("state", ""))


def run_degraded(tmp_path: Path, broker: Broker, make_agent: Any, rss: RssWatch, scale: int) -> None:
    log_file = tmp_path / "app.log"
    log_file.write_bytes(b"")
    subscriber = Subscriber(broker.port, TOPIC)
    try:
        with tmpfs(tmp_path / "disk", "8m") as disk:
            state_dir = disk / "state"
            offline = make_agent(config(state_dir, log_file, None), name="offline")
            online = make_agent(config(state_dir, log_file, broker), name="online")
            offline.state_dir = online.state_dir = state_dir

            def start(agent: Any, wait_ready: bool = True) -> None:
                agent.start(wait_ready=wait_ready)
                rss.pid = agent.proc.pid

            # A backlog in the spool (nothing uploads yet), then kill -9.
            n = append(log_file, 0, 10_000 * scale)
            start(offline)
            wait_for(lambda: offline.status().get("counters", {}).get("spooled_records", 0) >= n, 60, 0.5)
            offline.kill()

            # Disk full at start-up: the spool is left as it is; the agent waits or, if SQLite can
            # still open it, uploads while the disk is full (acks must still be recorded); kill -9.
            filler = fill(disk)
            n = append(log_file, n, 2_000 * scale)
            start(online, wait_ready=False)
            wait_for(
                lambda: "unavailable" in spool_state(online) or len(delivered(subscriber)) > 0,
                60,
                0.5,
                what="the agent waiting for the spool, or uploading on the full disk",
            )
            online.kill()

            # Acks on the full disk: deleting must work (that is how space comes back); kill -9 mid-way.
            start(online, wait_ready=False)
            wait_for(lambda: len(delivered(subscriber)) > 0, 60, 0.5, what="uploads on a full disk")
            online.kill()

            # Space returns; then the disk fills up again mid-run while lines keep coming. Acks keep freeing
            # pages, so the spool may take every line into pages it reuses and the 256 KiB reserve it released:
            # under CPU load it did (50,000 lines are about 300 KB of chunks), or stalled for only the 150 ms
            # between two polls. Either the stall shows, or there is nothing left to stall on: every line arrived.
            filler.unlink()
            start(online)
            fill(disk)
            n = append(log_file, n, 50_000 * scale)
            wait_for(
                lambda: "unavailable" in spool_state(online) or all_lines(subscriber)[-1:] == [n - 1],
                60,
                0.5,
                what="the stall shown in status, or every line delivered on the full disk",
            )
            online.kill()

            # Space returns for good: everything arrives, exactly once.
            filler.unlink()
            start(online)
            wait_for(lambda: all_lines(subscriber)[-1:] == [n - 1], 300, 1, what="every line delivered")
            wait_for(lambda: online.status().get("backlog", {}).get("records") == 0, 60, 0.5, what="spool drained")
            assert online.stop() == 0
    finally:
        subscriber.close()
    lines = all_lines(subscriber)
    assert lines == list(range(n)), f"{len(lines)} lines delivered of {n} (missing or duplicated)"
    print(f"degraded storage: {n} lines exactly once, peak agent RSS {rss.peak_kib} KiB")
    assert rss.peak_kib < 120 * 1024, f"agent RSS peaked at {rss.peak_kib} KiB"


def test_degraded_storage_every_line_exactly_once(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, rss: RssWatch
) -> None:
    run_degraded(tmp_path, mosquitto, make_agent, rss, scale=1)


@pytest.mark.slow
def test_degraded_storage_every_line_exactly_once_long(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, rss: RssWatch
) -> None:
    run_degraded(tmp_path, mosquitto, make_agent, rss, scale=4)

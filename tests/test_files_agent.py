"""The file source in a real agent process (`edgeagent run`), killed with SIGKILL while a writer appends
and the file is rotated: nothing lost, nothing twice. Read back from the spool (upload.to = "none")."""

from __future__ import annotations

import collections
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import spool_records, wait_for

CONFIG = """
device_id = "files-test"
state_dir = "{{state_dir}}"
[kmsg]
enabled = false
[upload]
to = "none"
[spool]
flush_interval = "100ms"
[[files]]
include = [{include}]
start_at = "beginning"
rotate_wait = "500ms"
partial_line_timeout = "1s"
max_line_size = "1KiB"
"""


def config(*include: Path) -> str:
    return CONFIG.format(include=", ".join(f'"{p}"' for p in include))


def file_lines(state_dir: Path) -> list[dict[str, Any]]:
    return [r for r in spool_records(state_dir) if r["scope"] == "edgeagent/files"]


class RotatingWriter:
    """Appends numbered lines to `path` from a thread, like an application with an O_APPEND descriptor,
    and rotates the file on request, as logrotate would."""

    def __init__(self, path: Path, lines_per_second: int = 2000) -> None:
        self.path = path
        self.seq = 0
        self.generations = 0
        self.interval = 20 / lines_per_second  # 20 lines per burst
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _burst(self, n: int) -> None:
        data = "".join(f"seq {self.seq + i:07d} {'x' * ((self.seq + i) % 50)}\n" for i in range(n))
        os.write(self._fd, data.encode())
        self.seq += n

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._burst(20)
            self._stop.wait(self.interval)

    def rotate_rename(self) -> None:
        """rename + create: the application writes a little more to the old file before it reopens."""
        with self._lock:
            self.generations += 1
            os.rename(self.path, self.path.with_name(f"{self.path.name}.{self.generations}"))
            self._burst(5)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._burst(1)

    def rotate_copytruncate(self) -> None:
        """copy + truncate. The writer pauses between the copy and the truncation: lines written in that
        window are in neither file for any tailer (see docs/files.md)."""
        with self._lock:
            self.generations += 1
            shutil.copyfile(self.path, self.path.with_name(f"{self.path.name}.{self.generations}"))
            os.truncate(self.path, 0)
            self._burst(1)

    def current_first_line(self) -> str:
        with open(self.path, "rb") as f:
            return f.readline().decode().rstrip("\n")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)


def check_exactly_once(state_dir: Path, total: int) -> None:
    bodies = [r["body"] for r in file_lines(state_dir)]
    counts = collections.Counter(int(b.split()[1]) for b in bodies)
    duplicates = {seq: n for seq, n in counts.items() if n > 1}
    missing = sorted(set(range(total)) - counts.keys())
    assert not duplicates, f"lines shipped twice: {list(duplicates.items())[:10]}"
    assert not missing, f"{len(missing)} lines lost, first {missing[:10]}"
    for body in bodies:
        seq = int(body.split()[1])
        assert body == f"seq {seq:07d} {'x' * (seq % 50)}", body


def soak(make_agent: Any, tmp_path: Path, rounds: int, seed: int) -> None:
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    agent = make_agent(config(log))
    writer = RotatingWriter(log)
    writer.start()
    try:
        try:
            soak_rounds(agent, writer, rounds, random.Random(seed))
        finally:
            writer.stop()
        agent.start()
        wait_for(lambda: len(file_lines(agent.state_dir)) >= writer.seq, 60, what=f"{writer.seq} lines in the spool")
        agent.stop()
        check_exactly_once(agent.state_dir, writer.seq)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed}; agent log:\n{agent.stderr()[-4000:]})") from None


def soak_rounds(agent: Any, writer: RotatingWriter, rounds: int, rng: random.Random) -> None:
    """Start the agent, let it read, rotate (while it runs, while it is stopped, or not), SIGKILL it."""
    rotations = [writer.rotate_rename, writer.rotate_copytruncate]
    for round_ in range(rounds):
        agent.start()
        # Each generation must be seen by the agent once before it is rotated again.
        first = writer.current_first_line()
        if first:
            wait_for(
                lambda f=first: any(r["body"] == f for r in file_lines(agent.state_dir)),
                30,
                what=f"the agent to read {first!r}",
            )
        time.sleep(rng.uniform(0.05, 0.4))
        rotate = rotations[round_ % 2]
        when = rng.random()
        if when < 0.5:
            rotate()  # while the agent runs
            time.sleep(rng.uniform(0.0, 0.3))
            agent.kill()
        elif when < 0.8:
            agent.kill()
            rotate()  # while the agent is stopped
        else:
            agent.kill()  # no rotation this time


def test_rotation_under_sigkill_loses_and_repeats_nothing(make_agent: Any, tmp_path: Path) -> None:
    soak(make_agent, tmp_path, rounds=16, seed=4)


@pytest.mark.slow
def test_rotation_under_sigkill_soak(make_agent: Any, tmp_path: Path) -> None:
    soak(make_agent, tmp_path, rounds=80, seed=int(time.time()))


def test_agent_reads_odd_files_as_documented(make_agent: Any, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    (logs / "many").mkdir(parents=True)
    (logs / "data").mkdir()
    (logs / "empty.log").write_bytes(b"")
    (logs / "crlf.log").write_bytes(b"dos 1\r\ndos 2\r\n")
    (logs / "bad.log").write_bytes(b"bad \xff\xfe bytes\n")
    (logs / "long.log").write_bytes(b"L" * 3000 + b"\nshort\n")
    for i in range(1000):
        (logs / "many" / f"{i:04d}.log").write_bytes(f"many {i}\n".encode())
    (logs / "data" / "target.log").write_bytes(b"via symlink\n")
    (logs / "link.log").symlink_to(logs / "data" / "target.log")
    agent = make_agent(config(logs / "*.log", logs / "many" / "*.log"))
    agent.start()
    expected_count = 2 + 1 + 2 + 1000 + 1
    wait_for(lambda: len(file_lines(agent.state_dir)) >= expected_count, 60, what="every line")
    agent.kill()
    agent.start()  # a restart reads nothing again
    with open(logs / "empty.log", "ab") as f:
        f.write(b"no longer empty\n")
    wait_for(lambda: len(file_lines(agent.state_dir)) >= expected_count + 1, 30, what="the new line")
    agent.stop()
    records = file_lines(agent.state_dir)
    by_file = collections.defaultdict(list)
    for r in records:
        by_file[r["attributes"]["log.file.name"]].append(r)
    assert [r["body"] for r in by_file["crlf.log"]] == ["dos 1", "dos 2"]
    assert [r["body"] for r in by_file["bad.log"]] == ["bad \ufffd\ufffd bytes"]
    long_records = by_file["long.log"]
    assert [r["body"] for r in long_records] == ["L" * 1024, "short"]
    assert long_records[0]["attributes"]["edgeagent.line.truncated"] is True
    assert long_records[0]["attributes"]["edgeagent.line.original_bytes"] == 3000
    assert [r["body"] for r in by_file["empty.log"]] == ["no longer empty"]
    assert [r["body"] for r in by_file["link.log"]] == ["via symlink"]
    assert by_file["link.log"][0]["attributes"]["log.file.path"] == str(logs / "link.log")
    many = sorted(r["body"] for r in records if r["attributes"]["log.file.path"].startswith(str(logs / "many")))
    assert many == sorted(f"many {i}" for i in range(1000))
    assert len(records) == expected_count + 1

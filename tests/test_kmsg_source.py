"""The kmsg source in-process, with the real Spool, Batcher and SourceContext.

Most tests read the real /dev/kmsg (as root, with kernel.printk_devkmsg = on so
the kernel keeps every line the test writes). The real ring buffer holds other
messages, so every test writes lines with its own random marker and looks
only at those. A stand-in device is used only for what the kernel cannot be
made to do on demand: a malformed record, a read error, an exact sequence
layout for gap arithmetic.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import KMSG, write_kmsg

from edgeagent import clock
from edgeagent.clock import ClockState
from edgeagent.config import Config, KmsgConfig, SpoolConfig
from edgeagent.otlp import ChunkEncoder, decode_request
from edgeagent.pipeline import Batcher, SourceContext, UploaderContext
from edgeagent.sources.kmsg import PREVIOUS_BOOT_KEY, KmsgSource, sequence_of
from edgeagent.spool import Spool

needs_kmsg = pytest.mark.skipif(os.geteuid() != 0 or not KMSG.exists(), reason="needs root and the real /dev/kmsg")


def newest_sequence() -> int:
    """The sequence of the newest record in the ring buffer now."""
    fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.lseek(fd, 0, os.SEEK_END)
        write_kmsg(7, f"edgeagent-test-probe {uuid.uuid4().hex}")
        return sequence_of(os.read(fd, 16384))
    finally:
        os.close(fd)


def oldest_sequence() -> int:
    fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return sequence_of(os.read(fd, 16384))
    finally:
        os.close(fd)


def overflow_ring_buffer() -> tuple[int, int]:
    """Write until every record now in the ring buffer is overwritten.
    Returns (newest sequence before, oldest sequence after)."""
    before = newest_sequence()
    filler = "edgeagent-test-overflow " + "x" * 900
    while oldest_sequence() <= before:
        for _ in range(64):
            write_kmsg(7, filler)
    return before, oldest_sequence()


class Harness:
    """A real spool, batcher and source context in `state_dir`."""

    def __init__(
        self,
        state_dir: Path,
        boot_id: str,
        kmsg: KmsgConfig | None = None,
        clock_: clock.Clock | None = None,
    ) -> None:
        self.config = Config(state_dir=state_dir, kmsg=kmsg or KmsgConfig(min_priority=7), spool=SpoolConfig())
        self.spool = Spool.open(self.config.spool_path)
        self.batcher = Batcher(
            self.spool, ChunkEncoder({"device.id": "test"}, "test"), boot_id, self.config.spool, clock_
        )
        self.ctx = SourceContext(self.batcher, self.spool, boot_id, self.config)

    def records(self, marker: str | None = None) -> list[dict[str, Any]]:
        dctx = zstandard.ZstdDecompressor()
        out = []
        for chunk in self.spool.oldest(10**6):
            for record in decode_request(dctx.decompress(chunk.payload)):
                if marker is None or marker in str(record.get("body")):
                    out.append(record)
        return out

    def position(self) -> str | None:
        return self.spool.positions("kmsg").get("kmsg")

    def close(self) -> None:
        self.spool.close()


async def run_until(source: KmsgSource, ctx: SourceContext, done: Callable[[], bool], timeout: float = 20.0) -> None:
    """Run the source until `done()` holds, then stop it as the agent does:
    cancel it, then commit what the batcher holds."""
    task = asyncio.create_task(source.run(ctx))
    try:
        async with asyncio.timeout(timeout):
            while not done():
                if task.done():
                    task.result()
                    raise AssertionError("the source stopped by itself")
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ctx._batcher.flush()


def read_past(seq: int, source: KmsgSource) -> Callable[[], bool]:
    return lambda: source.status()["next_sequence"] > seq


def marker() -> str:
    return f"edgeagent-test-{uuid.uuid4().hex}"


# --- the real device -------------------------------------------------------------


@needs_kmsg
def test_reads_every_level_once_with_mapped_severity(devkmsg: None, tmp_path: Path) -> None:
    mark = marker()
    for level in range(8):
        write_kmsg(level, f"{mark} level {level}")
    last = newest_sequence()
    h = Harness(tmp_path, clock.boot_id())
    source = KmsgSource(h.config)
    asyncio.run(run_until(source, h.ctx, read_past(last, source)))
    got = {r["attributes"]["kmsg.level"]: r for r in h.records(mark)}
    assert sorted(got) == list(range(8))
    expected = {0: 21, 1: 21, 2: 21, 3: 17, 4: 13, 5: 10, 6: 9, 7: 5}
    for level, record in got.items():
        assert record["severity_number"] == expected[level]
        assert record["severity_text"]
        assert record["attributes"]["kmsg.facility"] == "user"
        assert record["attributes"]["boot.id"] == clock.boot_id()
        assert record["time_unix_nano"] > 0
    assert len(h.records(mark)) == 8
    boot, _, next_seq = h.position().rpartition(":")
    assert boot == clock.boot_id() and int(next_seq) > last
    assert source.status()["state"] == "stopped" and source.status()["error"] is None
    h.close()


@needs_kmsg
def test_restart_on_the_same_boot_resumes_without_duplicates(devkmsg: None, tmp_path: Path) -> None:
    mark = marker()
    write_kmsg(6, f"{mark} before the first run")
    h = Harness(tmp_path, clock.boot_id())
    first = KmsgSource(h.config)
    asyncio.run(run_until(first, h.ctx, read_past(newest_sequence(), first)))
    write_kmsg(6, f"{mark} while stopped")
    second = KmsgSource(h.config)
    asyncio.run(run_until(second, h.ctx, read_past(newest_sequence(), second)))
    bodies = [r["body"] for r in h.records(mark)]
    assert bodies == [f"{mark} before the first run", f"{mark} while stopped"]
    assert second.status()["skipped_stored"] > 0
    h.close()


@needs_kmsg
def test_filtered_records_still_advance_the_position(devkmsg: None, tmp_path: Path) -> None:
    mark = marker()
    h = Harness(tmp_path, clock.boot_id(), KmsgConfig(min_priority=4))
    write_kmsg(4, f"{mark} warning")
    write_kmsg(6, f"{mark} info")
    info_seq = newest_sequence() - 1
    source = KmsgSource(h.config)
    asyncio.run(run_until(source, h.ctx, read_past(info_seq, source)))
    assert [r["body"] for r in h.records(mark)] == [f"{mark} warning"]
    assert int(h.position().rpartition(":")[2]) > info_seq
    assert source.status()["filtered"] > 0
    h.close()


@needs_kmsg
def test_a_new_boot_reads_the_whole_ring_buffer_again(devkmsg: None, tmp_path: Path) -> None:
    """A boot id change is simulated: the ring buffer of "boot B" is the same
    device, but every record in it must count as new."""
    mark = marker()
    write_kmsg(5, f"{mark} notice")
    last = newest_sequence()
    boot_a = Harness(tmp_path, "boot-a")
    source = KmsgSource(boot_a.config)
    asyncio.run(run_until(source, boot_a.ctx, read_past(last, source)))
    assert boot_a.position().startswith("boot-a:")
    boot_a.close()

    boot_b = Harness(tmp_path, "boot-b")
    source = KmsgSource(boot_b.config)
    asyncio.run(run_until(source, boot_b.ctx, read_past(last, source)))
    records = boot_b.records(mark)
    assert [r["attributes"]["boot.id"] for r in records] == ["boot-a", "boot-b"]
    assert source.status()["skipped_stored"] == 0
    assert boot_b.position().startswith("boot-b:")
    assert boot_b.spool.positions(PREVIOUS_BOOT_KEY) == {PREVIOUS_BOOT_KEY: "boot-a"}
    boot_b.close()


@needs_kmsg
def test_overwritten_while_reading_is_a_gap_record_from_a_real_epipe(devkmsg: None, tmp_path: Path) -> None:
    """The source cannot read while the event loop is blocked; filling the
    ring buffer meanwhile makes the kernel answer its next read with EPIPE."""
    h = Harness(tmp_path, clock.boot_id())
    source = KmsgSource(h.config)
    mark = marker()

    async def scenario() -> None:
        task = asyncio.create_task(source.run(h.ctx))
        last = newest_sequence()
        while source.status()["next_sequence"] <= last:
            await asyncio.sleep(0.02)
        overflow_ring_buffer()  # blocks the loop: the source cannot keep up
        write_kmsg(4, f"{mark} after the overflow")
        after = newest_sequence()
        while source.status()["next_sequence"] <= after:
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        h.batcher.flush()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    gaps = [r for r in h.records() if r["attributes"].get("edgeagent.loss.cause") == "read"]
    assert len(gaps) == 1
    gap = gaps[0]["attributes"]
    assert gaps[0]["severity_number"] == 13
    assert gap["edgeagent.loss.reason"] == "kmsg_overwritten"
    assert (
        gap["edgeagent.loss.records"] == gap["edgeagent.loss.last_sequence"] - gap["edgeagent.loss.first_sequence"] + 1
    )
    assert gap["boot.id"] == clock.boot_id()
    assert len(h.records(f"{mark} after the overflow")) == 1
    assert h.spool.counters()["kmsg_lost"] >= gap["edgeagent.loss.records"]
    h.close()


@needs_kmsg
def test_overwritten_while_stopped_is_a_gap_record(devkmsg: None, tmp_path: Path) -> None:
    h = Harness(tmp_path, clock.boot_id())
    first = KmsgSource(h.config)
    asyncio.run(run_until(first, h.ctx, read_past(newest_sequence(), first)))
    stored_next = int(h.position().rpartition(":")[2])
    _, oldest = overflow_ring_buffer()
    second = KmsgSource(h.config)
    asyncio.run(run_until(second, h.ctx, read_past(newest_sequence(), second)))
    gaps = [r for r in h.records() if r["attributes"].get("edgeagent.loss.cause") == "restart"]
    assert len(gaps) == 1
    gap = gaps[0]["attributes"]
    assert gap["edgeagent.loss.first_sequence"] == stored_next
    assert gap["edgeagent.loss.last_sequence"] >= oldest - 1
    assert "not running" in gaps[0]["body"]
    h.close()


# --- a stand-in device for what the kernel cannot be made to do ---------------------


class FakeDevice:
    """Replays a script of reads: bytes are records, exceptions are raised.
    An eventfd makes the loop wake as /dev/kmsg does when records wait."""

    def __init__(self, script: list[bytes | OSError]) -> None:
        self.script = collections.deque(script)
        self._fd = os.eventfd(1, os.EFD_NONBLOCK)
        self.closed = False

    def fileno(self) -> int:
        return self._fd

    def read(self) -> bytes:
        if not self.script:
            try:
                os.eventfd_read(self._fd)
            except BlockingIOError:
                pass
            raise BlockingIOError(errno.EAGAIN, "no record")
        item = self.script.popleft()
        if isinstance(item, OSError):
            raise item
        return item

    def close(self) -> None:
        os.close(self._fd)
        self.closed = True


def rec(seq: int, text: str | None = None, level: int = 6) -> bytes:
    return f"{level},{seq},{seq * 1000},-;{text or f'message {seq}'}\n".encode()


def fake_opener(*scripts: list[bytes | OSError]) -> tuple[Callable[[str], FakeDevice], list[FakeDevice]]:
    remaining = collections.deque(scripts)
    opened: list[FakeDevice] = []

    def open_device(path: str) -> FakeDevice:
        device = FakeDevice(remaining.popleft() if remaining else [])
        opened.append(device)
        return device

    return open_device, opened


def run_fake(h: Harness, opener: Callable[[str], FakeDevice], until_seq: int) -> KmsgSource:
    source = KmsgSource(h.config, opener)
    asyncio.run(run_until(source, h.ctx, read_past(until_seq, source)))
    return source


def bodies(h: Harness) -> list[str]:
    return [r["body"] for r in h.records()]


def test_epipe_gap_counts_the_missing_range(tmp_path: Path) -> None:
    h = Harness(tmp_path, "boot-x")
    opener, _ = fake_opener([rec(0), rec(1), BrokenPipeError(errno.EPIPE, "overwritten"), rec(5), rec(6)])
    source = run_fake(h, opener, 6)
    records = h.records()
    assert [r["body"] for r in records][:2] == ["message 0", "message 1"]
    gap = records[2]
    assert gap["severity_number"] == 13 and gap["severity_text"] == "WARN"
    assert gap["attributes"]["edgeagent.loss.first_sequence"] == 2
    assert gap["attributes"]["edgeagent.loss.last_sequence"] == 4
    assert gap["attributes"]["edgeagent.loss.records"] == 3
    assert gap["attributes"]["edgeagent.loss.cause"] == "read"
    assert gap["attributes"]["boot.id"] == "boot-x"
    assert "boot-x" in gap["body"] and "2..4" in gap["body"]
    assert [r["body"] for r in records][3:] == ["message 5", "message 6"]
    assert h.position() == "boot-x:7"
    assert h.spool.counters()["kmsg_lost"] == 3
    assert source.status()["gaps"] == 1 and source.status()["lost"] == 3
    h.close()


def test_resume_skips_stored_records_and_reports_a_gap_when_the_ring_wrapped(tmp_path: Path) -> None:
    h = Harness(tmp_path, "boot-x")
    run_fake(h, fake_opener([rec(0), rec(1), rec(2)])[0], 2)
    run_fake(h, fake_opener([rec(1), rec(2), rec(3)])[0], 3)  # same boot: 1 and 2 are stored already
    assert bodies(h) == ["message 0", "message 1", "message 2", "message 3"]
    run_fake(h, fake_opener([rec(9), rec(10)])[0], 10)  # 4..8 were overwritten while stopped
    records = h.records()
    gap = records[4]
    assert gap["attributes"]["edgeagent.loss.cause"] == "restart"
    assert (gap["attributes"]["edgeagent.loss.first_sequence"], gap["attributes"]["edgeagent.loss.last_sequence"]) == (
        4,
        8,
    )
    assert [r["body"] for r in records[5:]] == ["message 9", "message 10"]
    h.close()


def test_a_new_boot_whose_first_records_are_gone_reports_them(tmp_path: Path) -> None:
    h = Harness(tmp_path, "boot-y")
    run_fake(h, fake_opener([rec(100), rec(101)])[0], 101)
    gap = h.records()[0]
    assert gap["attributes"]["edgeagent.loss.cause"] == "start"
    assert gap["attributes"]["edgeagent.loss.records"] == 100
    assert bodies(h)[1:] == ["message 100", "message 101"]
    h.close()


def test_malformed_records_are_kept_counted_and_never_stop_the_reader(tmp_path: Path) -> None:
    h = Harness(tmp_path, "boot-x")
    source = run_fake(h, fake_opener([rec(0), b"complete garbage\n", b"6,zz,1,-;bad sequence\n", rec(1)])[0], 1)
    records = h.records()
    assert [r["body"] for r in records] == ["message 0", "complete garbage", "6,zz,1,-;bad sequence", "message 1"]
    assert "kmsg.malformed" in records[1]["attributes"]
    assert h.spool.counters()["kmsg_malformed"] == 2
    assert source.status()["malformed"] == 2
    h.close()


def test_read_errors_are_reported_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgeagent.sources.kmsg.RETRY_INITIAL", 0.05)
    h = Harness(tmp_path, "boot-x")
    opener, opened = fake_opener([rec(0), OSError(errno.EIO, "Input/output error")], [rec(0), rec(1)])
    source = KmsgSource(h.config, opener)
    seen_states: list[tuple[str, str | None]] = []

    def done() -> bool:
        seen_states.append((source.status()["state"], source.status()["error"]))
        return source.status()["next_sequence"] > 1

    asyncio.run(run_until(source, h.ctx, done))
    assert bodies(h) == ["message 0", "message 1"]
    assert len(opened) == 2 and opened[0].closed
    assert any(state == "error" and "Input/output error" in (error or "") for state, error in seen_states)
    assert source.status()["state"] == "stopped"
    h.close()


def test_a_missing_device_is_an_error_in_status_and_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgeagent.sources.kmsg.RETRY_INITIAL", 0.05)
    missing = tmp_path / "no-kmsg-here"
    h = Harness(tmp_path, "boot-x", KmsgConfig(path=str(missing), min_priority=7))
    source = KmsgSource(h.config)

    async def scenario() -> None:
        task = asyncio.create_task(source.run(h.ctx))
        while source.status()["state"] != "error":
            await asyncio.sleep(0.02)
        assert "does not exist" in source.status()["error"]
        assert str(missing) in source.status()["error"]
        if KMSG.exists() and os.geteuid() == 0:
            missing.symlink_to(KMSG)  # the device appears: the source recovers by itself
            while source.status()["state"] != "running":
                await asyncio.sleep(0.02)
            assert source.status()["error"] is None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 30))
    h.close()


@pytest.mark.parametrize("kind", ["regular file", "fifo"])
def test_a_path_that_is_not_the_kernel_log_is_an_error_not_a_busy_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr("edgeagent.sources.kmsg.RETRY_INITIAL", 0.05)
    path = tmp_path / "not-kmsg"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_text("6,1,1,-;looks like a record\n")
    h = Harness(tmp_path, "boot-x", KmsgConfig(path=str(path), min_priority=7))
    source = KmsgSource(h.config)

    async def scenario() -> None:
        task = asyncio.create_task(source.run(h.ctx))
        if kind == "fifo":
            while source.status()["state"] != "running":
                await asyncio.sleep(0.02)
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # a writer came and went: end of file
        while source.status()["state"] != "error":
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert str(path) in source.status()["error"]
    assert "CAP_SYSLOG" not in source.status()["error"]
    h.close()


@needs_kmsg
def test_permission_denied_names_cap_syslog_and_dmesg_restrict(tmp_path: Path) -> None:
    """The real error path: a process without CAP_SYSLOG while dmesg_restrict = 1."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop CAP_SYSLOG")
    restrict = Path("/proc/sys/kernel/dmesg_restrict")
    old = restrict.read_text().strip()
    restrict.write_text("1\n")
    script = f"""
import asyncio, json, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from edgeagent.config import Config
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher, SourceContext
from edgeagent.sources.kmsg import KmsgSource
from edgeagent.spool import Spool

async def main():
    config = Config(state_dir=Path({str(tmp_path)!r}) / "state")
    spool = Spool.open(config.spool_path)
    ctx = SourceContext(Batcher(spool, ChunkEncoder({{}}, "t"), "b", config.spool), spool, "b", config)
    source = KmsgSource(config)
    task = asyncio.create_task(source.run(ctx))
    while source.status()["state"] != "error":
        await asyncio.sleep(0.02)
    print(json.dumps(source.status()))
    task.cancel()

asyncio.run(asyncio.wait_for(main(), 20))
"""
    try:
        out = subprocess.run(
            ["setpriv", "--bounding-set", "-syslog", sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        restrict.write_text(old + "\n")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["state"] == "error"
    assert "CAP_SYSLOG" in status["error"] and "dmesg_restrict" in status["error"]


# --- time correction ------------------------------------------------------------------


class SettableClock(clock.Clock):
    """The wall clock of a device without an RTC: at 1970 until "NTP" sets it."""

    def __init__(self, state: ClockState) -> None:
        self.current = state

    def state(self) -> ClockState:
        return self.current


def test_records_read_before_ntp_upload_with_corrected_wall_times(tmp_path: Path) -> None:
    unsynced = ClockState(offset_ns=5 * 10**9, synced=False)  # the wall clock said 1970
    real_offset = 1_790_000_000 * 10**9
    fake_clock = SettableClock(unsynced)
    h = Harness(tmp_path, "boot-ntp", clock_=fake_clock)
    run_fake(h, fake_opener([rec(0), rec(1, level=3)])[0], 1)
    [chunk] = h.spool.oldest(10)
    assert not chunk.clock_synced
    before = list(decode_request(zstandard.ZstdDecompressor().decompress(chunk.payload)))
    assert before[1]["time_unix_nano"] == 1_000_000 + unsynced.offset_ns
    assert before[1]["attributes"]["edgeagent.clock"] == "unsynced"

    fake_clock.current = ClockState(offset_ns=real_offset, synced=True)  # NTP set the clock
    h.batcher.count({"test_tick": 1})
    h.batcher.flush()
    assert h.spool.boot_offset("boot-ntp") == (real_offset, True)

    payload = UploaderContext(h.spool, h.config).payload(h.spool.oldest(10)[0])
    after = list(decode_request(zstandard.ZstdDecompressor().decompress(payload)))
    assert [r["time_unix_nano"] for r in after] == [real_offset + 1, real_offset + 1_000_000]
    assert after[1]["attributes"]["edgeagent.clock"] == "adjusted"
    assert after[1]["severity_number"] == 17
    h.close()


def test_a_malformed_record_is_not_a_gap(tmp_path: Path) -> None:
    h = Harness(tmp_path, "boot-x")
    bad_time = b"6,1,zz,-;bad timestamp\n"  # its sequence number is readable: the next record follows it
    source = run_fake(h, fake_opener([rec(0), bad_time, rec(2), b"garbage\n", rec(4), b"garbage\n", rec(7)])[0], 7)
    records = h.records()
    assert [r["body"] for r in records][:6] == [
        "message 0",
        "6,1,zz,-;bad timestamp",
        "message 2",
        "garbage",
        "message 4",
        "garbage",
    ]
    # Sequence 3 was the first garbage record; of 5 and 6 one was the second, the other is lost.
    gap = records[6]["attributes"]
    assert (gap["edgeagent.loss.first_sequence"], gap["edgeagent.loss.last_sequence"]) == (5, 6)
    assert gap["edgeagent.loss.records"] == 1
    assert records[7]["body"] == "message 7"
    assert h.spool.counters()["kmsg_lost"] == 1 and h.spool.counters()["kmsg_malformed"] == 3
    assert source.status()["gaps"] == 1 and source.status()["lost"] == 1
    assert h.position() == "boot-x:8"
    h.close()

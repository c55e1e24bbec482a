"""A real full disk: a tiny tmpfs mounted for the test (root only)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import spool_records

from edgeagent.config import Config, SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher, SourceContext
from edgeagent.records import Batch
from edgeagent.spool import Spool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def lines(start: int, count: int) -> list[bytes]:
    # Incompressible enough that a few hundred KiB of chunks fill the disk.
    return [b"%d %s" % (n, os.urandom(40).hex().encode()) for n in range(start, start + count)]


def test_disk_full_below_the_cap_evicts_and_counts(small_disk: Path) -> None:
    """The spool cap (64 MiB) is far above the disk (3 MiB): when the disk
    fills, the spool evicts inside its own file instead of failing."""
    spool = Spool.open(small_disk / "spool.db", max_size=64 * 1024 * 1024)
    batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", SpoolConfig(chunk_max_records=2000))
    n = 0
    for _ in range(40):
        batcher.add(Batch("files", lines(n, 2000), 0, "boot", position=("f", str(n + 2000))))
        n += 2000
    assert not batcher.stalled, batcher.last_error
    counters = spool.counters()
    assert counters.get("evicted_records", 0) > 0
    assert spool.positions()["f"] == str(n)
    # What is left is the newest data, intact, and the loss is on record.
    bodies = [r["body"] for r in spool_records(small_disk)]
    numbers = [int(b.split()[0]) for b in bodies if b[0].isdigit()]
    assert numbers == list(range(n - len(numbers), n))
    assert any("spool full" in b for b in bodies)


def test_commit_failure_pauses_sources_and_loses_nothing(small_disk: Path) -> None:
    """With no chunk to evict and no space (another file ate the disk), commits
    fail: records stay pending, the source is paused, and once space is back
    everything is committed with its position."""
    spool = Spool.open(small_disk / "spool.db", max_size=64 * 1024 * 1024)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    config = SpoolConfig(chunk_max_records=500, flush_interval=0.05)

    async def scenario() -> tuple[bool, int]:
        batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", config)
        ctx = SourceContext(batcher, spool, "boot", Config())
        emitted = 0

        async def source() -> None:
            nonlocal emitted
            for block in range(10):
                await ctx.emit(
                    Batch("files", lines(block * 500, 500), 0, "boot", position=("f", str((block + 1) * 500)))
                )
                emitted += 1

        task = asyncio.create_task(source())
        await asyncio.sleep(0.5)
        paused = not task.done() and batcher.stalled
        at_pause = emitted
        filler.unlink()
        await asyncio.wait_for(task, 30)
        batcher.flush()
        return paused, at_pause

    paused, at_pause = asyncio.run(scenario())
    assert paused, "the source must wait while the spool cannot commit"
    assert at_pause <= 2
    assert spool.positions()["f"] == "5000"
    numbers = [int(r["body"].split()[0]) for r in spool_records(small_disk)]
    assert numbers == list(range(5000))

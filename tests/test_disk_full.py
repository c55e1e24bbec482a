"""A real full disk: a tiny tmpfs mounted for the test (root only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from conftest import spool_records, until
from disk import fill, remount, tmpfs

from edgeagent.config import Config, SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher, SourceContext
from edgeagent.records import Batch
from edgeagent.spool import NewChunk, Spool, SpoolUnavailable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "3m") as mount:
        yield mount


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
    filler = fill(small_disk)
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


def _store_lines(path: Path, count: int) -> None:
    spool = Spool.open(path)
    batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", SpoolConfig(chunk_max_records=100))
    batcher.add(Batch("files", lines(0, count), 0, "boot", position=("f", str(count))))
    assert batcher.flush()
    spool.close()


def _contents(directory: Path) -> dict[str, bytes]:
    """The files that hold data (SQLite may leave an empty -wal and a -shm index behind)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.name != "filler" and not (p.name.endswith(("-wal", "-shm")) and p.stat().st_size <= 32768)
    }


@pytest.mark.parametrize("trouble", ["disk full", "read-only"])
def test_an_unavailable_spool_is_waited_out_never_quarantined(small_disk: Path, trouble: str) -> None:
    """Issue 9, degraded storage 1: disk full or read-only at start-up is not
    corruption: open says "unavailable", leaves every file as it was, and
    works once the disk does."""
    path = small_disk / "spool.db"
    _store_lines(path, 500)
    Path(str(path) + ".reserve").unlink(missing_ok=True)  # as a spool of an older version: no reserve to use
    before = _contents(small_disk)
    if trouble == "disk full":
        fill(small_disk)
    else:
        remount(small_disk, "ro")
    for _ in range(2):
        with pytest.raises(SpoolUnavailable, match="unavailable"):
            Spool.open(path)
    assert _contents(small_disk) == before, "an unavailable spool must be left exactly as it was"
    if trouble == "disk full":
        (small_disk / "filler").unlink()
    else:
        remount(small_disk, "rw")
    spool = Spool.open(path)
    assert not spool.events and not spool.counters().get("spool_quarantined")
    assert spool.backlog()["records"] == 500 and spool.positions() == {"f": "500"}


def test_ack_and_reject_on_a_full_disk_are_recorded_or_retried(small_disk: Path) -> None:
    """Issue 9, degraded storage 5: deleting works on a full disk (the reserve
    is released for it); when even that is not enough the outcome is kept,
    the chunks are not handed out again, and it is written once space is back."""
    spool = Spool.open(small_disk / "spool.db")
    for n in range(8):
        spool.append([_chunk(n)])
    spool.checkpoint()  # an empty WAL: every write now needs new blocks
    fill(small_disk)
    first = spool.oldest(8)
    assert spool.ack([first[0].id, first[1].id]) == 2  # raised "database or disk is full" before
    assert spool.reject([first[2].id], "refused") == 1
    fill(small_disk, "filler2")  # the released reserve is taken too
    assert spool.ack([first[3].id]) == 1
    assert spool.reject([first[4].id], "refused") == 1
    spool.add_counters({"rejected_records": 5})  # a partial success reported meanwhile: kept, not raised
    handed = [c.id for c in spool.oldest(8)]
    assert handed == [c.id for c in first[5:]], "recorded or pending outcomes are never sent again"
    (small_disk / "filler").unlink()
    (small_disk / "filler2").unlink()
    spool.retry_unrecorded()
    spool.close()
    again = Spool.open(small_disk / "spool.db")
    assert [c.id for c in again.oldest(8)] == [c.id for c in first[5:]]
    assert again.dead_letter_count() == 2
    assert again.counters()["acked_chunks"] == 3
    assert again.counters()["rejected_records"] == 5


def test_the_reserve_released_on_a_disk_others_filled_is_not_room_to_evict_into(small_disk: Path) -> None:
    """Another program filled the disk; an ack released the reserve. Those 256 KiB are the spool's own, given
    back for deletions, not room the disk has: the next append must not evict to fit its budget into them
    (before, it evicted 4 of 14 chunks here; in the degraded-storage run a chunk of 5,577 lines, and the
    write failed anyway), nor after a restart (kill -9) while the disk is still full. The write fails and
    waits, or fits; nothing is dropped."""
    path = small_disk / "spool.db"
    spool = Spool.open(path)
    for n in range(15):
        spool.append([_chunk(n)])
    spool.checkpoint()  # an empty WAL: the ack needs new blocks, which only the reserve has
    filler = fill(small_disk)
    first = spool.oldest(15)
    assert spool.ack([first[0].id]) == 1
    for attempt in range(2):
        with contextlib.suppress(sqlite3.OperationalError):  # disk full: the batcher keeps it and retries
            spool.append([_chunk(100 + attempt)])
        assert not spool.counters().get("evicted_chunks"), "evicted to make room another program took"
        assert [c.id for c in spool.oldest(15)][: len(first) - 1] == [c.id for c in first[1:]]
        spool.close()
        spool = Spool.open(path)  # as after a kill -9: the disk is still full
    filler.unlink()
    spool.append([_chunk(200)])
    assert [c.id for c in spool.oldest(20)][:14] == [c.id for c in first[1:]]
    assert not spool.counters().get("evicted_chunks")
    spool.close()


def test_an_eviction_is_part_of_the_write_it_makes_room_for(small_disk: Path) -> None:
    """Another program leaves 100 KiB free (above the 64 KiB that stops evictions): the spool evicts to fit
    a 300 KiB chunk into its budget, but the write fails anyway (its WAL needs more than the disk has).
    The eviction goes back with it: before, 8 of 15 chunks were deleted in a transaction of their own and
    the write failed after it, so they were dropped for nothing and no loss record was shipped."""
    spool = Spool.open(small_disk / "spool.db")
    for n in range(15):
        spool.append([_chunk(n)])
    spool.checkpoint()
    filler = fill(small_disk)
    os.truncate(filler, filler.stat().st_size - 100 * 1024)
    before = [c.id for c in spool.oldest(20)]
    big = _chunk(99, 300_000)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        spool.append([big])
    assert not spool.counters().get("evicted_chunks"), "nothing may be dropped by a write that failed"
    assert [c.id for c in spool.oldest(20)] == before
    filler.unlink()
    assert spool.append([big]) == []  # room again: stored, nothing evicted
    assert [c.id for c in spool.oldest(20)][:15] == before
    spool.close()


def _chunk(n: int, size: int = 100_000) -> NewChunk:
    payload = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(size))
    return NewChunk(payload, 10, size, 9, "boot", 0, True)


def test_a_stall_neither_crashes_sources_nor_makes_them_read_twice(small_disk: Path) -> None:
    """Issue 9, degraded storage 3 and 4: while commits fail, the context says
    "not accepting", forgetting a position does not raise, and a restarted
    source resumes after what it handed over (the pending position), not at
    the stale committed one."""
    spool = Spool.open(small_disk / "spool.db")
    spool.append([], {"f": "0", "gone": "7"})
    spool.checkpoint()
    fill(small_disk)

    async def scenario() -> None:
        batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", SpoolConfig(chunk_max_records=1000))
        ctx = SourceContext(batcher, spool, "boot", Config())
        ctx.emit_nowait(Batch("files", lines(0, 300), 0, "boot", position=("f", "300")))
        assert not batcher.flush()
        assert not ctx.accepting
        ctx.forget_positions(["gone"])  # raised from _flush_forgets before: the source crashed
        assert ctx.positions("") == {"f": "300"}, "a restarted source must resume after what it handed over"
        assert spool.positions() == {"f": "0", "gone": "7"}, "nothing is committed without its records"
        (small_disk / "filler").unlink()
        await asyncio.wait_for(ctx.wait_writable(), 30)
        assert ctx.accepting

    asyncio.run(scenario())
    assert spool.positions() == {"f": "300"}
    numbers = [int(r["body"].split()[0]) for r in spool_records(small_disk)]
    assert numbers == list(range(300))


def test_the_kernel_log_source_stops_reading_while_the_spool_cannot_commit(small_disk: Path, devkmsg: None) -> None:
    """Issue 9, degraded storage 3, for the reader-callback source: while the
    spool cannot commit, /dev/kmsg is not read (its position stays), and every
    record written meanwhile is read once space is back."""
    from conftest import write_kmsg

    from edgeagent.config import KmsgConfig
    from edgeagent.sources.kmsg import KmsgSource

    config = Config(state_dir=small_disk, kmsg=KmsgConfig(min_priority=7), spool=SpoolConfig(flush_interval=0.05))
    spool = Spool.open(config.spool_path)
    tag = f"edgeagent-stall-{os.getpid()}-{os.urandom(4).hex()}"

    async def scenario() -> tuple[int, int]:
        batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", config.spool)
        ctx = SourceContext(batcher, spool, "boot", config)
        source = KmsgSource(config)
        task = asyncio.create_task(source.run(ctx))
        await until(lambda: spool.positions().get("kmsg"), "the ring buffer read")
        fill(small_disk)
        write_kmsg(6, f"{tag} 0")
        await until(lambda: batcher.stalled, "the stall")
        paused_at = source.status()["next_sequence"]
        for n in range(1, 200):
            write_kmsg(6, f"{tag} {n}")
        await asyncio.sleep(0.5)
        read_while_stalled = source.status()["next_sequence"] - paused_at
        (small_disk / "filler").unlink()
        await until(lambda: sum(tag in r["body"] for r in spool_records(small_disk)) >= 200, "the records after")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return read_while_stalled, batcher.pending_records

    read_while_stalled, _ = asyncio.run(scenario())
    assert read_while_stalled == 0, "nothing may be read while the spool cannot commit"
    bodies = [r["body"] for r in spool_records(small_disk) if tag in r["body"]]
    assert sorted(int(b.split()[-1]) for b in bodies) == list(range(200)), "each record exactly once"

"""The spool's RAM tier and its policy (issue 16): what waits in RAM for its
acknowledgement, what reaches the file, and that a position is never stored
ahead of records that are neither delivered nor stored. Real SQLite files; what
is on disk is read with a separate connection."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from conftest import Broker, spool_records, until, wait_for
from mqtt_helpers import Subscriber, line_numbers
from test_mqtt_agent import publishing_to_a_stopped_broker

from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher
from edgeagent.records import SEVERITY_FATAL, SEVERITY_INFO, Batch, Record
from edgeagent.spool import Spool

KEY = "file:1:2:abc"


def on_disk(db: Path) -> tuple[list[int], dict[str, str], dict[str, int]]:
    """Chunk ids, positions and counters in the file (what a crash right now would find)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        ids = [r[0] for r in conn.execute("SELECT id FROM chunks ORDER BY id")]
        positions = dict(conn.execute("SELECT key, value FROM positions").fetchall())
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    finally:
        conn.close()
    return ids, positions, counters


def file_lines(tmp_path: Path, n: int, offset: int, first: int = 0) -> Batch:
    records = [f"line {first + i}".encode() for i in range(n)]
    attrs = {"log.file.path": str(tmp_path / "app.log")}
    return Batch("files", records, 0, "boot", attrs, (KEY, str(offset)))  # type: ignore[arg-type]


def kernel(text: str, severity: int = SEVERITY_INFO, seq: int = 1) -> Batch:
    return Batch("kmsg", [Record(text, severity, "INFO")], 0, "boot", {}, ("kmsg", f"boot:{seq}"))


def batcher(spool: Spool, **config: object) -> Batcher:
    """A batcher with an uploader attached (on_commit), past its first commit (which records the boot's clock)."""
    woken: list[int] = []
    b = Batcher(spool, ChunkEncoder({}, "t"), "boot", SpoolConfig(**config), on_commit=lambda: woken.append(1))  # type: ignore[arg-type]
    b.count({"test_started": 1})
    assert b.flush()
    return b


def test_file_lines_acknowledged_from_ram_never_reach_the_file(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    spool = Spool.open(db)
    b = batcher(spool)
    b.add(file_lines(tmp_path, 5, 350))
    assert b.flush()
    [held] = spool.oldest(10)
    assert spool.chunk_count == 1 and held.records == 5
    assert on_disk(db)[:2] == ([], {})  # neither the lines nor their position
    assert spool.ack([held.id]) == 1
    assert spool.chunk_count == 0
    assert on_disk(db)[:2] == ([], {})  # the position waits for the next write
    spool.commit_released()
    ids, positions, counters = on_disk(db)
    assert ids == [] and positions == {KEY: "350"}
    assert counters["acked_from_ram_records"] == counters["acked_records"] == counters["spooled_records"] == 5
    assert Spool.open(db).positions() == {KEY: "350"}  # a restart resumes after the delivered lines


def test_a_position_waits_for_every_chunk_held_before_it(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool.db")
    b = batcher(spool)
    b.add(file_lines(tmp_path, 2, 100))
    b.flush()
    b.add(file_lines(tmp_path, 2, 200, first=2))
    b.flush()
    first, second = spool.oldest(10)
    assert first.id < second.id
    spool.ack([second.id])  # out of order: the first is still only in RAM
    spool.commit_released()
    assert on_disk(tmp_path / "spool.db")[1] == {}
    assert spool.oldest(10) == [first]
    spool.ack([first.id])
    spool.commit_released()
    assert on_disk(tmp_path / "spool.db")[1] == {KEY: "200"}


def test_unacknowledged_chunks_are_written_with_their_ids_and_positions_when_their_time_is_up(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"

    async def scenario() -> None:
        spool = Spool.open(db)
        b = batcher(spool, hold_file_lines=0.2)
        b.add(file_lines(tmp_path, 3, 90))
        b.flush()
        [held] = spool.oldest(10)
        await until(lambda: on_disk(db)[0], "the held chunk written after hold_file_lines")
        assert on_disk(db)[:2] == ([held.id], {KEY: "90"})
        assert spool.held.count == 0 and spool.oldest(10)[0].chunk_id == held.chunk_id
        assert spool.ack([held.id]) == 1  # an acknowledgement that comes late finds it in the file
        assert on_disk(db)[0] == []

    asyncio.run(scenario())


def test_kernel_records_are_due_on_flash_within_flush_interval_of_being_read(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"

    async def scenario() -> None:
        spool = Spool.open(db)
        b = batcher(spool, flush_interval=0.4)
        b.add(kernel("usb 1-1: new device"))
        read_at = b._urgent_since
        assert read_at is not None
        await until(lambda: spool.held.entries, "the kernel record cut into a chunk and held")
        [entry] = spool.held.entries
        assert entry.durable and entry.deadline <= read_at + 0.4 + 1e-6
        await until(lambda: on_disk(db)[0], "the kernel record written at its deadline")
        assert on_disk(db)[1] == {"kmsg": "boot:1"}

    asyncio.run(scenario())


def test_what_must_be_on_flash_now_is_never_held(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    spool = Spool.open(db)
    b = batcher(spool)
    b.add(kernel("kernel panic imminent", SEVERITY_FATAL))
    b.flush()
    assert len(on_disk(db)[0]) == 1  # CRIT+ that no input keeps: written at once
    b.add(file_lines(tmp_path, 2, 50))
    b.flush()
    assert spool.held.count == 1
    b.forget([KEY])  # the file was let go (rotated away, deleted): its lines may be gone with it
    b.flush()
    ids, positions, _ = on_disk(db)
    assert len(ids) == 2 and KEY not in positions and spool.held.count == 0
    b.add(file_lines(tmp_path, 1, 60))
    b.count({"files_truncated_lines": 1})  # a loss is counted: the commit is written
    b.flush()
    assert len(on_disk(db)[0]) == 3


def test_file_lines_are_committed_as_they_are_with_hold_file_lines_0(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    spool = Spool.open(db)
    b = batcher(spool, hold_file_lines=0)
    b.add(file_lines(tmp_path, 3, 30))
    b.flush()
    assert spool.held.entries == [] and on_disk(db)[1] == {KEY: "30"} and len(on_disk(db)[0]) == 1


def test_stopping_writes_everything_held(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"

    async def scenario() -> None:
        spool = Spool.open(db)
        b = batcher(spool)
        b.add(file_lines(tmp_path, 4, 400))
        b.flush()
        b.add(file_lines(tmp_path, 1, 500, first=4))  # still pending in the batcher
        assert await b.drain(5)
        assert spool.held.count == 0
        ids, positions, _ = on_disk(db)
        assert len(ids) == 2 and positions == {KEY: "500"}

    asyncio.run(scenario())


def test_lines_of_a_file_in_ram_are_not_held_longer_than_kernel_messages(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool.db")
    b = batcher(spool)
    shm = Path("/dev/shm")
    batch = file_lines(shm, 1, 10) if shm.is_dir() else file_lines(tmp_path, 1, 10)
    assert b._hold.replayable(file_lines(tmp_path, 1, 10))
    if shm.is_dir():
        assert not b._hold.replayable(batch)  # tmpfs: a power cut takes the file's lines with it
    assert not batcher(spool, hold_file_lines=0)._hold.replayable(file_lines(tmp_path, 1, 10))


def test_held_and_stored_chunks_share_one_id_sequence(tmp_path: Path) -> None:
    db = tmp_path / "spool.db"
    spool = Spool.open(db)
    b = batcher(spool)
    b.add(kernel("stored", SEVERITY_FATAL))
    b.flush()
    b.add(file_lines(tmp_path, 1, 10))
    b.flush()
    stored, held = spool.oldest(10)
    assert held.id > stored.id and spool.oldest(10, after_id=stored.id) == [held]
    spool.split(stored, [(stored.payload, 1)])  # needs the file: what is held is written first, ids kept
    ids = on_disk(db)[0]
    assert held.id in ids and max(ids) > held.id and stored.id not in ids
    spool.close()
    again = Spool.open(db)
    assert again.oldest(10)[-1].id == max(ids)
    again.append([])
    b2 = batcher(again)
    b2.add(file_lines(tmp_path, 1, 20))
    b2.flush()
    assert again.oldest(10)[-1].id > max(ids)  # never an id used before, also after a restart


def test_sigkill_while_lines_wait_in_ram_sends_them_again_under_the_same_chunk_id(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    """Lines held in RAM, published, not acknowledged (the broker is stopped),
    then SIGKILL: nothing of them is on flash, their position is not stored,
    so the restarted agent reads them again from the file and sends them under
    the same chunk id (derived from the source positions): a receiver drops
    the copy the broker may still deliver from before the kill."""
    with publishing_to_a_stopped_broker(tmp_path, mosquitto, make_agent, subscribers) as (agent, logs):
        assert spool_records(agent.state_dir) == []  # held in RAM, not written
        stored = Spool.open_readonly(agent.state_dir / "spool.db")
        assert stored is not None and not any(k.startswith("file:") for k in stored.positions())
        agent.kill()
    agent.start()
    wait_for(lambda: {n for ns in line_numbers(logs.received()) for n in ns} == set(range(500)), 30, what="lines")
    delivered = logs.received()
    assert len({m.user_properties["chunk-id"] for m in delivered}) == 1  # one chunk id, however many copies
    assert agent.stop() == 0
    assert spool_records(agent.state_dir) == []

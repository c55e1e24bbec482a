"""The spool's RAM tier and its policy (issue 16): what waits in RAM for its
acknowledgement, what reaches the file, and that a position is never stored
ahead of records that are neither delivered nor stored. Real SQLite files; what
is on disk is read with a separate connection."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import Broker, spool_records, until, wait_for
from mqtt_helpers import Subscriber, line_numbers
from test_mqtt_agent import publishing_to_a_stopped_broker

from edgeagent import holding
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


def test_stopping_writes_the_positions_of_what_was_delivered_from_ram(tmp_path: Path) -> None:
    """Nothing held any more, nothing pending: the positions (and counters) of the chunks acknowledged
    from RAM are all a stop has left to write. Before, a stop wrote nothing then, and the next start sent
    those lines again (seen on every restart for TLS, which comes right after a reload)."""
    db = tmp_path / "spool.db"

    async def scenario() -> None:
        spool = Spool.open(db)
        b = batcher(spool)
        b.add(file_lines(tmp_path, 4, 400))
        assert b.flush()
        [held] = spool.oldest(10)
        spool.ack([held.id])
        assert spool.held.entries == [] and on_disk(db)[1] == {}
        assert await b.drain(5)
        ids, positions, counters = on_disk(db)
        assert ids == [] and positions == {KEY: "400"}
        assert counters["acked_from_ram_records"] == counters["acked_records"] == 4
        spool.close()
        assert Spool.open(db).positions() == {KEY: "400"}  # the next start resumes after the delivered lines

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


# --- full chunks of file lines (issue 15): delivered from RAM while delivery keeps up ----------------


def big_lines(tmp_path: Path, n: int, offset: int, first: int = 0) -> Batch:
    """`n` lines of 2,000 incompressible-ish bytes: a few make a full chunk and a full RAM hold."""
    records = [f"line {first + i} ".encode() + os.urandom(1000).hex().encode() for i in range(n)]
    attrs = {"log.file.path": str(tmp_path / "app.log")}
    return Batch("files", records, 0, "boot", attrs, (KEY, str(offset)))  # type: ignore[arg-type]


def test_full_chunks_of_file_lines_acknowledged_in_time_never_reach_the_file(tmp_path: Path) -> None:
    """The bulk path (a backlog read at full speed): each full chunk is compressed behind, then held, and
    the uploader's acknowledgements keep RAM from filling up; only the positions are written."""
    db = tmp_path / "spool.db"

    async def scenario() -> None:
        spool = Spool.open(db)
        b = batcher(spool, chunk_max_records=50)
        at_start = on_disk(db)[0]
        for i in range(20):
            b.add(big_lines(tmp_path, 50, 1000 * (i + 1), first=50 * i))  # a full chunk each
            await until(lambda: spool.held.count or not b.pending_records, "the chunk compressed behind")
            await asyncio.sleep(0)
            assert spool.ack([c.id for c in spool.oldest(10)]) >= 1  # the uploader's round trip
        assert b.flush()
        spool.ack([c.id for c in spool.oldest(10)])
        spool.commit_released()
        ids, positions, counters = on_disk(db)
        assert ids == at_start == []
        assert positions == {KEY: "20000"}
        assert counters["acked_from_ram_records"] == 1000

    asyncio.run(scenario())


def test_file_sources_pause_while_ram_is_full_of_chunks_on_their_way_and_resume_on_acknowledgement(
    tmp_path: Path,
) -> None:
    """Only file sources wait for room (their files keep what is not read yet): `accepting`, which syslog and
    kmsg read, stays True — a syslog socket drops what arrives while it is False."""

    async def scenario() -> None:
        spool = Spool.open(tmp_path / "spool.db")
        b = batcher(spool, chunk_max_records=50)
        waiter = None
        for i in range(20):  # chunks of ~50 KB compressed, until more than HOLD_PAUSE_BYTES are held
            b.add(big_lines(tmp_path, 50, i + 1, first=50 * i))
            await until(lambda: not b.pending_records, "compressed behind and held")
            waiter = asyncio.ensure_future(b.wait_ram_room())
            await asyncio.sleep(0)
            if not waiter.done():
                break
            sent = spool.oldest(10)  # handed to the uploader: in flight
        assert waiter is not None and not waiter.done()
        assert spool.held.payload_bytes > holding.HOLD_PAUSE_BYTES
        assert b.accepting  # syslog and kmsg read on
        await asyncio.sleep(0.05)
        assert not waiter.done()
        spool.ack([c.id for c in sent])  # the receiver caught up
        await asyncio.wait_for(waiter, 1)
        assert on_disk(tmp_path / "spool.db")[0] == []

    asyncio.run(scenario())


def test_an_uploader_still_connecting_at_start_gets_the_pause_before_a_bulk_read_goes_to_flash(
    tmp_path: Path,
) -> None:
    """Reading a file is faster than connecting: right after the spool opens, nothing is in flight yet and no
    acknowledgement came, but the file sources still pause (at most PAUSE_MAX) once half the RAM tier is full,
    as if an acknowledgement had just come, instead of writing the rest of the read to flash."""

    async def scenario() -> None:
        opened = time.monotonic()
        spool = Spool.open(tmp_path / "spool.db")
        b = batcher(spool, chunk_max_records=200)
        waiter = None
        for i in range(10):  # chunks of ~200 KB compressed, none handed to an uploader
            b.add(big_lines(tmp_path, 200, i + 1, first=200 * i))
            await until(lambda: not b.pending_records, "compressed behind and held")
            waiter = asyncio.ensure_future(b.wait_ram_room())
            await asyncio.sleep(0)
            if spool.held.payload_bytes > holding.HOLD_PAUSE_BYTES:
                break
        assert waiter is not None and spool.held.payload_bytes > holding.HOLD_PAUSE_BYTES
        if time.monotonic() - opened < holding.PAUSE_MAX / 2:  # (a very slow machine is past the grace)
            assert not waiter.done()
        await asyncio.wait_for(waiter, holding.PAUSE_MAX + 1)  # never acknowledged: reading goes on
        assert on_disk(tmp_path / "spool.db")[0] == []

    asyncio.run(scenario())


def test_a_link_that_does_not_acknowledge_in_time_gets_the_chunks_written(tmp_path: Path) -> None:
    """A stalled broker: the pause ends after PAUSE_MAX, reading goes on, and what does not fit in RAM is
    written (synced) with everything held, under the ids the uploader already used."""
    db = tmp_path / "spool.db"

    async def scenario() -> None:
        spool = Spool.open(db)
        b = batcher(spool, chunk_max_records=50)
        sent: list[int] = []
        for i in range(30):
            await asyncio.wait_for(b.wait_ram_room(), holding.PAUSE_MAX + 1)
            b.add(big_lines(tmp_path, 50, i + 1, first=50 * i))
            await until(lambda: not b.pending_records, "compressed behind")
            sent += [c.id for c in spool.oldest(100, max(sent, default=0))]  # sent, never acknowledged
        assert b.flush()
        written = on_disk(db)[0]
        assert written and set(written) <= set(sent)
        assert spool.held.payload_bytes <= holding.HOLD_MAX_BYTES
        b.flush(store=True)
        assert on_disk(db)[0] == sorted(sent)  # nothing read was lost, every id kept
        assert on_disk(db)[1] == {KEY: "30"}

    asyncio.run(scenario())


def test_positions_of_lines_delivered_from_ram_are_written_every_few_mib_not_only_every_30_s(
    tmp_path: Path,
) -> None:
    """After a crash the agent reads again from the last stored position: at full speed 30 s of lines would
    be millions; RELEASED_POSITIONS_BYTES bounds what is sent twice."""
    db = tmp_path / "spool.db"

    async def scenario() -> None:
        spool = Spool.open(db)
        b = batcher(spool, chunk_max_records=50)
        i = 0
        while not on_disk(db)[1] and i < 200:
            await asyncio.wait_for(b.wait_ram_room(), 2)
            b.add(big_lines(tmp_path, 50, i + 1, first=50 * i))
            await until(lambda: not b.pending_records, "compressed behind")
            spool.ack([c.id for c in spool.oldest(100)])
            await asyncio.sleep(0)
            i += 1
        delivered_bytes = i * 50 * 2000
        assert on_disk(db)[1], f"no position written after {delivered_bytes} bytes delivered from RAM"
        assert delivered_bytes <= holding.RELEASED_POSITIONS_BYTES + 2 * 50 * 2010
        assert on_disk(db)[0] == []

    asyncio.run(scenario())


def test_sigkill_while_a_backlog_is_delivered_from_ram_loses_nothing_and_resends_only_after_the_stored_position(
    tmp_path: Path, mosquitto: Broker, make_agent: Any, subscribers: list[Subscriber]
) -> None:
    """A 12 MB file read at full speed and delivered from RAM (the bulk path), SIGKILL in the middle:
    every line arrives, and a line arrives twice only if it lies after the position stored at the kill
    (written every RELEASED_POSITIONS_BYTES of delivered text, so that window is bounded) or was in a chunk
    in the spool at the kill (sent, its acknowledgement not recorded yet: guarantee 2)."""
    from test_trickle_guarantees import LINE, LINE_BYTES, TOPIC, config, received_lines, stored_offset

    total = 700_000
    log_file = tmp_path / "app.log"
    log_file.write_bytes("".join(LINE.format(n) for n in range(total)).encode())
    sub = Subscriber(mosquitto.port, TOPIC)
    subscribers.append(sub)
    agent = make_agent(config(mosquitto.port, log_file))
    agent.start()
    wait_for(lambda: len(received_lines(sub)) >= total // 2, 60, what="half the lines delivered")
    agent.kill()
    first_unstored = stored_offset(agent.state_dir) // LINE_BYTES
    assert first_unstored > 0, "no position stored for a backlog delivered from RAM"
    explained = {n for n in received_lines(sub) if n >= first_unstored}
    explained |= {int(r["body"].split()[1]) for r in spool_records(agent.state_dir)}  # stored, maybe sent: again
    agent.start()
    wait_for(lambda: set(received_lines(sub)) == set(range(total)), 90, what="every line delivered")
    assert agent.stop() == 0
    counts = Counter(received_lines(sub))
    duplicated = {n for n, c in counts.items() if c > 1}
    assert duplicated <= explained, sorted(duplicated - explained)[:20]
    assert max(counts.values()) <= 2
    spool = Spool.open(agent.state_dir / "spool.db")
    assert spool.counters().get("acked_from_ram_chunks", 0) > 0  # the RAM path was taken
    spool.close()


def test_a_full_ram_tier_outside_an_event_loop_pauses_nothing_and_raises_nothing(tmp_path: Path) -> None:
    """Tools and tests drive the batcher without a loop: holding past HOLD_PAUSE_BYTES with chunks in flight
    must not need one (there is no reader to pause)."""
    spool = Spool.open(tmp_path / "spool.db")
    b = batcher(spool)
    for i in range(20):
        b.add(big_lines(tmp_path, 50, i + 1, first=50 * i))
        assert b.flush()
        spool.oldest(100)  # in flight
    assert spool.held.payload_bytes > holding.HOLD_PAUSE_BYTES or on_disk(tmp_path / "spool.db")[0]
    assert b.accepting

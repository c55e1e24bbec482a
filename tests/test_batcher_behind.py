"""The batcher compresses full chunks on a background thread (issue 15) and still commits every chunk with
exactly its positions, in order, with nothing lost when a commit fails; and cuts batches the same way as
before, without a Python step per record."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import spool_records
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher
from edgeagent.pipeline.batcher import _split_batch
from edgeagent.records import Batch, Record
from edgeagent.spool import Spool


def cut_record_by_record(records: list, max_records: int, max_bytes: int) -> list[list]:  # type: ignore[type-arg]
    """The cut as the batcher made it before: a part ends before the record that would overflow it."""
    parts: list[list] = [[]]  # type: ignore[type-arg]
    size = 0
    for record in records:
        n = len(record) if isinstance(record, bytes) else len(str(record.body).encode())
        if parts[-1] and (len(parts[-1]) >= max_records or size + n > max_bytes):
            parts.append([])
            size = 0
        parts[-1].append(record)
        size += n
    return parts


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=300), st.text(max_size=100).map(Record)), min_size=1, max_size=80),
    st.integers(1, 30),
    st.integers(1, 2000),
)
def test_split_cuts_where_a_record_by_record_cut_does(records: list, max_records: int, max_bytes: int) -> None:  # type: ignore[type-arg]
    parts = _split_batch(Batch("s", records, 1, "boot", {"k": "v"}), max_records, max_bytes)
    assert [p.records for p in parts] == cut_record_by_record(records, max_records, max_bytes)
    for part in parts:
        assert part.raw_bytes == Batch("s", part.records, 1, "boot").body_bytes()
        assert part.attributes == {"k": "v"}


def lines(n: int, tag: str) -> list[bytes]:
    return [f"{tag} {i} ".encode() + os.urandom(40).hex().encode() for i in range(n)]


def failing_once(append: Callable[..., object]) -> Callable[..., object]:
    """`append` that fails once first, as a full disk makes it fail."""
    failures: list[int] = []

    def append_failing_once(*args: object, **kwargs: object) -> object:
        if not failures:
            failures.append(1)
            raise OSError(28, "No space left on device")
        return append(*args, **kwargs)

    return append_failing_once


def test_a_full_chunk_is_committed_after_compressing_behind_with_its_positions(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool.db")
    config = SpoolConfig(chunk_max_records=500, chunk_max_bytes=1 << 20)

    async def scenario() -> None:
        batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", config)
        batcher.add(Batch("files", lines(700, "a"), 1, "boot", position=("file:a", "700")))
        # Handed over, being compressed: not lost from the batcher's view before it is committed.
        assert batcher.pending_positions() == {"file:a": "700"}
        assert batcher.pending_records == 700
        for _ in range(500):
            if spool.positions("file:") == {"file:a": "700"}:
                break
            await asyncio.sleep(0.01)
        # The full chunk (500 records) went behind; the rest (200) waits for the age flush.
        assert spool.positions("file:") == {"file:a": "700"}
        assert batcher.flush()
        assert batcher.pending_positions() == {} and batcher.pending_records == 0

    asyncio.run(scenario())
    spool.close()
    bodies = [r["body"] for r in spool_records(tmp_path)]
    assert [b.split(" ")[:2] for b in bodies] == [["a", str(i)] for i in range(700)]


def test_chunks_behind_and_after_commit_in_order_and_flush_waits_for_them(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool.db")
    config = SpoolConfig(chunk_max_records=300, chunk_max_bytes=1 << 20)

    async def scenario() -> None:
        batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", config)
        for i in range(10):  # each add fills a chunk: each waits for the oldest behind, then goes behind
            batcher.add(Batch("files", lines(300, f"b{i}"), 1, "boot", position=("file:b", str(i))))
        batcher.add(Batch("files", lines(10, "tail"), 1, "boot", position=("file:b", "tail")))
        assert batcher.flush()  # commits the one behind, then what is pending
        assert spool.positions("file:") == {"file:b": "tail"}

    asyncio.run(scenario())
    records = spool_records(tmp_path)
    spool.close()
    tags = [r["body"].split(" ")[0] for r in records]
    assert tags == [f"b{i}" for i in range(10) for _ in range(300)] + ["tail"] * 10


def test_a_failed_commit_of_a_chunk_behind_keeps_everything_pending(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool.db")
    config = SpoolConfig(chunk_max_records=100, chunk_max_bytes=1 << 20)

    async def scenario() -> None:
        batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", config)
        spool.append = failing_once(spool.append)  # type: ignore[method-assign,assignment]
        batcher.add(Batch("files", lines(100, "c"), 1, "boot", position=("file:c", "100")))
        for _ in range(500):
            if batcher.stalled:
                break
            await asyncio.sleep(0.01)
        assert batcher.stalled and not batcher.accepting
        assert batcher.pending_positions() == {"file:c": "100"} and batcher.pending_records == 100
        assert spool.positions("file:") == {}
        assert batcher.flush()  # the retry: re-encoded, committed with its position
        assert not batcher.stalled

    asyncio.run(scenario())
    assert spool.positions("file:") == {"file:c": "100"}
    records = spool_records(tmp_path)
    spool.close()
    assert [r["body"].split(" ")[:2] for r in records] == [["c", str(i)] for i in range(100)]


def test_a_failed_commit_puts_back_every_flush_behind_it_in_order(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool.db")
    config = SpoolConfig(chunk_max_records=100, chunk_max_bytes=1 << 20)

    async def scenario() -> None:
        batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", config)
        spool.append = failing_once(spool.append)  # type: ignore[method-assign,assignment]
        compressing = threading.Event()
        real_compress = batcher._background._compress

        def compress_when_let(requests: list[bytes]) -> list[bytes]:
            compressing.wait(10)
            return real_compress(requests)

        batcher._background._compress = compress_when_let  # type: ignore[method-assign]
        for i in range(Batcher.MAX_BEHIND):  # both go behind: neither waits for the other
            batcher.add(Batch("files", lines(100, f"e{i}"), 1, "boot", position=("file:e", str(100 * (i + 1)))))
        batcher.add(Batch("files", lines(10, "tail"), 1, "boot", position=("file:e", "tail")))
        assert len(batcher._behind) == Batcher.MAX_BEHIND
        assert batcher.pending_positions() == {"file:e": "tail"} and batcher.pending_records == 210
        compressing.set()
        for _ in range(500):
            if batcher.stalled:
                break
            await asyncio.sleep(0.01)
        # The oldest failed: it and the one behind it are pending again, in front of the tail, nothing lost.
        assert batcher.stalled and not batcher._behind
        assert batcher.pending_positions() == {"file:e": "tail"} and batcher.pending_records == 210
        assert spool.positions("file:") == {}
        assert batcher.flush()

    asyncio.run(scenario())
    assert spool.positions("file:") == {"file:e": "tail"}
    records = spool_records(tmp_path)
    spool.close()
    assert [r["body"].split(" ")[0] for r in records] == ["e0"] * 100 + ["e1"] * 100 + ["tail"] * 10


@pytest.mark.parametrize("in_loop", [False, True])
def test_without_a_full_chunk_nothing_goes_behind(tmp_path: Path, in_loop: bool) -> None:
    spool = Spool.open(tmp_path / "spool.db")
    batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", SpoolConfig())

    async def scenario() -> None:
        batcher.add(Batch("files", lines(5, "d"), 1, "boot", position=("file:d", "5")))
        assert batcher.flush()

    if in_loop:
        asyncio.run(scenario())
    else:
        batcher.add(Batch("files", lines(5, "d"), 1, "boot", position=("file:d", "5")))
        assert batcher.flush()
    assert spool.positions("file:") == {"file:d": "5"}
    spool.close()

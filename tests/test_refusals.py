"""Refusal reports (edgeagent/refusals.py through UploaderContext): counted with
the spool, aggregated to at most one record per kind per interval, never fed
back into another refusal, and not lost across a restart. Real spool, real
batcher; the receiver's refusals are the uploader's calls to the context."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import until

from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import AGENT_SOURCE, Batcher, UploaderContext
from edgeagent.records import Batch, Record
from edgeagent.spool import Spool, StoredChunk


class Pipeline:
    def __init__(self, path: Path, interval: float = 60.0, shipping: bool = True) -> None:
        self.spool = Spool.open(path / "spool.db")
        self.batcher = Batcher(self.spool, ChunkEncoder({}, "t"), "boot", SpoolConfig())
        self.shipped: list[Record] = []
        self.ctx = UploaderContext(self.spool, None, self.ship if shipping else None, interval)  # type: ignore[arg-type]

    def ship(self, record: Record, counters: dict[str, int]) -> None:
        self.shipped.append(record)
        self.batcher.add(Batch(AGENT_SOURCE, [record], 0, "boot"))
        self.batcher.count(counters)

    def data_chunk(self, n: int = 3) -> StoredChunk:
        self.batcher.add(Batch("files", [f"line {i}".encode() for i in range(n)], 0, "boot"))
        self.batcher.flush()
        return self.spool.oldest(10**6)[-1]

    def refuse_everything(self) -> None:
        """A receiver answering 400 to every chunk in the spool."""
        self.batcher.flush()
        for chunk in self.spool.oldest(10**6):
            self.ctx.reject([chunk.id], "HTTP 400 Bad Request: schema")


def test_a_refused_report_is_never_reported_again(tmp_path: Path) -> None:
    """Reproduction: each refusal's loss record was refused in turn, once a second forever."""
    p = Pipeline(tmp_path)
    p.data_chunk()
    for _ in range(20):
        p.refuse_everything()
    assert len(p.shipped) == 1
    assert p.shipped[0].attributes["edgeagent.loss.records"] == 3  # type: ignore[index]
    assert p.spool.chunk_count == 0 and p.batcher.pending_records == 0
    counters = p.spool.counters()
    # The data chunk and the chunk of its report: two dead letters, not one a refusal.
    assert counters["dead_letter_chunks"] == 2
    assert counters.get("unreported_rejected_records", 0) == 0
    assert len(p.spool.dead_letters()) == 2


def test_refusals_are_aggregated_into_one_record_per_interval(tmp_path: Path) -> None:
    async def test() -> None:
        p = Pipeline(tmp_path, interval=0.5)
        for _ in range(5):
            p.data_chunk(2)
        p.refuse_everything()  # 5 data chunks refused at once
        assert [r.attributes["edgeagent.loss.records"] for r in p.shipped] == [2]  # type: ignore[index]
        await until(lambda: len(p.shipped) == 2, "the summary of the other four after the interval")
        summary = p.shipped[1].attributes
        assert summary["edgeagent.loss.records"] == 8 and summary["edgeagent.loss.chunks"] == 4  # type: ignore[index]
        assert "HTTP 400" in summary["edgeagent.loss.detail"]  # type: ignore[index,operator]
        p.batcher.flush()
        assert p.spool.counters().get("unreported_rejected_chunks", 0) == 0
        p.ctx.refusals.close()

    asyncio.run(asyncio.wait_for(test(), 30))


def test_a_report_not_shipped_before_a_restart_is_shipped_after_it(tmp_path: Path) -> None:
    first = Pipeline(tmp_path, shipping=False)  # dies before its report was committed
    first.data_chunk(4)
    first.refuse_everything()
    assert first.spool.counters()["unreported_rejected_records"] == 4
    first.spool.close()
    again = Pipeline(tmp_path)
    assert [r.attributes["edgeagent.loss.records"] for r in again.shipped] == [4]  # type: ignore[index]
    again.batcher.flush()
    counters = again.spool.counters()
    assert counters["unreported_rejected_records"] == 0 and counters["unreported_rejected_chunks"] == 0
    assert Pipeline(tmp_path).shipped == []  # and only once


def test_a_partial_success_of_reports_only_is_not_reported_again(tmp_path: Path) -> None:
    p = Pipeline(tmp_path)
    p.data_chunk()
    p.refuse_everything()
    p.batcher.flush()
    (report_chunk,) = p.spool.oldest(10)
    p.ctx.report_rejected(1, "too old", [report_chunk])
    assert len(p.shipped) == 1 and p.batcher.pending_records == 0
    assert p.spool.counters()["rejected_records"] == 1


def test_spool_dump_dead_letters_shows_reason_and_time(tmp_path: Path) -> None:
    import datetime
    import json
    import subprocess
    import sys

    from conftest import REPO

    p = Pipeline(tmp_path)
    p.data_chunk(2)
    before = datetime.datetime.now(datetime.UTC)
    p.refuse_everything()
    p.spool.close()
    config = tmp_path / "edgeagent.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[kmsg]\nenabled = false\n')
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "spool", "dump", "--dead-letters", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["body"] for r in rows] == ["line 0", "line 1"]
    assert all(r["dead_letter_reason"] == "HTTP 400 Bad Request: schema" for r in rows)
    at = datetime.datetime.fromisoformat(rows[0]["dead_letter_at"])
    assert at.tzinfo is not None and abs((at - before).total_seconds()) < 600

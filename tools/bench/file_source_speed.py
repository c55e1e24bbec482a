#!/usr/bin/env python3
"""Lines per second of the file source reading a syslog-style corpus into a real spool.

Generates the corpus with /work/shared/bench/gen_corpus.py (or ../shared/bench relative to the repo) in a
temporary directory, then runs FileSource -> Batcher (OTLP encoding + zstd) -> Spool (SQLite, synced
commits) on one asyncio loop, as the agent does, until every line is committed. Also measures the source
alone (batches handed to a counter instead of the batcher), to show what the source itself costs.

usage: tools/bench/file_source_speed.py [--lines N] [--corpus FILE] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from edgeagent.config import Config, FilesConfig, SpoolConfig  # noqa: E402
from edgeagent.otlp import ChunkEncoder  # noqa: E402
from edgeagent.pipeline import Batcher, SourceContext  # noqa: E402
from edgeagent.records import Batch  # noqa: E402
from edgeagent.sources.files import FileSource  # noqa: E402
from edgeagent.spool import Spool  # noqa: E402

BOOT_ID = "bench"


def find_generator() -> Path:
    for candidate in (REPO.parent / "shared" / "bench" / "gen_corpus.py", Path("/work/shared/bench/gen_corpus.py")):
        if candidate.exists():
            return candidate
    raise SystemExit("gen_corpus.py not found (expected ../shared/bench/gen_corpus.py)")


class CountingContext(SourceContext):
    """Takes batches and only counts them: the cost of the source alone."""

    def __init__(self, config: Config, spool: Spool) -> None:
        self.boot_id = BOOT_ID
        self.config = config
        self._spool = spool
        self.records = 0

    def emit_nowait(self, batch: Batch) -> None:
        self.records += len(batch.records)

    async def emit(self, batch: Batch) -> None:
        self.emit_nowait(batch)
        await asyncio.sleep(0)

    def count(self, counters: dict[str, int]) -> None:
        pass

    def forget_positions(self, keys: list[str]) -> None:
        self._spool.delete_positions(keys)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(corpus: Path, lines: int, work: Path, source_only: bool) -> dict[str, Any]:
    config = Config(
        device_id="bench",
        state_dir=work,
        files=(FilesConfig(include=(str(corpus),), start_at="beginning"),),
        spool=SpoolConfig(max_size=1024**3),
    )
    spool = Spool.open(config.spool_path, max_size=config.spool.max_size)
    batcher = Batcher(spool, ChunkEncoder({"service.name": "bench"}, "0"), BOOT_ID, config.spool)
    ctx: Any = CountingContext(config, spool) if source_only else SourceContext(batcher, spool, BOOT_ID, config)
    source = FileSource(config)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    task = asyncio.create_task(source.run(ctx))
    while source.status()["lines"] < lines:
        await asyncio.sleep(0.01)
    batcher.flush()
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    spooled = spool.counters().get("spooled_records", 0)
    spool.close()
    return {"elapsed": elapsed, "cpu": cpu, "spooled": spooled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--corpus", type=Path, help="use this file instead of generating one")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-") as tmp:
        corpus = args.corpus
        if corpus is None:
            corpus = Path(tmp) / "corpus.log"
            subprocess.run([sys.executable, str(find_generator()), str(corpus), str(args.lines)], check=True)
        with open(corpus, "rb") as f:
            lines = sum(1 for _ in f)
        size = corpus.stat().st_size
        print(f"corpus: {lines} lines, {size / 1e6:.1f} MB ({size / lines:.0f} bytes/line)")
        for source_only in (True, False):
            label = "source alone (counting)" if source_only else "source -> batcher -> spool"
            for run in range(args.repeat):
                work = Path(tmp) / f"state-{int(source_only)}-{run}"
                result = asyncio.run(measure(corpus, lines, work, source_only))
                if not source_only and result["spooled"] != lines:
                    raise SystemExit(f"spooled {result['spooled']} records, expected {lines}")
                print(
                    f"{label}: {lines / result['elapsed']:>10,.0f} lines/s  "
                    f"{result['elapsed']:.2f} s wall  {result['cpu'] / lines * 1e6:.2f} CPU s per million lines"
                )


if __name__ == "__main__":
    main()

"""Spool append throughput: the real `Batcher` + `Spool`, in-process, on the corpus.

Owns the measurement issue 2 asks BENCHMARKS.md to record: records/s through
`Batcher.add` -> OTLP encode -> zstd -> `Spool.append` (durability "full",
default chunk size), bytes this process wrote to disk per record
(`/proc/self/io` write_bytes) and the compressed/raw size ratio.

The corpus is read and split into batches before the clock starts, the way
the file source hands them over (the bytes fast path: one `bytes` per line,
one position per batch), so the figure is the batcher's and the spool's cost
alone.

usage: spool_bench.py CORPUS [--lines N] [--read-size BYTES] [--state-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeagent import __version__
from edgeagent.clock import boot_id as current_boot_id
from edgeagent.clock import monotonic_ns
from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher
from edgeagent.records import Batch
from edgeagent.spool import Spool


def read_batches(corpus: Path, lines: int, read_size: int, boot: str) -> tuple[list[Batch], int, int]:
    """The corpus as file-source batches of about `read_size` bytes each.

    Returns (batches, records, raw body bytes)."""
    batches: list[Batch] = []
    records = raw = 0
    offset = 0
    carry = b""
    attributes = {"log.file.path": str(corpus)}
    with open(corpus, "rb") as f:
        while records < lines:
            block = f.read(read_size)
            if not block:
                break
            data = carry + block
            end = data.rfind(b"\n")
            if end < 0:
                carry = data
                continue
            carry = data[end + 1 :]
            split = data[:end].split(b"\n")
            split = split[: lines - records]
            consumed = sum(len(line) + 1 for line in split)
            offset += consumed
            records += len(split)
            raw += consumed - len(split)
            batches.append(
                Batch(
                    source="files",
                    records=split,
                    observed_mono_ns=monotonic_ns(),
                    boot_id=boot,
                    attributes=attributes,
                    position=("file:bench", str(offset)),
                )
            )
    return batches, records, raw


def io_write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no write_bytes (kernel without task I/O accounting)")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(corpus: Path, lines: int, read_size: int, state_dir: Path) -> dict[str, Any]:
    boot = current_boot_id()
    batches, records, raw = read_batches(corpus, lines, read_size, boot)
    config = SpoolConfig(max_size=1024**3, durability="full")
    spool = Spool.open(state_dir / "spool.db", max_size=config.max_size, durability=config.durability)
    encoder = ChunkEncoder({"service.name": "edgeagent", "host.name": "bench"}, __version__)
    batcher = Batcher(spool, encoder, boot, config)
    write0, cpu0, wall0 = io_write_bytes(), cpu_seconds(), time.perf_counter()
    for batch in batches:
        batcher.add(batch)
    batcher.flush()
    wall = time.perf_counter() - wall0
    cpu = cpu_seconds() - cpu0
    written = io_write_bytes() - write0
    backlog = spool.backlog()
    sizes = spool.file_sizes()
    spool.close()
    return {
        "records": records,
        "raw_bytes": raw,
        "batches": len(batches),
        "chunks": backlog["chunks"],
        "wall_s": wall,
        "cpu_s": cpu,
        "records_per_s": records / wall,
        "disk_write_bytes": written,
        "disk_write_per_record": written / records,
        "disk_write_per_raw": written / raw,
        "compressed_bytes": backlog["bytes"],
        "compressed_per_raw": backlog["bytes"] / raw,
        "spool_file_bytes": sum(sizes.values()),
        "chunk_max_records": config.chunk_max_records,
        "chunk_max_bytes": config.chunk_max_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--lines", type=int, default=10**9, help="use at most this many lines of the corpus")
    parser.add_argument("--read-size", type=int, default=256 * 1024, help="bytes per source read (one batch)")
    parser.add_argument("--state-dir", type=Path, help="where the spool goes (default: a temp dir, removed after)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        print(f"spool_bench: corpus {args.corpus} does not exist", file=sys.stderr)
        return 2
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.corpus.parent))
    if (state_dir / "spool.db").exists():
        print(f"spool_bench: {state_dir}/spool.db exists; give an empty --state-dir", file=sys.stderr)
        return 2
    try:
        result = run(args.corpus, args.lines, args.read_size, state_dir)
    finally:
        if args.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24} {value:,.3f}" if isinstance(value, float) else f"{key:24} {value:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

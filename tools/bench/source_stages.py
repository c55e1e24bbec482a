#!/usr/bin/env python3
"""Where the syslog and journald sources spend their CPU: each stage of their data path timed alone, in one
process, on the inputs the harness built (`tools/bench/run --scenarios syslog,journald --lines N` first).

syslog: RFC 6587 framing of the pre-framed RFC 5424 file (`Framer`, 64 KiB reads), `parse_message`, OTLP
encoding (`ChunkEncoder`, chunks of 256 KiB of bodies as the Batcher cuts them) and zstd level 3 (the Batcher's).
journald: `journalctl -o export` of the journal directory (its CPU, once), `ExportParser`, `entry_record`,
then encoding and compression as above. The SQLite commit is not included (see "Spool append").

usage: tools/bench/source_stages.py [--lines N]   (CPU seconds per million messages, per stage)
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import zstandard  # noqa: E402

from edgeagent.otlp import ChunkEncoder  # noqa: E402
from edgeagent.records import Batch, Record  # noqa: E402
from edgeagent.sources.journald import ExportParser, entry_record  # noqa: E402
from edgeagent.sources.syslog import Framer  # noqa: E402
from edgeagent.sources.syslog_parse import parse_message  # noqa: E402

OUT = HERE / "out"
READ = 64 * 1024
CHUNK_BYTES = 256 * 1024


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(figures: dict[str, float], stage: str, count: int, work: Callable[[], Any]) -> Any:
    start = cpu()
    result = work()
    figures[stage] = (cpu() - start) * 1e6 / count
    return result


def reads(path: Path) -> list[bytes]:
    with open(path, "rb") as f:
        return list(iter(lambda: f.read(READ), b""))


def chunks(records: list[Record]) -> list[list[Batch]]:
    """Records cut into chunks of about CHUNK_BYTES of bodies, each as batches of ~64 KiB (one read)."""
    out: list[list[Batch]] = [[]]
    batch: list[Record] = []
    size = chunk_size = 0
    for record in records:
        batch.append(record)
        size += len(record.body)
        if size >= READ:
            out[-1].append(Batch("bench", batch, time.monotonic_ns(), "bench"))
            batch, chunk_size, size = [], chunk_size + size, 0
            if chunk_size >= CHUNK_BYTES:
                out.append([])
                chunk_size = 0
    out[-1].append(Batch("bench", batch, time.monotonic_ns(), "bench"))
    return out


def encode_and_compress(figures: dict[str, float], records: list[Record]) -> None:
    encoder, zstd = ChunkEncoder({"service.name": "bench"}, "0"), zstandard.ZstdCompressor(level=3)
    groups = chunks(records)
    encoded = timed(figures, "otlp_encode", len(records), lambda: [encoder.encode(g, 0, True) for g in groups])
    timed(figures, "zstd_3", len(records), lambda: [zstd.compress(e) for e in encoded])
    figures["otlp_bytes_per_record"] = sum(map(len, encoded)) / len(records)


def syslog_stages(lines: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    data = reads(OUT / f"framed-rfc5424-{lines}.bin")
    framer = Framer(16 * 1024)
    messages = timed(figures, "framing", lines, lambda: [m for d in data for m in framer.feed(d)])
    offset, now = time.time_ns() - time.monotonic_ns(), time.time()
    records = timed(figures, "parse", lines, lambda: [parse_message(m, "auto", offset, now) for m, _ in messages])
    encode_and_compress(figures, records)
    return figures


def journald_stages(lines: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    export = OUT / f"journal-{lines}.export"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(export, "wb") as out:
        command = ["journalctl", "--directory", str(OUT / f"journal-{lines}"), "-o", "export", "--no-pager"]
        subprocess.run(command, stdout=out, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures["journalctl_export"] = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e6 / lines
    data = reads(export)
    parser = ExportParser(64 * 1024)
    entries = timed(figures, "export_parse", lines, lambda: [e for d in data for e in parser.feed(d)])
    offset = time.time_ns() - time.monotonic_ns()
    records = timed(figures, "entry_record", lines, lambda: [entry_record(e, "other", offset) for e in entries])
    encode_and_compress(figures, records)
    export.unlink()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args()
    for name, stages in (("syslog (RFC 5424, octet counting)", syslog_stages), ("journald", journald_stages)):
        print(f"{name}: CPU s per million messages")
        for stage, value in stages(args.lines).items():
            print(f"  {stage:24} {value:8.2f}")


if __name__ == "__main__":
    main()

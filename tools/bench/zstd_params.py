#!/usr/bin/env python3
"""CPU and bytes of zstd over the corpus's bulk chunks, for `codec.BULK_PARAMS` and variants of it that move
one or two parameters: the corpus cut into 256 KiB blocks at line ends, each encoded by `ChunkEncoder` with
a file's attributes (the chunks a bulk read gives), then every compressor over the same payloads. Minimum of
3 passes of `time.process_time()`, CPU seconds for the whole corpus, and compressed bytes / raw text bytes.

usage: tools/bench/zstd_params.py [--lines N]   (run `tools/bench/run` once first: it makes the corpus)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BLOCK = 256 * 1024
VARIANTS: list[tuple[str, dict[str, int]]] = [
    ("codec.BULK_PARAMS", {}),
    ("hash_log 16", {"hash_log": 16}),
    ("hash_log 15", {"hash_log": 15}),
    ("min_match 6", {"min_match": 6}),
    ("min_match 7", {"min_match": 7}),
    ("chain_log 12", {"chain_log": 12}),
    ("chain_log 11", {"chain_log": 11}),
    ("window_log 18", {"window_log": 18}),
    ("strategy fast", {"strategy": 1}),
    ("hash_log 16, chain_log 12", {"hash_log": 16, "chain_log": 12}),
    ("hash_log 15, min_match 6", {"hash_log": 15, "min_match": 6}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent.parent))
    import zstandard

    from edgeagent.codec import BULK_PARAMS
    from edgeagent.otlp import ChunkEncoder
    from edgeagent.records import Batch

    data = (HERE / "out" / f"corpus-{args.lines}.log").read_bytes()
    encoder = ChunkEncoder({"host.name": "bench"}, "1")
    attributes = {"log.file.path": "/var/log/app.log", "log.file.name": "app.log"}
    payloads, pos = [], 0
    while pos < len(data):
        end = data.rfind(b"\n", pos, pos + BLOCK)
        end = len(data) if end < 0 else end
        lines = data[pos:end].split(b"\n")
        batch = Batch("files", lines, 10**18 + pos, "boot", attributes, ("file:1", str(end)))
        payloads.append(bytes(encoder.encode([batch], 0, True)))
        pos = end + 1
    p = BULK_PARAMS
    base: dict[str, Any] = {
        "window_log": p.window_log,
        "chain_log": p.chain_log,
        "hash_log": p.hash_log,
        "search_log": p.search_log,
        "min_match": p.min_match,
        "target_length": p.target_length,
        "strategy": p.strategy,
        "write_checksum": 1,
        "write_content_size": 1,
    }
    print(f"{len(payloads)} chunks, protobuf {sum(map(len, payloads)) / len(data):.3f} x raw; base {base}")
    for name, change in VARIANTS:
        params = zstandard.ZstdCompressionParameters(**{**base, **change})
        compress = zstandard.ZstdCompressor(compression_params=params).compress
        best, size = float("inf"), 0
        for _ in range(3):
            start = time.process_time()
            size = sum(len(compress(x)) for x in payloads)
            best = min(best, time.process_time() - start)
        print(f"{name:28s} {best:.3f} CPU s   {size / len(data):.4f} x raw", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

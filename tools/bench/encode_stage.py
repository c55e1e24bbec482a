#!/usr/bin/env python3
"""CPU of the OTLP encoding of the file corpus alone, as the batcher does it: the corpus cut into 256 KiB
blocks at line ends (one chunk each, as 256 KiB reads give), each encoded by `ChunkEncoder` with the
attributes of a file. Minimum of 5 passes, CPU seconds for the whole corpus. `TREE` is a checkout or an
exported tree of the agent (to compare two revisions side by side); default: this repository.

usage: tools/bench/encode_stage.py [TREE] [--lines N]   (run `tools/bench/run` once first: it makes the corpus)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK = 256 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", nargs="?", default=str(HERE.parent.parent))
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    sys.path.insert(0, args.tree)
    from edgeagent.agent import _Heap
    from edgeagent.otlp import ChunkEncoder
    from edgeagent.records import Batch

    data = (HERE / "out" / f"corpus-{args.lines}.log").read_bytes()
    blocks, pos = [], 0
    while pos < len(data):
        end = data.rfind(b"\n", pos, pos + BLOCK)
        end = len(data) if end < 0 else end
        blocks.append(data[pos:end].split(b"\n"))
        pos = end + 1
    _Heap()
    encoder = ChunkEncoder({"host.name": "bench"}, "1")
    attributes = {"log.file.path": "/var/log/app.log", "log.file.name": "app.log"}
    best = float("inf")
    for _ in range(9):
        start = time.process_time()
        for i, lines in enumerate(blocks):
            encoder.encode([Batch("files", lines, 10**18 + i, "boot", attributes, ("file:1", str(i)))], 0, True)
        best = min(best, time.process_time() - start)
    print(f"{args.tree}: encoding {args.lines:,} lines in {len(blocks)} chunks: {best:.3f} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

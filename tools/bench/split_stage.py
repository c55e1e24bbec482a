#!/usr/bin/env python3
"""CPU of the file source's read-and-split stage alone, two ways, alternated: the corpus read with `pread` in
the file source's blocks, and each block's complete lines split (1) from a copy of the complete part
(`data[:cut].split`, the agent before stop 22) and (2) whole, what follows the last newline dropped
(`edgeagent.sources.lines.split_lines` now). Minimum of 5 passes each, CPU seconds for the whole corpus.

With the agent's heap settings (`agent._Heap`, as the agent runs) by default: there the copy comes from heap
pages used before and costs about 0.003 CPU s per million lines. `--glibc-defaults` leaves malloc as it is
in a plain Python process, where each 256 KiB copy is a fresh mmap, faulted in page by page: 0.05 CPU s (the
figure first given for this change, measured that way by mistake).

usage: tools/bench/split_stage.py [--lines N] [--rounds R] [--glibc-defaults]   (run `tools/bench/run` once
       first: it makes the corpus)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from edgeagent.agent import _Heap  # noqa: E402
from edgeagent.sources.files.tail import BLOCK_SIZE  # noqa: E402
from edgeagent.sources.lines import split_lines  # noqa: E402


def copy_then_split(fd: int, size: int) -> None:
    pos = 0
    while pos < size:
        data = os.pread(fd, BLOCK_SIZE, pos)
        cut = data.rfind(b"\n")
        seg = data[:cut]
        if b"\r" in seg or not seg.isascii():
            raise SystemExit("the corpus is expected to be ASCII without CRs")
        seg.split(b"\n")
        pos += cut + 1


def split_whole(fd: int, size: int) -> None:
    pos = 0
    while pos < size:
        data = os.pread(fd, BLOCK_SIZE, pos)
        cut = data.rfind(b"\n")
        split_lines(data, cut, 1 << 20, {})
        data.isascii()  # as the file source checks it
        pos += cut + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--glibc-defaults", action="store_true", help="without the agent's heap settings")
    args = parser.parse_args()
    if not args.glibc_defaults:
        _Heap()
    corpus = HERE / "out" / f"corpus-{args.lines}.log"
    fd = os.open(corpus, os.O_RDONLY)
    size = os.fstat(fd).st_size
    for _ in range(args.rounds):
        for way in (copy_then_split, split_whole):
            best = min(_cpu(way, fd, size) for _ in range(5))
            print(f"{way.__name__:16} {best:.3f} CPU s")
    return 0


def _cpu(way: object, fd: int, size: int) -> float:
    t0 = time.process_time()
    way(fd, size)  # type: ignore[operator]
    return time.process_time() - t0


if __name__ == "__main__":
    sys.exit(main())

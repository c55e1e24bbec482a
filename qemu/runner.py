"""`qemu/run [SCENARIO|all ...] [--arch arm64|armhf|all]`: builds or reuses the
images, runs the scenarios, prints one line per scenario and architecture and
a summary; exits 1 if any failed."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from harness import ARCHES
from scenarios import POWERCUT_ROUNDS, SCENARIOS, Session, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qemu/run", description=__doc__)
    parser.add_argument("scenarios", nargs="*", default=["all"], help=f"any of {', '.join(SCENARIOS)}, or all")
    parser.add_argument("--arch", default="all", help="arm64, armhf or all (default)")
    parser.add_argument("--workdir", type=Path, help="keep consoles, disks and results here")
    parser.add_argument(
        "--rounds", type=int, default=POWERCUT_ROUNDS, help=f"power cuts in a row (default {POWERCUT_ROUNDS})"
    )
    args = parser.parse_args(argv)
    names = SCENARIOS if args.scenarios == ["all"] else args.scenarios
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    arches = list(ARCHES) if args.arch == "all" else args.arch.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgeagent-qemu-"))
    session = Session(workdir, log=lambda m: print(f"qemu: {m}", flush=True), powercut_rounds=args.rounds)
    print(f"qemu: work directory {workdir}", flush=True)
    t0 = time.monotonic()
    for arch in arches:
        for name in names:
            run(name, arch, session)
    results = session.results
    print("qemu: summary (scenario, arch, verdict, duration, key figures)")
    for result in results:
        print(result.line())
    passed = sum(r.ok for r in results)
    print(f"{passed} passed, {len(results) - passed} failed in {time.monotonic() - t0:.0f}s")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The QEMU scenario tests (`tools/test --qemu`): one session shares the wheel
of the checkout; the summary prints one line per scenario and architecture."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

QEMU_DIR = Path(__file__).resolve().parents[2] / "qemu"
sys.path.insert(0, str(QEMU_DIR))

from scenarios import Result, Session  # noqa: E402

RESULTS: list[Result] = []


@pytest.fixture(scope="session")
def qemu_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    yield Session(tmp_path_factory.mktemp("qemu"), log=lambda m: print(f"qemu: {m}", file=sys.stderr, flush=True))


@pytest.fixture
def qemu_results() -> list[Result]:
    return RESULTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section("QEMU scenarios")
    for result in RESULTS:
        terminalreporter.write_line(result.line())
    passed = sum(r.ok for r in RESULTS)
    terminalreporter.write_line(f"qemu: {passed} of {len(RESULTS)} scenario runs passed")

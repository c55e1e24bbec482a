"""Every QEMU scenario on arm64 and armhf, booting the Debian test images
(qemu/README.md says what each proves). Selected only by `tools/test --qemu`;
one alone with e.g. `tools/test --qemu -k "first_boot and arm64"`. The session
shares one wheel of the checkout. Each scenario prints one line as it ends
(verdict, duration, key figures) and the run ends with a table of them all.
`EDGEAGENT_QEMU_POWERCUT_ROUNDS` (`tools/test --qemu --powercut-rounds=N`)
sets the power-cut rounds, 20 by default; `EDGEAGENT_QEMU_ARCH` one
architecture (`tools/test --qemu` runs one pytest per architecture at once)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "qemu"))

from scenarios import POWERCUT_ROUNDS, SCENARIOS, Result, Session, run

pytestmark = pytest.mark.qemu


class ScenarioReport:
    """Writes each scenario's line when it ends (pytest would show a dot) and the
    table of all of them in pytest's terminal summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.reporter = config.pluginmanager.get_plugin("terminalreporter")
        self.capture = config.pluginmanager.get_plugin("capturemanager")
        self.results: list[Result] = []
        self.started = time.monotonic()

    def say(self, line: str) -> None:
        """A line on the terminal now, from inside a test (pytest captures fd 1 there)."""
        if self.reporter is None:
            return
        with self.capture.global_and_fixture_disabled() if self.capture else contextlib.nullcontext():
            self.reporter.ensure_newline()
            self.reporter.write_line(line)
            self.reporter.flush()  # a run takes hours: show each line when it ends, also into a file

    def add(self, result: Result) -> None:
        self.results.append(result)
        self.say(f"qemu: {result.line()}")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.results:
            return
        terminalreporter.write_sep("=", "QEMU scenarios (scenario, arch, verdict, duration, key figures)")
        for result in self.results:
            terminalreporter.write_line(result.line())
        passed = sum(r.ok for r in self.results)
        terminalreporter.write_line(
            f"qemu: {passed} of {len(self.results)} scenario runs passed, {len(self.results) - passed} failed, "
            f"in {time.monotonic() - self.started:.0f}s"
        )


@pytest.fixture(scope="session")
def qemu_session(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Session]:
    report = ScenarioReport(request.config)
    request.config.pluginmanager.register(report, "edgeagent-qemu-report")
    workdir = tmp_path_factory.mktemp("qemu")
    progress = workdir / "progress.log"  # image builds, power-cut rounds: `tail -f` it during a long run
    report.say(f"qemu: work directory {workdir}, progress in {progress}")

    def log(message: str) -> None:
        with open(progress, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    rounds = int(os.environ.get("EDGEAGENT_QEMU_POWERCUT_ROUNDS") or POWERCUT_ROUNDS)
    yield Session(workdir, log=log, powercut_rounds=rounds, on_result=report.add)


# The most telling and longest first (a run cut short still has them), each on both architectures.
FIRST = ["powercut", "powercut_normal", "clock"]
ORDER = FIRST + [s for s in SCENARIOS if s not in FIRST]


@pytest.mark.parametrize("arch", os.environ.get("EDGEAGENT_QEMU_ARCH", "arm64,armhf").split(","))
@pytest.mark.parametrize("scenario", ORDER)
def test_scenario(arch: str, scenario: str, qemu_session: Session) -> None:
    result = run(scenario, arch, qemu_session)
    assert result.ok, result.line()

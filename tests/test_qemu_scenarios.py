"""Every QEMU scenario on arm64 and armhf, booting the Debian test images
(qemu/README.md says what each proves). Selected only by `tools/test --qemu`;
one alone with e.g. `tools/test --qemu -k "first_boot and arm64"`. The session
shares one wheel of the checkout; at the end one line per scenario and
architecture is printed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "qemu"))

from scenarios import SCENARIOS, Session, run

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="session")
def qemu_session(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Session]:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    session = Session(tmp_path_factory.mktemp("qemu"), log=lambda m: print(f"qemu: {m}", file=sys.stderr))
    yield session
    results = session.results
    if reporter is not None and results:
        reporter.write_sep("=", "QEMU scenarios")
        for result in results:
            reporter.write_line(result.line())
        reporter.write_line(f"qemu: {sum(r.ok for r in results)} of {len(results)} scenario runs passed")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("arch", ["arm64", "armhf"])
def test_scenario(arch: str, scenario: str, qemu_session: Session) -> None:
    result = run(scenario, arch, qemu_session)
    qemu_session.results.append(result)
    assert result.ok, result.line()

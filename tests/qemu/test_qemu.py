"""Every scenario on arm64 and armhf, booting the Debian test images under QEMU
(qemu/README.md says what each proves). Selected by `tools/test --qemu`; one
alone with e.g. `tools/test --qemu -k "first_boot and arm64"`."""

from __future__ import annotations

import pytest
from scenarios import SCENARIOS, Result, Session, run

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("arch", ["arm64", "armhf"])
def test_scenario(arch: str, scenario: str, qemu_session: Session, qemu_results: list[Result]) -> None:
    result = run(scenario, arch, qemu_session)
    qemu_results.append(result)
    assert result.ok, result.line()

"""Sources register themselves: one table, lazy imports, declarations that agree with it."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

from edgeagent.config import Config, FilesConfig, JournaldConfig, KmsgConfig
from edgeagent.sources import REGISTRY, build_sources


def test_every_registration_matches_its_module_and_a_config_section() -> None:
    names = []
    for registration in REGISTRY:
        factory = getattr(importlib.import_module(registration.module), registration.factory)
        assert factory.config_section == registration.section, registration
        assert registration.section in {f.name for f in dataclasses.fields(Config)}, registration
        names.append(factory.name)
    assert len(names) == len(set(names)), "two sources with one name"


def test_sources_are_built_in_order_only_when_enabled(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path, kmsg=KmsgConfig(enabled=False))
    assert build_sources(config) == []
    config = dataclasses.replace(
        config,
        kmsg=KmsgConfig(enabled=True, pstore=True),
        files=(FilesConfig(include=(str(tmp_path / "*.log"),)),),
        journald=JournaldConfig(enabled=True),
    )
    assert [source.name for source in build_sources(config)] == ["kmsg", "pstore", "files", "journald"]


def test_a_source_not_configured_is_not_imported(tmp_path: Path) -> None:
    """RAM on small devices: an agent that reads only the kernel log never imports the file source."""
    program = f"""
import json, sys
from edgeagent.config import Config
from edgeagent.sources import build_sources
build_sources(Config(state_dir={str(tmp_path)!r}))
print(json.dumps(sorted(m for m in sys.modules if m.startswith("edgeagent.sources."))))
"""
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60)
    loaded = json.loads(out.stdout)
    assert "edgeagent.sources.kmsg" in loaded
    assert not any(m.startswith(("edgeagent.sources.files", "edgeagent.sources.syslog")) for m in loaded), loaded
    assert "edgeagent.sources.journald" not in loaded

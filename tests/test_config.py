"""Config parsing: typed values, defaults, and errors that name file, line, key and value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgeagent import config
from edgeagent.config import ConfigError, load, loads, parse_duration, parse_priority, parse_size


def test_design_example_parses_with_the_fixed_names() -> None:
    text = """
device_id = "gw-0042"
state_dir = "/var/lib/edgeagent"

[kmsg]
enabled = true
min_priority = "info"

[[files]]
include = ["/var/log/*.log"]
exclude = []
start_at = "end"

[spool]
max_size = "64MiB"

[upload]
to = "mqtt"

[mqtt]
url = "mqtts://broker.example.net:8883"
topic = "edgeagent/{device_id}/logs"

[otlp_http]
endpoint = "https://collector.example.net:4318/v1/logs"
compression = "zstd"
"""
    cfg = loads(text)
    assert cfg.device_id == "gw-0042"
    assert cfg.state_dir == Path("/var/lib/edgeagent")
    assert cfg.kmsg.min_priority == 6
    assert cfg.files[0].include == ("/var/log/*.log",)
    assert cfg.spool.max_size == 64 * 1024 * 1024
    assert cfg.mqtt.url.startswith("mqtts://")
    assert cfg.otlp_http.compression == "zstd"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.device_id = "x"  # type: ignore[misc]


def test_defaults_fit_a_device() -> None:
    cfg = loads("")
    assert cfg.state_dir == Path("/var/lib/edgeagent")
    assert not str(cfg.state_dir).startswith("/tmp")
    assert cfg.spool.durability == "full"
    assert cfg.spool.flush_interval == 1.0
    assert cfg.device_id  # machine-id or hostname


@pytest.mark.parametrize(
    ("text", "value"),
    [("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), (3, 3.0)],
)
def test_durations(text: object, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("64MiB", 64 * 2**20), ("512KiB", 512 * 1024), ("1GB", 10**9), ("100", 100), (4096, 4096), ("1.5MiB", 1572864)],
)
def test_sizes(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "value"), [("warning", 4), ("err", 3), ("debug", 7), (0, 0), ("5", 5)])
def test_priorities(text: object, value: int) -> None:
    assert parse_priority(text) == value


def test_misspelt_key_names_file_line_key_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "edgeagent.toml"
    path.write_text('state_dir = "/x"\n\n[spool]\nmax_sise = "1MiB"\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    message = str(e.value)
    assert f"{path}:4:" in message
    assert "spool.max_sise" in message
    assert "did you mean 'max_size'" in message


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('[spool]\nmax_size = "lots"\n', ["spool.max_size", "'lots'", "a size like"]),
        ('[spool]\nflush_interval = "soon"\n', ["spool.flush_interval", "a duration"]),
        ('[kmsg]\nmin_priority = "loud"\n', ["kmsg.min_priority", "'loud'", "a priority name"]),
        ('[upload]\nto = "mqt"\n', ["upload.to", "did you mean 'mqtt'"]),
        ("[kmsg]\nenabled = 1\n", ["kmsg.enabled", "true or false"]),
        ('[mqtt]\nurl = "http://x"\n', ["mqtt.url", "mqtt://HOST"]),
        ('[[files]]\ninclude = ["/var/log/*.log"]\nmultiline_start = "("\n', ["files[0].multiline_start", "regular"]),
        ("[[files]]\nexclude = []\n", ["files[0].include", "required"]),
        ('spool = "big"\n', ["spool", "a table"]),
        ("[spool\n", ["invalid TOML", "line 1"]),
        ("[upload]\nwindow = 0\n", ["upload.window", "at least 1"]),
    ],
)
def test_bad_values_are_named(text: str, expect: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        loads(text, "cfg.toml")
    for part in expect:
        assert part in str(e.value)
    assert str(e.value).startswith("cfg.toml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "a.toml"
    path.write_text('state_dir = "../state"\n[[files]]\ninclude = ["logs/*.log"]\n')
    cfg = load(path)
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.files[0].include == (str(tmp_path / "conf" / "logs" / "*.log"),)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load(tmp_path / "nope.toml")


def test_environment_names_the_default_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEAGENT_CONFIG", "/etc/other.toml")
    assert config.default_config_path() == Path("/etc/other.toml")
    monkeypatch.delenv("EDGEAGENT_CONFIG")
    assert config.default_config_path() == Path("/etc/edgeagent/edgeagent.toml")


def test_overlay_is_merged_before_validation() -> None:
    cfg = loads('[spool]\nmax_size = "8MiB"\n', overlay={"spool": {"durability": "normal"}})
    assert cfg.spool.max_size == 8 * 2**20 and cfg.spool.durability == "normal"
    with pytest.raises(ConfigError, match=r"spool\.durability"):
        loads("", overlay={"spool": {"durability": "sometimes"}})


def test_effective_config_round_trips_through_toml() -> None:
    import tomli_w

    cfg = loads('device_id = "d"\n[[files]]\ninclude = ["/a/*.log"]\n')
    again = loads(tomli_w.dumps(cfg.to_dict()))
    assert again == dataclasses.replace(cfg, source_path="<config>")

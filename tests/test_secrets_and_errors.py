"""Secrets never shown, and config errors that name file, line, key, value and
expectation with exit 2: the real CLI and the real agent process."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, wait_for
from otlp_server import Answer, OtlpServer

from edgeagent.config import REDACTED, ConfigError, loads, parse_url, secret_values
from edgeagent.redact import Redactor

TOKEN = "tok-S3CRET-4711"
PASSWORD = "hunter2-pass"
FILE_PASSWORD = "from-the-file-42"


def edgeagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgeagent.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\ndevice_id = "dev"\n[kmsg]\nenabled = false\n' + text)
    return path


def test_check_config_redacts_passwords_and_header_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[upload]\nto = "otlp_http"\n[mqtt]\npassword = "{PASSWORD}"\n'
        f'[otlp_http]\nheaders = {{ Authorization = "Bearer {TOKEN}", X-Tenant = "acme-tenant" }}\n',
    )
    out = edgeagent("check-config", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert TOKEN not in out.stdout + out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    printed = tomllib.loads(out.stdout)  # still valid TOML
    assert printed["mqtt"]["password"] == REDACTED
    assert printed["otlp_http"]["headers"] == {"Authorization": REDACTED, "X-Tenant": REDACTED}
    assert printed["mqtt"]["username"] == ""  # not a secret, shown as is


def test_a_bad_secret_value_is_named_but_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, "[otlp_http]\nheaders = { Authorization = 98765432123 }\n")
    out = edgeagent("check-config", "-c", str(path))
    assert out.returncode == 2
    assert "98765432123" not in out.stderr
    assert f"{path}:6: otlp_http.headers.Authorization = {REDACTED}: expected a string" in out.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:99999", "a port number between 1 and 65535"),
        ("mqtt://127.0.0.1:0", "a port number between 1 and 65535"),
        ("http://127.0.0.1:1883", "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"),
        ("mqtt://broker/some/path", "mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (no path, query or fragment)"),
        ("mqtt://[::1", "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"),
    ],
)
def test_bad_broker_urls_exit_2_naming_line_key_value(tmp_path: Path, url: str, expected: str) -> None:
    path = write(tmp_path, f'[mqtt]\nurl = "{url}"\n')
    for command in ("check-config", "run"):
        out = edgeagent(command, "-c", str(path))
        assert out.returncode == 2, (command, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr  # one line, no traceback
        assert f"{path}:6: mqtt.url = {url!r}: expected {expected}" in out.stderr


def test_credentials_in_urls_are_refused_without_showing_them(tmp_path: Path) -> None:
    path = write(tmp_path, f'[mqtt]\nurl = "mqtts://gw:{PASSWORD}@broker.example.net"\n')
    out = edgeagent("check-config", "-c", str(path))
    assert out.returncode == 2
    assert PASSWORD not in out.stderr
    assert f"mqtt.url = 'mqtts://{REDACTED}@broker.example.net'" in out.stderr
    assert "without credentials" in out.stderr
    path = write(tmp_path, f'[otlp_http]\nendpoint = "https://u:{TOKEN}@collector:4318/v1/logs"\n')
    out = edgeagent("check-config", "-c", str(path))
    assert out.returncode == 2 and TOKEN not in out.stderr and "otlp_http.endpoint" in out.stderr


def test_ipv6_broker_and_collector_urls_are_accepted() -> None:
    address = parse_url("mqtt://[::1]:1884", ("mqtt", "mqtts"), False)
    assert (address.host, address.port, address.tls) == ("::1", 1884, False)
    assert parse_url("mqtts://[fd00::7]", ("mqtt", "mqtts"), False).port == 8883
    cfg = loads('[mqtt]\nurl = "mqtt://[::1]:1883"\n[otlp_http]\nendpoint = "https://[::1]:4318/v1/logs"\n')
    assert cfg.mqtt.url == "mqtt://[::1]:1883"


@pytest.mark.parametrize(
    ("mqtt", "key", "expected"),
    [
        ('password_file = "{missing}"', "mqtt.password_file", "a readable file (No such file or directory)"),
        ('password_file = "{empty}"', "mqtt.password_file", "a file holding the password, not empty"),
        ('url = "mqtts://127.0.0.1"\nca_file = "{missing}"', "mqtt.ca_file", "a readable PEM file of CA certificates"),
        ('url = "mqtts://127.0.0.1"\nca_file = "{empty}"', "mqtt.ca_file", "a readable PEM file of CA certificates"),
        ('url = "mqtt://127.0.0.1"\nca_file = "{empty}"', "mqtt.ca_file", "mqtt.url to start with mqtts://"),
        ('url = "mqtts://127.0.0.1"\nkey_file = "{empty}"', "mqtt.key_file", "mqtt.cert_file as well"),
        ('url = "mqtts://127.0.0.1"\ncert_file = "{empty}"', "mqtt.cert_file", "a readable client certificate"),
    ],
)
def test_check_config_checks_the_mqtt_files(tmp_path: Path, mqtt: str, key: str, expected: str) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    text = mqtt.format(missing=tmp_path / "missing", empty=empty)
    path = write(tmp_path, f'[upload]\nto = "mqtt"\n[mqtt]\n{text}\n')
    out = edgeagent("check-config", "-c", str(path))
    assert out.returncode == 2, out.stderr
    assert f"{path}:" in out.stderr and f": {key} = " in out.stderr and expected in out.stderr, out.stderr


def test_secret_values_include_the_password_file_and_bearer_tokens(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text(FILE_PASSWORD + "\n")
    cfg = loads(
        f'[mqtt]\npassword_file = "{secret}"\n[otlp_http]\nheaders = {{ Authorization = "Bearer {TOKEN}", A = "ab" }}\n'
    )
    assert secret_values(cfg) == {FILE_PASSWORD, f"Bearer {TOKEN}", TOKEN, "Bearer"}


def test_log_records_and_tracebacks_are_redacted() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(Redactor([TOKEN]))
    logger = logging.getLogger("test-redaction")
    logger.addHandler(handler)
    try:
        logger.warning("answer was %s", f"bad token {TOKEN}")
        try:
            raise ConfigError(f"refused {TOKEN}")
        except ConfigError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2
    assert all(TOKEN not in r for r in records), records
    assert REDACTED in records[0] and "ConfigError: refused <redacted>" in records[1]


def test_the_running_agent_keeps_a_token_out_of_logs_and_status(tmp_path: Path, make_agent) -> None:  # type: ignore[no-untyped-def]
    """A collector that echoes the token in its error body: the agent logs the
    error and shows it in status, without the token."""
    server = OtlpServer().start()
    server.default = Answer(status=503, body=f"invalid credentials: Bearer {TOKEN}".encode())
    try:
        demo = tmp_path / "app.log"
        demo.write_text("one line\n")
        agent = make_agent(
            f'state_dir = "{{state_dir}}"\ndevice_id = "dev"\n[kmsg]\nenabled = false\n'
            f'[[files]]\ninclude = ["{demo}"]\nstart_at = "beginning"\n'
            f'[upload]\nto = "otlp_http"\nretry_initial = "100ms"\nretry_max = "200ms"\n'
            f'[otlp_http]\nendpoint = "{server.url}"\nheaders = {{ Authorization = "Bearer {TOKEN}" }}\n'
        )
        agent.start()
        wait_for(lambda: len(server.received) >= 2, what="the agent retried the 503")
        text = edgeagent("status", "-c", str(agent.config_path))
        status = edgeagent("status", "--json", "-c", str(agent.config_path))
        assert "invalid credentials" in status.stdout, status.stdout  # the error is shown ...
        assert agent.stop() == 0
    finally:
        server.stop()
    assert server.received[0].headers["authorization"] == f"Bearer {TOKEN}"  # ... the token was really sent ...
    for output in (text.stdout, status.stdout, agent.stderr()):
        assert TOKEN not in output  # ... and never shown
    assert "invalid credentials" in agent.stderr()


def test_a_reload_naming_an_unusable_mqtt_file_is_refused_whole(tmp_path: Path, make_agent, mosquitto) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP checks the files a new config names, as start-up and check-config do."""
    import signal

    base = 'state_dir = "{state_dir}"\ndevice_id = "dev"\n[kmsg]\nenabled = false\n[upload]\nto = "mqtt"\n'
    agent = make_agent(base + f'[mqtt]\nurl = "{mosquitto.url}"\nfirst_connect_delay = "0s"\n')
    agent.start()
    agent.config_path.write_text(
        base.replace("{state_dir}", str(agent.state_dir))
        + f'[mqtt]\nurl = "mqtts://127.0.0.1:{mosquitto.port}"\nca_file = "{tmp_path / "missing.pem"}"\n'
    )
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "config" in agent.status().get("agent", {}).get("errors", {}), what="the refused reload")
    error = agent.status()["agent"]["errors"]["config"]
    assert f"{agent.config_path}:9: mqtt.ca_file = " in error and "a readable PEM file" in error, error
    assert agent.status()["agent"]["state"] == "running"
    assert agent.stop() == 0


@pytest.mark.parametrize("content", [None, "not base64 at all", "c2hvcnQ="])
def test_unusable_fleet_trusted_keys_are_a_config_error(tmp_path: Path, content: str | None) -> None:
    """A device that could never verify a signed config must not start as if it could."""
    key = tmp_path / "operator.pub"
    if content is not None:
        key.write_text(content)
    path = write(tmp_path, f'[fleet]\nenabled = true\ntrusted_keys = ["{key}"]\n')
    out = edgeagent("check-config", "-c", str(path))
    assert out.returncode == 2, out.stderr
    assert f"{path}:7: fleet.trusted_keys = " in out.stderr and str(key) in out.stderr, out.stderr

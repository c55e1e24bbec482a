"""One TLS client context for every endpoint (edgeagent.tls.client_context): a file that cannot be used is
named by its key, whichever part of the agent reads it (the config check, the MQTT session, the fleet
operator); verification stays on. Real certificates (tests/tls.py), a real mosquitto with TLS on loopback."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Broker, free_port, wait_for
from mqtt_helpers import UploaderHarness
from tls import Pki, make_pki, mosquitto_tls_listener

from edgeagent.errors import OperatorError
from edgeagent.fleet.operator import BrokerOptions, Connection
from edgeagent.tls import TlsFileError, TlsFiles, client_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[int]:
    """A mosquitto with a TLS listener (the test CA's server certificate); yields its port."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    port = free_port()
    broker = Broker(workdir, mosquitto_tls_listener(pki, port))
    broker.start()
    yield port
    broker.stop()


def test_a_file_that_cannot_be_used_is_named_by_its_key(tmp_path: Path, pki: Pki) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    missing = str(tmp_path / "missing.pem")
    cases = [
        (TlsFiles(ca_file=missing, section="mqtt"), "mqtt.ca_file", missing, "No such file or directory"),
        (TlsFiles(ca_file=str(empty), section="otlp_http"), "otlp_http.ca_file", str(empty), "no certificate"),
        (TlsFiles(ca_file=str(garbage)), "--ca-file", str(garbage), "PEM file of CA certificates"),
        (TlsFiles(str(pki.ca_cert), cert_file=missing, section="mqtt"), "mqtt.cert_file", missing, "No such file"),
        (TlsFiles(str(pki.ca_cert), key_file=str(pki.client_key), section="mqtt"), "mqtt.key_file", "", "cert_file"),
        (  # a key that is not the certificate's
            TlsFiles(str(pki.ca_cert), str(pki.client_cert), str(pki.server_key), "otlp_http"),
            "otlp_http.cert_file",
            str(pki.client_cert),
            "matching its key",
        ),
    ]
    for files, key, path, why in cases:
        with pytest.raises(TlsFileError) as caught:
            client_context(files)
        message = str(caught.value)
        assert message.startswith(f"{key} = ") and path in message and why in message, message


def test_verification_is_on_unless_switched_off_and_then_only_what_was_asked(pki: Pki) -> None:
    files = TlsFiles(str(pki.ca_cert), str(pki.client_cert), str(pki.client_key), "mqtt")
    strict = client_context(files)
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    assert strict.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert strict.cert_store_stats()["x509_ca"] == 1  # the test CA, and only it
    no_name = client_context(files, check_hostname=False)  # mqtt.tls_insecure: the chain is still verified
    assert no_name.verify_mode == ssl.CERT_REQUIRED and not no_name.check_hostname
    nothing = client_context(files, verify=False)  # otlp_http.tls_insecure
    assert nothing.verify_mode == ssl.CERT_NONE and not nothing.check_hostname


def test_the_operator_names_a_bad_ca_file_and_still_verifies(tls_broker: int, pki: Pki, tmp_path: Path) -> None:
    url = f"mqtts://127.0.0.1:{tls_broker}"
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(OperatorError, match=f"--ca-file = '{missing}': expected a readable PEM file"):
        Connection(BrokerOptions(url, ca_file=missing), timeout=5)
    with pytest.raises(OperatorError, match="certificate verify failed"):
        Connection(BrokerOptions(url, ca_file=str(pki.other_ca_cert)), timeout=5)
    connection = Connection(BrokerOptions(url, ca_file=str(pki.ca_cert)), timeout=10)
    connection.close()


def test_the_mqtt_session_names_a_ca_file_gone_since_start_up(
    tls_broker: int, pki: Pki, tmp_path: Path, harnesses: list[UploaderHarness]
) -> None:
    """The files are read again at every connection attempt: one that became unreadable is reported by key
    and file in the status, and the chunk stays in the spool."""
    ca_copy = tmp_path / "ca.pem"
    ca_copy.write_bytes(pki.ca_cert.read_bytes())
    config = f"""
device_id = "gw-ctx"
state_dir = "{{state_dir}}"
[kmsg]
enabled = false
[upload]
retry_initial = "200ms"
retry_max = "1s"
[mqtt]
url = "mqtts://127.0.0.1:{tls_broker}"
ca_file = "{ca_copy}"
first_connect_delay = "0s"
"""
    ca_copy.write_text("not a certificate\n")
    h = UploaderHarness(tmp_path / "state", config)
    harnesses.append(h)
    h.add_lines(0, 10, 10)
    h.start()
    wait_for(lambda: "mqtt.ca_file" in (h.status()["last_error"] or ""), what="the CA file named in last_error")
    assert str(ca_copy) in h.status()["last_error"]
    assert h.backlog()["chunks"] == 1 and not h.status()["connected"]
    ca_copy.write_bytes(pki.ca_cert.read_bytes())  # fixed: the next attempt connects and delivers
    wait_for(lambda: h.backlog()["chunks"] == 0, what="delivery once the CA file is readable again")

"""One TLS client context for every endpoint (edgeagent.tls.client_context): a file that cannot be used is
named by its key, whichever part of the agent reads it (the config check, the MQTT session, the fleet
operator); verification stays on. Real certificates (tests/tls.py), a real mosquitto with TLS on loopback."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, Broker, free_port, spool_records, wait_for
from mqtt_helpers import Subscriber, UploaderHarness, line_numbers
from tls import Pki, agent_config, make_pki, mosquitto_tls_listener, server_certificate

from edgeagent.errors import OperatorError
from edgeagent.fleet.operator import BrokerOptions, Connection
from edgeagent.tls import TlsFileError, TlsFiles, client_context, system_ca_dir


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


def uploader_config(url: str, ca_file: str = "") -> str:
    ca = f'ca_file = "{ca_file}"' if ca_file else ""
    return f"""
device_id = "gw-ctx"
state_dir = "{{state_dir}}"
[kmsg]
enabled = false
[upload]
retry_initial = "200ms"
retry_max = "1s"
[mqtt]
url = "{url}"
topic = "edgeagent/gw-ctx/logs"
first_connect_delay = "0s"
{ca}
"""


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
    config = uploader_config(f"mqtts://127.0.0.1:{tls_broker}", str(ca_copy))
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


# --- the system's CA store: read lazily from its hashed directory when that trusts the same CAs ------------


def hashed_directory(directory: Path, *certificates: Path) -> Path:
    """A CA directory as Debian and OpenWrt's ca-certificates install it: the certificates and their
    subject-hash links (`openssl rehash`)."""
    directory.mkdir()
    for certificate in certificates:
        shutil.copy(certificate, directory / certificate.name)
    subprocess.run(["openssl", "rehash", str(directory)], check=True, capture_output=True)
    assert any(p.name.endswith(".0") for p in directory.iterdir())
    return directory


def bundle(path: Path, *certificates: Path) -> Path:
    path.write_bytes(b"".join(c.read_bytes() for c in certificates))
    return path


def use_system_store(monkeypatch: pytest.MonkeyPatch, ca_file: Path, ca_dir: Path) -> None:
    """The system's CA store for this process, as OpenSSL and Python find it (the agent's child processes
    inherit it)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setenv("SSL_CERT_DIR", str(ca_dir))


def test_the_system_store_is_looked_up_lazily_when_its_directory_holds_every_ca_of_its_file(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_dir = hashed_directory(tmp_path / "certs", pki.ca_cert, pki.other_ca_cert)
    use_system_store(monkeypatch, bundle(tmp_path / "ca-certificates.crt", pki.ca_cert, pki.other_ca_cert), ca_dir)
    assert system_ca_dir() == str(ca_dir)
    context = client_context(TlsFiles(section="mqtt"))
    assert context.cert_store_stats()["x509_ca"] == 0  # nothing read yet: the defaults would have read both
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # No CA file at all (OpenWrt's ca-certificates without ca-bundle): the directory is all the defaults are.
    use_system_store(monkeypatch, tmp_path / "absent.crt", ca_dir)
    assert system_ca_dir() == str(ca_dir)


def test_the_system_store_is_read_whole_where_its_directory_would_trust_less(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    both = bundle(tmp_path / "both.crt", pki.ca_cert, pki.other_ca_cert)
    trusted = tmp_path / "trusted.crt"  # an OpenSSL trust setting: only the defaults read it as they do
    subprocess.run(
        ["openssl", "x509", "-in", str(pki.ca_cert), "-trustout", "-addtrust", "serverAuth", "-out", str(trusted)],
        check=True,
        capture_output=True,
    )
    bundle_only = tmp_path / "bundle-only"  # OpenWrt's ca-bundle alone: the file, no hashed links beside it
    bundle_only.mkdir()
    shutil.copy(both, bundle_only / "ca-certificates.crt")
    cases = {
        "no hashed links": (both, bundle_only, 2),
        "a CA of the file missing from the directory": (
            both,
            hashed_directory(tmp_path / "one", pki.ca_cert),
            2,
        ),
        "a trust setting in the file": (trusted, hashed_directory(tmp_path / "same", pki.ca_cert), 1),
        "no directory": (both, tmp_path / "absent", 2),
    }
    for case, (ca_file, ca_dir, in_file) in cases.items():
        use_system_store(monkeypatch, ca_file, ca_dir)
        assert system_ca_dir() is None, case
        assert client_context(TlsFiles()).cert_store_stats()["x509_ca"] == in_file, case  # read at once, as before


@pytest.fixture
def tls_brokers(tmp_path: Path, pki: Pki) -> Iterator[tuple[Broker, int, int]]:
    """One mosquitto: a plain listener (`broker.port`), a TLS one with the test server certificate (for
    127.0.0.1) and a TLS one whose certificate, signed by the same CA, names another host."""
    workdir = tmp_path / "brokers"
    workdir.mkdir()
    key, cert = server_certificate(pki, workdir / "elsewhere", "elsewhere", "DNS:broker.elsewhere.example")
    good, wrong_name = free_port(), free_port()
    broker = Broker(
        workdir,
        mosquitto_tls_listener(pki, good)
        + f"listener {wrong_name} 127.0.0.1\ncafile {pki.ca_cert}\ncertfile {cert}\nkeyfile {key}\n",
    )
    broker.start()
    yield broker, good, wrong_name
    broker.stop()


def test_over_the_lazy_system_store_the_broker_is_verified_as_strictly(
    tmp_path: Path,
    pki: Pki,
    tls_brokers: tuple[Broker, int, int],
    monkeypatch: pytest.MonkeyPatch,
    make_agent: Any,
    subscribers: list[Subscriber],
) -> None:
    """Real agents, `ca_file` empty, the system store (SSL_CERT_FILE and SSL_CERT_DIR in each agent's
    environment) holding the test CA in a hashed directory and its file: the connection verifies and
    delivers; a certificate for another name from the same CA, and a store without the test CA, are
    refused and the lines stay in the spool."""
    broker, good, wrong_name = tls_brokers
    store = {"with": tmp_path / "with", "without": tmp_path / "without"}
    for name, cas in (("with", (pki.ca_cert, pki.other_ca_cert)), ("without", (pki.other_ca_cert,))):
        store[name].mkdir()
        hashed_directory(store[name] / "certs", *cas)
        bundle(store[name] / "ca-certificates.crt", *cas)

    def start(name: str, port: int, ca_store: Path) -> tuple[AgentProcess, Subscriber]:
        logs = Subscriber(broker.port, f"edgeagent/gw-ctx/{name}", client_id=f"sub-{name}")
        subscribers.append(logs)
        use_system_store(monkeypatch, ca_store / "ca-certificates.crt", ca_store / "certs")
        assert system_ca_dir() == str(ca_store / "certs")  # the lazy path, as the agent will find it
        log = tmp_path / f"{name}.log"
        log.write_text("".join(f"line {n} from {name}\n" for n in range(10)))
        mqtt = f'url = "mqtts://127.0.0.1:{port}"\ntopic = "edgeagent/gw-ctx/{name}"'  # ca_file empty
        agent = make_agent(agent_config(log, mqtt), name)
        agent.start()
        return agent, logs

    def last_error(agent: AgentProcess) -> str:
        return agent.status().get("uploader", {}).get("last_error") or ""

    unknown_ca, unknown_ca_logs = start("unknown-ca", good, store["without"])
    other_name, other_name_logs = start("other-name", wrong_name, store["with"])
    _, verified_logs = start("verified", good, store["with"])

    def delivered() -> list[int]:
        return sorted(n for numbers in line_numbers(verified_logs.received()) for n in numbers)

    wait_for(lambda: delivered() == list(range(10)), what="the lines over the lazy system store")
    wait_for(lambda: "certificate verify failed" in last_error(unknown_ca), what="the unknown CA refused")
    wait_for(lambda: "mismatch" in last_error(other_name), what="the other name refused")
    for refused, logs in ((unknown_ca, unknown_ca_logs), (other_name, other_name_logs)):
        assert refused.status()["uploader"]["acked"] == 0 and logs.received() == []
        assert refused.stop() == 0
        assert len(spool_records(refused.state_dir)) == 10

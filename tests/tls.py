"""Test certificates made with the openssl command line: a CA, a server
certificate for 127.0.0.1/localhost and a client certificate, all signed by
the CA, plus a second CA that signed nothing we trust (for negative tests)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path


def _run(*args: str, cwd: Path) -> None:
    result = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.name, cwd=directory)
    _run(
        "req", "-x509", "-new", "-key", key.name, "-sha256", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", cert.name,
        cwd=directory,
    )  # fmt: skip
    return key, cert


def _make_leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.name, cwd=directory)
    _run("req", "-new", "-key", key.name, "-subj", f"/CN={name}", "-out", csr.name, cwd=directory)
    _run(
        "x509", "-req", "-in", csr.name, "-CA", ca[1].name, "-CAkey", ca[0].name, "-CAcreateserial",
        "-days", "2", "-sha256", "-extfile", ext.name, "-out", cert.name,
        cwd=directory,
    )  # fmt: skip
    return key, cert


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "test-ca")
    other = _make_ca(directory, "other-ca")
    server_key, server_cert = _make_leaf(
        directory,
        "server",
        ca,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    client_key, client_cert = _make_leaf(
        directory,
        "gw-tls-client",
        ca,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    return Pki(ca[1], server_cert, server_key, client_cert, client_key, other[1])


def server_certificate(pki: Pki, directory: Path, name: str, subject_alt_name: str) -> tuple[Path, Path]:
    """(key, certificate) of another server certificate signed by the test CA, made in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = (directory / "test-ca.key", directory / "test-ca.crt")
    ca[0].write_bytes(pki.ca_cert.with_suffix(".key").read_bytes())
    ca[1].write_bytes(pki.ca_cert.read_bytes())
    extensions = f"basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName={subject_alt_name}\n"
    return _make_leaf(directory, name, ca, extensions)


def mosquitto_tls_listener(pki: Pki, port: int, require_client_cert: bool = False) -> str:
    """mosquitto.conf lines for a TLS listener on 127.0.0.1:`port` with the test server certificate."""
    return (
        f"listener {port} 127.0.0.1\n"
        f"cafile {pki.ca_cert}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"require_certificate {'true' if require_client_cert else 'false'}\n"
    )


def agent_config(log: Path, mqtt: str, extra: str = "") -> str:
    """A real agent's config: `log` read from the beginning and sent over MQTT (`mqtt`: the [mqtt] lines)."""
    return f"""
device_id = "gw-tls"
state_dir = "{{state_dir}}"
[kmsg]
enabled = false
[[files]]
include = ["{log}"]
start_at = "beginning"
[spool]
flush_interval = "100ms"
[upload]
to = "mqtt"
retry_initial = "200ms"
retry_max = "1s"
[mqtt]
{mqtt}
first_connect_delay = "0s"
{extra}
"""

"""A TLS context kept from one connection attempt to the next (edgeagent.tls.ContextKeeper) and what changes
on disk make it be made again: a renewed client certificate, a rotated CA file, a system CA store updated
the way update-ca-certificates does it. Every check is a real TLS handshake with a server on 127.0.0.1
that demands the new certificate or presents one only the new CA verifies; then the same through the MQTT
session (a real mosquitto restarted with a new client CA) and the OTLP/HTTP uploader (a real endpoint)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Broker, free_port, until, wait_for
from mqtt_helpers import UploaderHarness
from otlp_server import OtlpServer
from test_otlp_http import Harness, run
from test_tls_context import uploader_config
from tls import Pki, make_pki, mosquitto_tls_listener

from edgeagent import tls
from edgeagent.tls import ContextKeeper, TlsFiles, system_ca_dir


@pytest.fixture(scope="module")
def old_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("old-pki"))


@pytest.fixture(scope="module")
def new_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """What replaces `old_pki` (another CA, named alike, and the certificates it signed)."""
    return make_pki(tmp_path_factory.mktemp("new-pki"))


@pytest.fixture
def identity_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files count as settled at once, so what a test sees is the identity check alone (in the field the
    files changed seconds or days before the next attempt; tests change them milliseconds before). Such a
    test changes every file so that its identity surely changes, even within one tick of the kernel's
    clock: renamed over (a new inode), or rewritten in place with another file's mtime (`cp -p`)."""
    monkeypatch.setattr(tls, "SETTLED", 0.0)


class TlsServer:
    """A TLS server on 127.0.0.1: handshakes with `context` (swapped between connections by the test), says
    "ok" and records the serial of the client certificate it verified ("" without one) or why it refused."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            with raw:
                raw.settimeout(10)
                try:
                    with self.context.wrap_socket(raw, server_side=True) as conn:
                        certificate = conn.getpeercert()
                        self.seen.append(str(certificate["serialNumber"]) if certificate else "")
                        conn.sendall(b"ok")
                except OSError as e:
                    self.seen.append(f"refused: {e}")

    def attempt(self, context: ssl.SSLContext) -> str:
        """One connection with the client's `context`: "ok", or what went wrong (at either end)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
            try:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                    return conn.recv(2).decode() or "closed by the server"
            except OSError as e:
                return str(e)


@pytest.fixture
def servers() -> Iterator[list[TlsServer]]:
    made: list[TlsServer] = []
    yield made
    for server in made:
        server.listener.close()


def server_context(pki: Pki, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server with `pki`'s server certificate; with `client_ca`, requiring a client certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def serial(certificate: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(certificate)], capture_output=True)
    return out.stdout.decode().strip().removeprefix("serial=").upper()


def install(source: Path, target: Path) -> None:
    """Put `source` at `target` as renewal tools do: a new file renamed over the old one."""
    temporary = target.with_name(f".{target.name}.new")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def copy_in_place(source: Path, target: Path) -> None:
    """`cp -p source target`: the same inode rewritten, with the source's (older) mtime."""
    shutil.copy2(source, target)


def rehash(directory: Path) -> None:
    subprocess.run(["openssl", "rehash", str(directory)], check=True, capture_output=True)


def test_the_context_is_kept_until_a_file_it_was_made_from_changes(
    tmp_path: Path, old_pki: Pki, new_pki: Pki, identity_only: None, servers: list[TlsServer]
) -> None:
    """A renewed client certificate and a rotated CA file, put in place by a rename or rewritten in place,
    are used at the next attempt; the server accepts only the new ones."""
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "device.crt", tmp_path / "device.key"
    for source, target in ((old_pki.ca_cert, ca), (old_pki.client_cert, cert), (old_pki.client_key, key)):
        shutil.copyfile(source, target)
    keeper = ContextKeeper(TlsFiles(str(ca), str(cert), str(key), "mqtt"))
    server = TlsServer(server_context(old_pki, client_ca=old_pki.ca_cert))
    servers.append(server)
    first = keeper.context()
    assert server.attempt(first) == "ok" and server.seen[-1] == serial(old_pki.client_cert)
    assert keeper.context() is first  # nothing changed: nothing read again

    # The client certificate renewed by another CA, which the server now demands.
    server.context = server_context(old_pki, client_ca=new_pki.ca_cert)
    assert server.attempt(keeper.context()) != "ok"
    install(new_pki.client_cert, cert)
    install(new_pki.client_key, key)
    renewed = keeper.context()
    assert renewed is not first
    assert server.attempt(renewed) == "ok" and server.seen[-1] == serial(new_pki.client_cert)
    assert keeper.context() is renewed

    # The server's certificate now from the new CA: the old CA file refuses it until the file is rotated,
    # here by `cp -p` (same inode, the source's older mtime).
    server.context = server_context(new_pki, client_ca=new_pki.ca_cert)
    assert "certificate verify failed" in server.attempt(keeper.context())
    copy_in_place(new_pki.ca_cert, ca)
    assert server.attempt(keeper.context()) == "ok" and server.seen[-1] == serial(new_pki.client_cert)


def test_a_file_that_just_changed_is_not_kept(tmp_path: Path, old_pki: Pki) -> None:
    """Timestamps have a granularity: a file could change again within its ctime's tick, keeping its
    identity. A context made from a file changed under `SETTLED` ago is made again at every attempt."""
    ca = tmp_path / "ca.pem"
    shutil.copyfile(old_pki.ca_cert, ca)
    keeper = ContextKeeper(TlsFiles(str(ca), section="mqtt"))
    assert keeper.context() is not keeper.context()
    wait_for(lambda: keeper.context() is keeper.context(), 3 * tls.SETTLED, what="the file settled: kept")
    kept = keeper.context()
    ca.write_bytes(ca.read_bytes())  # the same bytes: still a change, and a young one
    assert keeper.context() is not kept


def test_a_file_gone_is_an_error_naming_its_key_and_nothing_stale_is_used(
    tmp_path: Path, old_pki: Pki, identity_only: None
) -> None:
    ca = tmp_path / "ca.pem"
    shutil.copyfile(old_pki.ca_cert, ca)
    keeper = ContextKeeper(TlsFiles(str(ca), section="otlp_http"))
    keeper.context()
    ca.unlink()
    for _ in range(2):
        with pytest.raises(tls.TlsFileError, match=f"otlp_http.ca_file = '{ca}'"):
            keeper.context()
    shutil.copyfile(old_pki.ca_cert, ca)
    assert keeper.context() is keeper.context()


def test_the_system_store_is_read_again_when_its_file_its_directory_or_a_certificate_in_it_changes(
    tmp_path: Path,
    old_pki: Pki,
    new_pki: Pki,
    identity_only: None,
    monkeypatch: pytest.MonkeyPatch,
    servers: list[TlsServer],
) -> None:
    """No ca_file: the system store as SSL_CERT_FILE and SSL_CERT_DIR give it (a bundle, a hashed
    directory). Each step changes one of them the way update-ca-certificates, openssl rehash or a package
    upgrade do; each next attempt trusts exactly what the store holds by then."""
    certs, bundle = tmp_path / "certs", tmp_path / "ca-certificates.crt"
    certs.mkdir()
    shutil.copyfile(old_pki.other_ca_cert, certs / "other.pem")  # a CA that signed nothing the server presents
    rehash(certs)
    shutil.copyfile(old_pki.other_ca_cert, bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    keeper = ContextKeeper(TlsFiles(section="mqtt"))
    server = TlsServer(server_context(old_pki))
    servers.append(server)

    def trusted() -> bool:
        answer = server.attempt(keeper.context())
        assert answer == "ok" or "certificate verify failed" in answer, answer
        return answer == "ok"

    unknown = keeper.context()
    assert not trusted() and keeper.context() is unknown

    shutil.copyfile(old_pki.ca_cert, certs / "test-ca.pem")  # a CA linked into the directory only
    rehash(certs)
    assert system_ca_dir() == str(certs) and trusted()

    # Its file rewritten in place with a CA of the same name and another key (a package upgrade): the
    # directory itself is untouched, and the kept context has the old CA cached since it verified with it.
    copy_in_place(new_pki.ca_cert, certs / "test-ca.pem")
    assert not trusted()
    copy_in_place(old_pki.ca_cert, certs / "test-ca.pem")
    assert trusted()

    install_bundle = tmp_path / "bundle.new"
    install_bundle.write_bytes(old_pki.other_ca_cert.read_bytes() + old_pki.ca_cert.read_bytes())
    install(install_bundle, bundle)  # update-ca-certificates: the bundle follows
    assert system_ca_dir() == str(certs) and trusted()

    (certs / "test-ca.pem").unlink()  # removed from the directory, still in the bundle: the defaults trust it
    rehash(certs)
    assert system_ca_dir() is None and trusted()
    install_bundle.write_bytes(old_pki.other_ca_cert.read_bytes())
    install(install_bundle, bundle)  # and now from the bundle too: distrusted
    assert not trusted()


# --- through the MQTT session and the OTLP/HTTP uploader ----------------------------------------------------


def test_the_mqtt_session_uses_a_renewed_client_certificate_at_its_next_attempt(
    tmp_path: Path, old_pki: Pki, new_pki: Pki, harnesses: list[UploaderHarness]
) -> None:
    """A real mosquitto requiring client certificates restarts demanding ones of a new CA: the session's
    attempts are refused until the device's certificate and key are renewed on disk, then it delivers."""
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "device.crt", tmp_path / "device.key"
    for source, target in ((old_pki.ca_cert, ca), (old_pki.client_cert, cert), (old_pki.client_key, key)):
        shutil.copyfile(source, target)
    (tmp_path / "broker").mkdir()
    tls_port = free_port()
    broker = Broker(tmp_path / "broker", mosquitto_tls_listener(old_pki, tls_port, require_client_cert=True))
    broker.start()
    try:
        config = (
            uploader_config(f"mqtts://127.0.0.1:{tls_port}", str(ca)) + f'cert_file = "{cert}"\nkey_file = "{key}"\n'
        )
        h = UploaderHarness(tmp_path / "state", config)
        harnesses.append(h)
        h.add_lines(0, 10, 10)
        h.start()
        wait_for(lambda: h.backlog()["chunks"] == 0, what="delivery with the first certificate")

        broker.stop()  # the broker's client CA rotated: mosquitto's `cafile` verifies client certificates
        broker.extra_config = broker.extra_config.replace(f"cafile {old_pki.ca_cert}", f"cafile {new_pki.ca_cert}")
        broker.start()
        h.add_lines(10, 10, 10)
        failures = h.status()["retry_failures"]
        wait_for(lambda: h.status()["retry_failures"] >= failures + 2, what="attempts refused with the old certificate")
        assert h.backlog()["chunks"] == 1
        install(new_pki.client_cert, cert)
        install(new_pki.client_key, key)
        wait_for(lambda: h.backlog()["chunks"] == 0, what="delivery with the renewed certificate")
    finally:
        broker.stop()


def test_the_otlp_uploader_uses_rotated_files_at_its_next_connection(
    tmp_path: Path, old_pki: Pki, new_pki: Pki
) -> None:
    """Once the uploader runs, its TLS files are no longer read only at start: a collector moved to a new
    PKI (its certificate and the client certificates it accepts) is reached once the device's files are
    replaced, with no reload; a file broken meanwhile is reported by its key and the chunk kept."""
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "device.crt", tmp_path / "device.key"
    for source, target in ((old_pki.ca_cert, ca), (old_pki.client_cert, cert), (old_pki.client_key, key)):
        shutil.copyfile(source, target)
    server = OtlpServer(tls=server_context(old_pki, client_ca=old_pki.ca_cert)).start()
    files = f'ca_file = "{ca}"\ncert_file = "{cert}"\nkey_file = "{key}"'
    h = Harness(tmp_path, server.url, upload='retry_max = "300ms"', otlp=files)

    async def test() -> None:
        first = h.add_lines(["before the rotation"])
        h.start()
        await until(lambda: first in server.delivered, "delivery with the first PKI")
        server.stop()  # drops the kept-alive connection: the next request connects anew
        server.tls = server_context(new_pki, client_ca=new_pki.ca_cert)
        server.start()
        second = h.add_lines(["after the rotation"])
        await until(lambda: h.uploader.status()["failed_requests"] >= 1, "the old files refused")
        ca.write_text("not a certificate\n")
        await until(lambda: "otlp_http.ca_file" in (h.uploader.status()["last_error"] or ""), "the broken CA file")
        assert h.chunk_ids() == [second]
        install(new_pki.ca_cert, ca)
        install(new_pki.client_cert, cert)
        install(new_pki.client_key, key)
        await until(lambda: second in server.delivered, "delivery with the new PKI")
        subject = dict(x[0] for x in server.received[-1].client_cert["subject"])
        assert server.received[-1].client_cert["serialNumber"] == serial(new_pki.client_cert)
        assert subject["commonName"] == "gw-tls-client"
        await h.stop()

    try:
        run(test)
    finally:
        server.stop()
        h.close()

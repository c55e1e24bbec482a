"""TLS support in the running agent: loaded only when the config uses it.

asyncio and paho import `ssl` whatever the config, and `hashlib` loads
OpenSSL's libcrypto for hashes CPython also builds in: together about 4.5 MiB
of an idle agent's RSS (measured, BENCHMARKS.md). `edgeagent run` calls
`keep_out()` before importing them when no endpoint of the config uses TLS
(`Config.uses_tls`): `import ssl` then raises ImportError, which asyncio is
written to handle ("no TLS here"; paho gets `ssl_stand_in()`), and hashlib
uses CPython's own sha256 and blake2 (the agent's only hashes).

Guarantees:
- a config that needs TLS always gets it: when one is applied later (SIGHUP,
  a fleet config), it is first checked whole in a child process with TLS
  (`check_elsewhere`: an unusable one is refused like any bad reload, the
  running config kept), then the agent stops cleanly and `restart_with_tls()`
  executes the same command line again with `EDGEAGENT_TLS=1` (same PID: a
  service manager sees a reload). Everything the agent must keep is durable in
  the state dir; a fleet probation continues after the restart
  (fleet/device.py).
- `EDGEAGENT_TLS=1` in the environment loads TLS from the start.
- a process where TLS was never kept out is never restarted for it: a Python
  built without `ssl` fails the TLS connection with a clear error instead.

`client_context()` is the one place that makes a client SSLContext (MQTT
session, OTLP/HTTP uploader, config check, fleet operator): verification on,
the files named by their config key when they cannot be used, and the
system's CA store looked up lazily when that trusts exactly the same CAs
(`system_ca_dir`). The MQTT session and the OTLP/HTTP uploader each keep
theirs in a `ContextKeeper`: made again at a connection attempt only when a
file it was made from changed (a renewed certificate, a rotated CA, an
updated system store), never reused from a file that did.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
import types
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from edgeagent.errors import TlsFileError

if TYPE_CHECKING:
    import ssl

    from edgeagent.config import Config

ENV = "EDGEAGENT_TLS"


def keep_out(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Make `import ssl` (and OpenSSL's hashlib backend) fail in this process,
    unless TLS was asked for or is loaded already. True when it did."""
    if environ.get(ENV) == "1" or "ssl" in sys.modules or "_ssl" in sys.modules:
        return False
    sys.modules["ssl"] = sys.modules["_ssl"] = None  # type: ignore[assignment]
    try:  # hashlib falls back on these; a Python built without them keeps OpenSSL's
        for builtin in ("_sha256", "_blake2"):
            __import__(builtin)
    except ImportError:
        return True
    if "_hashlib" not in sys.modules:
        sys.modules["_hashlib"] = None  # type: ignore[assignment]
    return True


def available() -> bool:
    """False when `keep_out()` kept TLS out of this process."""
    return not ("ssl" in sys.modules and sys.modules["ssl"] is None)


def restart_with_tls() -> NoReturn:
    """Execute this process's command line again, with TLS loaded. Call only
    after a clean stop (run lock released, spool closed)."""
    os.environ[ENV] = "1"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


class _NeverRaised(Exception):
    """Stands for ssl's exceptions where TLS is kept out: no plain socket raises it."""


def ssl_stand_in() -> types.SimpleNamespace:
    """What paho's module-level `ssl` should be where TLS is kept out. paho 2.x
    names `ssl.SSLWantReadError` and `ssl.SSLWantWriteError` in the except
    clauses of every socket read and write; with `ssl = None` (its own
    fallback) a plain EAGAIN would become an AttributeError there and break the
    connection. With this stand-in those clauses never match, as without TLS."""
    return types.SimpleNamespace(
        SSLWantReadError=_NeverRaised,
        SSLWantWriteError=_NeverRaised,
        SSLError=_NeverRaised,
        CertificateError=_NeverRaised,
    )


async def check_elsewhere(config: Config) -> str:
    """Why `config` cannot be used ('' when it can), as `edgeagent check-config`
    finds in a child process with TLS loaded: TLS files can only be checked
    with TLS, and a config must be known usable before the agent restarts for it."""
    import asyncio  # not at the top: `keep_out()` runs before asyncio is imported

    import tomli_w

    path = config.state_dir / f".tls-check-{os.getpid()}.toml"
    command = [sys.executable, "-m", "edgeagent", "check-config", "-c", str(path)]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # secrets in it: the agent's user only
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tomli_w.dumps(config.to_dict(redact=False)))
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env={**os.environ, ENV: "1"}
        )
        _, err = await process.communicate()
    except OSError as e:  # a full or read-only state dir: the running config stays
        return f"cannot check the new config with TLS loaded ({e}); keeping the running one"
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    if process.returncode == 0:
        return ""
    text = err.decode(errors="replace").strip().removeprefix("edgeagent: error: ")
    return _as_in_the_file(text, str(path), config.source_path) or f"check-config exited {process.returncode}"


def _as_in_the_file(message: str, copy: str, source_path: str) -> str:
    """`message` about the copy (`COPY:LINE: key = ...`) as about the config file: its name, its line."""
    from edgeagent.config.loader import line_of

    where = source_path or "the config"
    found = re.match(re.escape(copy) + r"(?::\d+)?: ([\w.\[\]]+) = ", message)
    line = line_of(source_path, found.group(1)) if found and source_path else None
    return re.sub(re.escape(copy) + r"(:\d+)?", f"{where}:{line}" if line else where, message)


# --- client contexts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The TLS files of one endpoint, and where they are named: `section` "mqtt"
    gives the keys `mqtt.ca_file`, ...; "" the command-line options `--ca-file`, ..."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    section: str = ""

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else "--" + name.replace("_", "-")


def client_context(files: TlsFiles, *, check_hostname: bool = True, verify: bool = True) -> ssl.SSLContext:
    """A client context as `ssl.create_default_context()` makes it (TLS 1.2 or
    later, the peer's chain and name verified) trusting `files.ca_file`, or the
    system's CA store when it is empty, with the client certificate and key when
    given. `check_hostname=False` skips only the name check; `verify=False` the
    chain too. Raises TlsFileError when a file cannot be used."""
    import ssl  # only here: TLS is kept out of processes that do not use it

    from edgeagent.config.files import reason

    if files.key_file and not files.cert_file:
        raise TlsFileError(files.key("key_file"), files.key_file, f"{files.key('cert_file')} as well")
    try:
        if files.ca_file:
            context = ssl.create_default_context(cafile=files.ca_file)
        else:
            context = ssl.create_default_context(capath=system_ca_dir())  # None: the system's defaults, eagerly
    except OSError as e:  # ssl.SSLError is one
        expected = f"a readable PEM file of CA certificates ({reason(e)})"
        raise TlsFileError(files.key("ca_file"), files.ca_file, expected) from None
    if files.cert_file:
        try:
            context.load_cert_chain(files.cert_file, files.key_file or None)
        except OSError as e:
            raise TlsFileError(
                files.key("cert_file"), files.cert_file, f"a readable client certificate matching its key ({reason(e)})"
            ) from None
    if not check_hostname or not verify:
        context.check_hostname = False
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context


# A file changed less than this long ago may change again without its identity changing: timestamps
# have a granularity (1-2 s on FAT and JFFS2, the kernel's coarse clock elsewhere). No context is kept
# from such a file.
SETTLED = 3.0


class ContextKeeper:
    """The client context of one endpoint, kept by the object that owns its connections (the MQTT session,
    the OTLP/HTTP uploader): `context()` at every connection attempt gives the one made before when no file
    it was made from has changed since, else makes it again as `client_context()` does.

    What it is made from: the configured CA, certificate and key files; without a CA file, the system
    store (its CA file, its hashed directories and their hashed files: all that `system_ca_dir` and
    OpenSSL read). Each file is known by its identity (device, inode, size, mtime and ctime in ns), taken
    before the files are read: a file replaced by a rename (certbot's symlinks, `update-ca-certificates`),
    rewritten in place (`cp`, even `cp -p`, which restores an old mtime but never the ctime), or a link
    added to or removed from a directory (its mtime) makes the next attempt read everything again. No
    context is kept while a file's ctime is less than `SETTLED` old or in the future (a device without a
    real-time clock before its clock is set): it is made at every attempt then, as without a keeper."""

    def __init__(self, files: TlsFiles, *, check_hostname: bool = True, verify: bool = True) -> None:
        self.files, self.check_hostname, self.verify = files, check_hostname, verify
        self._kept: tuple[bytes, ssl.SSLContext] | None = None

    def context(self) -> ssl.SSLContext:
        """The context for the next connection. Raises TlsFileError like `client_context()`, keeping nothing."""
        inputs = self._inputs()
        if self._kept is not None and self._kept[0] == inputs:
            return self._kept[1]
        self._kept = None
        context = client_context(self.files, check_hostname=self.check_hostname, verify=self.verify)
        if inputs is not None:
            self._kept = (inputs, context)
        return context

    def _inputs(self) -> bytes | None:
        """A digest of the identities of every file the context is made from; None when one is too young."""
        import hashlib  # not at the top: `keep_out()` runs after this module is imported

        digest = hashlib.blake2b(digest_size=16)
        young = time.time_ns() - int(SETTLED * 1e9)
        for path in self._sources():
            try:
                st = os.stat(path)
            except OSError as e:  # missing or unreadable: its coming back is a change too
                digest.update(f"{path}\0{e.errno}\n".encode(errors="surrogateescape"))
                continue
            if st.st_ctime_ns >= young:
                return None
            identity = f"{path}\0{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n"
            digest.update(identity.encode(errors="surrogateescape"))
        return digest.digest()

    def _sources(self) -> Iterator[str]:
        files = self.files
        yield from (path for path in (files.ca_file, files.cert_file, files.key_file) if path)
        if files.ca_file:
            return
        import ssl

        paths = ssl.get_default_verify_paths()  # as OpenSSL finds them: the environment first
        yield os.environ.get(paths.openssl_cafile_env, paths.openssl_cafile)
        for directory in os.environ.get(paths.openssl_capath_env, paths.openssl_capath).split(os.pathsep):
            if not directory:
                continue
            yield directory
            try:
                yield from _hashed_files(directory)
            except OSError:  # not there, or not readable: the directory's own identity tells when that changes
                continue


_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.\d+")  # what `openssl rehash` names its links: subject hash . n
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def system_ca_dir() -> str | None:
    """The system's hashed CA directory when trusting it alone trusts exactly
    what the system's defaults do, else None.

    The defaults (`load_default_certs`: OpenSSL's default CA file and
    directory, or SSL_CERT_FILE / SSL_CERT_DIR) read the whole CA file into
    memory (on Debian ~140 certificates, about 0.9 MiB of RSS), while a hashed
    directory is read at verification time, one issuer at a time. The directory
    trusts no more than the defaults (it is one of them); it trusts as much when
    every certificate of the CA file is also one of its hashed files, which is
    how Debian, Yocto (update-ca-certificates) and OpenWrt (ca-certificates with
    ca-bundle) install them. OpenWrt's ca-bundle alone has no hashed directory:
    None, the defaults."""
    import ssl

    paths = ssl.get_default_verify_paths()  # the environment's SSL_CERT_FILE / SSL_CERT_DIR included
    if not paths.capath:
        return None
    try:
        hashed = _hashed_files(paths.capath)
        if not hashed:
            return None
        if not paths.cafile:  # the defaults are the directory alone
            return paths.capath
        in_file = _certificates(paths.cafile)
        if in_file is None:
            return None
        in_dir: set[str] = set()
        for path in hashed:
            in_dir |= _certificates(path) or set()
    except OSError:
        return None
    return paths.capath if in_file <= in_dir else None


def _hashed_files(directory: str) -> list[str]:
    """The paths of the certificate links `openssl rehash` made in `directory` (what OpenSSL looks up there)."""
    with os.scandir(directory) as entries:
        return [entry.path for entry in entries if _HASHED_NAME.fullmatch(entry.name)]


def _certificates(path: str) -> set[str] | None:
    """The certificates of a PEM file (their base64, whitespace removed); None
    when it holds anything else (trust settings, CRLs: only the defaults read them alike)."""
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read()
    found = set()
    for kind, body in _PEM_BLOCK.findall(text):
        if kind != "CERTIFICATE":
            return None
        found.add("".join(body.split()))
    return found

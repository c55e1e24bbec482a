"""The desired-config envelope: encoding, size cap and Ed25519 signatures.

Owns the wire format of a desired config (docs/fleet.md, "Envelope") and the
check that runs before anything parses the TOML inside it. Guarantees:

- a payload over `MAX_ENVELOPE_BYTES` is refused before it is decoded;
- with trusted keys, only a payload signed by one of them is accepted, and the
  signature covers the scope, the version and the exact bytes of the TOML text
  (so neither can be replayed onto another scope or version);
- without trusted keys, a payload is accepted unsigned (a signature, if
  present, is ignored: there is nothing to check it against).

The envelope is one UTF-8 JSON object:
`{"format": 1, "scope": "device:ID" | "group:NAME", "version": N, "config": "TOML text",
"signature": "base64 of 64 bytes" (optional)}`. The signed bytes are
`b"edgeagent-fleet/1\\n" + scope + b"\\n" + decimal version + b"\\n" + config text (UTF-8)`.

PyNaCl is an optional dependency (`pip install edgeagent[fleet]`), imported
only when a key is used.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.errors import EnvelopeError

MAX_ENVELOPE_BYTES = 64 * 1024
FORMAT = 1
_SCOPE_RE = re.compile(r"^(device|group):[^#+\x00/]+$")


@dataclass(frozen=True)
class Envelope:
    scope: str
    version: int
    config: str
    signature: bytes | None = None

    def signed_bytes(self) -> bytes:
        return b"edgeagent-fleet/1\n%s\n%d\n%s" % (self.scope.encode(), self.version, self.config.encode())

    def encode(self) -> bytes:
        data: dict[str, Any] = {"format": FORMAT, "scope": self.scope, "version": self.version, "config": self.config}
        if self.signature is not None:
            data["signature"] = base64.b64encode(self.signature).decode()
        payload = json.dumps(data, ensure_ascii=False, sort_keys=True).encode()
        if len(payload) > MAX_ENVELOPE_BYTES:
            raise EnvelopeError(f"envelope is {len(payload)} bytes; the limit is {MAX_ENVELOPE_BYTES}")
        return payload


def decode(payload: bytes | bytearray) -> Envelope:
    """Parse an envelope; size and shape only (no signature check)."""
    if len(payload) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"payload is {len(payload)} bytes; the limit is {MAX_ENVELOPE_BYTES}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EnvelopeError(f"payload is not a JSON envelope: {e}") from None
    if not isinstance(data, dict):
        raise EnvelopeError("payload is not a JSON object")
    if data.get("format") != FORMAT:
        raise EnvelopeError(f"format = {data.get('format')!r}: expected {FORMAT}")
    scope, version, config = data.get("scope"), data.get("version"), data.get("config")
    if not isinstance(scope, str) or not _SCOPE_RE.match(scope):
        raise EnvelopeError(f"scope = {scope!r}: expected 'device:ID' or 'group:NAME'")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EnvelopeError(f"version = {version!r}: expected a whole number, at least 1")
    if not isinstance(config, str):
        raise EnvelopeError(f"config = {type(config).__name__}: expected the TOML text as a string")
    signature = data.get("signature")
    if signature is None:
        return Envelope(scope, version, config)
    try:
        raw = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
    except binascii.Error:
        raw = b""
    if len(raw) != 64:
        raise EnvelopeError("signature: expected base64 of a 64-byte Ed25519 signature")
    return Envelope(scope, version, config, raw)


def _nacl() -> Any:
    try:
        import nacl.exceptions
        import nacl.signing
    except ImportError:
        raise EnvelopeError(
            "fleet signatures need PyNaCl, which is not installed (pip install 'edgeagent[fleet]')"
        ) from None
    return nacl


def read_key_file(path: str | Path) -> bytes:
    """A key file holds one line: the base64 of 32 raw bytes (public key or private seed)."""
    try:
        text = Path(path).read_text().strip()
        raw = base64.b64decode(text, validate=True)
    except (OSError, UnicodeDecodeError, binascii.Error) as e:
        raise EnvelopeError(f"{path}: cannot read the key file: {e}") from None
    if len(raw) != 32:
        raise EnvelopeError(f"{path}: expected the base64 of a 32-byte Ed25519 key, got {len(raw)} bytes")
    return raw


class Verifier:
    """Checks envelopes against the trusted public keys (none: unsigned accepted)."""

    def __init__(self, key_files: tuple[str, ...] | list[str]) -> None:
        self._keys: list[Any] = []
        if key_files:
            nacl = _nacl()
            self._keys = [nacl.signing.VerifyKey(read_key_file(path)) for path in key_files]

    @property
    def requires_signature(self) -> bool:
        return bool(self._keys)

    def check(self, envelope: Envelope) -> None:
        if not self._keys:
            return
        if envelope.signature is None:
            raise EnvelopeError("unsigned config, but [fleet] trusted_keys is set: only signed configs are accepted")
        nacl = _nacl()
        message = envelope.signed_bytes()
        for key in self._keys:
            try:
                key.verify(message, envelope.signature)
                return
            except nacl.exceptions.BadSignatureError:
                continue
        raise EnvelopeError("signature does not verify with any of [fleet] trusted_keys")


def sign(envelope: Envelope, private_key_file: str | Path) -> Envelope:
    nacl = _nacl()
    key = nacl.signing.SigningKey(read_key_file(private_key_file))
    signature = key.sign(envelope.signed_bytes()).signature
    return Envelope(envelope.scope, envelope.version, envelope.config, bytes(signature))


def generate_keypair(out: str | Path) -> tuple[Path, Path]:
    """Write a new private key to `out` (mode 0600) and its public key to `out.pub`."""
    import os

    nacl = _nacl()
    key = nacl.signing.SigningKey.generate()
    private, public = Path(out), Path(f"{out}.pub")
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(bytes(key)).decode() + "\n")
    public.write_text(base64.b64encode(bytes(key.verify_key)).decode() + "\n")
    return private, public

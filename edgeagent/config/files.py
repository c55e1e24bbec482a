"""Checks that need the files a config names: what parsing cannot see.

Run by `check-config`, at start-up and on every reload whenever the MQTT
session is needed; each failure is a ConfigError at the key's line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.config.loader import error_at
from edgeagent.config.values import parse_url

if TYPE_CHECKING:
    from edgeagent.config import Config


# --- checks that need the files a config names ----------------------------------------------------


def check_mqtt_files(config: Config) -> None:
    """What parsing cannot see in [mqtt]: the password file and the TLS files
    exist, can be read and hold what they should. Raises ConfigError."""
    mqtt = config.mqtt
    if mqtt.password and mqtt.password_file:
        raise error_at(config, "mqtt.password_file", mqtt.password_file, "either mqtt.password or mqtt.password_file")
    if mqtt.password_file:
        try:
            secret = Path(mqtt.password_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise error_at(config, "mqtt.password_file", mqtt.password_file, f"a readable file ({reason(e)})") from None
        if not secret:
            raise error_at(config, "mqtt.password_file", mqtt.password_file, "a file holding the password, not empty")
    tls_files = {"ca_file": mqtt.ca_file, "cert_file": mqtt.cert_file, "key_file": mqtt.key_file}
    address = parse_url(mqtt.url, ("mqtt", "mqtts"), False)
    if not address.tls:
        for name, path in tls_files.items():
            if path:
                raise error_at(
                    config, f"mqtt.{name}", path, "mqtt.url to start with mqtts:// (TLS) when TLS files are set"
                )
        return
    if not any(tls_files.values()):
        return  # nothing to check: the system's CA store is OpenSSL's to find (edgeagent.tls.client_context)
    from edgeagent import tls  # its ssl only here: most of the agent never needs it

    try:
        tls.client_context(tls.TlsFiles(mqtt.ca_file, mqtt.cert_file, mqtt.key_file, "mqtt"))
    except tls.TlsFileError as e:
        raise error_at(config, e.key, e.path, e.expected) from None


def reason(error: Exception) -> str:
    """Why a file could not be used, in a few words (an OSError's strerror)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__

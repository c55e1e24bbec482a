"""Remote layers: from a verified envelope to a checked layer, and from layers
to the effective config.

Owns the validation order and the merge order. Guarantees:

- the remote TOML goes through the same parser as the local file
  (`edgeagent.config.loads`), so its errors name the key, the value and what
  was expected, with the scope and version as the source (`fleet device:gw-1 v7:3: ...`);
- then the local policy (`policy.check`) runs on the keys the layer sets;
- effective config = defaults < local file < group layers (in `groups`
  order) < device layer; tables merge key by key, arrays (`[[files]]`)
  replace the lower layer's array as a whole.
"""

from __future__ import annotations

import tomllib
from typing import Any

from edgeagent import config as config_mod
from edgeagent.config import Config, ConfigError, FleetConfig
from edgeagent.fleet import policy
from edgeagent.fleet.envelope import Envelope
from edgeagent.fleet.store import Layer


def check_layer(envelope: Envelope, fleet: FleetConfig) -> Layer:
    """Parse and police one remote layer; ConfigError or PolicyError name the first problem."""
    source = f"fleet {envelope.scope} v{envelope.version}"
    try:
        table = tomllib.loads(envelope.config)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    config_mod.loads(envelope.config, source)
    policy.check(table, fleet)
    return Layer(envelope.scope, envelope.version, table)


def scope_order(config: Config) -> list[str]:
    return [f"group:{group}" for group in config.fleet.groups] + [f"device:{config.device_id}"]


def merged(config: Config, layers: dict[str, Layer]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scope in scope_order(config):
        if scope in layers:
            out = config_mod._merge(out, layers[scope].table)
    return out


def effective(local: Config, layers: dict[str, Layer]) -> Config:
    """The local file (read again now) with `layers` over it."""
    overlay = merged(local, layers)
    try:
        return config_mod.load(local.source_path, overlay=overlay or None)
    except ConfigError as e:
        if not overlay:
            raise
        raise ConfigError(f"with the remote layers {sorted(layers)}: {e}") from None

"""Sources: one module per kind of input, each a `pipeline.Source`, registered in `REGISTRY`.

A source module declares the config section it reads (`config_section` on its
source class) and is listed here once, by name: adding a source adds one line to
`REGISTRY` and touches nothing else. Modules are imported only when the
configuration enables them, so an agent that does not tail files does not pay
for the file source's imports in RAM (64 MB devices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from edgeagent.config import Config
from edgeagent.pipeline import Source


class Registration(NamedTuple):
    """One kind of source: `module`.`factory`(config) builds it when `enabled(config)`; `section` is the
    config section it reads (the factory's `config_section` says the same)."""

    section: str
    module: str
    factory: str
    enabled: Callable[[Config], bool]

    def build(self, config: Config) -> Source:
        # __import__ rather than importlib: one stdlib package less on Yocto/OpenWrt images.
        factory: Callable[[Config], Source] = getattr(__import__(self.module, fromlist=[self.factory]), self.factory)
        return factory(config)


# In start order.
REGISTRY: tuple[Registration, ...] = (
    Registration("kmsg", "edgeagent.sources.kmsg", "KmsgSource", lambda c: c.kmsg.enabled),
    Registration("kmsg", "edgeagent.sources.pstore", "PstoreSource", lambda c: c.kmsg.enabled and c.kmsg.pstore),
    Registration("files", "edgeagent.sources.files", "FileSource", lambda c: bool(c.files)),
    Registration("syslog", "edgeagent.sources.syslog", "SyslogSource", lambda c: bool(c.syslog)),
    Registration("journald", "edgeagent.sources.journald", "JournaldSource", lambda c: c.journald.enabled),
)


def build_sources(config: Config) -> list[Source]:
    return [registration.build(config) for registration in REGISTRY if registration.enabled(config)]

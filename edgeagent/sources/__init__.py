"""Sources: one module per kind of input, each a `pipeline.Source`.

Modules are imported only when the configuration uses them, so an agent that
does not tail files does not pay for the file source's imports in RAM.
"""

from __future__ import annotations

from edgeagent.config import Config
from edgeagent.pipeline import Source


def build_sources(config: Config) -> list[Source]:
    sources: list[Source] = []
    if config.kmsg.enabled:
        from edgeagent.sources.kmsg import KmsgSource

        sources.append(KmsgSource(config))
        if config.kmsg.pstore:
            from edgeagent.sources.pstore import PstoreSource

            sources.append(PstoreSource(config))
    if config.files:
        from edgeagent.sources.files import FileSource

        sources.append(FileSource(config))
    if config.syslog:
        from edgeagent.sources.syslog import SyslogSource

        sources.append(SyslogSource(config))
    if config.journald.enabled:
        from edgeagent.sources.journald import JournaldSource

        sources.append(JournaldSource(config))
    return sources

"""What sources and uploaders are to the rest of the agent: the two interfaces and the wake reasons.

A source turns input into batches handed to its `SourceContext`; an uploader drains the spool through
its `UploaderContext` and deletes a chunk only on acknowledgement. Both are run by the agent on the one
event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edgeagent.pipeline.contexts import SourceContext, UploaderContext

AGENT_SOURCE = "edgeagent"  # the source name of records the agent writes about itself

WAKE_DATA = "data"
WAKE_NETWORK = "network"
WAKE_ASKED = "asked"


class Source(Protocol):
    """A source reads one kind of input and emits batches until cancelled.

    `run` must hand every record it read to `ctx.emit` together with the
    position after it; cancellation (at shutdown) may arrive at any `await`.
    `status` returns a small JSON-able dict for `edgeagent status`.
    """

    name: str

    async def run(self, ctx: SourceContext) -> None: ...

    def status(self) -> dict[str, Any]: ...


class Uploader(Protocol):
    """Drains the spool to a receiver, deleting chunks only on acknowledgement.

    `run` loops until cancelled; `drain(timeout)` is called at shutdown to wait
    a bounded time for acknowledgements of what is in flight.
    """

    async def run(self, ctx: UploaderContext) -> None: ...

    async def drain(self, timeout: float) -> None: ...

    def status(self) -> dict[str, Any]: ...

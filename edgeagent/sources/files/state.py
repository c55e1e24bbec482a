"""The state the parts of the file source share, and the small helpers all of them use.

`FileSource` (source.py) is assembled from one part per concern: discovery
(finding files), identity (fingerprints, copies, truncation), tailing (reading
lines) and positions (what is stored, and resuming from it). They all work on
the attributes declared here, which only `FileSource.__init__` sets; the calls
one part makes into another are declared here too, so that each part reads
(and type-checks) on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from edgeagent import loss
from edgeagent.clock import monotonic_ns
from edgeagent.records import Batch

if TYPE_CHECKING:
    from edgeagent.config import Config
    from edgeagent.pipeline import SourceContext
    from edgeagent.sources import inotify
    from edgeagent.sources.files.discovery import Group
    from edgeagent.sources.files.positions import Stored
    from edgeagent.sources.files.tail import Tailer

log = logging.getLogger("edgeagent.sources.files")


class FileSourceState:
    """Attributes and helpers shared by the parts of `FileSource`."""

    name: str
    config: Config
    _groups: list[Group]  # the [[files]] sections, compiled
    _ctx: SourceContext | None
    _tailers: dict[tuple[int, int], Tailer]  # open files by (device, inode)
    _dirty: dict[Tailer, None]  # tailers to read, in order (a dict is an ordered set)
    _wake: asyncio.Event
    _rescan_due: bool
    _markers: set[str]  # sections scanned before (start_at applies only to the first scan)
    _forget: list[str]  # positions to drop once what was read before is committed
    _unopened: dict[tuple[int, int], Stored]  # stored positions of files that failed to open
    _copies: set[Tailer]  # files known as copies of tailed ones (copy_of set)
    _opened: int  # files opened so far
    _inotify: inotify.Inotify | None
    _wd_tailer: dict[int, Tailer]
    _dir_wd: dict[str, int]
    _wd_dir: dict[int, str]
    _rescan_timer: asyncio.TimerHandle | None
    _poll_timer: asyncio.TimerHandle | None
    _warned: set[str]
    _stats: dict[str, int]
    _rescan_interval: float
    _poll_interval: float

    if TYPE_CHECKING:  # implemented by the parts (discovery, identity, tail, positions, source)

        def _open(self, group: Group, path: str, pos: int, attrs_path: str) -> Tailer | None: ...
        def _open_stored(self, entry: Stored, path: str, copy: bool = False) -> bool: ...
        def _emit(self, t: Tailer, records: list[Any], raw_bytes: int = -1) -> None: ...
        def _key(self, t: Tailer) -> str: ...
        def _set_fingerprint(self, t: Tailer, size: int) -> None: ...
        def _identify(self, t: Tailer, size: int) -> bool: ...
        def _follow_original(self, t: Tailer, size: int) -> bool: ...
        def _unshadow(self, original: Tailer, pos: int) -> bool: ...
        def _truncated(self, t: Tailer, seen_size: int) -> None: ...
        def _release(self, t: Tailer) -> None: ...
        def _arm_poll(self) -> None: ...

    def _mark(self, t: Tailer) -> None:
        self._dirty[t] = None
        self._wake.set()

    def _arm_timer(self, t: Tailer, deadline_mono: float) -> None:
        if t.timer is not None:
            t.timer.cancel()
        loop = asyncio.get_running_loop()
        t.timer = loop.call_later(max(deadline_mono - time.monotonic(), 0.01), self._on_tailer_timer, t)

    def _on_tailer_timer(self, t: Tailer) -> None:
        t.timer = None
        if self._tailers.get(t.ident) is t:
            self._mark(t)

    def _close(self, t: Tailer) -> None:
        if self._tailers.get(t.ident) is t:
            del self._tailers[t.ident]
        self._copies.discard(t)
        if self._copies:
            self._unshadow(t, t.pos)
        self._dirty.pop(t, None)
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        if t.wd >= 0 and self._inotify is not None:
            self._wd_tailer.pop(t.wd, None)
            self._inotify.rm_watch(t.wd)
            t.wd = -1
        with contextlib.suppress(OSError):
            os.close(t.fd)

    def _report_loss(self, path: str, reason: str, text: str) -> None:
        """A loss the source could not prevent: logged, counted and shipped as a record (guarantee 5)."""
        log.warning("files: %s", text)
        self._stats["lost_files"] += 1
        ctx = self._require_ctx()
        ctx.count({"files_lost_" + reason: 1})
        record = loss.record(reason, text, source=self.name, extra={"log.file.path": path})
        ctx.emit_nowait(Batch(self.name, [record], monotonic_ns(), ctx.boot_id))

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _require_ctx(self) -> SourceContext:
        assert self._ctx is not None, "FileSource.run() sets the context"
        return self._ctx

"""`FileSource`: the file source's main loop and wake-ups, assembled from its parts.

Owns the `pipeline.Source` protocol (`run`, `status`), the main loop (rescan
when due, then read one block of each file that changed per turn, fair to
other files and sources, pausing while the spool cannot commit) and the
wake-ups: one inotify descriptor (watching every open file through
/proc/self/fd and the directories the globs can match) on the event loop, a
rescan timer every `rescan_interval`, and per-file timers only while a partial
line or a rotated file is pending. Without inotify, open files are polled every
`poll_interval`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from edgeagent.config import Config
from edgeagent.pipeline import SourceContext
from edgeagent.sources import inotify
from edgeagent.sources.files.discovery import RESCAN_EVENTS, Discovery, Group
from edgeagent.sources.files.identity import Identity
from edgeagent.sources.files.positions import Positions, Stored
from edgeagent.sources.files.state import log
from edgeagent.sources.files.tail import Tailer, Tailing


class FileSource(Positions, Discovery, Identity, Tailing):
    """Tails the files of every `[[files]]` section (see the package docstring)."""

    name = "files"
    config_section = "files"  # registered in edgeagent/sources/__init__.py

    def __init__(self, config: Config) -> None:
        self.config = config
        self._groups = [Group(i, cfg, config.source_path) for i, cfg in enumerate(config.files)]
        self._ctx: SourceContext | None = None
        self._tailers: dict[tuple[int, int], Tailer] = {}
        self._dirty: dict[Tailer, None] = {}  # tailers to read, in order (a dict is an ordered set)
        self._wake = asyncio.Event()
        self._rescan_due = True
        self._markers: set[str] = set()
        self._forget: list[str] = []
        self._unopened: dict[tuple[int, int], Stored] = {}  # stored positions of files that failed to open
        self._copies: set[Tailer] = set()  # files known as copies of tailed ones (copy_of set)
        self._opened = 0  # files opened so far
        self._inotify: inotify.Inotify | None = None
        self._wd_tailer: dict[int, Tailer] = {}
        self._dir_wd: dict[str, int] = {}
        self._wd_dir: dict[int, str] = {}
        self._rescan_timer: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._warned: set[str] = set()
        self._stats = {
            "lines": 0,
            "bytes_read": 0,
            "truncated_lines": 0,
            "invalid_encoding_lines": 0,
            "rotations": 0,
            "truncations": 0,
            "copies_recovered": 0,
            "lost_files": 0,
            "open_errors": 0,
        }
        min_rescan = min((g.cfg.rescan_interval for g in self._groups), default=10.0)
        self._rescan_interval = max(min_rescan, 0.1)
        self._poll_interval = max(min((g.cfg.poll_interval for g in self._groups), default=1.0), 0.05)

    def status(self) -> dict[str, Any]:
        return {
            "files": len(self._tailers),
            "rotated_pending": sum(1 for t in self._tailers.values() if t.detached),
            "inotify": self._inotify is not None,
            **self._stats,
        }

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        loop = asyncio.get_running_loop()
        raise_open_file_limit()
        try:
            self._inotify = inotify.Inotify()
            loop.add_reader(self._inotify.fileno(), self._on_inotify)
        except OSError as e:
            log.warning("files: %s; falling back to stat polling every %.1fs", e, self._poll_interval)
            self._inotify = None
        try:
            self._restore()
            self._rescan_due = False
            self._scan()
            self._flush_forgets()
            self._arm_rescan()
            while True:
                await self._work()
                await self._wake.wait()
                self._wake.clear()
        finally:
            self._shutdown(loop)

    async def _work(self) -> None:
        while True:
            if self._rescan_due:
                self._rescan_due = False
                self._scan()
            if not self._dirty:
                break
            tailers = list(self._dirty)
            self._dirty.clear()
            for t in tailers:
                ctx = self._require_ctx()
                await ctx.wait_writable()  # the spool cannot commit: read nothing more until it can
                await ctx.wait_ram_room()  # the file keeps what is not read yet (edgeagent.holding)
                if self._tailers.get(t.ident) is not t:
                    continue  # let go of meanwhile
                try:
                    more = self._read(t)
                except OSError as e:
                    self._warn_once(f"read:{t.at}", "files: reading %s failed: %s", t.at, e)
                    more = False
                if more:
                    self._dirty[t] = None
                await asyncio.sleep(0)  # one block per file per turn: fair to other files and sources
            self._flush_forgets()
        self._flush_forgets()

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        for ev in self._inotify.read_events():
            if ev.mask & inotify.IN_Q_OVERFLOW:
                self._rescan_due = True
                self._dirty.update(dict.fromkeys(self._tailers.values()))
                continue
            t = self._wd_tailer.get(ev.wd)
            if t is not None:
                self._dirty[t] = None
                if ev.mask & RESCAN_EVENTS:
                    self._rescan_due = True
                if ev.mask & inotify.IN_IGNORED:  # the kernel dropped the watch (unmount): poll the file instead
                    self._wd_tailer.pop(ev.wd, None)
                    t.wd = -1
                    t.polled = True
                    self._arm_poll()
                continue
            if ev.wd in self._wd_dir:
                self._rescan_due = True
                if ev.mask & inotify.IN_IGNORED:
                    self._dir_wd.pop(self._wd_dir.pop(ev.wd), None)
        self._wake.set()

    def _arm_rescan(self) -> None:
        loop = asyncio.get_running_loop()
        self._rescan_timer = loop.call_later(self._rescan_interval, self._on_rescan_timer)

    def _on_rescan_timer(self) -> None:
        self._rescan_due = True
        self._wake.set()
        self._arm_rescan()

    def _arm_poll(self) -> None:
        if self._poll_timer is None and any(t.polled for t in self._tailers.values()):
            loop = asyncio.get_running_loop()
            self._poll_timer = loop.call_later(self._poll_interval, self._on_poll_timer)

    def _on_poll_timer(self) -> None:
        self._poll_timer = None
        polled = [t for t in self._tailers.values() if t.polled]
        if polled:
            self._dirty.update(dict.fromkeys(polled))
            self._wake.set()
            self._arm_poll()

    def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        for timer in (self._rescan_timer, self._poll_timer):
            if timer is not None:
                timer.cancel()
        self._rescan_timer = self._poll_timer = None
        self._store_read_to_end()
        for t in list(self._tailers.values()):
            self._close(t)
        self._dirty.clear()
        if self._inotify is not None:
            loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        self._wd_tailer.clear()
        self._dir_wd.clear()
        self._wd_dir.clear()
        self._unopened.clear()


def raise_open_file_limit() -> None:
    """One descriptor per tailed file: lift the soft limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ImportError, ValueError, OSError):
        pass

"""In-process harness for the file source: the real FileSource, Batcher, SourceContext and Spool
on one asyncio loop, with a "crash" that drops whatever was not committed (like SIGKILL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard

from edgeagent.config import Config, FilesConfig, SpoolConfig
from edgeagent.otlp import ChunkEncoder, decode_request
from edgeagent.pipeline import Batcher, SourceContext
from edgeagent.sources.files import FileSource
from edgeagent.spool import Spool

BOOT_ID = "00000000-0000-0000-0000-000000000001"


def files_config(state_dir: Path, **files: Any) -> Config:
    files.setdefault("start_at", "beginning")
    files.setdefault("rotate_wait", 0.3)
    files.setdefault("partial_line_timeout", 0.5)
    include = files.pop("include")
    return Config(
        device_id="test",
        state_dir=state_dir,
        files=(FilesConfig(include=tuple(include), **files),),
        spool=SpoolConfig(flush_interval=0.05),
    )


class Harness:
    """`await h.start()`, write files, `await h.wait_lines(n)`, `await h.crash()` or `await h.stop()`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool: Spool | None = None
        self.batcher: Batcher | None = None
        self.source: FileSource | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.spool = Spool.open(self.config.spool_path)
        self.batcher = Batcher(self.spool, ChunkEncoder({"service.name": "test"}, "0"), BOOT_ID, self.config.spool)
        ctx = SourceContext(self.batcher, self.spool, BOOT_ID, self.config)
        self.source = FileSource(self.config)
        self.task = asyncio.create_task(self.source.run(ctx))
        await asyncio.sleep(0)

    async def _cancel(self) -> None:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # surface a crash of the source
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def stop(self) -> None:
        """A clean stop: the source ends, what was read is committed."""
        await self._cancel()
        assert self.batcher is not None and self.spool is not None
        self.batcher.flush()
        self.spool.close()

    async def crash(self) -> None:
        """Like SIGKILL: whatever the batcher holds is lost; the spool keeps what was committed."""
        await self._cancel()
        assert self.batcher is not None and self.spool is not None
        if self.batcher._timer is not None:
            self.batcher._timer.cancel()
        self.spool.close()

    def records(self) -> list[dict[str, Any]]:
        """Every committed record (commits what is pending first)."""
        assert self.batcher is not None and self.spool is not None
        self.batcher.flush()
        return read_records(self.spool)

    def bodies(self) -> list[str]:
        """Bodies of the lines read from files (without the source's own loss reports)."""
        return [r["body"] for r in self.records() if is_line(r)]

    def loss_reports(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "edgeagent.loss.reason" in r["attributes"]]

    async def wait(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.task is not None and self.task.done():
                self.task.result()
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.02)

    async def wait_lines(self, n: int, timeout: float = 20.0) -> list[str]:
        return await self.wait(lambda: (b := self.bodies()) and len(b) >= n and b, timeout, f"{n} lines")


def is_line(record: dict[str, Any]) -> bool:
    return record.get("scope") == "edgeagent/files" and "edgeagent.loss.reason" not in record["attributes"]


def read_records(spool: Spool) -> list[dict[str, Any]]:
    dctx = zstandard.ZstdDecompressor()
    out: list[dict[str, Any]] = []
    for chunk in spool.oldest(10**9):
        out.extend(decode_request(dctx.decompress(chunk.payload)))
    return out


def committed_bodies(state_dir: Path) -> list[str]:
    spool = Spool.open(state_dir / "spool.db")
    try:
        return [r["body"] for r in read_records(spool) if is_line(r)]
    finally:
        spool.close()

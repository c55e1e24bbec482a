"""The syslog source when the spool takes no writes (a real full tmpfs): TCP stops reading, so back-pressure
reaches the sender and nothing is lost; UDP datagrams are dropped, counted and reported once the spool recovers."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from conftest import free_port, spool_records, until
from disk import fill
from test_disk_full import small_disk  # noqa: F401 - the fixture: a real 3 MiB tmpfs

from edgeagent.config import loads
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import Batcher, SourceContext
from edgeagent.records import Batch
from edgeagent.sources.syslog import SyslogSource
from edgeagent.spool import Spool

LOGGER = shutil.which("logger")
TCP_MESSAGES = 20000
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
    pytest.mark.skipif(LOGGER is None, reason="util-linux logger is not installed"),
]


def test_full_spool_pauses_tcp_and_counts_udp_drops(small_disk: Path, tmp_path: Path) -> None:  # noqa: F811
    udp, tcp = free_port(), free_port()
    config = loads(
        f"""
state_dir = "{small_disk}"
[spool]
flush_interval = "50ms"
[[syslog]]
listen = "udp://127.0.0.1:{udp}"
[[syslog]]
listen = "tcp://127.0.0.1:{tcp}"
"""
    )
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"udp {n}\n" for n in range(5000)))
    big_lines = tmp_path / "big-lines.txt"  # 18 MB: more than the kernel's socket buffers on both ends hold
    big_lines.write_text("".join(f"tcp {n} {'p' * 890}\n" for n in range(TCP_MESSAGES)))
    spool = Spool.open(small_disk / "spool.db", max_size=64 * 1024 * 1024)

    async def scenario() -> tuple[int, int, bool]:
        batcher = Batcher(spool, ChunkEncoder({}, "t"), "boot", config.spool)
        ctx = SourceContext(batcher, spool, "boot", config)
        source = SyslogSource(config)
        task = asyncio.create_task(source.run(ctx))
        await until(lambda: source.status()["state"] == "running", "listeners")
        filler = fill(small_disk)
        batcher.add(Batch("test", [b"x" * 1000] * 2000, 0, "boot"))
        batcher.flush()
        assert batcher.stalled, "the spool must fail to commit on a full disk"
        udp_sender = await asyncio.create_subprocess_exec(
            LOGGER, "-n", "127.0.0.1", "-P", str(udp), "-d", "-t", "u", "-f", str(lines)
        )
        await udp_sender.wait()
        tcp_sender = await asyncio.create_subprocess_exec(
            LOGGER, "-n", "127.0.0.1", "-P", str(tcp), "-T", "--octet-count", "-t", "t", "-f", str(big_lines)
        )
        # The sender is blocked by TCP flow control: the agent reads one buffer, then waits for the spool.
        await until(lambda: source.status()["messages"] > 0, "the first TCP read")
        await asyncio.sleep(1.0)
        read_while_stalled = source.status()["messages"]
        sender_blocked = tcp_sender.returncode is None
        dropped = source.status()["dropped"]
        filler.unlink()
        await asyncio.wait_for(tcp_sender.wait(), 120)
        await until(lambda: source.status()["messages"] == TCP_MESSAGES and not batcher.stalled, "all TCP messages")
        await until(lambda: not source.listeners[0]._unreported_drops, "the drop report")
        batcher.flush()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return dropped, read_while_stalled, sender_blocked

    dropped, read_while_stalled, sender_blocked = asyncio.run(scenario())
    assert dropped == 5000, "every datagram received while stalled is counted (or the kernel's drops are)"
    assert read_while_stalled < TCP_MESSAGES and sender_blocked, "TCP is not read on while the spool is stalled"
    records = spool_records(small_disk)
    tcp_numbers = sorted(int(r["body"].split()[1]) for r in records if r["body"].startswith("tcp "))
    assert tcp_numbers == list(range(TCP_MESSAGES)), "nothing sent over TCP is lost"
    loss = [r for r in records if r["attributes"].get("edgeagent.loss.reason") == "syslog_dropped"]
    assert sum(r["attributes"]["edgeagent.loss.records"] for r in loss) == 5000
    assert spool.counters()["syslog_dropped"] == 5000
    spool.close()

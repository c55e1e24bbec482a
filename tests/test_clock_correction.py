"""Wall-time correction at upload (guarantee 7): the one place that shifts times
(`UploaderContext.corrected`), with the live clock of this boot and the spool's
`boots` table for earlier ones. Real spool and batcher; the clock is a fake
because stepping the host's clock in a test would disturb everything else."""

from __future__ import annotations

from pathlib import Path

import zstandard
from conftest import until
from otlp_server import OtlpServer
from test_otlp_http import BOOT, Harness, run

from edgeagent.clock import ClockState
from edgeagent.config import SpoolConfig
from edgeagent.otlp import ChunkEncoder, decode_request
from edgeagent.pipeline import Batcher, UploaderContext
from edgeagent.records import SEVERITY_INFO, Batch, Record
from edgeagent.spool import Spool

REAL = 1_790_000_000 * 10**9  # a synced offset (2026-09)
DAY = 86_400 * 10**9


class FakeClock:
    def __init__(self, offset_ns: int, synced: bool) -> None:
        self.value = ClockState(offset_ns, synced)

    def state(self) -> ClockState:
        return self.value


def _store(spool: Spool, clock: FakeClock, boot: str = BOOT) -> None:
    batcher = Batcher(spool, ChunkEncoder({}, "t"), boot, SpoolConfig(), clock=clock)  # type: ignore[arg-type]
    batcher.add(Batch("kmsg", [Record("r", SEVERITY_INFO, "INFO", None, 5_000_000_000)], 6_000_000_000, boot))
    batcher.flush()


def _times(payload: bytes) -> list[tuple[int, str | None]]:
    raw = zstandard.ZstdDecompressor().decompress(payload)
    return [(r["time_unix_nano"], r["attributes"].get("edgeagent.clock")) for r in decode_request(raw)]


def test_an_idle_device_that_synced_its_clock_uploads_corrected_times(tmp_path: Path) -> None:
    """Reproduction: the correction used only the boots table, written when the batcher
    commits; a device that synced while idle uploaded its backlog with 1970 times."""
    spool = Spool.open(tmp_path / "spool.db")
    clock = FakeClock(1_000, False)  # booted without RTC
    _store(spool, clock)
    clock.value = ClockState(REAL, True)  # NTP, while nothing is committed
    ctx = UploaderContext(spool, None, boot_id=BOOT, clock=clock)  # type: ignore[arg-type]
    (chunk,) = spool.oldest(1)
    assert _times(ctx.payload(chunk)) == [(REAL + 5_000_000_000, "adjusted")]
    (stored,) = spool.oldest(1)
    assert stored.clock_synced and stored.clock_offset_ns == REAL
    assert ctx.payload(stored) == stored.payload  # corrected once
    spool.close()


def test_a_stale_plausible_clock_stepped_by_ntp_is_corrected(tmp_path: Path) -> None:
    """Reproduction: chunks marked synced were never corrected, although clock.py says they are."""
    spool = Spool.open(tmp_path / "spool.db")
    clock = FakeClock(REAL, True)  # fake-hwclock: plausible, a day behind
    _store(spool, clock)
    _store(spool, clock, boot="earlier-boot")
    clock.value = ClockState(REAL + DAY, True)  # NTP steps it
    spool.append([], boot=("earlier-boot", REAL + DAY, True))  # the step, as that boot's batcher recorded it
    ctx = UploaderContext(spool, None, boot_id=BOOT, clock=clock)  # type: ignore[arg-type]
    this_boot, earlier = spool.oldest(2)
    assert _times(ctx.payload(this_boot)) == [(REAL + DAY + 5_000_000_000, None)]
    assert _times(ctx.payload(earlier)) == [(REAL + DAY + 5_000_000_000, None)]
    # Slew below Clock.JUMP_NS is not a step: nothing is rewritten.
    clock.value = ClockState(REAL + DAY + 300_000_000, True)
    (again, _) = spool.oldest(2)
    assert ctx.payload(again) == again.payload
    spool.close()


def test_split_and_correction_shift_times_once(tmp_path: Path) -> None:
    """Reproduction: with a small max_request_size the split parts were corrected again
    (records sent 56 years in the future)."""
    with OtlpServer() as server:
        h = Harness(tmp_path, server.url, otlp='max_request_size = "4KiB"')
        clock = FakeClock(1_000, False)
        h.batcher.clock = clock  # type: ignore[assignment]
        h.ctx = UploaderContext(h.spool, h.config, boot_id=BOOT, clock=clock)  # type: ignore[arg-type]
        records = [Record(f"{i:05d} " + "y" * 60, SEVERITY_INFO, "INFO", None, 10**9 + i) for i in range(300)]

        async def test() -> None:
            h.add_records(records)
            clock.value = ClockState(REAL, True)
            h.start()
            await until(lambda: h.spool.chunk_count == 0, "delivery in parts")
            await h.stop()

        run(test)
        assert len(server.received) > 4
        got = sorted(r.time_unix_nano for rec in server.received for r in rec.records())
        assert got == [REAL + 10**9 + i for i in range(300)]
        markers = {kv.value.string_value for rec in server.received for r in rec.records() for kv in r.attributes}
        assert "adjusted" in markers and "unsynced" not in markers
    h.close()


def test_mqtt_split_and_correction_shift_times_once(tmp_path: Path) -> None:
    """The same over MQTT: chunks above the broker's maximum packet size are split after
    the correction, and the parts must not be corrected again."""
    from conftest import Broker, wait_for
    from mqtt_helpers import BOOT_ID, Subscriber, UploaderHarness, decode

    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Broker(workdir, "max_packet_size 6000\n")
    broker.start()
    logs = Subscriber(broker.port, "edgeagent/gw-7/logs")
    config = (
        f'device_id = "gw-7"\nstate_dir = "{tmp_path / "state"}"\n[kmsg]\nenabled = false\n'
        f'[upload]\nretry_initial = "200ms"\nretry_max = "2s"\n[mqtt]\nurl = "{broker.url}"\n'
    )
    h = UploaderHarness(tmp_path / "state", config)
    try:
        clock = FakeClock(1_000, False)

        def use_clock() -> None:
            h.batcher.clock = clock  # type: ignore[assignment]
            h.ctx = UploaderContext(h.spool, h.config, boot_id=BOOT_ID, clock=clock)  # type: ignore[arg-type]
            h.batcher.on_commit = h.ctx.wake

        h.call(use_clock)
        h.add_lines(0, 2000, 2000)  # one chunk of about 15 KB, observed at monotonic 1 s
        clock.value = ClockState(REAL, True)
        h.start()
        wait_for(lambda: h.backlog()["chunks"] == 0, 60, what="all parts delivered")
        wait_for(
            lambda: (
                sum(len(decode(m.payload).resource_logs[0].scope_logs[0].log_records) for m in logs.received()) >= 2000
            ),
            what="every line",
        )
        times = {
            r.observed_time_unix_nano
            for m in logs.received()
            for rl in decode(m.payload).resource_logs
            for sl in rl.scope_logs
            for r in sl.log_records
        }
        assert h.status()["splits"] >= 1
        assert times == {REAL + 1_000_000_000}
    finally:
        h.close()
        logs.close()
        broker.stop()

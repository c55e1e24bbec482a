"""The pstore source with the real Spool and Batcher, on a directory of fixture
dumps (tests/data/kmsg/pstore: a ramoops panic dump and its console log); the
real /sys/fs/pstore holds nothing on a machine that did not crash."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import zstandard

from edgeagent.config import Config, KmsgConfig, SpoolConfig
from edgeagent.otlp import ChunkEncoder, decode_request
from edgeagent.pipeline import Batcher, SourceContext
from edgeagent.sources.kmsg import PREVIOUS_BOOT_KEY
from edgeagent.sources.pstore import PstoreSource, file_identity, parse_dump
from edgeagent.spool import Spool

FIXTURES = Path(__file__).parent / "data" / "kmsg" / "pstore"
CURRENT_BOOT = "boot-now"
PREVIOUS_BOOT = "boot-crashed"
PREVIOUS_OFFSET = 1_790_000_000 * 10**9


def pstore_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pstore"
    shutil.copytree(FIXTURES, directory)
    return directory


class Harness:
    def __init__(self, state_dir: Path, directory: Path, clear: bool = False, boot_id: str = CURRENT_BOOT) -> None:
        self.config = Config(
            state_dir=state_dir,
            kmsg=KmsgConfig(pstore_dir=str(directory), pstore_clear=clear),
            spool=SpoolConfig(flush_interval=0.05),
        )
        self.spool = Spool.open(self.config.spool_path)
        self.batcher = Batcher(self.spool, ChunkEncoder({"device.id": "t"}, "test"), boot_id, self.config.spool)
        self.ctx = SourceContext(self.batcher, self.spool, boot_id, self.config)

    def run(self) -> PstoreSource:
        source = PstoreSource(self.config)

        async def main() -> None:
            await source.run(self.ctx)
            self.batcher.flush()

        asyncio.run(main())
        return source

    def records(self) -> list[dict[str, Any]]:
        dctx = zstandard.ZstdDecompressor()
        return [r for c in self.spool.oldest(10**6) for r in decode_request(dctx.decompress(c.payload))]

    def close(self) -> None:
        self.spool.close()


def remember_previous_boot(h: Harness, offset_known: bool = True) -> None:
    """What the agent stored while the crashed boot ran: a kmsg position in
    that boot and (via its batcher) the boot's clock offset."""
    boot = (PREVIOUS_BOOT, PREVIOUS_OFFSET, True) if offset_known else None
    h.spool.append([], {"kmsg": f"{PREVIOUS_BOOT}:1234"}, None, boot)


def test_parse_a_ramoops_dump() -> None:
    header, lines = parse_dump((FIXTURES / "dmesg-ramoops-0").read_bytes())
    assert header == "Panic#1 Part1"
    assert lines[0] == (6, 301_112_233_000, "usb 1-1: USB disconnect, device number 2")
    assert lines[-1] == (0, 305_779_001_000, "Kernel panic - not syncing: Fatal exception")
    header, lines = parse_dump((FIXTURES / "console-ramoops-0").read_bytes())
    assert header == ""
    assert lines[2] == (-1, 305_779_500_000, "Rebooting in 1 seconds..")
    assert parse_dump(b"no timestamp at all\n\n") == ("", [(-1, -1, "no timestamp at all")])


def test_collects_the_previous_boots_crash_log_once(tmp_path: Path) -> None:
    directory = pstore_dir(tmp_path)
    h = Harness(tmp_path / "state", directory)
    remember_previous_boot(h)
    source = h.run()
    records = h.records()
    panic = [r for r in records if r["attributes"].get("edgeagent.pstore.file") == "dmesg-ramoops-0"]
    assert panic[0]["severity_number"] == 13 and "previous boot (boot-crashed)" in panic[0]["body"]
    assert [r["body"] for r in panic[1:]] == [
        "usb 1-1: USB disconnect, device number 2",
        "gpio-watchdog watchdog0: pretimeout 5s",
        "BUG: kernel NULL pointer dereference, address: 0000000000000008",
        "Kernel panic - not syncing: Fatal exception",
    ]
    assert [r["severity_number"] for r in panic[1:]] == [9, 13, 21, 21]
    for r in panic:
        assert r["attributes"]["boot.id"] == PREVIOUS_BOOT
        assert r["attributes"]["log.source"] == "pstore"
        assert r["attributes"]["edgeagent.pstore.dump"] == "Panic#1 Part1"
    # The kernel timestamps are placed on the crashed boot's clock.
    assert panic[1]["time_unix_nano"] == PREVIOUS_OFFSET + 301_112_233_000
    assert panic[0]["observed_time_unix_nano"] == PREVIOUS_OFFSET + 305_779_001_000
    console = [r for r in records if r["attributes"].get("edgeagent.pstore.file") == "console-ramoops-0"]
    assert len(console) == 4
    assert source.status()["collected_files"] == 2 and source.status()["state"] == "done"
    assert len(h.spool.positions("pstore:")) == 2
    assert directory.joinpath("dmesg-ramoops-0").exists()  # pstore_clear is off

    again = h.run()
    assert again.status()["collected_files"] == 0
    assert len(h.records()) == len(records)
    h.close()


def test_unknown_previous_boot_keeps_the_uptime_as_an_attribute(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", pstore_dir(tmp_path))
    h.run()
    records = [r for r in h.records() if r["attributes"].get("edgeagent.pstore.file") == "dmesg-ramoops-0"]
    assert {r["attributes"]["boot.id"] for r in records} == {"unknown"}
    assert "time_unix_nano" not in records[1]
    assert records[1]["attributes"]["kmsg.uptime_ns"] == 301_112_233_000
    assert records[1]["observed_time_unix_nano"] > PREVIOUS_OFFSET // 2  # now, not 1970
    h.close()


def test_previous_boot_after_the_kmsg_source_moved_on(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", pstore_dir(tmp_path))
    h.spool.append([], {"kmsg": f"{CURRENT_BOOT}:10", PREVIOUS_BOOT_KEY: PREVIOUS_BOOT}, None, (PREVIOUS_BOOT, 0, True))
    h.run()
    assert {r["attributes"]["boot.id"] for r in h.records()} == {PREVIOUS_BOOT}
    h.close()


def test_pstore_clear_removes_files_only_once_their_records_are_committed(tmp_path: Path) -> None:
    directory = pstore_dir(tmp_path)
    h = Harness(tmp_path / "state", directory, clear=True)
    source = h.run()
    assert sorted(p.name for p in directory.iterdir()) == []
    assert source.status()["cleared_files"] == 2
    assert len(h.records()) == 5 + 4
    h.close()


def test_a_collected_file_left_behind_is_removed_at_the_next_start(tmp_path: Path) -> None:
    directory = pstore_dir(tmp_path)
    h = Harness(tmp_path / "state", directory)
    h.run()
    key = file_identity(directory / "dmesg-ramoops-0")
    assert key in h.spool.positions("pstore:")
    h.close()
    h = Harness(tmp_path / "state", directory, clear=True)
    source = h.run()
    assert not any(directory.iterdir())
    assert source.status()["collected_files"] == 0
    assert len(h.records()) == 9
    h.close()


def test_a_new_dump_with_a_reused_name_is_collected(tmp_path: Path) -> None:
    directory = pstore_dir(tmp_path)
    h = Harness(tmp_path / "state", directory)
    h.run()
    (directory / "dmesg-ramoops-0").write_bytes(b"Oops#1 Part1\n<3>[   12.000000] a different crash\n")
    source = h.run()
    assert source.status()["collected_files"] == 1
    assert "a different crash" in [r["body"] for r in h.records()]
    h.close()


def test_missing_directory_is_not_an_error(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", tmp_path / "no-pstore")
    source = h.run()
    assert source.status()["state"] == "done" and source.status()["collected_files"] == 0
    h.close()


def test_an_unreadable_pstore_directory_is_an_error_not_silence(tmp_path: Path) -> None:
    """As an unprivileged user (the service's `edgeagent` user without CAP_DAC_READ_SEARCH), a 0700
    pstore directory must raise, not look empty: the last boot's crash log would be missed silently."""
    import subprocess
    import sys

    from edgeagent.sources.pstore import list_dumps

    pstore = tmp_path / "pstore"
    pstore.mkdir()
    (pstore / "dmesg-ramoops-0").write_text("Panic#1 Part1\n<0>[ 1.0] oops\n")
    pstore.chmod(0o700)
    assert [p.name for p in list_dumps(pstore)] == ["dmesg-ramoops-0"]  # as root: readable
    assert list_dumps(tmp_path / "absent") == []
    code = (
        f"from pathlib import Path; from edgeagent.sources.pstore import list_dumps; list_dumps(Path({str(pstore)!r}))"
    )
    as_nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    assert as_nobody.returncode != 0 and "PermissionError" in as_nobody.stderr, (as_nobody.stdout, as_nobody.stderr)

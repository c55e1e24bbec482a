"""The QEMU runner's pure logic, in the default suite (no QEMU, no image):
the image cache key, the input/results disks, the checks of what arrived."""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "qemu"))

from checks import SEVERITY, check_file_lines, check_ring, powercut_tally
from harness import QEMU_DIR, image_key, read_results, write_input_disk
from scenarios import SCENARIOS, agent_config

from edgeagent.config import loads

BOOT = "11111111-2222-4333-8444-555555555555"


def kmsg(seq: int, body: str, severity: int, chunk: str = "c1", boot: str = BOOT) -> dict:
    return {
        "scope": "edgeagent/kmsg",
        "body": body,
        "severity_number": severity,
        "attributes": {"boot.id": boot, "kmsg.sequence": seq},
        "chunk_id": chunk,
    }


def line(body: str, chunk: str = "c1") -> dict:
    return {"scope": "edgeagent/files", "body": body, "attributes": {}, "chunk_id": chunk}


def test_image_key_follows_every_input(tmp_path: Path) -> None:
    copy = tmp_path / "qemu"
    shutil.copytree(QEMU_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = image_key("arm64", "linux-image-x=1", copy)
    assert image_key("arm64", "linux-image-x=1", copy) == base
    assert image_key("armhf", "linux-image-x=1", copy) != base
    assert image_key("arm64", "linux-image-x=2", copy) != base
    with open(copy / "packages.txt", "a") as f:
        f.write("less\n")
    changed = image_key("arm64", "linux-image-x=1", copy)
    assert changed != base
    (copy / "image/etc/motd").write_text("hello\n")
    assert image_key("arm64", "linux-image-x=1", copy) != changed
    # The guest scenario scripts are per run, not part of the image.
    (copy / "guest/edgetest.py").write_text("changed\n")
    (copy / "image/etc/motd").unlink()
    assert image_key("arm64", "linux-image-x=1", copy) == changed


def test_input_disk_is_a_padded_tar(tmp_path: Path) -> None:
    src = tmp_path / "file.whl"
    src.write_bytes(b"wheel")
    disk = tmp_path / "input.img"
    write_input_disk(disk, {"setup.sh": b"#!/bin/sh\n", "file.whl": src})
    assert disk.stat().st_size % 2**20 == 0
    with tarfile.open(disk) as tar:
        assert sorted(tar.getnames()) == ["file.whl", "setup.sh"]
        assert tar.getmember("setup.sh").mode == 0o755


def test_results_disk_read_without_mounting(tmp_path: Path) -> None:
    disk = tmp_path / "results.img"
    with open(disk, "wb") as f:
        f.truncate(2**20)
    assert read_results(disk) == {}  # the guest wrote nothing
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"ok": true}')
    with open(disk, "r+b") as f, tarfile.open(fileobj=f, mode="w") as tar:  # as the guest writes it onto /dev/vdc
        tar.add(out, arcname=".")
    assert read_results(disk) == {"result.json": b'{"ok": true}'}


def test_check_ring_wants_every_record_once_with_its_severity() -> None:
    ring = {
        "boot_id": BOOT,
        "records": [
            {"seq": 0, "level": 6, "text": "Booting Linux"},
            {"seq": 1, "level": 3, "text": "tab\\x09here"},
            {"seq": 2, "level": 4, "text": "warn"},
        ],
    }
    good = [kmsg(0, "Booting Linux", 9), kmsg(1, "tab\there", 17), kmsg(2, "warn", 13)]
    assert check_ring(ring, good) == []
    assert "arrived 2 times" in " ".join(check_ring(ring, [*good, kmsg(2, "warn", 13, chunk="c2")]))
    assert "1 of 3 ring records missing: [2]" in " ".join(check_ring(ring, good[:2]))
    assert "severity 9 for level 3" in " ".join(check_ring(ring, [good[0], kmsg(1, "tab\there", 9), good[2]]))
    other_boot = [kmsg(0, "Booting Linux", 9, boot="other")]
    assert "3 of 3 ring records missing" in " ".join(check_ring(ring, other_boot))
    assert SEVERITY[0] == 21 and SEVERITY[7] == 5


def test_check_file_lines() -> None:
    expected = ["edgetest a f0", "edgetest a f1"]
    assert check_file_lines([line("edgetest a f0"), line("edgetest a f1")], expected) == []
    problems = check_file_lines([line("edgetest a f0"), line("edgetest a f0", "c2")], expected)
    assert "1 of 2 file lines missing" in problems[0] and "more than once" in problems[1]


def test_powercut_tally_counts_losses_and_explains_duplicates() -> None:
    rounds = [{"boot_id": "b1", "kseq": 3, "flines": 2}, {"boot_id": "b2", "kseq": 2, "flines": 4}]
    received = [
        kmsg(0, "x", 9, "c1", "b1"),
        kmsg(1, "x", 9, "c1", "b1"),
        kmsg(1, "x", 9, "c1", "b1"),  # the same chunk again: sent before the cut, acked after
        # b1 seq 2 committed but never arrived: lost
        kmsg(0, "x", 9, "c2", "b2"),
        kmsg(0, "x", 9, "c3", "b2"),  # read again into another chunk
        kmsg(1, "x", 9, "c3", "b2"),
        kmsg(5, "x", 9, "c3", "b2"),  # not committed before the cut: not counted either way
        line("edgetest pc f0"),
        line("edgetest pc f1"),
        line("edgetest pc f1", "c9"),
        line("edgetest pc f3"),
    ]
    tally = powercut_tally(rounds, received)
    assert tally["kmsg_committed"] == 5
    assert tally["kmsg_lost"] == 1
    assert tally["kmsg_dup_same_chunk"] == 1
    assert tally["kmsg_dup_other_chunk"] == 1
    assert tally["file_committed"] == 4
    assert tally["file_lost"] == 1  # f2
    assert tally["file_dup_other_chunk"] == 1
    assert tally["chunks_resent"] == 1  # c1
    assert [r["kmsg_lost"] for r in tally["per_round"]] == [1, 0]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_config_is_valid(scenario: str) -> None:
    config = loads(agent_config("armhf", scenario))
    assert config.spool.durability == ("normal" if scenario == "powercut_normal" else "full")


def test_agent_failures_are_found_in_its_journal() -> None:
    from scenarios import agent_failures

    journal = (
        "[  160.4] edgeqemu systemd[1]: Started edgeagent.service - edgeagent log agent.\n"
        "[  203.9] edgeqemu edgeagent[240]: edgeagent: error: creating or migrating the spool schema failed\n"
        "[  205.0] edgeqemu systemd[1]: edgeagent.service: Main process exited, code=exited, status=1/FAILURE\n"
        "[  233.3] edgeqemu edgeagent[263]: 2026-11-30 INFO edgeagent: edgeagent 0.1.0 started\n"
    )
    assert len(agent_failures(journal)) == 2
    assert agent_failures(journal.splitlines()[0] + "\n" + journal.splitlines()[3]) == []

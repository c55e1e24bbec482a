"""The /dev/kmsg record parser, on records recorded from real kernels (tests/data/kmsg).

The data files hold what `cat /dev/kmsg` prints: one record per line, with its
dictionary entries on the following lines that start with a space.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeagent.records import SEVERITY_DEBUG, SEVERITY_ERROR, SEVERITY_FATAL, SEVERITY_INFO, SEVERITY_WARN
from edgeagent.sources.kmsg import (
    MalformedRecord,
    format_position,
    open_error_message,
    parse_position,
    parse_record,
    sequence_of,
)

DATA = Path(__file__).parent / "data" / "kmsg"


def recorded(name: str) -> list[bytes]:
    """The raw records of a data file, each as one read() of /dev/kmsg returns it."""
    records: list[bytes] = []
    for line in (DATA / name).read_bytes().splitlines(keepends=True):
        if line.startswith(b" ") and records:
            records[-1] += line
        else:
            records.append(line)
    return records


def by_sequence(name: str) -> dict[int, tuple[int, object]]:
    out = {}
    for raw in recorded(name):
        seq, level, record = parse_record(raw)
        out[seq] = (level, record)
    return out


def test_every_record_of_a_real_boot_parses_in_order() -> None:
    raws = recorded("x86_64-6.18-boot.txt")
    seqs = [parse_record(raw)[0] for raw in raws]
    assert seqs == sorted(seqs)
    assert len(seqs) == len(set(seqs)) == len(raws)


def test_plain_record_fields() -> None:
    seq, level, record = parse_record(recorded("x86_64-6.18-boot.txt")[2])
    assert (seq, level) == (2, 4)
    assert record.body == "[Firmware Bug]: TSC doesn't count with P0 frequency!"
    assert (record.severity, record.severity_text) == (SEVERITY_WARN, "WARNING")
    assert record.time_mono_ns == 1  # stamped 0 by the kernel; 0 would mean "time unknown"
    assert record.attributes == {"kmsg.sequence": 2, "kmsg.facility": "kern", "kmsg.level": 4}


def test_dictionary_lines_become_attributes_not_body() -> None:
    records = by_sequence("x86_64-6.18-boot.txt")
    _, record = records[194]
    assert record.body == "acpi PNP0A08:00: _OSC: OS supports [ExtendedConfig ASPM ClockPM Segments MSI HPX-Type3]"
    assert record.attributes["kmsg.dict.SUBSYSTEM"] == "acpi"
    assert record.attributes["kmsg.dict.DEVICE"] == "+acpi:PNP0A08:00"
    assert record.time_mono_ns == 289948 * 1000
    assert "SUBSYSTEM" not in record.body


def test_escapes_are_decoded() -> None:
    records = by_sequence("x86_64-6.18-boot.txt")
    assert records[90][1].body == "rcu: \tRCU restricting CPUs from NR_CPUS=256 to nr_cpu_ids=2."
    assert records[287][1].body == (
        "amd_pstate: The CPPC feature is supported but currently disabled by the BIOS.\n"
        "Please enable it if your BIOS has the CPPC option."
    )
    crafted = by_sequence("printk-caller.txt")
    assert crafted[349][1].body == "back\\slash, tab\tand line\nbreak"
    assert crafted[351][1].body == "café UTF-8 escaped, and \ufffd\ufffd invalid bytes"
    assert crafted[350][1].attributes["kmsg.dict.MODEL"] == "Disk with\\space"


def test_caller_ids_continuation_and_unknown_header_fields() -> None:
    records = by_sequence("printk-caller.txt")
    assert records[339][1].attributes["kmsg.caller"] == "T1"
    assert records[341][1].attributes["kmsg.caller"] == "C0"
    assert "kmsg.continuation" not in records[339][1].attributes
    fragment = records[343][1]
    assert fragment.attributes["kmsg.continuation"] is True
    assert fragment.body == "usb 1-1: new high-speed USB device number 3 using "
    assert records[344][1].attributes["kmsg.continuation"] is True
    unknown = records[345][1]
    assert unknown.attributes["kmsg.caller"] == "T9"
    assert unknown.body == "a record with an unknown trailing header field"
    usb = records[342][1]
    assert usb.attributes["kmsg.dict.DEVICE"] == "+usb:1-1"
    assert (usb.severity, usb.severity_text) == (SEVERITY_ERROR, "ERR")


@pytest.mark.parametrize(
    ("seq", "facility", "level", "severity", "text"),
    [
        (346, "user", 4, SEVERITY_WARN, "WARNING"),
        (347, "daemon", 6, SEVERITY_INFO, "INFO"),
        (348, "local7", 7, SEVERITY_DEBUG, "DEBUG"),
    ],
)
def test_facility_and_level_from_priority(seq: int, facility: str, level: int, severity: int, text: str) -> None:
    got_level, record = by_sequence("printk-caller.txt")[seq]
    assert got_level == level
    assert record.attributes["kmsg.facility"] == facility
    assert record.attributes["kmsg.level"] == level
    assert (record.severity, record.severity_text) == (severity, text)


@pytest.mark.parametrize(
    ("level", "severity"),
    [(0, 21), (1, 21), (2, 21), (3, 17), (4, 13), (5, 10), (6, 9), (7, 5)],
)
def test_severity_mapping(level: int, severity: int) -> None:
    _, _, record = parse_record(f"{level},1,1,-;x\n".encode())
    assert record.severity == severity
    assert record.severity_text


def test_emergency_record_is_fatal() -> None:
    level, record = by_sequence("x86_64-6.18-boot.txt")[113]
    assert (level, record.severity, record.severity_text) == (0, SEVERITY_FATAL, "EMERG")


@pytest.mark.parametrize("raw", recorded("malformed.txt"))
def test_malformed_records_raise_a_clear_error(raw: bytes) -> None:
    with pytest.raises(MalformedRecord):
        parse_record(raw)


def test_sequence_of_reads_only_the_header() -> None:
    assert sequence_of(b"6,1234,5,-;anything\n") == 1234
    with pytest.raises(MalformedRecord):
        sequence_of(b"garbage")


def test_position_round_trip() -> None:
    boot = "2e12d29d-0d27-4033-824c-954004ff1564"
    assert parse_position(format_position(boot, 42)) == (boot, 42)
    assert parse_position("garbage") is None
    assert parse_position("boot:") is None


def test_error_messages_name_the_fix() -> None:
    denied = open_error_message("/dev/kmsg", PermissionError(1, "Operation not permitted"))
    assert "CAP_SYSLOG" in denied and "dmesg_restrict" in denied
    missing = open_error_message("/dev/kmsg", FileNotFoundError(2, "No such file or directory"))
    assert "/dev/kmsg" in missing and "container" in missing

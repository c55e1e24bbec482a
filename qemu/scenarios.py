"""The scenarios, host side: start the test's broker, boot the guest with a
scenario, act on its console cues (stop the broker, pull the link, cut the
power), then check what arrived against what the guest saw.

`run(name, arch, session)` returns a `Result`; `qemu/run` and the pytest
module tests/qemu/test_qemu.py both call it.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard
from harness import (
    GUEST_DIR,
    REPO,
    SERVICE_ADDR,
    Guest,
    GuestError,
    build_wheel,
    ensure_image,
    run_wheels,
    write_input_disk,
)

sys.path.insert(0, str(REPO))
from checks import check_file_lines, check_ring, loss_records, powercut_tally

from edgeagent.otlp import decode_request
from tests.conftest import Broker
from tests.mqtt_helpers import Subscriber

MQTT_PORT = 1883
SCENARIOS = ["first_boot", "reboot", "tmp_wiped", "clock", "link", "powercut", "powercut_normal", "idle", "reload"]
POWERCUT_ROUNDS = 20  # issue 12: 20 power cuts in a row (each round is a boot)
POWERCUT_NORMAL_ROUNDS = 6  # durability = "normal": enough rounds to show what it loses


@dataclass
class Result:
    scenario: str
    arch: str
    ok: bool = False
    seconds: float = 0.0
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        figures = f" {json.dumps(self.figures, sort_keys=True)}" if self.figures else ""
        verdict = "PASS" if self.ok else "FAIL"
        return f"{self.scenario:16} {self.arch:6} {verdict} {self.seconds:6.0f}s {self.detail}{figures}"


@dataclass
class Session:
    """What the scenarios of one run share: a work directory and the wheel of the checkout."""

    workdir: Path
    log: Callable[[str], None] = print
    powercut_rounds: int = POWERCUT_ROUNDS
    on_result: Callable[[Result], None] = lambda result: print(result.line(), flush=True)
    results: list[Result] = field(default_factory=list)
    _wheel: Path | None = None

    def wheel(self) -> Path:
        if self._wheel is None:
            self._wheel = build_wheel(self.workdir / "wheel")
        return self._wheel


class Receiver:
    """The test's mosquitto on 127.0.0.1 and a persistent subscriber, so that
    stopping and starting the broker loses nothing on the receiving side."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.broker = Broker(workdir, f"persistence true\npersistence_location {workdir}/\nautosave_interval 0\n")
        self.broker.start()
        self.subscriber = Subscriber(self.broker.port, "edgeagent/+/logs", persistent=True, client_id="qemu-receiver")

    def records(self) -> list[dict[str, Any]]:
        out = []
        dctx = zstandard.ZstdDecompressor()
        for message in self.subscriber.received():
            for record in decode_request(dctx.decompress(message.payload)):
                record["chunk_id"] = message.user_properties.get("chunk-id", "")
                out.append(record)
        return out

    def close(self) -> None:
        self.subscriber.close()
        self.broker.stop()


def agent_config(arch: str, scenario: str) -> str:
    durability = "normal" if scenario == "powercut_normal" else "full"
    # link: a long retry back-off, so that only the network watch can explain a quick drain after link-up.
    retry = (
        'retry_initial = "30s"\nretry_max = "60s"\n'
        if scenario == "link"
        else 'retry_initial = "1s"\nretry_max = "5s"\n'
    )
    keepalive = 'keepalive = "4s"\n' if scenario == "link" else ""
    return (
        f'device_id = "qemu-{arch}"\nstate_dir = "/var/lib/edgeagent"\n\n'
        '[kmsg]\nenabled = true\nmin_priority = "debug"\n\n'
        '[[files]]\ninclude = ["/var/log/edgetest/*.log"]\nstart_at = "beginning"\n\n'
        f'[spool]\ndurability = "{durability}"\n\n'
        f'[upload]\nto = "mqtt"\n{retry}\n'
        f'[mqtt]\nurl = "mqtt://{SERVICE_ADDR}:{MQTT_PORT}"\ntopic = "edgeagent/{{device_id}}/logs"\n{keepalive}'
    )


def service_unit() -> Path:
    """The unit a device image ships (packaging/: Type=notify, its own user, sandboxed),
    or the runner's minimal one (EDGEAGENT_QEMU_UNIT=minimal, or if packaging/ has none)."""
    packaged = REPO / "packaging/systemd/edgeagent.service"
    if os.environ.get("EDGEAGENT_QEMU_UNIT", "packaged") == "packaged" and packaged.exists():
        return packaged
    return GUEST_DIR / "edgeagent.service"


def input_files(session: Session, arch: str, scenario: str) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {name: GUEST_DIR / name for name in ("setup.sh", "scenario.sh", "edgetest.py")}
    for wheel in [session.wheel(), *run_wheels()]:
        files[wheel.name] = wheel
    files["edgeagent.toml"] = agent_config(arch, scenario).encode()
    files["edgeagent.service"] = service_unit()
    return files


def ring_dumps(results: dict[str, bytes]) -> list[dict[str, Any]]:
    return [json.loads(data) for name, data in sorted(results.items()) if name.startswith("ring-")]


def finish(guest: Guest, timeout: float) -> dict[str, bytes]:
    guest.wait_console(r"EDGE: done ok=True", timeout)
    guest.wait_exit(120)
    results = guest.results()
    if not results:
        raise GuestError("the guest wrote no results")
    return results


def verify(results: dict[str, bytes], received: list[dict[str, Any]], file_lines: list[str]) -> list[str]:
    problems = []
    for ring in ring_dumps(results):
        problems += check_ring(ring, received)
    problems += check_file_lines(received, file_lines)
    problems += [f"agent reported a loss: {body}" for body in loss_records(received)]
    problems += agent_failures(results.get("agent.log", b"").decode(errors="replace"))
    return problems


def agent_failures(journal: str) -> list[str]:
    """The agent exited on its own during the last boot (systemd restarted it, hiding the failure)."""
    return [
        f"the agent failed: {line.strip()}"
        for line in journal.splitlines()
        if "edgeagent: error:" in line or "Main process exited" in line
    ][:3]


def lines(tag: str, count: int) -> list[str]:
    return [f"edgetest {tag} f{i}" for i in range(count)]


# --- the scenarios -------------------------------------------------------------------


def first_boot(guest: Guest, rx: Receiver, result: Result) -> list[str]:
    guest.boot("first_boot")
    results = finish(guest, 600)
    rings = ring_dumps(results)
    result.detail = f"{len(rings[0]['records'])} ring records"
    return verify(results, rx.records(), lines("first-boot", 6))


def reboot(guest: Guest, rx: Receiver, result: Result, wipe_tmp: bool = False) -> list[str]:
    guest.boot("tmp_wiped" if wipe_tmp else "reboot")
    guest.wait_console(r"EDGE: rebooting with (\d+) chunks unsent", 600)
    results = finish(guest, 600)
    rings = ring_dumps(results)
    problems = []
    if len(rings) != 2 or rings[0]["boot_id"] == rings[1]["boot_id"]:
        problems.append(f"expected two boots with different boot ids: {[r['boot_id'] for r in rings]}")
    expected = lines("boot1-sent", 4) + lines("boot1-unsent", 5) + lines("boot2", 4)
    if wipe_tmp:
        expected += lines("boot1-after-wipe", 4)
    result.detail = "boots " + " ".join(f"{r['boot_id'][:8]}:{len(r['records'])}rec" for r in rings)
    return problems + verify(results, rx.records(), expected)


def clock(guest: Guest, rx: Receiver, result: Result) -> list[str]:
    rx.broker.stop()  # nothing leaves before the clock is set, as on a device without network time
    started = time.time()
    guest.boot("clock")
    guest.wait_console(r"EDGE: clock set to (\d{9,})", 600)
    rx.broker.start()  # at once: the chunks read at 1970 are sent before the agent's next commit
    results = finish(guest, 600)
    received = rx.records()
    ring = ring_dumps(results)[0]
    problems = verify(results, received, lines("clock-1970", 4) + lines("clock-set", 2))
    ours = [
        r
        for r in received
        if r.get("attributes", {}).get("boot.id") == ring["boot_id"] or str(r.get("body", "")).startswith("edgetest ")
    ]
    low, high = (started - 120) * 1e9, (time.time() + 120) * 1e9
    wrong = [r for r in ours if not low <= (r.get("time_unix_nano") or r.get("observed_time_unix_nano", 0)) <= high]
    if wrong:
        problems.append(f"{len(wrong)} of {len(ours)} records with a wrong wall time, e.g. {wrong[0]}")
    marks: dict[str, int] = {}
    for r in ours:
        mark = r.get("attributes", {}).get("edgeagent.clock", "none")
        marks[mark] = marks.get(mark, 0) + 1
    if marks.get("unsynced"):
        problems.append(f"records still marked unsynced: {marks}")
    figures = json.loads(results["result.json"])["figures"]
    if not figures.get("sent_before_next_commit"):
        problems.append("the agent committed under the new clock before sending the 1970 chunks: case not covered")
    result.figures = {"records": len(ours), "clock_marks": marks, "wrong_wall_time": len(wrong)}
    result.detail = "1970 chunks sent after the clock was set, before the next commit"
    return problems


def link(guest: Guest, rx: Receiver, result: Result) -> list[str]:
    guest.boot("link")
    guest.wait_console(r"EDGE: link-down-please", 600)
    guest.set_link(False)
    guest.wait_console(r"EDGE: link-up-please", 600)
    guest.set_link(True)
    results = finish(guest, 600)
    figures = json.loads(results["result.json"])["figures"]
    result.figures = figures
    problems = verify(results, rx.records(), lines("link-down", 6))
    up = figures.pop("carrier_up_at")
    log = results.get("agent.log", b"").decode(errors="replace")
    wake = first_after(log, r"network watch: .*waking the uploader", up)
    connected = first_after(log, r"mqtt: connected to", up)
    if wake is None or connected is None:
        return [*problems, f"after link-up: network watch wake {wake}, reconnect {connected} (agent log)"]
    figures["link_up_to_wake_s"] = round(wake - up, 3)
    figures["link_up_to_reconnect_s"] = round(connected - up, 3)
    # "Starts draining": the uploader is connected again and sending (journal stamps, guest monotonic clock).
    if connected - up > 2.0:
        problems.append(f"reconnected {connected - up:.2f}s after link-up (> 2 s)")
    result.detail = "woken by the network watch (retry back-off was 30 s)"
    return problems


def first_after(journal: str, pattern: str, after: float) -> float | None:
    """The monotonic stamp (journalctl -o short-monotonic) of the first line matching `pattern` after `after`."""
    for line in journal.splitlines():
        stamp = re.match(r"\[\s*(\d+\.\d+)\]", line)
        if stamp and float(stamp[1]) >= after and re.search(pattern, line):
            return float(stamp[1])
    return None


def powercut(guest: Guest, rx: Receiver, result: Result, rounds: int, log: Callable[[str], None]) -> list[str]:
    durability = "normal" if result.scenario == "powercut_normal" else "full"
    rng = random.Random(42)
    cuts = []
    for n in range(1, rounds + 1):
        started = time.monotonic()
        broker_up = n % 3 != 2  # every third round the broker is down during the whole boot
        if broker_up and rx.broker.proc is None:
            rx.broker.start()
        elif not broker_up and rx.broker.proc is not None:
            rx.broker.stop()
        guest.boot("powercut")
        guest.wait_console(r"EDGE: writer start", 600)
        report = r"EDGE: committed boot_id=(\S+) kseq=(-?\d+) flines=(\d+) written=(\d+)"
        last = guest.wait_console(report, 600)
        while int(last[2]) < 0:  # the agent has not committed anything of this boot yet
            last = guest.wait_console(report, 600)
        for _ in range(rng.randint(4, 24)):  # then 1 to 6 s more of writing and uploading
            last = guest.wait_console(report, 120)
        guest.power_cut()
        assert last is not None
        cuts.append({"boot_id": last[1], "kseq": int(last[2]), "flines": int(last[3]), "written": int(last[4])})
        broker = "up" if broker_up else "down"
        took = time.monotonic() - started
        log(f"{result.scenario} {guest.arch.name} round {n}/{rounds} (broker {broker}, {took:.0f}s): cut at {cuts[-1]}")
    if rx.broker.proc is None:
        rx.broker.start()
    guest.boot("powercut_final")
    finish(guest, 900)
    tally = powercut_tally(cuts, rx.records())
    per_round = tally.pop("per_round")
    result.figures = tally
    result.detail = f"durability={durability}"
    (guest.workdir / "powercut.json").write_text(json.dumps({"cuts": cuts, "tally": tally, "per_round": per_round}))
    if durability == "normal":
        return []  # what "normal" loses is the figure this scenario measures, not a failure
    problems = []
    if tally["kmsg_lost"] or tally["file_lost"]:
        problems.append(f"committed records lost with durability=full: {tally}")
    # A resend of the same chunk is the at-least-once window (sent, cut before the ack was committed);
    # a kernel record in another chunk would mean a position and its chunk were not committed together.
    # File lines are different by design (docs/spool.md, "Flash wear"): a chunk of file lines acknowledged
    # from RAM has its position written up to 30 s later, unsynced, so a cut reads those lines again from
    # the file, cut into chunks that need not match: counted (`file_dup_other_chunk`), not a failure.
    if tally["kmsg_dup_other_chunk"]:
        problems.append(f"kernel records read twice into different chunks with durability=full: {tally}")
    return problems


def idle(guest: Guest, rx: Receiver, result: Result) -> list[str]:
    guest.boot("idle")
    results = finish(guest, 900)
    result.figures = json.loads(results["result.json"])["figures"]
    return []


def reload(guest: Guest, rx: Receiver, result: Result) -> list[str]:
    """The guest checked the unit (reload exit status, RELOADING=1 then READY=1, active, same PID, the
    refused file's error); here: every line of both files, written across the reloads, arrived once."""
    guest.boot("reload")
    results = finish(guest, 900)
    figures = json.loads(results["result.json"])["figures"]
    expected = lines("reload-before", 3) + lines("reload-old", figures["old_lines"])
    problems = verify(results, rx.records(), expected + lines("reload-new", figures["new_lines"]))
    result.figures = {key: figures[key] for key in ("systemd", "old_lines", "new_lines", "mqtt_connects")}
    for step in ("applied", "refused", "restored"):
        result.figures[f"{step}_returned_s"] = figures[step]["returned_s"]
        result.figures[f"{step}_ready_s"] = figures[step]["ready_s"]
        result.figures[f"{step}_systemctl_waited"] = figures[step]["systemctl_waited"]
    result.detail = f"refused: {figures['error']}"
    return problems


def run(name: str, arch: str, session: Session) -> Result:
    result = Result(name, arch)
    t0 = time.monotonic()
    workdir = session.workdir / f"{name}-{arch}"
    rx: Receiver | None = None
    guest: Guest | None = None
    try:
        image = ensure_image(arch, session.log)
        t0 = time.monotonic()  # the image build is not the scenario's time
        rx = Receiver(workdir / "broker")
        guest = Guest(arch, image, workdir, {MQTT_PORT: rx.broker.port})
        write_input_disk(guest.input_disk, input_files(session, arch, name))
        flows: dict[str, Callable[[], list[str]]] = {
            "first_boot": lambda: first_boot(guest, rx, result),
            "reboot": lambda: reboot(guest, rx, result),
            "tmp_wiped": lambda: reboot(guest, rx, result, wipe_tmp=True),
            "clock": lambda: clock(guest, rx, result),
            "link": lambda: link(guest, rx, result),
            "powercut": lambda: powercut(guest, rx, result, session.powercut_rounds, session.log),
            "powercut_normal": lambda: powercut(
                guest, rx, result, min(POWERCUT_NORMAL_ROUNDS, session.powercut_rounds), session.log
            ),
            "idle": lambda: idle(guest, rx, result),
            "reload": lambda: reload(guest, rx, result),
        }
        problems = flows[name]()
        result.ok = not problems
        if problems:
            result.detail = "; ".join(problems)[:2000]
    except GuestError as e:
        result.detail = str(e)[:2000]
    finally:
        if guest is not None:
            guest.close()
        if rx is not None:
            rx.close()
        result.seconds = time.monotonic() - t0
    (workdir / "result.json").write_text(json.dumps(result.__dict__, default=str))
    session.results.append(result)
    session.on_result(result)
    return result

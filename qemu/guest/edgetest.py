"""The guest side of the QEMU scenarios (stdlib only, runs on the device's python3).

Started at boot by edgetest.service with the scenario named on the kernel
command line (`edgetest=NAME`). It drives the device (kernel log lines, a log
file, reboots, link and clock changes), watches what the agent committed by
reading the spool's `positions`, `chunks` and `status` tables, prints `EDGE:`
lines on the serial console for the host, and at the end writes its results
as a tar straight onto the results disk (/dev/vdc), then powers off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

SPOOL = Path("/var/lib/edgeagent/spool.db")
PERSIST = Path("/var/lib/edgetest")
OUT = Path("/run/edgetest/out")
LOGDIR = Path("/var/log/edgetest")
# The virtio NIC (its PCI slot, hence its name, depends on the disks before it).
NIC = next((p.name for p in sorted(Path("/sys/class/net").iterdir()) if p.name.startswith("en")), "eth0")
RESULTS_DISK = "/dev/vdc"


def say(text: str) -> None:
    print(f"EDGE: {text}", flush=True)


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def boot_number() -> int:
    return int((PERSIST / "boots").read_text())


def query(sql: str) -> list[tuple]:
    """One short read of the agent's spool (WAL: never blocks the agent)."""
    if not SPOOL.exists():
        return []
    conn = sqlite3.connect(f"file:{SPOOL}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []  # tables not created yet
    finally:
        conn.close()


def status(key: str) -> dict:
    rows = query(f"SELECT value FROM status WHERE key = '{key}'")
    return json.loads(rows[0][0]) if rows else {}


def main_pid() -> int:
    out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", "edgeagent"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def fail(reason: str) -> None:
    say(f"FAIL {reason}")
    finish(ok=False)


def agent_ready() -> bool:
    agent = status("agent")
    pid = main_pid()
    return (
        bool(pid) and agent.get("pid") == pid and agent.get("state") == "running" and agent.get("boot_id") == boot_id()
    )


def uploader_connected() -> bool:
    return bool(status("uploader").get("connected"))


def chunk_count() -> int:
    rows = query("SELECT count(*) FROM chunks")
    return rows[0][0] if rows else -1


def committed_kmsg() -> int:
    """The next kernel sequence the spool holds a position for, in this boot (-1: none)."""
    for (value,) in query("SELECT value FROM positions WHERE key = 'kmsg'"):
        boot, _, seq = value.rpartition(":")
        if boot == boot_id():
            return int(seq)
    return -1


def committed_offset(path: Path) -> int:
    for (value,) in query("SELECT value FROM positions WHERE key LIKE 'file:%'"):
        pos = json.loads(value)
        if pos.get("path") == str(path):
            return int(pos.get("offset", 0))
    return -1


def kmsg_write(level: int, text: str) -> None:
    fd = os.open("/dev/kmsg", os.O_WRONLY)
    try:
        os.write(fd, f"<{level}>{text}\n".encode())
    finally:
        os.close(fd)


def ring() -> list[dict]:
    """Every record now in the kernel ring, as the kernel numbers them."""
    records = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                raw = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue  # overwritten while reading: the next read resumes at the oldest
            header, _, text = raw.decode("utf-8", "replace").partition(";")
            fields = header.split(",")
            prio = int(fields[0])
            records.append({"seq": int(fields[1]), "level": prio & 7, "facility": prio >> 3, "text": text})
    finally:
        os.close(fd)
    return records


def last_seq() -> int:
    return ring()[-1]["seq"]


def append_line(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_lines(tag: str, count: int, levels: tuple[int, ...] = (6,)) -> None:
    """`count` kernel-log lines and `count` file lines named after `tag`."""
    for i in range(count):
        level = levels[i % len(levels)]
        kmsg_write(level, f"edgetest {tag} k{i} level{level}")
        append_line(LOGDIR / "demo.log", f"edgetest {tag} f{i}")


def wait_committed(timeout: float = 120) -> None:
    """Until the spool holds positions past everything written so far."""
    target = last_seq() + 1
    size = (LOGDIR / "demo.log").stat().st_size if (LOGDIR / "demo.log").exists() else 0
    wait(
        lambda: committed_kmsg() >= target and (size == 0 or committed_offset(LOGDIR / "demo.log") >= size),
        timeout,
        f"the spool to commit kmsg up to {target} and demo.log up to {size}",
    )


def wait_drained(timeout: float = 180) -> None:
    wait(lambda: chunk_count() == 0, timeout, "the backlog to drain (every chunk acknowledged)")


def save_ring(name: str) -> None:
    """Kept on the root filesystem: survives the reboots of a scenario."""
    (PERSIST / f"ring-{name}.json").write_text(json.dumps({"boot_id": boot_id(), "records": ring()}))
    os.sync()


def finish(ok: bool = True, figures: dict | None = None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for f in PERSIST.glob("ring-*.json"):
        shutil.copy(f, OUT / f.name)
    (OUT / "result.json").write_text(
        json.dumps({"ok": ok, "boot_id": boot_id(), "boots": boot_number(), "figures": figures or {}})
    )
    status_json = subprocess.run(
        ["/opt/edgeagent/bin/edgeagent", "status", "--json", "-c", "/etc/edgeagent/edgeagent.toml"],
        capture_output=True,
        text=True,
    )
    (OUT / "status.json").write_text(status_json.stdout or "{}")
    journal = subprocess.run(
        ["journalctl", "-b", "-u", "edgeagent", "-o", "short-monotonic", "--no-pager"], capture_output=True, text=True
    )
    (OUT / "agent.log").write_text(journal.stdout)
    with open(RESULTS_DISK, "wb") as disk, tarfile.open(fileobj=disk, mode="w") as tar:
        tar.add(OUT, arcname=".")
    os.sync()
    say(f"done ok={ok}")
    subprocess.run(["systemctl", "poweroff", "--no-block"])
    sys.exit(0)


def start(extra: float = 0) -> None:
    wait(agent_ready, 180, "the agent to be running")
    say(f"agent ready boot={boot_number()} boot_id={boot_id()}")


# --- scenarios ------------------------------------------------------------------


def first_boot() -> None:
    start()
    write_lines("first-boot", 6, levels=(3, 4, 5, 6, 7, 2))
    wait_committed()
    wait_drained()
    save_ring("1")
    finish()


def reboot(wipe_tmp: bool = False) -> None:
    """Boot 1: lines uploaded, then lines committed while the link is down,
    reboot. Boot 2: the new boot's ring and the previous boot's unsent lines."""
    start()
    if boot_number() == 1:
        write_lines("boot1-sent", 4)
        wait_committed()
        wait_drained()
        if wipe_tmp:
            subprocess.run(["systemctl", "stop", "edgeagent"], check=True)
            for entry in Path("/tmp").iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            (Path("/tmp") / "edgetest-marker").write_text("gone after a reboot if /tmp is a tmpfs")
            say("stopped the agent, wiped /tmp, starting it again")
            subprocess.run(["systemctl", "start", "edgeagent"], check=True)
            start()
            write_lines("boot1-after-wipe", 4)
            wait_committed()
            wait_drained()
        subprocess.run(["ip", "link", "set", NIC, "down"], check=True)
        write_lines("boot1-unsent", 5)
        wait_committed()
        save_ring("1")
        say(f"rebooting with {chunk_count()} chunks unsent")
        subprocess.run(["systemctl", "reboot"])
        time.sleep(600)
        return
    if wipe_tmp and (Path("/tmp") / "edgetest-marker").exists():
        fail("/tmp survived the reboot: it is not a tmpfs")
    write_lines("boot2", 4)
    wait_committed()
    wait_drained()
    save_ring("2")
    finish()


def clock() -> None:
    """The agent started at 1970 with the broker down; lines are committed, then the
    clock is set from the RTC (the host's time) and the host starts the broker at
    once: the 1970 chunks go out before the agent commits anything with the new
    clock (its `boots` row still says unsynced), as on a device whose link and NTP
    come up together. Then two more lines are committed and sent."""
    start()
    if time.time() > 10**9:
        fail(f"the clock was not in 1970 when the agent started: {time.time()}")
    write_lines("clock-1970", 4)
    wait_committed()
    rtc = int(Path("/sys/class/rtc/rtc0/since_epoch").read_text())
    subprocess.run(["date", "-s", f"@{rtc}"], check=True, capture_output=True)
    say(f"clock set to {rtc}")  # the host starts the broker
    wait_drained()
    # Did the chunks of 1970 leave before any commit under the new clock? (Something the
    # kernel logged in between would have made the agent store the new offset first.)
    stored = query(f"SELECT synced FROM boots WHERE boot_id = '{boot_id()}'")
    sent_before_commit = bool(stored) and not stored[0][0]
    say(f"1970 backlog drained; sent before the next commit: {sent_before_commit}")
    write_lines("clock-set", 2)
    wait_committed()
    wait_drained()
    save_ring("1")
    finish(figures={"clock_set_to": rtc, "sent_before_next_commit": sent_before_commit})


def carrier() -> bool:
    return Path(f"/sys/class/net/{NIC}/carrier").read_text().strip() == "1"


def link() -> None:
    """Backlog built while the host holds the link down; measures how long after
    the carrier comes back the first chunk is acknowledged."""
    start()
    wait(uploader_connected, 120, "the uploader to connect")
    wait_drained()
    say("link-down-please")
    wait(lambda: not carrier(), 60, "the carrier to go down", 0.05)
    write_lines("link-down", 6)
    wait_committed()
    wait(lambda: not uploader_connected(), 120, "the uploader to notice the link is gone")
    time.sleep(3)  # into the retry back-off (retry_initial is long in this scenario's config)
    chunks = chunk_count()
    say(f"link-up-please chunks={chunks}")
    wait(carrier, 120, "the carrier to come back", 0.02)
    up = time.monotonic()
    wait(lambda: chunk_count() < chunks, 120, "the first chunk to drain", 0.05)
    first = time.monotonic() - up
    wait_drained()
    drained = time.monotonic() - up
    say(f"link up: first chunk acknowledged after {first:.2f}s, backlog drained after {drained:.2f}s")
    save_ring("1")
    figures = {"carrier_up_at": up, "link_up_to_first_ack_s": round(first, 3)}
    figures["link_up_to_drained_s"] = round(drained, 3)
    finish(figures=figures)


def powercut(final: bool) -> None:
    """Lines written and committed until the host kills QEMU; the final boot drains."""
    if final:
        start()
        write_lines("final", 1)
        wait_committed()
        wait_drained(600)
        finish()
    boot = boot_number()
    path = LOGDIR / "pc.log"
    n = path.read_bytes().count(b"\n") if path.exists() else 0  # lines are fsynced: the file survived the cut
    say(f"writer start boot={boot} boot_id={boot_id()}")
    i = 0
    last_report = 0.0
    while True:
        kmsg_write(6, f"edgetest pc b{boot} k{i}")
        append_line(path, f"edgetest pc f{n}")
        n += 1
        i += 1
        if time.monotonic() - last_report > 0.25:
            last_report = time.monotonic()
            offset = committed_offset(path)
            lines = path.read_bytes()[: max(offset, 0)].count(b"\n")
            say(f"committed boot_id={boot_id()} kseq={committed_kmsg()} flines={lines} written={n}")
        time.sleep(0.05)


def idle() -> None:
    start()
    wait(uploader_connected, 120, "the uploader to connect")
    wait_drained()
    subprocess.run(["systemctl", "stop", "edgeagent"], check=True)
    t0 = time.monotonic()
    subprocess.run(["systemctl", "start", "edgeagent"], check=True)
    wait(agent_ready, 120, "the agent to be running again", 0.05)
    startup = time.monotonic() - t0
    wait(uploader_connected, 120, "the uploader to connect")
    pid = main_pid()
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    time.sleep(5)
    c0, t1 = cpu(), time.monotonic()
    time.sleep(60)
    c1, t2 = cpu(), time.monotonic()
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    figures = {
        "startup_to_ready_s": round(startup, 2),
        "idle_cpu_percent": round(100 * (c1 - c0) / (t2 - t1), 2),
        "rss_kib": rss,
    }
    say(f"idle figures {json.dumps(figures)}")
    save_ring("1")
    finish(figures=figures)


CONFIG = Path("/etc/edgeagent/edgeagent.toml")
NEW_LOG = Path("/var/log/edgetest-new/new.log")
# What the agent logs on a reload: applied, or refused naming the file and the line of the error.
APPLIED = f"reloading config from {re.escape(str(CONFIG))}"
REFUSED = rf"reload refused, keeping the running config: {re.escape(str(CONFIG))}: .*line \d+"
NEW_FILES = f'\n[[files]]\ninclude = ["{NEW_LOG.parent}/*.log"]\nstart_at = "beginning"\n'


def agent_journal() -> list[str]:
    """The unit's journal of this boot: the agent's lines and systemd's about the unit (debug ones too)."""
    out = subprocess.run(["journalctl", "-b", "-u", "edgeagent", "-o", "cat", "--no-pager"], capture_output=True)
    return out.stdout.decode(errors="replace").splitlines()


def unit_state() -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", "-p", "ActiveState,SubState,MainPID,NRestarts", "edgeagent"],
        capture_output=True,
        text=True,
    )
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def reload_seen(journal: list[str], outcome: str) -> list[str]:
    """The lines of a finished reload: the agent's RELOADING=1, its outcome, then READY=1 (systemd's debug log
    of the notifications and of the unit's states)."""
    notes = [i for i, line in enumerate(journal) if "notification message" in line]
    begun = next((i for i in notes if "RELOADING=1" in journal[i]), None)
    if begun is None:
        return []
    ended = next((i for i in notes if i > begun and "READY=1" in journal[i]), None)
    said = [line for line in journal[begun:] if re.search(outcome, line)]
    return journal[begun : ended + 1] if ended is not None and said else []


def reload_agent(step: str, outcome: str) -> dict:
    """`systemctl reload edgeagent`, then until the agent told systemd it is done (READY=1 after RELOADING=1,
    with `outcome` in its log) and the unit is active (running) again, same main PID, no restart.
    `systemctl_waited`: the reload job ended after that READY=1 (systemd 252 waits for it only when the
    agent's RELOADING=1 arrived before `kill`, the ExecReload, exited)."""
    before, state = len(agent_journal()), unit_state()
    t0 = time.monotonic()
    done = subprocess.run(["systemctl", "reload", "edgeagent"], capture_output=True, text=True)
    returned = time.monotonic() - t0
    if done.returncode != 0:
        fail(f"systemctl reload exited {done.returncode}: {done.stderr.strip()}")
    seen = wait(lambda: reload_seen(agent_journal()[before:], outcome), 180, f"RELOADING=1, {outcome!r}, READY=1")
    ready = time.monotonic() - t0
    after = wait(lambda: (s := unit_state())["ActiveState"] == "active" and s, 60, "the unit to be active again")
    if (after["SubState"], after["MainPID"], after["NRestarts"]) != ("running", state["MainPID"], state["NRestarts"]):
        fail(f"the unit after the reload: {after}, before: {state}")
    journal = agent_journal()[before:]
    transitions = [line for line in journal if re.search(r"Changed \w+ -> \w+", line)]
    if not any("running -> reload" in line for line in transitions):
        fail(f"the unit never went through reloading: {transitions}")
    job = r"Job \d+ edgeagent.service/reload finished"
    waited = next((i for i, line in enumerate(journal) if re.search(job, line)), -1) > journal.index(seen[-1])
    say(f"{step}: systemctl returned after {returned:.2f}s (waited for READY=1: {waited}), READY=1 after {ready:.2f}s")
    figures = {"returned_s": round(returned, 2), "ready_s": round(ready, 2), "systemctl_waited": waited}
    return figures | {"states": transitions, "seen": seen}


def write_new(first: int, count: int) -> int:
    for i in range(first, first + count):
        append_line(NEW_LOG, f"edgetest reload-new f{i}")
    return first + count


def wait_file_committed(path: Path) -> None:
    size = path.stat().st_size
    wait(lambda: committed_offset(path) >= size, 120, f"the spool to commit {path} up to {size}")


def reload() -> None:
    """The config changed under a running, connected agent and `systemctl reload`: a second log file is
    read from then on while the first is written throughout (nothing lost or twice across the reloads);
    then an invalid file is refused (the agent runs on with the old config and says where the error is);
    then the valid file is restored. The unit stays active with the same main PID throughout."""
    start()
    wait(uploader_connected, 120, "the uploader to connect")
    write_lines("reload-before", 3)
    wait_committed()
    wait_drained()
    original = CONFIG.read_text()
    NEW_LOG.parent.mkdir(parents=True, exist_ok=True)
    new_lines = write_new(0, 3)  # before the reload: read from the beginning once the new config is in
    old_lines = 0
    writing = threading.Event()
    writing.set()

    def writer() -> None:  # the first file, written across every reload
        nonlocal old_lines
        while writing.is_set():
            append_line(LOGDIR / "demo.log", f"edgetest reload-old f{old_lines}")
            old_lines += 1
            time.sleep(0.1)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    subprocess.run(["systemd-analyze", "log-level", "debug"], check=True)  # the notifications and states
    CONFIG.write_text(original + NEW_FILES)
    applied = reload_agent("applied", APPLIED)
    new_lines = write_new(new_lines, 3)
    wait_file_committed(NEW_LOG)
    wait_drained()
    CONFIG.write_text(original + NEW_FILES + "\n[broken\n")  # a TOML syntax error
    refused = reload_agent("refused", REFUSED)
    new_lines = write_new(new_lines, 3)  # the running config still reads both files
    wait_file_committed(NEW_LOG)
    wait_committed()
    wait_drained()
    CONFIG.write_text(original + NEW_FILES)
    restored = reload_agent("restored", APPLIED)
    new_lines = write_new(new_lines, 2)
    writing.clear()
    thread.join()
    subprocess.run(["systemd-analyze", "log-level", "info"], check=True)
    wait_file_committed(NEW_LOG)
    wait_committed()
    wait_drained()
    journal = agent_journal()
    error = next(line for line in journal if "reload refused" in line)
    save_ring("1")
    version = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    figures = {"systemd": version, "old_lines": old_lines, "new_lines": new_lines, "error": error}
    figures |= {"applied": applied, "refused": refused, "restored": restored}
    figures["mqtt_connects"] = sum("mqtt: connected to" in line for line in journal)
    finish(figures=figures)


def main() -> None:
    scenario = sys.argv[1]
    say(f"scenario {scenario} boot={boot_number()} uptime={Path('/proc/uptime').read_text().split()[0]}")
    LOGDIR.mkdir(parents=True, exist_ok=True)
    scenarios = {
        "first_boot": first_boot,
        "reboot": reboot,
        "tmp_wiped": lambda: reboot(wipe_tmp=True),
        "clock": clock,
        "link": link,
        "powercut": lambda: powercut(final=False),
        "powercut_final": lambda: powercut(final=True),
        "idle": idle,
        "reload": reload,
    }
    try:
        scenarios[scenario]()
    except SystemExit:
        raise
    except BaseException as e:
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()

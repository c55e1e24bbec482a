"""The agent under a service manager: the systemd unit as systemd reads it,
sd_notify and the watchdog as a real `edgeagent run` sends them, the log format
journald expects, and the sysvinit script driving a real agent."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, wait_for

from edgeagent import config, service

UNIT = REPO / "packaging" / "systemd" / "edgeagent.service"
SYSV = REPO / "packaging" / "sysvinit" / "edgeagent"
QUIET = '[kmsg]\nenabled = false\n[upload]\nto = "none"\n'


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "edgeagent.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\ndevice_id = "svc-dev"\n{extra}{QUIET}')
    return path


class NotifySocket:
    """What systemd listens on: a datagram socket, by path or abstract name."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def receive(self) -> None:
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except TimeoutError:
            pass

    def fields(self) -> list[str]:
        self.receive()
        return [line for message in self.messages for line in message.split("\n")]

    def has(self, field: str, count: int = 1) -> bool:
        return self.fields().count(field) >= count


def start_agent(config_path: Path, env: dict[str, str], stderr: Path) -> subprocess.Popen[bytes]:
    with open(stderr, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "-c", str(config_path)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
            cwd=REPO,
        )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the unit file --------------------------------------------------------------


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's entry point (verify
    checks that the binary exists and is executable)."""
    entry = Path(sys.executable).parent / "edgeagent"
    unit = tmp_path / "edgeagent.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/edgeagent", str(entry)))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd) - the unit was not verified")
    out = subprocess.run([analyze, "verify", str(unit_for_this_machine(tmp_path))], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_unit_keeps_the_settings_the_agent_depends_on() -> None:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["StateDirectory"] == ["edgeagent"] and settings["StateDirectoryMode"] == ["0700"]
    assert settings["User"] == ["edgeagent"] and settings["UMask"] == ["0077"]
    assert "CAP_SYSLOG" in settings["AmbientCapabilities"][0]
    # These would make /dev/kmsg unreadable; the unit says why they are absent.
    for breaking in ("ProtectKernelLogs", "PrivateDevices", "PrivateUsers", "ProcSubset"):
        assert breaking not in settings
    # The state dir the unit creates is the state_dir of the shipped default config.
    default = config.load(REPO / "packaging" / "edgeagent.toml")
    assert default.state_dir == Path("/var/lib/edgeagent")
    assert "/etc/edgeagent/edgeagent.toml" in settings["ExecStart"][0]


# --- sd_notify and the watchdog, end to end ---------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_agent_notifies_ready_watchdog_and_stopping(tmp_path: Path, procs: list, abstract: bool) -> None:
    address = f"@edgeagent-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify")
    notify = NotifySocket(address)
    proc = start_agent(write_config(tmp_path), {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}, tmp_path / "err")
    procs.append(proc)
    wait_for(lambda: notify.has("READY=1"), 30, interval=0, what="READY=1")
    assert any(f.startswith("STATUS=running") for f in notify.fields())
    wait_for(lambda: notify.has("WATCHDOG=1", 3), 30, interval=0, what="three watchdog pings")
    assert not notify.has("STOPPING=1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, (tmp_path / "err").read_text()
    assert notify.has("STOPPING=1"), notify.fields()
    fields = notify.fields()
    assert fields.index("READY=1") < fields.index("STOPPING=1")


def test_sighup_reload_is_framed_by_reloading_and_ready_applied_or_refused(tmp_path: Path, procs: list) -> None:
    """systemd sees a SIGHUP reload begin and end (`systemctl reload` with ExecReload=kill, or
    Type=notify-reload): RELOADING=1 with MONOTONIC_USEC, then READY=1, also for a refused config."""
    notify = NotifySocket(str(tmp_path / "notify"))
    config_path = write_config(tmp_path)
    proc = start_agent(config_path, {"NOTIFY_SOCKET": notify.address}, tmp_path / "err")
    procs.append(proc)
    wait_for(lambda: notify.has("READY=1"), 30, interval=0, what="READY=1")
    config_path.write_text(config_path.read_text().replace('"svc-dev"', '"svc-dev-2"'))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: notify.has("READY=1", 2), 30, interval=0, what="READY=1 after the reload")
    fields = notify.fields()
    reloading = fields.index("RELOADING=1")
    assert fields[reloading + 1].startswith("MONOTONIC_USEC="), fields
    assert fields.index("READY=1") < reloading < len(fields) - 1 - fields[::-1].index("READY=1")
    assert "STATUS=running: device svc-dev-2" in fields[reloading:], fields
    config_path.write_text("[upload\n")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: notify.has("READY=1", 3), 30, interval=0, what="READY=1 after the refused reload")
    assert notify.has("RELOADING=1", 2) and proc.poll() is None
    assert "STATUS=running: device svc-dev-2; reload refused, running config kept" in notify.fields()
    assert "reload refused" in (tmp_path / "err").read_text()


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(tmp_path: Path, procs: list) -> None:
    notify = NotifySocket(str(tmp_path / "notify"))
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
    proc = start_agent(write_config(tmp_path), env, tmp_path / "err")
    procs.append(proc)
    wait_for(lambda: notify.has("READY=1"), 30, interval=0, what="READY=1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert notify.has("STOPPING=1") and not notify.has("WATCHDOG=1")


def test_watchdog_pings_come_from_the_event_loop(tmp_path: Path) -> None:
    """A blocked loop sends no pings (systemd then restarts the agent); once it
    runs again, the pings resume."""
    notify = NotifySocket(str(tmp_path / "notify"))
    notifier = service.Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "20000"})
    assert notifier.watchdog_interval == pytest.approx(0.01)

    async def scenario() -> tuple[int, int]:
        notifier.start_watchdog()
        await asyncio.sleep(0)  # the first ping
        notify.receive()
        before = len(notify.messages)
        time.sleep(0.3)  # the loop hangs: about 30 intervals pass
        notify.receive()
        during = len(notify.messages) - before
        while len(notify.messages) == before + during:
            await asyncio.sleep(0.01)
            notify.receive()
        notifier.close()
        return before, during

    before, during = asyncio.run(scenario())
    assert before >= 1 and during == 0


def test_notifier_without_notify_socket_does_nothing() -> None:
    notifier = service.Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.send("READY=1") is False


def test_notifier_survives_a_missing_socket(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = service.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.send("READY=1") is False
    assert notifier.send("WATCHDOG=1") is False
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1


# --- log format -------------------------------------------------------------------


def run_until_started(tmp_path: Path, procs: list, extra: str = "", journal_stream: bool = False) -> list[str]:
    err = tmp_path / "err"
    err.touch()
    env = {}
    if journal_stream:
        st = err.stat()
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    proc = start_agent(write_config(tmp_path, extra), env, err)
    procs.append(proc)
    wait_for(lambda: " started: device svc-dev" in err.read_text(), 30, what="the start-up line")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    return err.read_text().splitlines()


def test_log_lines_carry_a_priority_and_no_timestamp_when_stderr_is_the_journal(tmp_path: Path, procs: list) -> None:
    lines = run_until_started(tmp_path, procs, journal_stream=True)
    started = next(line for line in lines if " started: device" in line)
    assert re.match(r"^<6>edgeagent: edgeagent \S+ started: device svc-dev", started), started
    assert all(re.match(r"^<[0-7]>", line) for line in lines), lines


def test_log_format_journal_by_config(tmp_path: Path, procs: list) -> None:
    lines = run_until_started(tmp_path, procs, extra='log_format = "journal"\n')
    assert lines and all(re.match(r"^<[0-7]>edgeagent", line) for line in lines), lines


def test_plain_log_lines_without_journal(tmp_path: Path, procs: list) -> None:
    # JOURNAL_STREAM inherited from a parent but naming another stream: not the journal.
    lines = run_until_started(tmp_path, procs, extra='log_format = "auto"\n')
    started = next(line for line in lines if " started: device" in line)
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO edgeagent: ", started), started


def test_journal_stream_of_another_stream_is_not_the_journal(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.touch()
    st = other.stat()
    assert not service.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not service.stderr_is_journal({"JOURNAL_STREAM": "garbage"})


def test_journal_formatter_prefixes_every_line_of_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = service.logging.LogRecord("edgeagent.x", 40, __file__, 1, "failed", (), sys.exc_info())
    text = service.JournalFormatter().format(record)
    assert text.startswith("<3>edgeagent.x: failed")
    assert len(text.splitlines()) > 2 and all(line.startswith("<3>") for line in text.splitlines())
    assert [service.syslog_priority(level) for level in (50, 40, 30, 20, 10)] == [2, 3, 4, 6, 7]


def test_log_format_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('log_format = "jornal"\n')
    with pytest.raises(config.ConfigError, match=r"c.toml:1: log_format = 'jornal'.*did you mean 'journal'"):
        config.load(path)


# --- the sysvinit script ------------------------------------------------------------


def test_sysvinit_script_starts_reloads_wakes_and_stops_a_real_agent(tmp_path: Path) -> None:
    if shutil.which("start-stop-daemon") is None:
        pytest.skip("start-stop-daemon is not installed")
    if os.geteuid() != 0:
        pytest.skip("the init script runs as root")
    config_path = write_config(tmp_path)
    env = dict(
        os.environ,
        DAEMON=str(Path(sys.executable).parent / "edgeagent"),
        PIDFILE=str(tmp_path / "edgeagent.pid"),
        EDGEAGENT_USER="root",
        EDGEAGENT_CONFIG=str(config_path),
        EDGEAGENT_LOG=str(tmp_path / "edgeagent.log"),
        STATE_DIR=str(tmp_path / "state"),
        DEFAULTS=str(tmp_path / "none"),
    )

    def init(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(SYSV), action], env=env, capture_output=True, text=True, timeout=60)

    assert init("status").returncode == 3
    assert init("start").returncode == 0
    pid = int(wait_for(lambda: (tmp_path / "edgeagent.pid").read_text().strip(), 10, what="pid file"))
    log = tmp_path / "edgeagent.log"
    try:
        wait_for(lambda: " started: device svc-dev" in log.read_text(), 30, what="agent start")
        assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
        assert f"pid {pid}" in init("status").stdout
        assert init("reload").returncode == 0
        wait_for(lambda: "reloading config" in log.read_text(), 30, what="reload on SIGHUP")
        assert init("wake").returncode == 0
        assert init("start").stdout.strip() == "edgeagent is already running"
    finally:
        assert init("stop").returncode == 0
    assert not (tmp_path / "edgeagent.pid").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "stopped" in log.read_text()

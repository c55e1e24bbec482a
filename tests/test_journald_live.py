"""The journald source against a live systemd-journald, not only against files written by journal-remote.

A real `systemd-journald` runs in a private mount namespace the test creates: tmpfs on /run and on /var/log
(with an empty journal/, so storage becomes persistent once flushed), /dev/null bound over /dev/kmsg, its
audit capabilities dropped (journald 252 otherwise sends the kernel AUDIT_SET), no forwarding to syslog,
kmsg, console or wall. The real agent runs in the same namespace with `directory = ""` (the machine's
journal: there, that journald's), and entries are written with systemd-cat (stdout stream), `logger
--journald` (native protocol), logger to journald's syslog socket and a writer of native datagrams. Nothing
of the host is touched; the namespace, its mounts and the journal go away with the last process in them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, end_process, wait_for
from test_journald import agent_report, config, journal_records, numbers, spooled, wait_for_spooled

JOURNALD = Path("/lib/systemd/systemd-journald")
COMMANDS = ("journalctl", "systemd-cat", "logger", "unshare", "nsenter", "setpriv")
IDENTIFIER = "edgeagent-live"


def _missing() -> str:
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    missing += [] if JOURNALD.exists() else [str(JOURNALD)]
    return f"{', '.join(missing)} (systemd, util-linux: tools/setup-env installs them)" if missing else ""


# Only root may mount tmpfs in a mount namespace of its own (unshare --mount); CI runs as root. A machine
# without the tools fails the tests instead: tools/setup-env installs them, and a skip would test nothing.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test mounts tmpfs in a mount namespace")

# Runs in the new mount namespace, then becomes journald (same pid: the namespace's anchor for nsenter).
NAMESPACE_SETUP = f"""
set -e
mount -t tmpfs -o size=256m,mode=0755 edgeagent-test-run /run
mount -t tmpfs -o size=256m,mode=0755 edgeagent-test-log /var/log
mkdir -m 2755 /var/log/journal
mount --bind /dev/null /dev/kmsg
mkdir -p /run/systemd/journald.conf.d
cat > /run/systemd/journald.conf.d/edgeagent-test.conf <<EOF
[Journal]
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
RuntimeMaxUse=200M
SystemMaxUse=200M
EOF
exec setpriv --bounding-set -audit_control,-audit_read,-audit_write {JOURNALD}
"""

# A writer of native-protocol datagrams (journald's /run/systemd/journal/socket), one entry each; a full
# socket queue blocks the writer rather than dropping an entry.
NATIVE_WRITER = """
import socket, sys
tag, first, count, identifier = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect("/run/systemd/journal/socket")
    for n in range(first, first + count):
        s.send(f"MESSAGE={tag} {n}\\nPRIORITY={n % 8}\\nSYSLOG_IDENTIFIER={identifier}\\nSEQUENCE={n}\\n".encode())
"""


class LiveJournal:
    """A systemd-journald in a mount namespace of its own; `enter` runs a command in that namespace."""

    def __init__(self, workdir: Path) -> None:
        self.log_path = workdir / "journald.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        notify_name = f"edgeagent-test-journald-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(self.log_path, "ab") as log:
            notify.bind("\0" + notify_name)
            notify.settimeout(30)
            env = dict(os.environ, NOTIFY_SOCKET="@" + notify_name, SYSTEMD_LOG_TARGET="console")
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NAMESPACE_SETUP],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
            try:
                while b"READY=1" not in notify.recv(4096).split(b"\n"):
                    pass
            except TimeoutError:
                raise AssertionError(f"journald did not get ready within 30 s:\n{self.log()}") from None

    def enter(self, *command: str) -> list[str]:
        assert self.proc is not None and self.proc.poll() is None, f"journald is not running:\n{self.log()}"
        return ["nsenter", f"--target={self.proc.pid}", "--mount", "--", *command]

    def run(self, *command: str, input: bytes | None = None) -> None:
        result = subprocess.run(self.enter(*command), input=input, capture_output=True, timeout=60)
        assert result.returncode == 0, f"{command}: exit {result.returncode}: {result.stderr.decode()}"

    def write_native(self, tag: str, first: int, count: int) -> None:
        self.run(sys.executable, "-c", NATIVE_WRITER, tag, str(first), str(count), IDENTIFIER)

    def agent(self, agent: AgentProcess) -> AgentProcess:
        """`agent`, run in this namespace."""
        agent.prefix = self.enter()
        return agent

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, 20)
        self.proc = None


@pytest.fixture
def live_journal(tmp_path: Path) -> Any:
    if missing := _missing():
        pytest.fail(f"missing {missing}")
    journal = LiveJournal(tmp_path)
    journal.start()
    yield journal
    journal.stop()


CONFIG = config("")  # directory = "": the machine's journal (in the namespace: the live journald's)


def ours(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Our records in the spool by body (journald's own entries are in this journal too)."""
    return {
        r["body"]: r
        for r in journal_records(state_dir)
        if r["attributes"].get("syslog.app_name", "").startswith(IDENTIFIER)
    }


def test_live_journal_entries_arrive_with_their_fields(live_journal: LiveJournal, make_agent: Any) -> None:
    """An entry written before the agent's first start (start_at = "beginning": read; "end": not) and entries
    written while it runs, over the native protocol, a stdout stream and the syslog socket, with their fields."""
    native = f"MESSAGE=before the first start\nPRIORITY=3\nSYSLOG_IDENTIFIER={IDENTIFIER}\nREQUEST_ID=r-1\n"
    live_journal.run("logger", "--journald", input=native.encode())
    agent = live_journal.agent(make_agent(CONFIG))
    agent.start()
    live_journal.run("systemd-cat", "-t", f"{IDENTIFIER}-cat", "-p", "warning", input=b"written while running\n")
    syslog_socket = "/run/systemd/journal/dev-log"
    live_journal.run("logger", "-u", syslog_socket, "-t", f"{IDENTIFIER}-syslog", "-p", "user.notice", "via syslog")
    got = wait_for(lambda: len(ours(agent.state_dir)) == 3 and ours(agent.state_dir), 30, what="the three entries")
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    machine_id = Path("/etc/machine-id").read_text().strip()
    for record in got.values():
        attributes = record["attributes"]
        assert attributes["boot.id"] == boot_id and attributes["host.id"] == machine_id
        assert isinstance(attributes["process.pid"], int) and attributes["process.user.id"] == 0
    native_record = got["before the first start"]
    assert (native_record["severity_number"], native_record["severity_text"]) == (17, "ERR")
    assert (
        native_record["attributes"]["syslog.level"] == 3
        and native_record["attributes"]["syslog.app_name"] == IDENTIFIER
    )
    assert native_record["attributes"]["journald.transport"] == "journal"
    assert native_record["attributes"]["journald.request_id"] == "r-1"
    assert native_record["attributes"]["process.executable.name"] == "logger"
    stream = got["written while running"]
    assert (stream["severity_number"], stream["severity_text"], stream["attributes"]["syslog.level"]) == (
        13,
        "WARNING",
        4,
    )
    assert stream["attributes"]["journald.transport"] == "stdout"
    assert stream["attributes"]["syslog.app_name"] == f"{IDENTIFIER}-cat"
    syslog = got["via syslog"]
    assert syslog["attributes"]["syslog.level"] == 5 and syslog["attributes"]["syslog.facility"] == "user"
    assert syslog["attributes"]["journald.transport"] == "syslog"
    assert syslog["attributes"]["syslog.app_name"] == f"{IDENTIFIER}-syslog"
    # start_at = "end": a second agent on the same journal reads only what is written after its start.
    at_end = live_journal.agent(make_agent(CONFIG + 'start_at = "end"\n', name="at-end"))
    at_end.start()
    at_end.wait_status(lambda st: st["sources"]["journald"]["cursor"], what="the cursor of the journal's last entry")
    live_journal.run("systemd-cat", "-t", f"{IDENTIFIER}-cat", input=b"after the second start\n")
    wait_for(lambda: ours(at_end.state_dir), 30, what="the entry after the second start")
    assert list(ours(at_end.state_dir)) == ["after the second start"]
    wait_for(lambda: len(ours(agent.state_dir)) == 4, 30, what="the first agent reading it too")
    assert at_end.stop() == 0 and agent.stop() == 0


def test_live_journal_restarts_resume_exactly(live_journal: LiveJournal, make_agent: Any) -> None:
    """SIGTERM, then three SIGKILLs while the agent reads 20000 entries, with entries written while it is
    stopped and while it runs: every entry of the live journal is in the spool exactly once."""
    agent = live_journal.agent(make_agent(CONFIG))
    live_journal.write_native("n", 0, 100)  # before the first start
    agent.start()
    wait_for(lambda: len(numbers(journal_records(agent.state_dir), "n")) == 100, 30, what="the first entries")
    assert agent.stop() == 0
    live_journal.write_native("n", 100, 100)  # while it is stopped
    agent.start()
    live_journal.write_native("n", 200, 100)  # while it runs
    wait_for(lambda: len(numbers(journal_records(agent.state_dir), "n")) == 300, 30, what="the entries after SIGTERM")
    agent.kill()
    total = 8000
    live_journal.write_native("n", 300, total - 300)
    kills = 0
    for _ in range(3):
        agent.start()
        count = wait_for(lambda: spooled(agent.state_dir), 60, interval=0.1, what="some entries")
        kills += count < total
        agent.kill()
    agent.start()
    live_journal.write_native("n", total, 500)  # while it resumes
    wait_for_spooled(agent, total + 500, "all entries")
    got = numbers(journal_records(agent.state_dir), "n")
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} entries twice\n{agent_report(agent)}"
    assert sorted(got) == list(range(total + 500)), agent_report(agent)
    assert kills >= 1, "the agent was never killed mid-stream"
    assert agent.stop() == 0


def test_live_journal_flush_to_persistent_storage_repeats_nothing(live_journal: LiveJournal, make_agent: Any) -> None:
    """journald's flush (systemd-journal-flush.service at every boot, `journalctl --flush`) copies the runtime
    journal to /var/log/journal: each entry gets a new cursor there (s=, i=) and the runtime files go. The
    agent took its stored cursor for a vacuumed one: a false gap record and the whole journal read again
    (100 entries twice here). A flush while it runs, and a restart after one, now repeat and lose nothing."""
    agent = live_journal.agent(make_agent(CONFIG))
    live_journal.write_native("f", 0, 100)
    agent.start()
    wait_for(lambda: len(numbers(journal_records(agent.state_dir), "f")) == 100, 30, what="the runtime entries")
    assert agent.stop() == 0
    live_journal.run("journalctl", "--flush")  # while the agent is stopped
    live_journal.write_native("f", 100, 100)
    agent.start()
    live_journal.write_native("f", 200, 100)
    wait_for(lambda: len(numbers(journal_records(agent.state_dir), "f")) >= 300, 30, what="the entries after the flush")
    live_journal.run("journalctl", "--relinquish-var")  # back to /run (as at shutdown), then a flush while it runs
    live_journal.write_native("f", 300, 100)
    live_journal.run("journalctl", "--flush")
    live_journal.write_native("f", 400, 100)
    wait_for(
        lambda: len(numbers(journal_records(agent.state_dir), "f")) >= 500, 30, what="the entries around the flush"
    )
    agent.kill()
    agent.start()
    live_journal.write_native("f", 500, 100)
    wait_for(lambda: len(numbers(journal_records(agent.state_dir), "f")) >= 600, 30, what="the entries after kill -9")
    status = agent.status()
    got = numbers(journal_records(agent.state_dir), "f")
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} entries twice\n{agent_report(agent)}"
    assert sorted(got) == list(range(600))
    assert status["sources"]["journald"]["gaps"] == 0 and status["counters"].get("journald_gaps", 0) == 0
    assert agent.stop() == 0

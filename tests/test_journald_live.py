"""The journald source against a live systemd-journald, not only against files written by journal-remote.

A real `systemd-journald` runs in a private mount namespace the test creates: tmpfs on /run and on /var/log
(with an empty journal/, so storage becomes persistent once flushed), /dev/null bound over /dev/kmsg, its
audit capabilities dropped (journald 252 otherwise sends the kernel AUDIT_SET), no forwarding to syslog,
kmsg, console or wall. The real agent runs in the same namespace with `directory = ""` (the machine's
journal: there, that journald's), and entries are written with systemd-cat (stdout stream), `logger
--journald` (native protocol), logger to journald's syslog socket and a writer of native datagrams. Nothing
of the host is touched; the namespace, its mounts and the journal go away with the last process in them.

The `units` filter needs entries with _SYSTEMD_UNIT, which journald takes from the sender's cgroup: those tests
create unit cgroups (`<slice>/<unit>.service`, in the cgroup hierarchy journald reads) and run writers in them;
the cgroups are removed after each test, failed or not."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
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

    def entries(self) -> list[dict[str, Any]]:
        """Every entry in the journal, as `journalctl -o json` gives it."""
        result = subprocess.run(
            self.enter("journalctl", "-q", "-o", "json", "--no-pager"), capture_output=True, timeout=60
        )
        assert result.returncode == 0, f"journalctl: exit {result.returncode}: {result.stderr.decode()}"
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def log_native(self, message: str, **fields: str) -> None:
        """One native-protocol entry with these fields, from the root cgroup (`logger --journald`)."""
        items = [f"MESSAGE={message}", f"SYSLOG_IDENTIFIER={IDENTIFIER}-root", *(f"{k}={v}" for k, v in fields.items())]
        self.run("logger", "--journald", input="".join(item + "\n" for item in items).encode())

    def write_native(self, tag: str, first: int, count: int) -> None:
        self.run(sys.executable, "-c", NATIVE_WRITER, tag, str(first), str(count), IDENTIFIER)

    def agent(self, agent: AgentProcess) -> AgentProcess:
        """`agent`, run in this namespace."""
        agent.prefix = self.enter()
        return agent

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """journald stopped (SIGSTOP) meanwhile: what is sent to it waits in its sockets."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

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


# --- units: real unit cgroups -----------------------------------------------------------------------------
#
# journald takes an entry's _SYSTEMD_CGROUP, _SYSTEMD_SLICE and _SYSTEMD_UNIT from the sender's cgroup
# (/proc/PID/cgroup, read when it processes the entry), not from systemd: a process that moved itself into
# <slice>/<name>.service before it logged is that unit's, for journald and for `journalctl --unit`.


def unit_hierarchy() -> Path:
    """The cgroup hierarchy systemd (journald included) takes a process's unit from, decided as systemd 252's
    cg_unified_cached() does: cgroup2 on /sys/fs/cgroup (unified), else cgroup2 on /sys/fs/cgroup/unified
    (hybrid: then the "0::" line of /proc/PID/cgroup counts, not the name=systemd v1 hierarchy, which journald
    does not read), else the name=systemd hierarchy on /sys/fs/cgroup/systemd (legacy)."""
    fstypes = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount, _, source = line.partition(" - ")
        fstypes[mount.split()[4]] = source.split()[0]  # a later mount on the same point hides the earlier one
    for path, types in (
        ("/sys/fs/cgroup", {"cgroup2"}),
        ("/sys/fs/cgroup/unified", {"cgroup2"}),
        ("/sys/fs/cgroup/systemd", {"cgroup", "cgroup2"}),
    ):
        if fstypes.get(path) in types:
            return Path(path)
    pytest.fail(f"no cgroup hierarchy systemd would use (mounts: {fstypes})")


# Runs in a unit's cgroup: moves itself there (argv[1]: its cgroup.procs) before it connects, then sends each
# line of its standard input ("FIELD=VALUE" items separated by tabs) as one native-protocol entry, until the
# input ends. It stays alive meanwhile: an entry journald reads after its sender is gone gets no _SYSTEMD_UNIT.
UNIT_NATIVE_WRITER = """
import os, socket, sys
with open(sys.argv[1], "w") as procs:
    procs.write(str(os.getpid()))
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect("/run/systemd/journal/socket")
    for line in sys.stdin:
        s.send(f"{line.rstrip(chr(10))}\\tSYSLOG_IDENTIFIER={sys.argv[2]}".replace("\\t", "\\n").encode() + b"\\n")
"""
# The same over a stdout stream: the shell moves itself, then becomes systemd-cat, which becomes cat.
UNIT_STREAM_WRITER = 'echo $$ > "$1" && exec systemd-cat -t "$2" cat'


class UnitWriter:
    """A process in a unit's cgroup that logs what `log` gives it, until `close`."""

    def __init__(self, command: list[str], native: bool) -> None:
        self.native = native
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE)
        self.pid = self.proc.pid  # nsenter, sh and systemd-cat exec: the pid that logs

    def log(self, message: str, **fields: str) -> None:
        assert self.native or not fields, "a stdout stream carries the message only"
        line = "\t".join([f"MESSAGE={message}", *(f"{name}={value}" for name, value in fields.items())])
        assert self.proc.poll() is None and self.proc.stdin is not None, f"the writer exited: {self.proc.returncode}"
        self.proc.stdin.write((line if self.native else message).encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class UnitCgroups:
    """Unit cgroups (`<slice>/edgeagent-test-<label>-<random>.service`, in a slice of this test's own) in the
    hierarchy journald reads, and writers in them; `remove` ends the writers and removes the cgroups."""

    def __init__(self, journal: LiveJournal) -> None:
        self.journal = journal
        self.slice = unit_hierarchy() / f"edgeagent-test-{uuid.uuid4().hex[:12]}.slice"
        self.slice.mkdir()
        self.cgroups: list[Path] = [self.slice]
        self.writers: list[UnitWriter] = []

    def unit(self, label: str) -> str:
        path = self.slice / f"edgeagent-test-{label}-{uuid.uuid4().hex[:12]}.service"
        path.mkdir()
        self.cgroups.append(path)
        return path.name

    def writer(self, unit: str, identifier: str, native: bool = False) -> UnitWriter:
        procs, tag = str(self.slice / unit / "cgroup.procs"), f"{IDENTIFIER}-{identifier}"
        if native:
            command = self.journal.enter(sys.executable, "-c", UNIT_NATIVE_WRITER, procs, tag)
        else:
            command = self.journal.enter("sh", "-c", UNIT_STREAM_WRITER, "sh", procs, tag)
        self.writers.append(UnitWriter(command, native))
        return self.writers[-1]

    def remove(self) -> None:
        for writer in self.writers:
            writer.close()
        for path in reversed(self.cgroups):  # a cgroup goes once its last process is reaped (EBUSY until then)
            wait_for(lambda path=path: _removed(path), 10, what=f"{path} removed")


def _removed(cgroup: Path) -> bool:
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return False
    return True


@pytest.fixture
def unit_cgroups(live_journal: LiveJournal) -> Iterator[UnitCgroups]:
    cgroups = UnitCgroups(live_journal)
    yield cgroups
    cgroups.remove()


def our_bodies(state_dir: Path) -> list[str]:
    """The bodies of our records in the spool, sorted, each as often as it is there."""
    return sorted(
        r["body"]
        for r in journal_records(state_dir)
        if r["attributes"].get("syslog.app_name", "").startswith(IDENTIFIER)
    )


def journald_recorded(journal: LiveJournal, units: dict[str, str | None]) -> None:
    """Waits until the journal holds the entries of `units` (body: the unit its writer ran in, None for the root
    cgroup) and checks the _SYSTEMD_UNIT journald recorded for each (a failure shows their _SYSTEMD_CGROUP)."""

    def ours_in_journal() -> dict[str, dict[str, Any]] | None:
        entries = {
            e.get("MESSAGE"): e for e in journal.entries() if e.get("SYSLOG_IDENTIFIER", "").startswith(IDENTIFIER)
        }
        return entries if set(units) <= set(entries) else None

    entries = wait_for(ours_in_journal, 30, 0.2, what=f"the entries {sorted(units)} in the journal")
    recorded = {body: entries[body].get("_SYSTEMD_UNIT") for body in units}
    assert recorded == units, "journald recorded other units than the writers' cgroups: " + str(
        {body: (entries[body].get("_SYSTEMD_UNIT"), entries[body].get("_SYSTEMD_CGROUP")) for body in units}
    )


def read_up_to(agent: AgentProcess, journal: LiveJournal, written: dict[str, str | None], writer: UnitWriter) -> str:
    """Once journald holds everything `written` (attributed as expected), `writer` (of the filter's unit) logs
    one more entry and the agent must read it: an entry the filter let through would have arrived before it.
    Returns that entry's body."""
    journald_recorded(journal, written)
    label = f"sync {uuid.uuid4().hex[:8]}"
    if writer.native:
        writer.log(label, EDGEAGENT_TEST="keep")
    else:
        writer.log(label)
    wait_for(lambda: label in our_bodies(agent.state_dir), 30, 0.1, what=f"the agent reading {label!r}")
    return label


def test_live_journal_units_filter_reads_its_units_entries_only(
    live_journal: LiveJournal, unit_cgroups: UnitCgroups, make_agent: Any
) -> None:
    """`units = [a]`, a and b being real unit cgroups: what a's processes log (stdout stream, native protocol)
    before the first start, while the agent runs and while it is stopped arrives once each, with its unit and
    fields; b's entries and the root cgroup's do not, except a root entry about a process of a (OBJECT_PID:
    `journalctl --unit` also matches OBJECT_SYSTEMD_UNIT from root). An entry of a process of a that exited
    before journald read it has no _SYSTEMD_UNIT: journald's limit, not read either."""
    a, b = unit_cgroups.unit("a"), unit_cgroups.unit("b")
    a_stream, b_stream = unit_cgroups.writer(a, "a"), unit_cgroups.writer(b, "b")
    a_native = unit_cgroups.writer(a, "an", native=True)
    agent = live_journal.agent(make_agent(CONFIG + f'units = ["{a}"]\n'))

    def everyone_logs(n: int) -> dict[str, str | None]:
        a_stream.log(f"a {n}")
        a_native.log(f"an {n}", PRIORITY="3", REQUEST_ID=f"r-{n}")
        b_stream.log(f"b {n}")
        live_journal.run("systemd-cat", "-t", f"{IDENTIFIER}-root", input=f"root {n}\n".encode())
        return {f"a {n}": a, f"an {n}": a, f"b {n}": b, f"root {n}": None}

    written = everyone_logs(0)  # before the first start
    agent.start()
    written |= everyone_logs(1)
    live_journal.log_native("root about a", OBJECT_PID=str(a_native.pid))
    written["root about a"] = None
    with live_journal.stopped():  # journald reads the sender's cgroup when it handles the entry: it is gone by then
        gone = unit_cgroups.writer(a, "gone", native=True)
        gone.log("a gone")
        gone.close()
    written["a gone"] = None  # no _SYSTEMD_UNIT: `units` cannot select it
    syncs = [read_up_to(agent, live_journal, written, a_stream)]
    got = {r["body"]: r["attributes"] for r in journal_records(agent.state_dir)}
    stream, native, about = got["a 0"], got["an 1"], got["root about a"]
    assert (stream["systemd.unit"], stream["journald.transport"], stream["syslog.app_name"]) == (
        a,
        "stdout",
        f"{IDENTIFIER}-a",
    )
    assert stream["process.pid"] == a_stream.pid and stream["process.executable.name"] == "cat"
    assert (native["systemd.unit"], native["journald.transport"], native["syslog.level"]) == (a, "journal", 3)
    assert native["process.pid"] == a_native.pid and native["journald.request_id"] == "r-1"
    assert "systemd.unit" not in about and about["journald.object_systemd_unit"] == a
    assert agent.stop() == 0
    written |= everyone_logs(2)  # while it is stopped: resumed at the stored cursor, an entry of a
    agent.start()
    written |= everyone_logs(3)
    syncs.append(read_up_to(agent, live_journal, written, a_stream))
    expected = [f"{tag} {n}" for tag in ("a", "an") for n in range(4)] + ["root about a", *syncs]
    assert our_bodies(agent.state_dir) == sorted(expected)
    assert agent.stop() == 0


def test_live_journal_units_and_matches_are_anded(
    live_journal: LiveJournal, unit_cgroups: UnitCgroups, make_agent: Any
) -> None:
    """`units = [a]` with `matches = ["EDGEAGENT_TEST=keep", "+", "PRIORITY=2"]`: journalctl ANDs the unit with
    the matches, their OR groups included: of the same entries logged in a, in b and in the root cgroup, only
    a's with EDGEAGENT_TEST=keep or PRIORITY=2 arrive."""
    a, b = unit_cgroups.unit("a"), unit_cgroups.unit("b")
    writers = {"a": unit_cgroups.writer(a, "a", native=True), "b": unit_cgroups.writer(b, "b", native=True)}
    matches = 'matches = ["EDGEAGENT_TEST=keep", "+", "PRIORITY=2"]\n'
    agent = live_journal.agent(make_agent(CONFIG + f'units = ["{a}"]\n' + matches))
    agent.start()
    written: dict[str, str | None] = {}
    for who, unit in (("a", a), ("b", b), ("root", None)):
        for kind, priority in (("keep", "6"), ("drop", "2"), ("drop", "6")):
            body = f"{who} {kind} {priority}"
            if who in writers:
                writers[who].log(body, PRIORITY=priority, EDGEAGENT_TEST=kind)
            else:
                live_journal.log_native(body, PRIORITY=priority, EDGEAGENT_TEST=kind)
            written[body] = unit
    sync = read_up_to(agent, live_journal, written, writers["a"])
    assert our_bodies(agent.state_dir) == sorted(["a keep 6", "a drop 2", sync])
    assert agent.stop() == 0

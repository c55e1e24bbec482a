"""`children.die_with_parent`, with real processes: a child started with it
runs its program while its parent lives, is killed by the kernel when its
parent dies, and does not run its program at all when its parent died between
the fork and its request to the kernel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import wait_for

from edgeagent.children import die_with_parent


def alive(pid: int) -> bool:
    """Running: not gone, not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_child_of_a_living_parent_runs_its_program() -> None:
    preexec = die_with_parent()
    assert preexec is not None, "ctypes and prctl exist on this machine"
    assert subprocess.run(["sh", "-c", "exit 7"], preexec_fn=preexec).returncode == 7


def test_a_child_dies_with_its_parent_even_a_kill_9(tmp_path: Path) -> None:
    """A parent process starts `sleep 600` with the preexec and is SIGKILLed: the sleep goes with it."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import subprocess, sys, time\n"
        "from edgeagent.children import die_with_parent\n"
        "child = subprocess.Popen(['sleep', '600'], preexec_fn=die_with_parent())\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=Path(__file__).resolve().parent.parent)
    try:
        child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, 0.01, what="the child's pid"))
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not alive(child), 10, 0.01, what="the child gone with its parent")
    finally:
        parent.kill()
        parent.wait()


def test_a_child_whose_parent_died_before_its_request_exits_before_exec() -> None:
    """The race PR_SET_PDEATHSIG alone leaves open, made certain: the preexec is made in this process, then
    used by a process forked from it, so the child's parent is not the process the preexec belongs to, as
    after the agent died between the fork and the prctl. The child exits 1 at once: `sleep` never runs."""
    preexec = die_with_parent()
    assert preexec is not None
    pid = os.fork()
    if pid == 0:  # the stand-in for a parent that is not (any more) the agent
        code = 99
        try:
            started = time.monotonic()
            returncode = subprocess.Popen(["sleep", "30"], preexec_fn=preexec).wait()
            code = returncode if time.monotonic() - started < 20 else 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1

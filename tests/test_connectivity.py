"""NetworkWatch for real, in a network namespace the test creates: interfaces
and default routes come and go there, and the watcher (running inside it in a
child process) must wake once per burst that made the network usable, and
never for changes that took it away."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, wait_for

from edgeagent.connectivity import NetworkState, read_state

WATCHER = """
import asyncio
from edgeagent.connectivity import NetworkWatch, read_state

async def main():
    watch = NetworkWatch(debounce=0.3, use_udev=False)

    def on_up():
        state = read_state()
        routes = ",".join(sorted(dev for dev, _ in state.default_routes))
        print("UP", ",".join(sorted(state.up)) or "-", routes or "-", flush=True)

    task = asyncio.create_task(watch.run(on_up))
    asyncio.get_running_loop().call_soon(lambda: print("READY", ",".join(watch.sources), flush=True))
    await task

asyncio.run(main())
"""


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *commands: str) -> None:
        """Run several `ip` commands inside the namespace in one go (one burst)."""
        result = subprocess.run(
            ["ip", "-n", self.name, "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr


@pytest.fixture
def netns() -> Iterator[Namespace]:
    name = f"edgeagent-test-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        yield Namespace(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Watcher:
    """The watcher running inside the namespace; its output lines, collected."""

    def __init__(self, netns: Namespace) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns.name, sys.executable, "-c", WATCHER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_for(lambda: self.ready_line(), what=f"watcher ready (stderr: {self._stderr_if_dead()})")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def _stderr_if_dead(self) -> str:
        if self.proc.poll() is not None and self.proc.stderr is not None:
            return self.proc.stderr.read()
        return "still running"

    def ready_line(self) -> str:
        if self.proc.poll() is not None:
            raise AssertionError(f"watcher exited: {self._stderr_if_dead()}")
        return next((line for line in self.lines if line.startswith("READY")), "")

    def wakes(self) -> list[str]:
        return [line for line in self.lines if line.startswith("UP")]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_wakes_once_per_burst_that_brings_the_network_up(netns: Namespace) -> None:
    watcher = Watcher(netns)
    try:
        assert watcher.ready_line() == "READY rtnetlink"

        # A veth pair appears and both ends come up: link, flags and address events, one wake.
        netns.ip(
            "link add a0 type veth peer name a1", "link set a0 up", "link set a1 up", "addr add 10.9.0.1/24 dev a0"
        )
        wait_for(lambda: len(watcher.wakes()) == 1, what="wake for a0/a1 up")
        assert watcher.wakes()[0] == "UP a0,a1 -"

        # A default route appears on an interface that is already up: another wake.
        netns.ip("route add default via 10.9.0.254 dev a0")
        wait_for(lambda: len(watcher.wakes()) == 2, what="wake for the default route")
        assert watcher.wakes()[1] == "UP a0,a1 ipv4/a0"

        # Going down is no reason to wake. Then a second pair comes up: one wake, which
        # also proves the "down" gave none (it would have come first).
        netns.ip("link set a0 down")
        netns.ip("link add v0 type veth peer name v1", "link set v0 up", "link set v1 up")
        wait_for(lambda: any("v0" in w for w in watcher.wakes()), what="wake for the second pair")
        assert watcher.wakes()[2:] == ["UP v0,v1 -"]
    finally:
        watcher.stop()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_reads_operstate_flags_and_default_routes(tmp_path: Path) -> None:
    net = tmp_path / "sys"
    for name, operstate, flags in [
        ("eth0", "up", "0x1003"),
        ("wlan0", "down", "0x1003"),
        ("ppp0", "unknown", "0x10d1"),  # point-to-point links report "unknown" while running
        ("tun0", "unknown", "0x1090"),  # "unknown" but not IFF_UP: not usable
        ("lo", "unknown", "0x9"),
    ]:
        write(net / name / "operstate", operstate + "\n")
        write(net / name / "flags", flags + "\n")
    proc = tmp_path / "proc"
    write(
        proc / "route",
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "wlan0\t00000000\t00000000\t0201\t0\t0\t0\t00000000\t0\t0\t0\n",  # unreachable: not a way out
    )
    write(
        proc / "ipv6_route",
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 "
        "00000400 00000002 00000000 00000003     ppp0\n"
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 "
        "ffffffff 00000001 00000000 00200200       lo\n",
    )
    state = read_state(net, proc)
    assert state.up == {"eth0", "ppp0"}
    assert state.default_routes == {("ipv4/eth0", "010200C0"), ("ipv6/ppp0", "fd000000000000000000000000000001")}
    before = NetworkState(frozenset({"eth0"}), frozenset())
    assert state.came_up_since(before) == [
        "interface ppp0 up",
        "default route via 010200C0 on ipv4/eth0",
        "default route via fd000000000000000000000000000001 on ipv6/ppp0",
    ]
    assert before.came_up_since(state) == []
    assert read_state(tmp_path / "missing", tmp_path / "missing") == NetworkState(frozenset(), frozenset())

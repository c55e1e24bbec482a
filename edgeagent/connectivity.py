"""Notices when the network comes up, so the uploader retries at once instead of
waiting out its backoff.

"Up" means: an interface became operational (operstate `up` in
/sys/class/net/<if>/operstate, or `unknown` with IFF_UP and IFF_RUNNING set, as
ppp, tun and dummy links report), or a default route appeared (IPv4 in
/proc/net/route, IPv6 in /proc/net/ipv6_route). Events only say "look again";
the decision always comes from comparing those files before and after, and a
burst of events (a link coming up usually brings several) gives one wake.

Event sources, all file descriptors on the event loop (no polling, no thread):
- an rtnetlink socket (NETLINK_ROUTE, groups RTMGRP_LINK | RTMGRP_IPV4_ROUTE |
  RTMGRP_IPV6_ROUTE): carrier changes and route changes. The kernel sends no
  uevent when a link gets carrier or a route appears, so this is what sees a
  cable plugged in or a DHCP lease arriving. It needs no privileges and no
  udev (OpenWrt has none).
- a pyudev monitor on the `net` subsystem when udevd runs: interfaces that
  appear once udev has named them (a USB modem plugged in).
- if rtnetlink cannot be opened, a raw NETLINK_KOBJECT_UEVENT socket (kernel
  uevents for the `net` subsystem) instead.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15  # not exported by the socket module
RTMGRP_LINK = 0x1
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
RTF_UP = 0x1
RTF_REJECT = 0x200
UDEV_CONTROL = Path("/run/udev/control")  # exists while udevd runs


class NetworkState(NamedTuple):
    up: frozenset[str]  # operational interfaces (not loopback)
    default_routes: frozenset[tuple[str, str]]  # (family/interface, gateway)

    def came_up_since(self, before: NetworkState) -> list[str]:
        """What is new compared to `before` that makes the network usable."""
        reasons = [f"interface {name} up" for name in sorted(self.up - before.up)]
        reasons += [
            f"default route via {gw} on {dev}" for dev, gw in sorted(self.default_routes - before.default_routes)
        ]
        return reasons


def read_state(sys_class_net: Path = Path("/sys/class/net"), proc_net: Path = Path("/proc/net")) -> NetworkState:
    return NetworkState(frozenset(_up_interfaces(sys_class_net)), frozenset(_default_routes(proc_net)))


def _up_interfaces(sys_class_net: Path) -> list[str]:
    up: list[str] = []
    try:
        names = os.listdir(sys_class_net)
    except OSError:
        return up
    for name in names:
        try:
            operstate = (sys_class_net / name / "operstate").read_text().strip()
            flags = int((sys_class_net / name / "flags").read_text().strip(), 16)
        except (OSError, ValueError):
            continue  # the interface went away while we looked
        if flags & IFF_LOOPBACK:
            continue
        if operstate == "up" or (operstate == "unknown" and flags & IFF_UP and flags & IFF_RUNNING):
            up.append(name)
    return up


def _default_routes(proc_net: Path) -> list[tuple[str, str]]:
    routes: list[tuple[str, str]] = []
    try:
        with open(proc_net / "route", encoding="ascii") as f:
            next(f, None)  # header
            for line in f:
                fields = line.split()
                # Iface Destination Gateway Flags RefCnt Use Metric Mask ...
                if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
                    continue
                flags = int(fields[3], 16)
                if flags & RTF_UP and not flags & RTF_REJECT:
                    routes.append((f"ipv4/{fields[0]}", fields[2]))
    except (OSError, ValueError):
        pass
    try:
        with open(proc_net / "ipv6_route", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                # dest prefixlen src srcprefixlen nexthop metric refcnt use flags iface
                if len(fields) >= 10 and fields[1] == "00" and fields[0] == "0" * 32 and fields[9] != "lo":
                    flags = int(fields[8], 16)
                    if flags & RTF_UP and not flags & RTF_REJECT:
                        routes.append((f"ipv6/{fields[9]}", fields[4]))
    except (OSError, ValueError):
        pass
    return routes


class NetworkWatch:
    """Calls `on_up()` once per burst of network changes that made it usable."""

    def __init__(
        self,
        debounce: float = 0.5,
        use_udev: bool = True,
        sys_class_net: Path = Path("/sys/class/net"),
        proc_net: Path = Path("/proc/net"),
    ) -> None:
        self.debounce = debounce
        self.use_udev = use_udev
        self.sys_class_net = sys_class_net
        self.proc_net = proc_net
        self.sources: list[str] = []  # which event sources are open, for status and tests
        self.wakes = 0
        self._state = NetworkState(frozenset(), frozenset())
        self._timer: asyncio.TimerHandle | None = None
        self._on_up: Callable[[], None] = lambda: None
        self._closers: list[Callable[[], None]] = []

    async def run(self, on_up: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self._on_up = on_up
        self._state = read_state(self.sys_class_net, self.proc_net)
        opened: list[tuple[int, Callable[[], bool]]] = []
        try:
            for fd, drain, name in self._open_sources():
                loop.add_reader(fd, self._on_readable, drain)
                opened.append((fd, drain))
                self.sources.append(name)
            if not opened:
                log.warning("network watch: no event source could be opened; only explicit wakes (SIGUSR1) work")
                return
            log.debug("network watch: listening on %s", ", ".join(self.sources))
            await loop.create_future()  # until cancelled
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for fd, _ in opened:
                loop.remove_reader(fd)
            for closer in self._closers:
                closer()
            self._closers = []
            self.sources = []

    def _open_sources(self) -> list[tuple[int, Callable[[], bool], str]]:
        self._closers = []
        sources = []
        rtnl = self._open_netlink(socket.NETLINK_ROUTE, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        if rtnl is not None:
            sources.append((rtnl.fileno(), lambda: _drain_socket(rtnl, None), "rtnetlink"))
        else:
            uevent = self._open_netlink(NETLINK_KOBJECT_UEVENT, 1)
            if uevent is not None:
                sources.append((uevent.fileno(), lambda: _drain_socket(uevent, b"SUBSYSTEM=net"), "kobject-uevent"))
        if self.use_udev and UDEV_CONTROL.exists():
            monitor = self._open_udev()
            if monitor is not None:
                sources.append((monitor.fileno(), lambda: _drain_udev(monitor), "udev"))
        return sources

    def _open_netlink(self, protocol: int, groups: int) -> socket.socket | None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, protocol)
        except OSError as e:
            log.info("network watch: netlink protocol %d unavailable: %s", protocol, e)
            return None
        try:
            sock.bind((0, groups))
        except OSError as e:
            log.info("network watch: cannot join netlink groups 0x%x (protocol %d): %s", groups, protocol, e)
            sock.close()
            return None
        self._closers.append(sock.close)
        return sock

    def _open_udev(self) -> Any:
        try:
            import pyudev  # imported only where udevd runs: it loads libudev through ctypes
        except ImportError:
            return None
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            monitor.filter_by("net")
            monitor.start()
        except (OSError, ImportError, pyudev.DeviceNotFoundError) as e:
            log.info("network watch: pyudev monitor unavailable: %s", e)
            return None
        return monitor

    def _on_readable(self, drain: Callable[[], bool]) -> None:
        try:
            relevant = drain()
        except OSError as e:
            log.warning("network watch: reading events failed: %s", e)
            relevant = True  # look anyway: missing an "up" costs a whole backoff period
        if relevant and self._timer is None:
            # The first event of a burst arms one check; later events of the burst ride on it.
            self._timer = asyncio.get_running_loop().call_later(self.debounce, self._check)

    def _check(self) -> None:
        self._timer = None
        try:
            state = read_state(self.sys_class_net, self.proc_net)
            reasons = state.came_up_since(self._state)
            self._state = state
            if reasons:
                self.wakes += 1
                log.info("network watch: %s; waking the uploader", "; ".join(reasons))
                self._on_up()
        except Exception:
            log.exception("network watch: checking the network state failed")


def _drain_socket(sock: socket.socket, must_contain: bytes | None) -> bool:
    """Read every pending message; True if any matters (contains `must_contain`)."""
    relevant = False
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return relevant
        except OSError as e:
            if e.errno == errno.ENOBUFS:  # the kernel dropped messages: something changed
                relevant = True
                continue
            raise
        if must_contain is None or must_contain in data:
            relevant = True


def _drain_udev(monitor: Any) -> bool:
    relevant = False
    while monitor.poll(timeout=0) is not None:
        relevant = True
    return relevant

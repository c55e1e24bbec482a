"""Living under a service manager: systemd's notify protocol and watchdog, and
log lines that journald, procd or a terminal each read well.

- `Notifier` speaks sd_notify with the standard library: one datagram per
  message to `$NOTIFY_SOCKET` (a path, or an abstract name written `@name`).
  Without `$NOTIFY_SOCKET` every call does nothing, so the agent behaves the
  same outside systemd. A failed send is logged once and never stops the agent.
- The watchdog is pinged by a coroutine on the agent's event loop, at half of
  `$WATCHDOG_USEC`: a loop that hangs (a blocking call, a busy loop) stops the
  pings and systemd restarts the service. It is only armed when
  `$WATCHDOG_PID` is unset or names this process.
- Request signals (`REQUEST_SIGNALS`: a reload, `wake`, `status`) are taken by the loop thread only:
  every worker thread starts with `leave_requests_to_the_loop`, and once the loop stops serving them
  `ignore_requests` ignores them (an exec keeps that), so none can end the agent with its default action.
- `configure_logging` writes to stderr. In "journal" format each line carries a
  `<N>` syslog priority prefix and no timestamp (journald adds its own and
  keeps the level); "plain" is a timestamped line for terminals and log files.
  "auto" picks "journal" when stderr is the stream systemd named in
  `$JOURNAL_STREAM`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping

log = logging.getLogger("edgeagent.service")

# Signals that ask a running agent for something: a reload (SIGHUP), `edgeagent wake` (SIGUSR1), a fresh
# status for `edgeagent status` (SIGUSR2). Their default action ends a process.
REQUEST_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def leave_requests_to_the_loop() -> None:
    """Run first in every worker thread: it never takes a request signal. The kernel gives a process's
    signal to any thread that does not block it; while the loop thread blocks them (`ignore_requests`), a
    worker taking one would get its default action."""
    signal.pthread_sigmask(signal.SIG_BLOCK, REQUEST_SIGNALS)


def ignore_requests(loop: asyncio.AbstractEventLoop) -> None:
    """The loop stops serving request signals: from now on they are ignored, which an exec keeps until the
    new loop handles them again (a reload asked meanwhile reads the file anyway). Without this, `status`,
    acting on a status read just before, made a stopping agent exit -12, or killed it in its restart for
    TLS before the new process had its handlers. Blocked meanwhile, so that none arrives between the loop's
    handler and SIG_IGN (workers block them for good)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, REQUEST_SIGNALS)
    for sig in REQUEST_SIGNALS:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, REQUEST_SIGNALS)


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Python logging levels -> syslog priorities (sd-daemon.h SD_ERR etc.).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """`<N>name: message`, with the prefix repeated on every line of a
    multi-line message (a traceback), since journald splits on newlines."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def stderr_is_journal(environ: Mapping[str, str] = os.environ) -> bool:
    """True when systemd connected stderr to the journal: `$JOURNAL_STREAM`
    is `DEVICE:INODE` of that stream (a child that inherited the variable
    but not the stream does not match)."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def configure_logging(level: str, log_format: str = "auto", environ: Mapping[str, str] = os.environ) -> str:
    """Set up the root logger on stderr; returns the format used."""
    if log_format == "auto":
        log_format = "journal" if stderr_is_journal(environ) else "plain"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if log_format == "journal" else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return log_format


class Notifier:
    """sd_notify to `$NOTIFY_SOCKET`, plus the watchdog pinger."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path.startswith("@"):
            self._address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._address = path
        self.watchdog_interval = _watchdog_interval(environ) if self._address else None
        self._socket: socket.socket | None = None
        self._warned = False
        self._pinger: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        if self._address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(fields).encode(), self._address)
            return True
        except OSError as e:
            if not self._warned:
                log.warning("cannot notify the service manager at %r: %s", self._address, e)
                self._warned = True
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def reloading(self, status: str) -> None:
        """Before a SIGHUP reload (READY=1 follows, applied or refused) or before the agent executes itself
        again (same PID; the new process sends READY=1)."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", f"STATUS={status}")

    def start_watchdog(self) -> None:
        """Ping from the running loop until `close()`."""
        if self.watchdog_interval is not None and self._pinger is None:
            self._pinger = asyncio.get_running_loop().create_task(self._ping(self.watchdog_interval), name="watchdog")

    async def _ping(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1e6

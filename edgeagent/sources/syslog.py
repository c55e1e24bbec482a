"""The syslog source: listeners on UDP, TCP, unix datagram (/dev/log) and unix stream sockets.

Owns the `[[syslog]]` listeners: opening, binding and permissions of their
sockets, TCP framing (RFC 6587 octet counting and newline/NUL framing,
detected per connection), connection and message-size limits, and the loss
accounting of datagrams. Parsing a message into a record is
`syslog_parse.parse_message`.

Guarantees (docs/syslog.md says what a crash loses per transport):
- Everything received is handed to the batcher at once, so it is in the spool
  within `[spool].flush_interval`. There is no position: a sender cannot
  replay, so what was received and not yet committed is what a kill -9 loses.
- When the spool takes no writes (`not ctx.accepting`), stream connections stop
  being read (`ctx.emit` waits), so back-pressure reaches the sender through
  TCP flow control; datagrams cannot be paused without blocking every local
  writer of /dev/log, so they are dropped, counted (`syslog_dropped`) and
  reported in a loss record once the spool takes writes again. Datagrams the
  kernel dropped because the agent read too slowly (SO_MEMINFO) are
  counted and reported the same way.
- Each connection is its own task reading at most 64 KiB at a time: a slow or
  stuck client holds only its own connection. Connections beyond
  `max_connections` are closed at once and counted.
- Messages longer than `max_message_size` are cut (not inside a UTF-8
  sequence), marked `edgeagent.line.truncated` and counted
  (`syslog_truncated`); invalid UTF-8 is replaced by U+FFFD and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import re
import socket
import stat
import struct
import time
from typing import Any

from edgeagent import loss
from edgeagent.clock import monotonic_ns
from edgeagent.config import Config, ConfigError, SyslogConfig, parse_listen
from edgeagent.pipeline import SourceContext
from edgeagent.records import Attributes, Batch, Record
from edgeagent.sources.lines import cut_utf8
from edgeagent.sources.syslog_parse import parse_message

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024  # bytes read from a connection at a time
DATAGRAMS_PER_WAKEUP = 256  # then yield to the loop
DATAGRAM_BUFFER = 256 * 1024  # larger than any UDP datagram; unix datagrams beyond are cut
RETRY_INITIAL, RETRY_MAX = 1.0, 60.0
DROP_REPORT_INTERVAL = 1.0  # seconds over which datagram drops are summed into one loss record
SOURCE = "syslog"
# Linux: SO_MEMINFO reads the socket's memory counters (u32s); index SK_MEMINFO_DROPS counts the datagrams the
# kernel dropped because the receive buffer was full. Read after every drain of the socket: a drop needs a full
# buffer, which makes the socket readable, so no drop goes unseen.
SO_MEMINFO, SK_MEMINFO_VARS, SK_MEMINFO_DROPS = 55, 9, 8
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux: SO_RCVBUF beyond net.core.rmem_max (CAP_NET_ADMIN)

ATTR_TRANSPORT = "network.transport"
ATTR_PEER_ADDRESS = "network.peer.address"
ATTR_PEER_PORT = "network.peer.port"

_OCTET_COUNT_RE = re.compile(rb"([1-9]\d{0,8}) ")
_DELIMITER_RE = re.compile(rb"[\n\x00]")


class Framer:
    """Splits a stream into syslog messages: RFC 6587 octet counting (`LEN SP MSG`) or
    newline/NUL framing, chosen by the connection's first byte (a digit: octet counting).
    Memory is bounded by `max_size` plus one read. Messages come out as
    (bytes, original length if cut else 0, or -1 if cut at an unknown length)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.octet_counting: bool | None = None
        self._buf = bytearray()
        self._discard = 0  # bytes of a cut octet-counted message still to drop
        self._discard_line = False  # drop up to the next delimiter (a cut newline-framed message)

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        buf = self._buf
        buf += data
        out: list[tuple[bytes, int]] = []
        pos = 0
        while pos < len(buf):
            if self._discard:
                n = min(self._discard, len(buf) - pos)
                self._discard -= n
                pos += n
                continue
            if self._discard_line:
                m = _DELIMITER_RE.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                self._discard_line = False
                pos = m.end()
                continue
            if self.octet_counting is None:
                self.octet_counting = buf[pos] in b"123456789"
            step = self._octet_counted(buf, pos, out) if self.octet_counting else None
            if step is None:
                step = self._delimited(buf, pos, out)
            if step == pos:
                break  # need more data
            pos = step
        del buf[:pos]
        return out

    def _octet_counted(self, buf: bytearray, pos: int, out: list[tuple[bytes, int]]) -> int | None:
        """One `LEN SP MSG` frame from `pos`: the position after it, `pos` if incomplete, None if the
        bytes are not an octet-counted frame (then they are read as newline-framed)."""
        m = _OCTET_COUNT_RE.match(buf, pos)
        if m is None:
            head = bytes(buf[pos : pos + 10])
            return pos if head.isdigit() and len(head) < 10 else None
        size, start = int(m.group(1)), m.end()
        if len(buf) - start >= size:
            message = bytes(buf[start : start + size])
            if size > self.max_size:
                out.append((cut_utf8(message, self.max_size), size))
            elif message.strip(b"\r\n\x00"):
                out.append((message, 0))
            return start + size
        if size > self.max_size and len(buf) - start > self.max_size:
            out.append((cut_utf8(bytes(buf[start : start + self.max_size + 1]), self.max_size), size))
            self._discard = size - (len(buf) - start)
            return len(buf)
        return pos

    def _delimited(self, buf: bytearray, pos: int, out: list[tuple[bytes, int]]) -> int:
        m = _DELIMITER_RE.search(buf, pos)
        if m is None:
            if len(buf) - pos > self.max_size:
                out.append((cut_utf8(bytes(buf[pos : pos + self.max_size + 1]), self.max_size), -1))
                self._discard_line = True
                return len(buf)
            return pos
        end = m.start()
        if end > pos and buf[end - 1] == 0x0D:  # CR LF
            end -= 1
        if end - pos > self.max_size:
            out.append((cut_utf8(bytes(buf[pos : pos + self.max_size + 1]), self.max_size), end - pos))
        elif end > pos and buf[pos:end].strip(b"\r"):
            out.append((bytes(buf[pos:end]), 0))
        return m.end()

    def finish(self) -> list[tuple[bytes, int]]:
        """What is left when the peer closed: an unterminated last message (kept; a cut-off
        octet-counted one is marked truncated)."""
        rest, self._buf = bytes(self._buf), bytearray()
        if self._discard or self._discard_line or not rest.strip(b"\r\n\x00 "):
            return []
        m = _OCTET_COUNT_RE.match(rest) if self.octet_counting else None
        if m is not None:
            return [(rest[m.end() :], int(m.group(1)))]
        return [(rest, 0)]


class SyslogSource:
    """The `pipeline.Source` for every `[[syslog]]` listener."""

    name = SOURCE
    config_section = "syslog"  # registered in edgeagent/sources/__init__.py

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners = [_Listener(i, cfg) for i, cfg in enumerate(config.syslog)]
        self._ctx: SourceContext | None = None

    def status(self) -> dict[str, Any]:
        listeners = [listener.status() for listener in self.listeners]
        errors = [st["error"] for st in listeners if st["error"]]
        states = {st["state"] for st in listeners}
        totals = {key: sum(lst.stats[key] for lst in self.listeners) for key in _Listener.STATS}
        state = "error" if errors else states.pop() if len(states) == 1 else "starting"
        return {"state": state, "error": "; ".join(errors) or None, **totals, "listeners": listeners}

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        tasks = [asyncio.create_task(lst.run(ctx), name=f"syslog {lst.cfg.listen}") for lst in self.listeners]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _Listener:
    """One `[[syslog]]` table: its socket(s), connections and counters."""

    STATS = ("messages", "truncated", "invalid_utf8", "dropped", "connections_refused")

    def __init__(self, index: int, cfg: SyslogConfig) -> None:
        self.cfg = cfg
        self.key = f"syslog[{index}]"
        self.transport, self.host, self.port = parse_listen(cfg.listen)
        self.mode = int(cfg.socket_mode, 8)
        self.gid = -1
        if cfg.socket_group:
            try:
                self.gid = grp.getgrnam(cfg.socket_group).gr_gid
            except KeyError:
                raise ConfigError(f"{self.key}.socket_group = {cfg.socket_group!r}: no such group") from None
        self.state = "starting"
        self.error: str | None = None
        self.stats = dict.fromkeys(self.STATS, 0)
        self._ctx: SourceContext | None = None
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._overflow_seen = 0
        self._unreported_drops = 0
        self._drop_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._attrs: Attributes = {ATTR_TRANSPORT: "unix" if self.transport.startswith("unix") else self.transport}

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = {"listen": self.cfg.listen, "state": self.state, "error": self.error}
        if self.transport in ("tcp", "unix-stream"):
            st["connections"] = len(self._connections)
        return st | self.stats

    async def run(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        self._closing = False
        delay = RETRY_INITIAL
        try:
            while True:
                try:
                    await self._open()
                    break
                except OSError as e:
                    message = f"cannot listen on {self.cfg.listen}: {e.strerror or e}; retrying"
                    if message != self.error:
                        log.error("syslog: %s", message)
                    self.state, self.error = "error", message
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
            self.state, self.error = "running", None
            log.info("syslog: listening on %s", self.cfg.listen)
            await asyncio.Future()  # until cancelled
        finally:
            self._close()
            self.state = "stopped"

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self.transport == "tcp":
            self._server = await asyncio.start_server(
                self._connection, self.host, self.port, limit=READ_SIZE, reuse_address=True
            )
        elif self.transport == "unix-stream":
            _remove_stale_socket(self.host)
            self._server = await asyncio.start_unix_server(self._connection, self.host, limit=READ_SIZE)
            self._set_permissions()
        else:
            self._sock = self._datagram_socket()
            loop.add_reader(self._sock.fileno(), self._on_datagrams)

    def _datagram_socket(self) -> socket.socket:
        if self.transport == "udp":
            family, _, _, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._bind(sock, address)
            except OSError:
                sock.close()
                raise
            return sock
        _remove_stale_socket(self.host)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._bind(sock, self.host)
            self._set_permissions()
        except OSError:
            sock.close()
            raise
        return sock

    def _bind(self, sock: socket.socket, address: Any) -> None:
        if self.cfg.receive_buffer:
            try:  # as root (CAP_NET_ADMIN), beyond net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.cfg.receive_buffer)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.cfg.receive_buffer)
        sock.setblocking(False)
        sock.bind(address)

    def _set_permissions(self) -> None:
        os.chmod(self.host, self.mode)
        if self.gid >= 0:
            os.chown(self.host, -1, self.gid)

    def _close(self) -> None:
        self._closing = True
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._report_drops()  # at a stop, drops not reported yet go out with the final commit
        if self._sock is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in self._connections:
            task.cancel()
        if self.transport.startswith("unix"):
            with contextlib.suppress(OSError):
                _remove_stale_socket(self.host)

    # --- datagrams ------------------------------------------------------------------------------

    def _on_datagrams(self) -> None:
        sock, ctx = self._sock, self._ctx
        if sock is None or ctx is None:
            return
        messages: list[tuple[bytes, int, Any]] = []
        dropped = 0
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                data, _, flags, peer = sock.recvmsg(DATAGRAM_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("syslog: receiving on %s failed: %s", self.cfg.listen, e)
                break
            if not ctx.accepting:
                dropped += 1
                continue
            original = -1 if flags & socket.MSG_TRUNC else 0
            if len(data) > self.cfg.max_message_size:
                original = original or len(data)
                data = cut_utf8(data, self.cfg.max_message_size)
            messages.append((data, original, peer))
        dropped += self._kernel_drops(sock)
        if dropped:
            self._dropped(dropped)
        if messages:
            records = self._records([(data, original) for data, original, _ in messages])
            if self.transport == "udp":
                for record, (_, _, peer) in zip(records, messages, strict=True):
                    assert record.attributes is not None
                    record.attributes[ATTR_PEER_ADDRESS] = peer[0]
                    record.attributes[ATTR_PEER_PORT] = peer[1]
            ctx.emit_nowait(Batch(SOURCE, records, monotonic_ns(), ctx.boot_id, self._attrs))

    def _kernel_drops(self, sock: socket.socket) -> int:
        """Datagrams the kernel dropped since the last call (the receive buffer was full)."""
        try:
            info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
        except OSError:
            return 0  # not Linux, or a kernel without SO_MEMINFO (before 4.6): kernel drops are not seen
        if len(info) < 4 * (SK_MEMINFO_DROPS + 1):
            return 0
        total = struct.unpack_from("I", info, 4 * SK_MEMINFO_DROPS)[0]
        new = (total - self._overflow_seen) & 0xFFFFFFFF
        self._overflow_seen = total
        return new

    def _dropped(self, count: int) -> None:
        """Datagrams lost (spool stalled, or the kernel's buffer overflowed): counted now, reported in a
        record once the spool takes writes again (guarantee 5)."""
        assert self._ctx is not None
        self.stats["dropped"] += count
        self._unreported_drops += count
        self._ctx.count({"syslog_dropped": count})
        if self._drop_timer is None:  # one record a second at most, however long the loss goes on
            self._drop_timer = asyncio.get_running_loop().call_later(DROP_REPORT_INTERVAL, self._report_drops)

    def _report_drops(self) -> None:
        ctx = self._ctx
        self._drop_timer = None
        if ctx is None or not self._unreported_drops:
            return
        if not ctx.accepting and not self._closing:
            self._drop_timer = asyncio.get_running_loop().call_later(DROP_REPORT_INTERVAL, self._report_drops)
            return
        count, self._unreported_drops = self._unreported_drops, 0
        text = f"edgeagent: {count} syslog datagrams received on {self.cfg.listen} were dropped"
        log.warning("syslog: %s", text)
        record = loss.record(
            loss.SYSLOG_DROPPED, text, records=count, source=SOURCE, extra={"syslog.listen": self.cfg.listen}
        )
        ctx.emit_nowait(Batch(SOURCE, [record], monotonic_ns(), ctx.boot_id))

    # --- streams --------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ctx = self._ctx
        task = asyncio.current_task()
        if ctx is None or task is None or len(self._connections) >= self.cfg.max_connections:
            self._refuse(writer)
            return
        self._connections.add(task)
        attrs = dict(self._attrs)
        peer = writer.get_extra_info("peername")
        if self.transport == "tcp" and isinstance(peer, tuple):
            attrs[ATTR_PEER_ADDRESS], attrs[ATTR_PEER_PORT] = peer[0], peer[1]
        framer = Framer(self.cfg.max_message_size)
        try:
            while True:
                try:
                    data = await reader.read(READ_SIZE)
                except (ConnectionError, OSError):
                    break
                messages = framer.feed(data) if data else framer.finish()
                if messages:
                    await ctx.emit(Batch(SOURCE, self._records(messages), monotonic_ns(), ctx.boot_id, attrs))
                if not data:
                    break
        except asyncio.CancelledError:  # shutdown: an unterminated last message is kept, not dropped
            rest = framer.finish()
            if rest:
                ctx.emit_nowait(Batch(SOURCE, self._records(rest), monotonic_ns(), ctx.boot_id, attrs))
            raise
        finally:
            self._connections.discard(task)
            writer.close()

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        if not self.stats["connections_refused"]:
            log.warning(
                "syslog: %s has %d connections (max_connections); refusing more",
                self.cfg.listen,
                len(self._connections),
            )
        self.stats["connections_refused"] += 1
        if self._ctx is not None:
            self._ctx.count({"syslog_connections_refused": 1})
        writer.close()

    # --- records --------------------------------------------------------------------------------

    def _records(self, messages: list[tuple[bytes, int]]) -> list[Record]:
        assert self._ctx is not None
        offset = time.time_ns() - monotonic_ns()
        now = time.time()
        fmt = self.cfg.format
        records = []
        truncated = invalid = 0
        for data, original in messages:
            if not data.isascii():
                try:
                    data.decode()
                except UnicodeDecodeError:
                    invalid += 1
            record = parse_message(data, fmt, offset, now)
            if original:
                truncated += 1
                assert record.attributes is not None
                record.attributes.update(loss.truncated(original))
            records.append(record)
        self.stats["messages"] += len(records)
        counters = {}
        if truncated:
            self.stats["truncated"] += truncated
            counters["syslog_truncated"] = truncated
        if invalid:
            self.stats["invalid_utf8"] += invalid
            counters["syslog_invalid_utf8"] = invalid
        self._ctx.count(counters)
        return records


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left behind by an earlier run (or another syslog daemon); refuse to delete
    anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(17, f"{path} exists and is not a socket")
    os.unlink(path)

"""The running agent: wires config, spool, sources, batcher and uploader on one
asyncio loop, supervises them, handles signals and publishes status.

Signals: SIGTERM/SIGINT stop cleanly (sources stop, what was read is
committed, the uploader waits `upload.shutdown_timeout` for acknowledgements);
SIGHUP reloads the config file (an invalid file is reported and the running
config kept); SIGUSR1 wakes the uploader (`edgeagent wake`, OpenWrt hotplug).

A new config (SIGHUP, fleet config over MQTT) is applied live by
`apply_config`: only components whose config sections changed are rebuilt, the
spool stays open, and a replaced source resumes from its committed position.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import platform
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgeagent import __version__, clock, redact, service, statedir, tls
from edgeagent import config as config_mod
from edgeagent.codec import ChunkCodec
from edgeagent.config import Config, ConfigError
from edgeagent.errors import RestartRequired
from edgeagent.mqtt import MqttSession, SessionKeeper
from edgeagent.otlp import ChunkEncoder
from edgeagent.pipeline import (
    AGENT_SOURCE,
    WAKE_ASKED,
    WAKE_NETWORK,
    Batcher,
    Source,
    SourceContext,
    Uploader,
    UploaderContext,
)
from edgeagent.records import Batch, Record
from edgeagent.spool import Spool, SpoolUnavailable

log = logging.getLogger("edgeagent")

STATUS_INTERVAL = 5.0
# The config sections each source reads; a source not listed reads the section named like it.
SOURCE_SECTIONS = {"kmsg": ("kmsg",), "pstore": ("kmsg",)}
UPLOADER_SECTIONS = ("upload", "mqtt", "otlp_http")
_RESTART_MIN, _RESTART_MAX = 1.0, 60.0

# OpenTelemetry host.arch values for what platform.machine() says.
_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm32",
    "armv6l": "arm32",
    "i686": "x86",
    "i386": "x86",
    "ppc64le": "ppc64",
    "s390x": "s390x",
}


def resource_attributes(config: Config) -> dict[str, Any]:
    """Who sent the logs: the device id plus OpenTelemetry host attributes."""
    attrs: dict[str, Any] = {
        "service.name": "edgeagent",
        "service.version": __version__,
        "device.id": config.device_id,
        "host.name": socket.gethostname(),
        "os.type": "linux",
    }
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
        if machine_id:
            attrs["host.id"] = machine_id
    except OSError:
        pass
    machine = platform.machine()
    attrs["host.arch"] = _ARCH.get(machine, machine)
    attrs.update(config.resource)
    return attrs


def build_components(config: Config) -> tuple[list[Source], Uploader | None]:
    """Sources and uploader for `config`. Constructors only check and prepare
    (no I/O that changes anything), so this also validates a config fully:
    raises ConfigError for what the TOML checks cannot see (TLS files, regexes
    that compile but cannot be used)."""
    from edgeagent.sources import build_sources
    from edgeagent.uploaders import build_uploader

    check_files(config)
    return build_sources(config), build_uploader(config)


def check_files(config: Config) -> None:
    """What parsing cannot see: the files the config names can be used (raises ConfigError)."""
    if config.needs_mqtt_session:
        config_mod.check_mqtt_files(config)
    if config.fleet.enabled and config.fleet.trusted_keys:
        from edgeagent.fleet.envelope import EnvelopeError, Verifier

        try:
            Verifier(config.fleet.trusted_keys)
        except EnvelopeError as e:  # unreadable, not a key, or PyNaCl missing
            raise config_mod.error_at(
                config, "fleet.trusted_keys", list(config.fleet.trusted_keys), f"usable Ed25519 public key files ({e})"
            ) from None


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool: Spool | None = None
        self.boot_id = clock.boot_id()
        self.started = time.time()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sources: list[Source] = []
        self._uploader: Uploader | None = None
        self._uploader_ctx: UploaderContext | None = None
        self._batcher: Batcher | None = None
        self._errors: dict[str, str] = {}
        self._last_status = ""
        self._component_status: dict[str, Any] = {"sources": {}, "uploader": {"to": "none"}}
        self._redactor = redact.install(config)
        self._heap = _Heap()
        self._fleet: Any = None  # edgeagent.fleet.device.FleetDevice when [fleet] is enabled
        self._fleet_task: asyncio.Task[None] | None = None
        self._lock = statedir.RunLock(config.state_dir)
        self._mqtt = SessionKeeper(lambda: self.spool.backlog() if self.spool is not None else {})
        self.restart_for_tls = False  # `run()` executes the agent again once it stopped (edgeagent.tls)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Worker threads (`asyncio.to_thread`: connects, HTTP requests) leave the request signals to the loop.
        loop.set_default_executor(ThreadPoolExecutor(initializer=service.leave_requests_to_the_loop))
        for sig, handler in (
            (signal.SIGTERM, self._stop.set),
            (signal.SIGINT, self._stop.set),
            (signal.SIGHUP, self._reload.set),
            (signal.SIGUSR1, lambda: self._wake(WAKE_ASKED)),
            (signal.SIGUSR2, lambda: self._write_status("running", force=True)),  # `edgeagent status` asks
        ):
            loop.add_signal_handler(sig, handler)
        os.umask(0o077)  # everything created in state_dir is the agent's user's only
        warnings = statedir.prepare(self.config.state_dir)
        # Only now, with the signal handlers in place, does the lock name this process: `edgeagent wake`
        # (SIGUSR1) and `status` find the agent through it, and a SIGUSR1 before its handler kills.
        self._lock.acquire()  # before the spool: a second agent must not touch it
        for warning in warnings:
            log.warning("%s", warning)
        try:
            return await self._run_locked()
        finally:
            self._lock.release()
            service.ignore_requests(loop)

    async def _run_locked(self) -> int:
        self.spool = await self._open_spool()
        if self.spool is None:
            log.info("stopped before the spool could be opened")
            return 0
        notifier = service.Notifier()
        for event in self.spool.events:
            log.error("%s", event)
        log.info(
            "edgeagent %s started: device %s, spool %s (%s, durability %s), boot %s",
            __version__,
            self.config.device_id,
            self.config.spool_path,
            self.spool.journal,
            self.config.spool.durability,
            self.boot_id,
        )
        try:
            if self.config.fleet.enabled:
                from edgeagent.fleet.device import FleetDevice

                self._fleet = FleetDevice(self, self.config)
                self._fleet.redact = self._redactor.text
                self.config = self._fleet.startup()
            if not self._begin_restart_for_tls(self.config, "the config"):
                self._start_components(build_components(self.config))
                if self._fleet is not None:
                    self._fleet_task = asyncio.create_task(self._supervise("fleet", self._fleet.run), name="fleet")
                self._write_status("running")
                notifier.start_watchdog()
                notifier.ready(f"running: device {self.config.device_id}")
            while not self._stop.is_set():
                stop_wait = asyncio.ensure_future(self._stop.wait())
                reload_wait = asyncio.ensure_future(self._reload.wait())
                await asyncio.wait({stop_wait, reload_wait}, timeout=STATUS_INTERVAL, return_when="FIRST_COMPLETED")
                stop_wait.cancel()
                reload_wait.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    await self._reload_notified(notifier)
                self.spool.retry_unrecorded()
                self._write_status("running")
                self._heap.trim()
            if self.restart_for_tls:
                notifier.reloading("restarting to load TLS")
            else:
                notifier.stopping()
            log.info("stopping")
            if self._fleet_task is not None:
                self._fleet_task.cancel()
                await asyncio.gather(self._fleet_task, return_exceptions=True)
            committed = await self._stop_components()
            await self._mqtt.close()
            self._write_status("restarting" if self.restart_for_tls else "stopped")
        finally:
            notifier.close()
            self.spool.close()
        if not committed:
            return 1
        log.info("stopped")
        return 0

    async def _open_spool(self) -> Spool | None:
        """Open the spool, waiting out a disk that is full, failing or read-only
        (the files are left as they are) until it works or a stop is asked."""
        delay, last = 1.0, ""
        while True:
            try:
                spool = Spool.open(
                    self.config.spool_path,
                    max_size=self.config.spool.max_size,
                    durability=self.config.spool.durability,
                    journal=self.config.spool.journal,
                    dead_letters_max=self.config.spool.dead_letters_max,
                    check_payload=ChunkCodec().decode,
                )
            except SpoolUnavailable as e:
                if str(e) != last:
                    log.error("%s; retrying with backoff (status shows it)", e)
                    last = str(e)
                self._lock.note(f"spool unavailable: {e}")
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    return None
                except TimeoutError:
                    delay = min(delay * 2, _RESTART_MAX / 2)
                continue
            if last:
                log.warning("spool %s is available again", self.config.spool_path)
            self._lock.note("")
            return spool

    def _wake(self, reason: str) -> None:
        self._mqtt.wake()
        if self._uploader_ctx is not None:
            self._uploader_ctx.wake(reason)

    def _start_components(self, components: tuple[list[Source], Uploader | None]) -> None:
        assert self.spool is not None
        config = self.config
        encoder = ChunkEncoder(resource_attributes(config), __version__)
        self._sources, self._uploader = components
        session = self._attach_session(config, self._uploader)
        if self._uploader is not None:
            self._uploader_ctx = UploaderContext(self.spool, config, on_loss=self._ship_loss, boot_id=self.boot_id)
        on_commit = self._uploader_ctx.wake if self._uploader_ctx is not None else None
        self._batcher = Batcher(
            self.spool,
            encoder,
            self.boot_id,
            config.spool,
            on_commit=on_commit,
            thread_start=service.leave_requests_to_the_loop,
        )
        self._batcher.ship_spool_losses()  # a quarantine at open, and what its salvage lost
        source_ctx = SourceContext(self._batcher, self.spool, self.boot_id, config)
        for source in self._sources:
            self._spawn(f"source {source.name}", functools.partial(source.run, source_ctx))
        if self._uploader is not None and self._uploader_ctx is not None:
            uploader, ctx = self._uploader, self._uploader_ctx
            self._spawn("uploader", lambda: uploader.run(ctx))
            ctx.wake()  # a backlog from the last run goes out at once
        if self._uploader is not None or session is not None:
            self._spawn("network watch", self._watch_network)

    def _attach_session(self, config: Config, uploader: Uploader | None) -> MqttSession | None:
        """The MQTT session for `config` (the running one when its connection settings are
        unchanged), handed to its clients: the MQTT uploader and fleet config."""
        session = self._mqtt.ensure(config)
        if session is not None and hasattr(uploader, "session"):
            uploader.session = session  # type: ignore[union-attr]
        if session is not None and self._fleet is not None:
            self._fleet.attach(session)
        return session

    def _ship_loss(self, record: Record, counters: dict[str, int]) -> None:
        if self._batcher is not None:
            self._batcher.add(Batch(AGENT_SOURCE, [record], clock.monotonic_ns(), self.boot_id))
            if counters:
                self._batcher.count(counters)  # committed with the record

    async def _watch_network(self) -> None:
        from edgeagent.connectivity import NetworkWatch

        await NetworkWatch().run(lambda: self._wake(WAKE_NETWORK))

    def _spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self._tasks.append(asyncio.create_task(self._supervise(name, run), name=name))

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a component forever: a crash is logged, shown in status and
        followed by a restart with backoff — bad input never stops the agent."""
        delay = _RESTART_MIN
        while True:
            started = time.monotonic()
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._errors[name] = f"{type(e).__name__}: {e}"
                log.exception("%s failed; restarting in %.0f s", name, delay)
            if time.monotonic() - started > 10 * _RESTART_MAX:
                delay = _RESTART_MIN
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_MAX)

    async def _stop_components(self) -> bool:
        """Stop sources, commit what they read, let the uploader drain, stop
        the rest. A stalled spool is retried for up to
        `upload.shutdown_timeout`; returns False if something read could not
        be committed (the caller then exits non-zero)."""
        source_tasks = [t for t in self._tasks if t.get_name().startswith("source ")]
        for task in source_tasks:
            task.cancel()
        await asyncio.gather(*source_tasks, return_exceptions=True)
        if self._batcher is not None:
            self._batcher.flush()
        if self._uploader is not None:
            try:
                await asyncio.wait_for(
                    self._uploader.drain(self.config.upload.shutdown_timeout),
                    self.config.upload.shutdown_timeout + 1,
                )
            except Exception:
                log.exception("uploader did not drain cleanly; unacknowledged chunks stay in the spool")
        self._snapshot_components()  # `status` after a stop shows the last known states
        committed = True
        if self._batcher is not None and not await self._batcher.drain(self.config.upload.shutdown_timeout):
            committed = False
            log.error(
                "stopping with %s not committed (%s): lines still in their files or the kernel ring buffer are "
                "read again at the next start; the rest is lost",
                self._batcher.pending_summary(),
                self._batcher.last_error,
            )
        rest = [t for t in self._tasks if t not in source_tasks]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        self._tasks = []
        self._sources = []
        self._uploader = None
        self._uploader_ctx = None
        return committed

    async def _reload_notified(self, notifier: service.Notifier) -> None:
        """A SIGHUP reload between `RELOADING=1` and `READY=1`, so that systemd sees it begin and end, applied
        or refused (a restart for TLS leaves READY=1 to the new process)."""
        notifier.reloading("reloading the config")
        await self._apply_reload()
        if not self.restart_for_tls:
            refused = "; reload refused, running config kept" if "config" in self._errors else ""
            notifier.ready(f"running: device {self.config.device_id}{refused}")

    async def _apply_reload(self) -> None:
        path = self.config.source_path
        try:
            new = config_mod.load(path)
            if self._fleet is not None:
                new = self._fleet.with_layers(new)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            self._errors["config"] = str(e)
            return
        log.info("reloading config from %s", path)
        try:
            await self.apply_config(new)
        except RestartRequired:
            return
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            self._errors["config"] = str(e)
            return
        self._errors.pop("config", None)

    async def apply_config(self, new: Config) -> None:
        """Apply `new` live. Everything is built before anything stops, so a
        config that parses but cannot be used (an unreadable CA file) raises
        ConfigError and leaves the running components alone. Then only the
        components whose sections changed are replaced. A config that needs TLS
        this process kept out raises RestartRequired: the agent stops to start again."""
        from edgeagent.sources import build_sources
        from edgeagent.uploaders import build_uploader

        if new.uses_tls and not tls.available():
            problem = await tls.check_elsewhere(new)
            if problem:
                raise ConfigError(problem)
            self._begin_restart_for_tls(new, "the new config")
            raise RestartRequired("restarting to load TLS")
        check_files(new)
        old = self.config
        if new.state_dir != old.state_dir:
            log.error("state_dir cannot change while running (restart the agent); keeping %s", old.state_dir)
            new = dataclasses.replace(new, state_dir=old.state_dir)
        changed = {f.name for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(new, f.name)}
        uploader_changed = bool(changed & {*UPLOADER_SECTIONS, "device_id"})  # device_id: topics, MQTT client id
        uploader = build_uploader(new) if uploader_changed else None
        built = {source.name: source for source in build_sources(new)}
        running = {source.name: source for source in self._sources}
        replaced = [
            name
            for name in {*built, *running}
            if name not in built or name not in running or changed & set(SOURCE_SECTIONS.get(name, (name,)))
        ]
        for name in [n for n in replaced if n in running]:
            await self._stop_task(f"source {name}")
        for name in [k for k in self._errors if k.startswith("source ")]:
            del self._errors[name]
        assert self.spool is not None and self._batcher is not None
        self._batcher.flush()  # what the stopped sources handed over, with their positions
        self._batcher.config = new.spool
        if changed & {"device_id", "resource"}:
            self._batcher.encoder = ChunkEncoder(resource_attributes(new), __version__)
        self.spool.max_size = new.spool.max_size
        _configure_logging(new.log_level)
        redact.install(new, self._redactor)
        if uploader_changed:
            await self._replace_uploader(uploader, new)
        self.config = new
        self._sources = [running[n] for n in running if n not in replaced] + [built[n] for n in built if n in replaced]
        source_ctx = SourceContext(self._batcher, self.spool, self.boot_id, new)
        for name in [n for n in built if n in replaced]:
            self._spawn(f"source {name}", functools.partial(built[name].run, source_ctx))
        if replaced or changed:
            log.info("applied config: changed %s; restarted %s", sorted(changed), sorted(replaced) or "no source")

    def _begin_restart_for_tls(self, config: Config, what: str) -> bool:
        """When `config` needs TLS that this process kept out: begin a clean stop
        after which `run()` starts the agent again with TLS, and return True."""
        if not config.uses_tls or tls.available():
            return False
        log.warning("%s uses TLS, kept out of this process until now: restarting with TLS loaded", what)
        if self._fleet is not None:
            self._fleet.prepare_restart()
        self.restart_for_tls = True
        self._stop.set()
        return True

    async def _stop_task(self, name: str) -> None:
        tasks = [t for t in self._tasks if t.get_name() == name]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = [t for t in self._tasks if t not in tasks]

    async def _replace_uploader(self, uploader: Uploader | None, new: Config) -> None:
        assert self.spool is not None and self._batcher is not None
        if self._uploader is not None:
            try:
                timeout = self.config.upload.shutdown_timeout
                await asyncio.wait_for(self._uploader.drain(timeout), timeout + 1)
            except Exception:
                log.exception("uploader did not drain cleanly; unacknowledged chunks stay in the spool")
        await self._stop_task("uploader")
        await self._stop_task("network watch")
        await self._mqtt.retire_if_changed(new)  # after the old uploader drained through it
        session = self._attach_session(new, uploader)
        self._errors.pop("uploader", None)
        refusals = self._uploader_ctx.refusals if self._uploader_ctx is not None else None
        self._uploader, self._uploader_ctx = uploader, None
        self._batcher.on_commit = None
        if uploader is not None:
            ctx = self._uploader_ctx = UploaderContext(
                self.spool, new, on_loss=self._ship_loss, boot_id=self.boot_id, refusals=refusals
            )
            self._batcher.on_commit = ctx.wake
            self._spawn("uploader", lambda: uploader.run(ctx))
            ctx.wake()
        if uploader is not None or session is not None:
            self._spawn("network watch", self._watch_network)

    def health(self) -> str:
        """'' when every source runs and the spool takes writes, else why not (fleet probation)."""
        for name, error in self._errors.items():
            if name.startswith("source "):
                return f"{name} failed: {error}"
        if self._batcher is not None and self._batcher.stalled:
            return f"the spool does not take writes: {self._batcher.last_error}"
        return ""

    def _snapshot_components(self) -> None:
        if self._sources or self._uploader is not None:
            self._component_status = {
                "sources": {s.name: _safe_status(s) for s in self._sources},
                "uploader": _safe_status(self._uploader) if self._uploader is not None else {"to": "none"},
            }

    def _write_status(self, state: str, force: bool = False) -> None:
        """Store the status `edgeagent status` shows, when it changed (or when
        `force`d: the CLI asked for a fresh one with SIGUSR2). Secrets are
        redacted; `updated` says how old it is."""
        if self.spool is None:
            return
        self._snapshot_components()
        if self._mqtt.session is not None:  # kept after a stop, like the components'
            self._component_status["mqtt"] = _safe_status(self._mqtt.session)
        status = {
            "agent": {
                "state": state,
                "pid": os.getpid(),
                "version": __version__,
                "started": self.started,
                "device_id": self.config.device_id,
                "boot_id": self.boot_id,
                "config": self.config.source_path,
                "errors": self._errors,
                "refresh_signal": "SIGUSR2",
            },
            **self._component_status,
        }
        if self._fleet is not None:
            status["fleet"] = self._fleet.status()
        stall = self._batcher.last_error if self._batcher is not None and self._batcher.stalled else ""
        status["agent"]["spool"] = f"unavailable: {stall}" if stall else "ok"
        self._lock.note(f"spool unavailable: {stall}" if stall else "")  # status reads it when the spool cannot
        text = json.dumps(status, sort_keys=True, default=str)
        if text == self._last_status and not force:
            return
        status = self._redactor.data(json.loads(text))
        status["agent"]["updated"] = time.time()
        try:
            self.spool.set_status(status)
            self._last_status = text
        except Exception as e:
            if not stall:
                log.warning("writing status failed: %s", e)


def _safe_status(component: Any) -> dict[str, Any]:
    try:
        return dict(component.status())
    except Exception as e:
        return {"state": "error", "error": f"status() failed: {e}"}


def _configure_logging(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


class _Heap:
    """glibc malloc tuning (other C libraries, e.g. musl on OpenWrt, have
    neither call and need neither: they return memory eagerly; there
    `libc.so.6` does not exist and nothing is changed).

    - Fixed thresholds: buffers up to 4 MiB (a 256 KiB read, a chunk being
      encoded, its compressed copy) come from the heap and their pages are
      reused from one chunk to the next, and the heap's top is returned to the
      kernel only beyond 8 MiB free. glibc's defaults move both thresholds
      after the first large free, which kept up to 10 MiB more resident under
      load; a low mmap threshold (128 KiB, before issue 15) made every such
      buffer a fresh mmap, faulted in and zeroed page by page: 160,000 page
      faults and about 0.5 CPU s per million lines, against 9,000 now, for the
      same peak RSS (37-38 MiB), measured.
    - `trim()` returns free heap pages (start-up temporaries, a burst that is
      over) to the kernel: about 1 MiB at idle, measured.
    """

    M_TRIM_THRESHOLD = -1
    M_MMAP_THRESHOLD = -3

    def __init__(self) -> None:
        import ctypes

        self._malloc_trim: Callable[[int], int] | None = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(self.M_MMAP_THRESHOLD, 4 * 1024 * 1024)
            libc.mallopt(self.M_TRIM_THRESHOLD, 8 * 1024 * 1024)
            self._malloc_trim = libc.malloc_trim
        except (OSError, AttributeError):
            pass

    def trim(self) -> None:
        if self._malloc_trim is not None:
            self._malloc_trim(0)


def run(config: Config) -> int:
    service.configure_logging(config.log_level, config.log_format)
    agent = Agent(config)
    code = asyncio.run(agent.run())
    if agent.restart_for_tls:  # what was not committed is read again at this next start
        tls.restart_with_tls()
    return code

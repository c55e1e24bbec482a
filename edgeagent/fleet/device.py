"""The device side of fleet config: receive, verify, validate, persist, apply,
prove, roll back, report.

Owns the apply state machine of docs/fleet.md. Runs on the agent's loop and
talks to the broker only through the agent's shared MQTT session. Guarantees:

- exact-topic subscriptions only (the device topic and one per group); the
  session re-subscribes after every CONNACK, so retained desired configs are
  read again after every (re)connect, and versions at or below the highest
  applied or rejected one for that scope are ignored;
- nothing is parsed before the size cap and the signature check passed, and
  a version is remembered (as applied or rejected) only once its signature
  verified, so forged messages cannot block future versions;
- the probation marker and the candidate layers are persisted before the
  apply; a crash or reboot while on probation restores the last good layers
  at the next start (`startup`) and reports `rolled_back`. Only the agent's
  own restart to load TLS (`prepare_restart`, edgeagent.tls) keeps the
  candidate: its probation starts again, in full, after that restart;
- an apply is committed as last good only after its proof: for applies that
  touch connectivity (or all, with `probation_always`), the session is
  connected, sources run, the spool takes writes and the `applied` report was
  acknowledged by PUBACK, all within `probation`; otherwise the last good
  config is restored, the version rejected and `rolled_back` reported;
- status reports are retained, QoS 1, sent on change only, never spooled,
  and resent until acknowledged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from edgeagent.config import Config, ConfigError
from edgeagent.errors import RestartRequired
from edgeagent.fleet import layers, policy, report
from edgeagent.fleet.envelope import EnvelopeError, Verifier, decode
from edgeagent.fleet.store import FleetState, FleetStore, Layer, layers_hash

log = logging.getLogger(__name__)

RETRY_INTERVAL = 1.0
SETTLE = 1.0  # how long new components must run before an apply without probation counts as applied


class FleetHost(Protocol):
    """What the agent offers the fleet component."""

    config: Config
    boot_id: str

    async def apply_config(self, new: Config) -> None: ...  # ConfigError: unusable, running config kept

    def health(self) -> str: ...  # '' when sources run and the spool takes writes, else why not


class Session(Protocol):
    connected: bool

    def subscribe(self, topic: str, handler: Callable[[Any], None], qos: int = 1) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any: ...

    async def wait_connected(self, timeout: float) -> bool: ...


def topics(config: Config) -> dict[str, str]:
    """Exact topic -> scope, for the device and each of its groups."""
    fleet, device = config.fleet, config.device_id
    out = {fleet.desired_topic.format(device_id=device): f"device:{device}"}
    for group in fleet.groups:
        out[fleet.group_topic.format(group=group, device_id=device)] = f"group:{group}"
    return out


class FleetDevice:
    def __init__(self, host: FleetHost, local: Config) -> None:
        self.host = host
        self.local = local  # the local file's config: [fleet], device_id and the file to re-read
        self.fleet = local.fleet
        self.store = FleetStore(local.state_dir)
        self.state: FleetState = self.store.load()
        self.status_topic = self.fleet.status_topic.format(device_id=local.device_id)
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._session: Session | None = None
        self._report_due = asyncio.Event()
        self._acknowledged: dict[str, Any] = {}
        self._resumed: dict[str, Any] | None = None  # a probation that goes on after a restart for TLS
        self.redact: Callable[[str], str] = lambda text: text  # the agent's Redactor: known secret values
        try:
            self.verifier: Verifier | None = Verifier(self.fleet.trusted_keys)
            self._verifier_error = ""
        except EnvelopeError as e:
            self.verifier, self._verifier_error = None, str(e)
            log.error("fleet: %s; every desired config will be rejected", e)

    # --- start-up (before components run) --------------------------------------

    def startup(self) -> Config:
        """The config to start with: local file < remote layers in effect.
        A probation interrupted by a crash or reboot is rolled back first."""
        marker = self.state.probation
        if marker is not None and marker.pop("resume", False):
            self._resumed = marker
            self.store.save(self.state)  # a crash from now on rolls back, as for any probation
        elif marker is not None:
            self.state.applied = dict(self.state.last_good)
            self.state.reject(marker["scope"], int(marker["version"]))
            self.state.probation = None
            self._set_status(
                "rolled_back",
                marker["scope"],
                int(marker["version"]),
                f"the agent restarted while {marker['scope']} v{marker['version']} was on probation "
                f"({marker['reason']}); restored the last good config",
            )
            self.store.save(self.state)
            log.error("fleet: %s", self.state.status["reason"])
        try:
            config = layers.effective(self.local, self.state.applied)
        except ConfigError as e:
            log.error("fleet: the remote layers no longer fit the local config, running it alone: %s", e)
            self._set_status("failed", "", 0, str(e))
            config = self.local
        if not self.state.status:
            self._set_status("applied", f"device:{self.local.device_id}", 0, "")
        self._report_due.set()
        return config

    def prepare_restart(self) -> None:
        """The agent restarts to load TLS: a probation under way goes on after it."""
        if self.state.probation is not None:
            self.state.probation["resume"] = True
            self.store.save(self.state)

    def with_layers(self, local: Config) -> Config:
        """SIGHUP: the re-read local file with the remote layers in effect over
        it (`[fleet]` itself, its topics and keys, change at the next start)."""
        self.local = local
        return layers.effective(local, self.state.applied)

    def status(self) -> dict[str, Any]:
        return dict(self.state.status)

    # --- the session -------------------------------------------------------------

    def attach(self, session: Session) -> None:
        """Subscribe on `session` (called again whenever the agent replaces it)."""
        self._session = session
        for topic, scope in topics(self.local).items():
            session.subscribe(topic, functools.partial(self._received, scope), 1)
        self._report_due.set()

    def _received(self, scope: str, message: Any) -> None:
        if message.payload:  # an empty retained message clears the topic; the layer in effect stays
            self._queue.put_nowait((scope, bytes(message.payload)))

    async def run(self) -> None:
        reporter = asyncio.create_task(self._report_loop(), name="fleet report")
        try:
            if (marker := self._resumed) is not None:
                self._resumed = None
                log.info("fleet: %s v%d back on probation after the restart", marker["scope"], marker["version"])
                await self._probation(marker["scope"], int(marker["version"]), marker["reason"])
            while True:
                scope, payload = await self._queue.get()
                try:
                    await self._handle(scope, payload)
                except Exception:
                    log.exception("fleet: handling a desired config for %s failed", scope)
        finally:
            reporter.cancel()

    # --- receive -----------------------------------------------------------------

    async def _handle(self, scope: str, payload: bytes) -> None:
        try:
            envelope = decode(payload)
        except EnvelopeError as e:
            self._reject_unverified(scope, 0, str(e))
            return
        try:
            if envelope.scope != scope:
                raise EnvelopeError(f"scope = {envelope.scope!r}: this topic carries {scope!r}")
            if self.verifier is None:
                raise EnvelopeError(self._verifier_error)
            self.verifier.check(envelope)
        except EnvelopeError as e:
            self._reject_unverified(scope, envelope.version, str(e))
            return
        version = envelope.version
        seen = self.state.highest_seen(scope)
        if version <= seen:
            level = logging.DEBUG if version == seen else logging.WARNING
            log.log(level, "fleet: ignoring %s v%d: at or below v%d, already applied or rejected", scope, version, seen)
            return
        try:
            layer = layers.check_layer(envelope, self.fleet)
            candidate = {**self.state.applied, scope: layer}
            new_config = layers.effective(self.local, candidate)
        except (ConfigError, policy.PolicyError) as e:
            self.state.reject(scope, version)
            self._set_status("rejected", scope, version, str(e))
            self.store.save(self.state)
            log.error("fleet: rejected %s v%d: %s", scope, version, e)
            return
        await self._apply(scope, version, candidate, new_config)

    def _reject_unverified(self, scope: str, version: int, reason: str) -> None:
        """Reported, not remembered: an unverified version must not block later ones."""
        log.error("fleet: rejected a desired config on %s: %s", scope, reason)
        self._set_status("rejected", scope, version, reason)

    # --- apply, prove, roll back -------------------------------------------------

    async def _apply(self, scope: str, version: int, candidate: dict[str, Layer], new: Config) -> None:
        why = policy.connectivity_change(self.host.config, new)
        if not why and self.fleet.probation_always:
            why = "every apply ([fleet] probation_always)"
        self.state.applied = candidate
        if why:
            self.state.probation = {"scope": scope, "version": version, "reason": why, "started_at": time.time()}
        self._set_status("applying", scope, version, f"on probation: {why}" if why else "")
        self.store.save(self.state)  # the marker is durable before anything changes
        await self._send_report(timeout=5.0)
        log.info("fleet: applying %s v%d%s", scope, version, f" on probation ({why})" if why else "")
        try:
            await self.host.apply_config(new)
        except RestartRequired:
            return  # the agent stops and starts again with the candidate (`prepare_restart`)
        except Exception as e:
            await self._restore(scope, version, "failed", f"cannot apply: {e}")
            return
        if not why:
            await asyncio.sleep(SETTLE)  # "applied" only once the new components ran, not when they were started
            problem = self.host.health()
            if problem:
                await self._restore(scope, version, "failed", f"unhealthy after the apply: {problem}")
            else:
                self._commit(scope, version, self._doc("applied", scope, version, ""))
            return
        await self._probation(scope, version, why)

    async def _probation(self, scope: str, version: int, why: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.fleet.probation
        problem = "not connected to the broker"
        while (remaining := deadline - loop.time()) > 0:
            problem = await self._prove(scope, version, remaining)
            if not problem:
                return
            await asyncio.sleep(min(RETRY_INTERVAL, max(0.0, deadline - loop.time())))
        await self._restore(
            scope,
            version,
            "rolled_back",
            f"{why} changed and health was not proven within {self.fleet.probation:g}s ({problem}); "
            "restored the last good config",
        )

    async def _prove(self, scope: str, version: int, remaining: float) -> str:
        session = self._session
        if session is None or not await session.wait_connected(min(remaining, 5.0)):
            return "not connected to the broker"
        problem = self.host.health()
        if problem:
            return problem
        doc = self._doc("applied", scope, version, "")
        try:
            result = await asyncio.wait_for(
                session.publish(self.status_topic, report.encode(doc), qos=1, retain=True), remaining
            )
        except TimeoutError:
            return "status report not acknowledged (no PUBACK)"
        if not result.ok:
            return f"status report not acknowledged: {result.reason}"
        self._acknowledged = doc
        self._commit(scope, version, doc)
        return ""

    def _commit(self, scope: str, version: int, doc: dict[str, Any]) -> None:
        self.state.last_good = dict(self.state.applied)
        self.state.probation = None
        self.state.status = doc
        self.store.save(self.state)
        self._report_due.set()
        log.info("fleet: %s v%d applied", scope, version)

    async def _restore(self, scope: str, version: int, state: str, reason: str) -> None:
        log.error("fleet: %s v%d %s: %s", scope, version, state, reason)
        self.state.applied = dict(self.state.last_good)
        self.state.reject(scope, version)
        self.state.probation = None
        self._set_status(state, scope, version, reason)
        self.store.save(self.state)
        try:
            await self.host.apply_config(layers.effective(self.local, self.state.applied))
        except RestartRequired:
            return  # the agent starts again with the restored layers
        except Exception:
            log.exception("fleet: restoring the last good config failed; restoring the local config alone")
            await self.host.apply_config(self.local)

    # --- report ------------------------------------------------------------------

    def _doc(self, state: str, scope: str, version: int, reason: str) -> dict[str, Any]:
        applied = self.state.applied.get(scope)
        return report.document(
            state,
            version=version,
            scope=scope,
            applied_version=applied.version if applied else 0,
            config_hash=layers_hash(self.state.applied),
            layers={s: layer.version for s, layer in sorted(self.state.applied.items())},
            reason=self.redact(reason),
            boot_id=self.host.boot_id,
        )

    def _set_status(self, state: str, scope: str, version: int, reason: str) -> None:
        self.state.status = self._doc(state, scope, version, reason)
        self._report_due.set()

    async def _send_report(self, timeout: float) -> bool:
        doc, session = self.state.status, self._session
        if not doc or session is None or report.same_report(doc, self._acknowledged):
            return True
        try:
            if not await session.wait_connected(timeout):
                return False
            result = await asyncio.wait_for(
                session.publish(self.status_topic, report.encode(doc), qos=1, retain=True), timeout
            )
        except TimeoutError:
            return False
        if result.ok and doc is self.state.status:
            self._acknowledged = doc
        return bool(result.ok)

    async def _report_loop(self) -> None:
        """Sends the current report when it changed, until acknowledged."""
        while True:
            await self._report_due.wait()
            self._report_due.clear()
            while not await self._send_report(timeout=5.0):
                await asyncio.sleep(RETRY_INTERVAL)

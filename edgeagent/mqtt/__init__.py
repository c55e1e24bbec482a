"""The agent's MQTT session: one connection to the broker, shared by its clients.

- `client.py`: one paho client per connection (CONNECT with its limits, TLS,
  credentials, the will), the bound on what a broker may send, reason codes
  that ask for a longer wait.
- `session.py`: `MqttSession`: connect/reconnect, status topic, subscriptions,
  `publish()` resolving to the PUBACK's outcome, the watchdog.
- here: who needs a session (`session_needed`) and `SessionKeeper`, which keeps
  the session alive across config reloads that do not touch the connection.

Clients: the log uploader (`uploaders/mqtt.py`) and fleet config.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from edgeagent.config import Config
from edgeagent.mqtt.client import connection_key
from edgeagent.mqtt.session import IncomingMessage, MqttSession, PublishResult

__all__ = ["IncomingMessage", "MqttSession", "PublishResult", "SessionKeeper", "session_needed"]

log = logging.getLogger("edgeagent.mqtt")

_RESTART_MIN, _RESTART_MAX = 1.0, 60.0


def session_needed(config: Config) -> bool:
    """Whether `config` needs a session (decided by `Config.needs_mqtt_session`)."""
    return config.needs_mqtt_session


class SessionKeeper:
    """Owns the session's life in the agent: created when something needs it,
    kept (with the new config) across a reload whose `connection_key` is
    unchanged, closed (goodbye on the status topic, DISCONNECT) otherwise."""

    def __init__(self, backlog: Callable[[], dict[str, Any]] | None = None) -> None:
        self.session: MqttSession | None = None
        self._backlog = backlog
        self._key: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None

    def ensure(self, config: Config) -> MqttSession | None:
        """The session for `config` (the running one when the connection is unchanged)."""
        if not session_needed(config):
            return None
        key = connection_key(config)
        if self.session is not None and key == self._key:
            self.session.update(config)
            return self.session
        assert self.session is None, "retire_if_changed() first"
        self.session = MqttSession(config, self._backlog)
        self._key = key
        self._task = asyncio.create_task(self._run(self.session), name="mqtt session")
        return self.session

    async def retire_if_changed(self, config: Config) -> None:
        """Before a reload: close the session unless `config` keeps its connection."""
        if self.session is not None and (not session_needed(config) or connection_key(config) != self._key):
            log.info("mqtt: the connection settings changed; reconnecting with the new ones")
            await self.close()

    async def close(self, timeout: float = 1.0) -> None:
        session, task = self.session, self._task
        self.session, self._task, self._key = None, None, None
        if session is not None:
            try:
                await session.close(timeout)
            except Exception:
                log.exception("mqtt: closing the session failed")
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def wake(self) -> None:
        if self.session is not None:
            self.session.wake()

    @staticmethod
    async def _run(session: MqttSession) -> None:
        """`session.run()` handles what the network does; this restarts it after a bug."""
        delay = _RESTART_MIN
        while True:
            try:
                await session.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("mqtt session failed; restarting in %.0f s", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_MAX)

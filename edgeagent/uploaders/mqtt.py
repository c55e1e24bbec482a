"""The MQTT log uploader: drains the spool through the agent's MQTT session,
one QoS 1 PUBLISH per chunk.

Owns: the window of chunks published and not yet acknowledged (the broker's
Receive Maximum lowers it), the bandwidth cap, and what a PUBACK's reason code
means as a delivery outcome (`edgeagent.uploaders.outcome` settles it: delete
only on a success code, retry, split or dead letter). A chunk above the
broker's Maximum Packet Size is split before it is sent, and one in flight
alone when a connection ends on a refused packet is split after the fact. The
connection itself (TLS, reconnects, status topic, watchdog) belongs to
`edgeagent.mqtt.MqttSession`.

The spool is the only queue: a chunk goes to the session at most once per
connection, and one whose PUBACK did not come (connection lost) is published
again from the spool on the next connection, with the same chunk id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from paho.mqtt.properties import Properties

from edgeagent import codec
from edgeagent.config import Config
from edgeagent.mqtt import client as mqttc
from edgeagent.mqtt.session import MqttSession, PublishResult
from edgeagent.pipeline import UploaderContext
from edgeagent.spool import StoredChunk
from edgeagent.uploaders import Backoff
from edgeagent.uploaders.outcome import Delivered, Outcome, Rejected, Retry, Settled, Split, settle

log = logging.getLogger(__name__)

broker_url_for_display = mqttc.broker_url_for_display  # kept importable from here

# Reason codes (MQTT 5.0, 3.4.2.1 and 3.14.2.1) that need more than "retry later".
RC_MALFORMED_PACKET = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_NOT_AUTHORIZED = 0x87
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_TOO_LARGE = 0x95
RC_PAYLOAD_FORMAT_INVALID = 0x99
# The broker refuses these for good: retrying the same message cannot succeed. 0x87 (not
# authorized) is not one of them: it means "fix the ACL or the credentials", the data is fine.
PERMANENT_FAILURES = {
    RC_TOPIC_NAME_INVALID: "topic name invalid",
    RC_PAYLOAD_FORMAT_INVALID: "payload format invalid",
}

# A connection ended with one of these while chunks were in flight: a packet we sent may be
# what the broker (or paho reading the broker's answer) could not take. mosquitto answers an
# oversized PUBLISH with PUBACK 0x95, which MQTT 5 does not allow in a PUBACK, so paho drops
# the connection as a protocol error instead of reporting the reason code.
REFUSED_PACKET_CODES = {RC_MALFORMED_PACKET, RC_PROTOCOL_ERROR, RC_PACKET_TOO_LARGE}

CONTENT_TYPE = codec.CONTENT_TYPE


@dataclass(slots=True)
class _InFlight:
    """A chunk handed to the session, with the payload as sent (after any time correction)."""

    chunk: StoredChunk
    size: int
    result: asyncio.Future[PublishResult]


@dataclass(slots=True)
class _Counters:
    """What `status()` counts for the uploader."""

    sent: int = 0
    acked: int = 0
    acked_records: int = 0
    failed: int = 0
    dead_letters: int = 0
    splits: int = 0


class MqttUploader:
    """`pipeline.Uploader` for `[upload] to = "mqtt"`. See the module docstring.
    The agent sets `session` before `run()`."""

    def __init__(self, config: Config, session: MqttSession | None = None) -> None:
        self.config = config
        self.upload = config.upload
        self.session = session
        self.topic = config.mqtt.topic.replace("{device_id}", config.device_id)
        self.v5 = config.mqtt.protocol == "5"
        self.backoff = Backoff(self.upload.retry_initial, self.upload.retry_max)  # refusals
        self._ctx: UploaderContext | None = None
        self._inflight: list[_InFlight] = []  # publish order
        self._cursor = 0  # highest spool id handed to the session on this connection
        self._window = self.upload.window  # lowered to the broker's Receive Maximum; 1 while probing
        self._probing = False  # one chunk at a time, to find the one the broker cannot take
        self._paused_until = 0.0  # monotonic; a refusal asked for a pause
        self._draining = False
        self._tokens = float(self.upload.max_rate)
        self._tokens_at = time.monotonic()
        self._status_backlog = 0  # backlog chunks in the last retained status published
        self.last_error = ""
        self.last_error_at = 0.0
        self.counters = _Counters()

    # --- the uploader protocol ----------------------------------------------------

    async def run(self, ctx: UploaderContext) -> None:
        session = self.session
        assert session is not None, "the agent attaches the MQTT session before run()"
        self._ctx = ctx
        session.on_connected(self._on_connected)
        try:
            if session.connected:
                self._on_connected()
            while True:
                if not self._draining:
                    self._step()
                await ctx.wait_for_work(None if self._draining else self._wait_timeout())
        finally:
            session.remove_on_connected(self._on_connected)

    async def drain(self, timeout: float) -> None:
        """Publish nothing new and wait up to `timeout` for outstanding PUBACKs.
        What is still unacknowledged stays in the spool and is sent again next
        time. (The session says goodbye when the agent closes it.)"""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self._inflight and (remaining := deadline - time.monotonic()) > 0:
            await asyncio.wait({e.result for e in self._inflight}, timeout=remaining)
            self._settle()
        self._settle()
        if self._inflight:
            log.warning(
                "mqtt: stopping with %d chunks unacknowledged; they stay in the spool and are sent again",
                len(self._inflight),
            )

    def status(self) -> dict[str, Any]:
        c = self.counters
        s = self.session.status() if self.session is not None else {}
        last_error, last_error_at = self.last_error, self.last_error_at
        if (s.get("last_error_at") or 0) > last_error_at:
            last_error, last_error_at = s["last_error"], s["last_error_at"]
        failures = self.session.backoff.failures if self.session is not None else 0
        return {
            "protocol": "mqtt",
            "broker": mqttc.broker_url_for_display(self.config.mqtt.url),
            "topic": self.topic,
            "connected": bool(s.get("connected")),
            "since": s.get("since"),
            "last_error": last_error or None,
            "last_error_at": last_error_at or None,
            **(self._ctx.credentials_status() if self._ctx is not None else {}),
            "sent": c.sent,
            "acked": c.acked,
            "acked_records": c.acked_records,
            "failed": c.failed,
            "dead_letters": c.dead_letters,
            "splits": c.splits,
            "connections": s.get("connections", 0),
            "in_flight": len(self._inflight),
            "retry_failures": max(failures, self.backoff.failures),
            "max_packet_size": s.get("max_packet_size"),
        }

    # --- one turn -------------------------------------------------------------------

    def _on_connected(self) -> None:
        """A new connection: everything not acknowledged on the last one is sent again."""
        assert self.session is not None and self._ctx is not None
        self._settle()
        self._cursor = 0
        receive_maximum = self.session.receive_maximum or 65535
        self._window = 1 if self._probing else max(1, min(self.upload.window, receive_maximum))
        self._status_backlog = self._ctx.spool.chunk_count  # what the session's online status just showed
        self._ctx.wake("connected")

    def _step(self) -> None:
        """Settle PUBACKs, fill the window, refresh the status once the backlog drained."""
        assert self.session is not None and self._ctx is not None
        self._settle()
        if not self.session.connected:
            return
        self._fill_window()
        if not self._inflight and self._status_backlog and not self._ctx.spool.chunk_count:
            self._status_backlog = 0
            self.session.refresh_status()

    def _fill_window(self) -> None:
        assert self._ctx is not None
        if time.monotonic() < self._paused_until:
            return
        while len(self._inflight) < self._window:
            chunks = self._ctx.spool.oldest(self._window - len(self._inflight), after_id=self._cursor)
            if not chunks:
                return
            sent_ids = {entry.chunk.id for entry in self._inflight}
            for chunk in chunks:
                if chunk.id in sent_ids:
                    self._cursor = max(self._cursor, chunk.id)
                    continue
                if not self._take_tokens(len(chunk.payload)):
                    return
                self._cursor = max(self._cursor, chunk.id)
                if not self._publish_chunk(chunk):
                    return

    def _publish_chunk(self, chunk: StoredChunk) -> bool:
        """Hand one chunk to the session; False when nothing more should be published now."""
        assert self._ctx is not None and self.session is not None
        try:
            # Corrected times and the offset they match: a split below inherits both (never shifted twice).
            chunk = self._ctx.corrected(chunk)
        except codec.CorruptChunk as e:
            self._apply([chunk], Rejected(f"chunk payload is corrupt and cannot be sent: {e}"))
            return True
        payload = chunk.payload
        properties = self._properties(chunk) if self.v5 else None
        limit = self.session.max_packet_size
        if limit:
            size = mqttc.publish_size(self.topic, payload, properties)
            if size > limit:
                self._apply([chunk], Split(f"{size} bytes exceed the broker's maximum packet size {limit}"))
                return True
        result = self.session.publish_nowait(self.topic, payload, qos=1, properties=properties)
        if result.done() and not result.result().ok and not result.result().reason_code:
            # Not connected (any more), the client's queue is full, or paho refused the message.
            self._cursor = min(self._cursor, chunk.id - 1)
            if self.session.connected:
                self._set_error(result.result().reason)
            return False
        ctx = self._ctx
        result.add_done_callback(lambda _: ctx.wake("progress"))
        self._inflight.append(_InFlight(chunk, len(payload), result))
        self.counters.sent += 1
        return True

    def _properties(self, chunk: StoredChunk) -> Properties:
        return mqttc.packed_publish_properties(
            CONTENT_TYPE, [("content-encoding", codec.PAYLOAD_ENCODING), ("chunk-id", chunk.chunk_id)]
        )

    def _settle(self) -> None:
        """Act on the PUBACKs (and lost connections) the session reported."""
        done = [entry for entry in self._inflight if entry.result.done()]
        if not done or self._ctx is None or self.session is None:
            return
        self._inflight = [entry for entry in self._inflight if not entry.result.done()]
        acked: list[StoredChunk] = []
        lost: list[_InFlight] = []
        for entry in done:
            result = entry.result.result()
            if result.ok:
                acked.append(entry.chunk)
            elif result.connection_lost:
                lost.append(entry)
            else:
                self.counters.failed += 1
                self._refused(entry.chunk, self._outcome(entry.chunk, result))
        if lost:
            self._lost(lost, lost[0].result.result().reason_code or 0)
        if acked:
            self._apply(acked, Delivered())
            if self._probing:
                self._probing = False
                self._window = max(1, min(self.upload.window, self.session.receive_maximum or 65535))

    def _outcome(self, chunk: StoredChunk, result: PublishResult) -> Outcome:
        """What a PUBACK with a failure reason code means for `chunk`."""
        code = result.reason_code or 0
        what = f"broker answered {result.reason} for chunk {chunk.chunk_id}"
        if code in PERMANENT_FAILURES:
            return Rejected(f"{what} on topic {self.topic!r}")
        if code == RC_PACKET_TOO_LARGE:
            return Split(what)
        if code == RC_NOT_AUTHORIZED:  # the ACL or credentials need fixing, the data is fine
            problem = f"broker answered {result.reason} on topic {self.topic!r}: fix its ACL or the credentials"
            return Retry(problem, credentials=True)
        return Retry(what)  # quota exceeded and anything else: retry later

    def _lost(self, lost: list[_InFlight], code: int) -> None:
        """The connection ended before these were acknowledged: they are sent again
        from the spool. If it ended on a packet the broker could not take, find it:
        with one chunk in flight that chunk is split; with more, the next connection
        sends one at a time until the culprit shows."""
        self._cursor = min(self._cursor, min(entry.chunk.id for entry in lost) - 1)
        if code not in REFUSED_PACKET_CODES:
            return
        if len(lost) == 1 and lost[0].chunk.records > 1:
            # Only a guess (a broken or hostile broker ends connections this way too), so a
            # chunk of one record is kept and retried, never dead-lettered.
            self._apply([lost[0].chunk], Split(f"the connection ended (0x{code:02x}) with only this chunk in flight"))
        self._probing = True
        self._window = 1

    def _refused(self, chunk: StoredChunk, outcome: Outcome) -> None:
        settled = self._apply([chunk], outcome)
        if not isinstance(outcome, Retry):
            return
        delay = settled.retry_in or 0.0
        self._paused_until = time.monotonic() + delay
        self._cursor = min(self._cursor, chunk.id - 1)
        if outcome.credentials:
            self.last_error, self.last_error_at = outcome.reason, time.time()  # logged once by credentials_refused
        else:
            self._set_error(f"{outcome.reason}; retrying in {delay:.1f}s")

    def _apply(self, chunks: list[StoredChunk], outcome: Outcome) -> Settled:
        """`outcome.settle`, and what it did in the counters and status."""
        assert self._ctx is not None
        settled = settle(self._ctx, chunks, outcome, self.backoff)
        self.counters.acked += settled.acked
        self.counters.acked_records += settled.acked_records
        self.counters.dead_letters += settled.dead_lettered
        self.counters.splits += settled.split
        if settled.dead_letter_reason:
            self._set_error(f"dead letter: {settled.dead_letter_reason}")
        return settled

    # --- timing ---------------------------------------------------------------------

    def _wait_timeout(self) -> float | None:
        now = time.monotonic()
        wake_at: list[float] = []
        if self._paused_until > now:
            wake_at.append(self._paused_until)
        if self.upload.max_rate and self._tokens < 0:
            wake_at.append(now + -self._tokens / self.upload.max_rate)
        return max(0.0, min(wake_at) - now) if wake_at else None

    def _take_tokens(self, size: int) -> bool:
        """Token bucket for `[upload].max_rate`: a chunk may go when the bucket is
        not in debt; its size is then charged, so the average stays under the cap."""
        rate = self.upload.max_rate
        if not rate:
            return True
        now = time.monotonic()
        self._tokens = min(float(rate), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 0:
            return False
        self._tokens -= size
        return True

    def _set_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("mqtt: %s", message)
        self.last_error = message
        self.last_error_at = time.time()

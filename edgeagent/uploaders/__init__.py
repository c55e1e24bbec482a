"""Uploaders: one module per protocol, each a `pipeline.Uploader`.

The shared retry policy lives here: jittered exponential backoff ("full
jitter": uniform between 0 and the capped exponential), driven one attempt at a
time by the uploader's own loop, so shutdown can interrupt any wait. It is
tenacity's `wait_random_exponential` in five lines, which saves importing
tenacity (0.5 MiB of RSS) into the agent.
"""

from __future__ import annotations

import random

from edgeagent.config import Config
from edgeagent.pipeline import Uploader


def build_uploader(config: Config) -> Uploader | None:
    if config.upload.to == "mqtt":
        from edgeagent.uploaders.mqtt import MqttUploader

        return MqttUploader(config)
    if config.upload.to == "otlp_http":
        from edgeagent.uploaders.otlp_http import OtlpHttpUploader

        return OtlpHttpUploader(config)
    return None


class Backoff:
    """Delays between failed attempts: jittered, exponential, capped.

    `failed()` returns how long to wait before the next attempt; `succeeded()`
    resets. A receiver's own `retry_after` (HTTP Retry-After, MQTT quota
    exceeded) is honoured when it asks for longer than the backoff would.
    """

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    @property
    def failures(self) -> int:
        return self._attempt

    def failed(self, retry_after: float | None = None) -> float:
        self._attempt += 1
        delay = random.uniform(0, min(self._maximum, self._initial * 2.0 ** min(self._attempt - 1, 64)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._maximum))
        return delay

    def succeeded(self) -> None:
        self._attempt = 0

"""Keeps secrets out of everything the agent writes for people to read.

The config knows which of its keys are secret (`config.SECRET` metadata:
`mqtt.password`, the content of `mqtt.password_file`, `otlp_http.headers`
values); `config.secret_values()` collects their values. A `Redactor` replaces
those values wherever they appear: in log records (a filter on the root
logger's handlers, so every module's logging is covered, tracebacks included)
and in the status the agent stores for `edgeagent status`. Knowing the
secrets beats guessing from key names: a token echoed back inside a
collector's error message is caught too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from edgeagent.config import REDACTED, Config, secret_values


class Redactor(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted(set(secrets), key=len, reverse=True)

    def text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def data(self, obj: Any) -> Any:
        """A copy of JSON-like `obj` with secrets replaced in every string."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {self.text(str(k)): self.data(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.data(v) for v in obj]
        return obj

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        redacted = self.text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set: the traceback is redacted once, here.
            record.exc_text = self.text(logging.Formatter().formatException(record.exc_info))
        return True


def install(config: Config, redactor: Redactor | None = None) -> Redactor:
    """Redact `config`'s secrets from every handler of the root logger (a
    reload passes the redactor it got back, to update the secrets)."""
    if redactor is None:
        redactor = Redactor()
    redactor.update(secret_values(config))
    for handler in logging.getLogger().handlers:
        if redactor not in handler.filters:
            handler.addFilter(redactor)
    return redactor

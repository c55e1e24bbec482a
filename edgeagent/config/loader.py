"""The loader: TOML tables into frozen section dataclasses, value by value.

A field's `metadata["kind"]` (see `values`) or its type says how the TOML value
is checked and converted. Unknown keys are errors with a did-you-mean; every
error names the file, the line where the key can be found, the dotted key,
the value (secrets redacted) and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.config.values import REDACTED, parse_duration, parse_priority, parse_size
from edgeagent.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from edgeagent.config import Config


class _Loader:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = text.splitlines()
        self._secret_keys: set[str] = set()

    def fail(self, key: str, value: Any, expected: str) -> typing.NoReturn:
        where = self._line_of(key)
        at = f":{where}" if where else ""
        secret = any(key == k or key.startswith(k + ".") for k in self._secret_keys)
        shown = REDACTED if secret else repr(value)
        raise ConfigError(f"{self.source}{at}: {key} = {shown}: expected {expected}")

    def _line_of(self, dotted: str) -> int | None:
        """Best-effort line number of a key: the first `name =` after its table header."""
        name = re.sub(r"\[\d+\]", "", dotted).split(".")
        leaf = name[-1]
        tables = ".".join(name[:-1])
        in_table = not tables
        for number, line in enumerate(self.lines, 1):
            stripped = line.strip()
            header = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", stripped)
            if header:
                in_table = header.group(1) == tables
                continue
            if in_table and re.match(rf'^"?{re.escape(leaf)}"?\s*=', stripped):
                return number
        if "." in dotted:  # a key inside an inline table: the line of the table's key
            return self._line_of(dotted.rsplit(".", 1)[0])
        return None

    def section(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, dict):
            self.fail(prefix.rstrip("."), data, "a table")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for key in data:
            if key not in fields:
                close = closest(key, fields)
                hint = f" (did you mean {close!r}?)" if close else ""
                known = ", ".join(fields)
                where = self._line_of(prefix + key)
                at = f":{where}" if where else ""
                raise ConfigError(f"{self.source}{at}: unknown key {prefix + key!r}{hint}; known keys here: {known}")
        values = {}
        for name, f in fields.items():
            if name in data:
                values[name] = self.value(hints[name], f.metadata, data[name], prefix + name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(prefix + name, None, "this required key to be set")
        return cls(**values)

    def value(self, hint: Any, meta: Any, raw: Any, key: str) -> Any:
        kind = meta.get("kind")
        if meta.get("secret"):
            self._secret_keys.add(key)
        if kind is not None:
            try:
                return _of_kind(kind, meta, raw)
            except ValueError as e:
                self.fail(key, raw, str(e))
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.section(hint, raw, key + ".")
        origin = typing.get_origin(hint)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            if isinstance(raw, str) and item is str:
                raw = [raw]
            if not isinstance(raw, list):
                self.fail(key, raw, "a list")
            return tuple(self.value(item, {}, x, f"{key}[{i}]") for i, x in enumerate(raw))
        if origin is dict:
            if not isinstance(raw, dict):
                self.fail(key, raw, "a table of strings")
            return {str(k): self.value(str, {}, v, f"{key}.{k}") for k, v in raw.items()}
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                self.fail(key, raw, "a path")
            return Path(raw)
        if hint is bool:
            if not isinstance(raw, bool):
                self.fail(key, raw, "true or false")
            return raw
        if hint is int:
            if not isinstance(raw, int) or isinstance(raw, bool):
                self.fail(key, raw, "a whole number")
            return raw
        if hint is float:
            if not isinstance(raw, (int, float)) or isinstance(raw, bool):
                self.fail(key, raw, "a number")
            return float(raw)
        if hint is str:
            if isinstance(raw, (int, float)) and not isinstance(raw, bool) and key.endswith("protocol"):
                raw = str(raw)
            if not isinstance(raw, str):
                self.fail(key, raw, "a string")
            return raw
        if isinstance(hint, types.UnionType):  # pragma: no cover - no unions in sections yet
            return raw
        raise ConfigError(f"{self.source}: internal: no converter for {key} ({hint})")


def _of_kind(kind: str, meta: Any, raw: Any) -> Any:
    """Check and convert `raw` by its field's kind; ValueError says what was expected."""
    if kind == "duration":
        return parse_duration(raw)
    if kind == "size":
        return parse_size(raw)
    if kind == "priority":
        return parse_priority(raw)
    if kind == "choice":
        if raw not in meta["choices"]:
            close = closest(str(raw), meta["choices"])
            hint_text = f" (did you mean {close!r}?)" if close else ""
            raise ValueError(" or ".join(repr(c) for c in meta["choices"]) + hint_text)
        return raw
    if kind == "regex":
        if not isinstance(raw, str):
            raise ValueError("a regular expression string")
        if raw and raw != "kubernetes":
            try:
                re.compile(raw)
            except re.error as e:
                raise ValueError(f"a valid regular expression ({e})") from None
        return raw
    raise ValueError(f"internal: no value kind {kind!r}")


def error_at(config: Config, key: str, value: Any, expected: str) -> ConfigError:
    """A ConfigError naming `key` at its line in the config file, like parse errors do."""
    try:
        _Loader(config.source_path, _text_of(config.source_path)).fail(key, value, expected)
    except ConfigError as e:
        return e


def line_of(source_path: str, key: str) -> int | None:
    """The line of the config file where `key` (dotted, as in error messages) is set, best effort."""
    return _Loader(source_path, _text_of(source_path))._line_of(key)


def _text_of(source_path: str) -> str:
    try:
        return Path(source_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice `word` was most likely meant to be, for a did-you-mean in an error."""
    import difflib  # only when a config is wrong: not at every start

    close = difflib.get_close_matches(word, list(choices), n=1)
    return close[0] if close else None

"""The exception tree in edgeagent/errors.py: the drawing in its docstring is
the real hierarchy, and every error is still importable where it is raised."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from edgeagent import errors

RAISED_IN = {
    "edgeagent.config": ["ConfigError"],
    "edgeagent.statedir": ["StateDirError", "AlreadyRunning"],
    "edgeagent.tls": ["TlsFileError"],
    "edgeagent.spool": ["SpoolError", "SpoolUnavailable"],
    "edgeagent.mqtt.link": ["ConnectFailed"],
    "edgeagent.mqtt.client": ["PacketTooLarge"],
    "edgeagent.uploaders.http11": ["ProtocolError"],
    "edgeagent.fleet.envelope": ["EnvelopeError"],
    "edgeagent.fleet.policy": ["PolicyError"],
    "edgeagent.fleet.operator": ["OperatorError"],
    "edgeagent.otlp": ["DecodeError"],
    "edgeagent.codec": ["CorruptChunk", "CannotSplit"],
    "edgeagent.sources.kmsg": ["MalformedRecord"],
    "edgeagent.cli": ["CliError"],
}


def _drawn_parents() -> dict[str, str | None]:
    """name -> parent name, read from the tree drawn in the module docstring."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^ {4}((?:[│ ] {3})*)(?:[├└]── )?([A-Z]\w+)\b", line)
        if m is None:
            continue
        depth = len(m.group(1)) // 4 + (1 if "──" in line else 0)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[m.group(2)] = stack[-1][1] if stack else None
        stack.append((depth, m.group(2)))
    return parents


def _classes() -> dict[str, type[BaseException]]:
    return {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    }


def test_the_docstring_draws_every_error_under_its_real_parent() -> None:
    drawn = _drawn_parents()
    classes = _classes()
    assert set(drawn) == set(classes)
    for name, cls in classes.items():
        ours = [base.__name__ for base in cls.__bases__ if base.__module__ == errors.__name__]
        assert drawn[name] == (ours[0] if ours else None), name


def test_every_error_derives_from_the_root() -> None:
    for cls in _classes().values():
        assert issubclass(cls, errors.EdgeagentError)


@pytest.mark.parametrize("module", sorted(RAISED_IN))
def test_every_error_is_importable_where_it_is_raised(module: str) -> None:
    mod = importlib.import_module(module)
    for name in RAISED_IN[module]:
        assert getattr(mod, name) is getattr(errors, name)


def test_errors_keep_the_standard_bases_callers_catch() -> None:
    # paho treats an OSError from a read as a lost connection; parsers' callers catch ValueError.
    assert issubclass(errors.PacketTooLarge, ConnectionAbortedError)
    assert issubclass(errors.DecodeError, ValueError)
    assert issubclass(errors.CorruptChunk, ValueError) and issubclass(errors.CannotSplit, ValueError)
    assert errors.CorruptChunk("bad", 2).index == 2
    assert issubclass(errors.MalformedRecord, ValueError)
    # The MQTT session's connection attempt catches ValueError (a credential or TLS file it cannot use).
    assert issubclass(errors.TlsFileError, ValueError)
    assert errors.TlsFileError("mqtt.ca_file", "/x", "a PEM file").key == "mqtt.ca_file"
    assert issubclass(errors.StateDirError, errors.ConfigError)
    assert errors.PolicyError("spool.max_size", "1GiB", "not allowed").key == "spool.max_size"
    assert errors.CliError("x").code == 1

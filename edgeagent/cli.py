"""The `edgeagent` command line.

Errors print as one line (`edgeagent: error: ...`) with a hint where one helps,
never a traceback (set EDGEAGENT_DEBUG=1 to see one). Heavy modules are
imported inside the commands that need them so `--version` and `status` start
fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent import __version__
from edgeagent.errors import CliError

if TYPE_CHECKING:
    from edgeagent.spool import Spool

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default: $EDGEAGENT_CONFIG or /etc/edgeagent/edgeagent.toml)",
    )


def _status_arguments(p: argparse.ArgumentParser) -> None:
    _with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _spool_arguments(p: argparse.ArgumentParser) -> None:
    spool_commands = p.add_subparsers(dest="spool_command", metavar="SPOOL_COMMAND")
    dump = spool_commands.add_parser("dump", help="decode spooled chunks to JSON lines")
    _with_config(dump)
    dump.add_argument("--dead-letters", action="store_true", help="dump the dead letters instead")
    dump.add_argument("--limit", type=int, default=0, help="at most this many chunks")


def _fleet_arguments(p: argparse.ArgumentParser) -> None:
    from edgeagent.fleet.arguments import add_fleet_arguments

    add_fleet_arguments(p)


# Each command's help and what adds its arguments.
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "run": ("run the agent in the foreground", _with_config),
    "status": ("backlog, sources, uploader and connectivity", _status_arguments),
    "check-config": ("validate and print the effective config", _with_config),
    "wake": ("make a running agent try to upload now (SIGUSR1)", _with_config),
    "spool": ("inspect the spool", _spool_arguments),
    "fleet": ("operator tools: keys, pushing config, fleet status", _fleet_arguments),
}


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: every command is listed (`--help`, a misspelt command), but only the one `argv`
    names gets its arguments. Each argparse argument costs CPU at every start (argparse formats it to check it),
    and the fleet commands alone have about 30: building them all for `run` was about 2.5 ms of its start-up."""
    parser = argparse.ArgumentParser(prog="edgeagent", description="A log agent that does not lose a line.")
    parser.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # The top-level options take no value, so the first word that is not an option is the command.
    named = next((a for a in argv if not a.startswith("-")), None)
    for name, (help_text, add_arguments) in _COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        if name == named:
            add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "wake":
            return cmd_wake(args)
        if args.command == "spool" and args.spool_command == "dump":
            return cmd_spool_dump(args)
        if args.command == "fleet":
            from edgeagent.fleet import operator

            return operator.main(args)
        parser.print_help()
        return EXIT_CONFIG
    except CliError as e:
        print(f"edgeagent: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if os.environ.get("EDGEAGENT_DEBUG"):
            raise
        print(f"edgeagent: error: {type(e).__name__}: {e} (EDGEAGENT_DEBUG=1 shows a traceback)", file=sys.stderr)
        return EXIT_RUNTIME


def _load_config(args: argparse.Namespace) -> Any:
    from edgeagent import config

    path = args.config or config.default_config_path()
    try:
        return config.load(path)
    except config.ConfigError as e:
        raise CliError(str(e), EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if not cfg.uses_tls:
        from edgeagent import tls

        tls.keep_out()  # before asyncio and paho import ssl: 4.5 MiB of RSS
    from edgeagent import agent
    from edgeagent.config import ConfigError
    from edgeagent.errors import AlreadyRunning, SpoolError

    try:
        return agent.run(cfg)
    except (SpoolError, AlreadyRunning) as e:
        raise CliError(str(e)) from None
    except ConfigError as e:
        raise CliError(str(e), EXIT_CONFIG) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    import tomli_w

    cfg = _load_config(args)
    from edgeagent.agent import build_components
    from edgeagent.config import ConfigError

    try:
        build_components(cfg)  # what TOML cannot check: TLS files, header values, path patterns
    except ConfigError as e:
        raise CliError(str(e), EXIT_CONFIG) from None
    print(f"# {cfg.source_path}: valid", file=sys.stderr)
    sys.stdout.write(tomli_w.dumps(cfg.to_dict()))
    return 0


def _read_status(cfg: Any) -> dict[str, Any]:
    import sqlite3

    from edgeagent.spool import Spool

    try:
        out = Spool.read_readonly(cfg.spool_path, lambda spool: _spool_status(cfg, spool))
    except (sqlite3.Error, OSError) as e:  # a full or failing disk can make even opening fail: the run lock tells
        out = _spool_status(cfg, None)
        out["backlog"], out["dead_letters"] = {}, None
        _cannot_read(out, e)
    agent = out["agent"]
    if agent.get("state") == "running" and not _alive(agent.get("pid")):
        agent["state"] = "not running (last seen running; killed or crashed)"
    _overlay_run_lock(cfg, out)
    return out


def _spool_status(cfg: Any, spool: Spool | None) -> dict[str, Any]:
    """What the spool says for `status` (`spool` None: there is none yet). What cannot be read is unknown, not
    zeros: `status` still shows the rest, and what the run lock says."""
    import sqlite3

    out: dict[str, Any] = {
        "state_dir": str(cfg.state_dir),
        "spool": str(cfg.spool_path),
        "agent": {"state": "not started"},
        "sources": {},
        "uploader": {},
        "backlog": {"chunks": 0, "records": 0, "bytes": 0, "raw_bytes": 0, "oldest_ns": 0, "oldest_age_s": None},
        "counters": {},
        "dead_letters": 0,
        "files": {},
    }
    if spool is None:
        return out
    out["backlog"], out["dead_letters"] = {}, None  # unknown until read: never shown as zeros
    if spool.read_as_is:
        out["spool_note"] = f"read as it is on disk, without its -shm file ({spool.read_as_is})"
    try:
        out.update(spool.status())
        backlog: dict[str, Any] = spool.backlog()
        backlog["oldest_age_s"] = round(time.time() - backlog["oldest_ns"] / 1e9, 3) if backlog["oldest_ns"] else None
        out["backlog"] = backlog
        out["counters"] = spool.counters()
        out["dead_letters"] = spool.dead_letter_count()
        out["files"] = spool.file_sizes()
    except (sqlite3.Error, OSError, ValueError) as e:  # ValueError: a status value that is not JSON
        _cannot_read(out, e)
    return out


def _cannot_read(out: dict[str, Any], error: Exception) -> None:
    """A spool that exists but cannot be read, or not all of it: what it holds is unknown, not zeros."""
    out["spool_error"] = f"cannot read the spool: {error}"
    if out["agent"] == {"state": "not started"}:
        out["agent"] = {"state": "unknown"}


def _overlay_run_lock(cfg: Any, out: dict[str, Any]) -> None:
    """What the running agent says in its run lock: its pid even before it
    could open the spool, and why the spool is unavailable, if it is."""
    from edgeagent.statedir import holder

    pid, note = holder(cfg.state_dir)
    if pid is None:
        return
    agent = out.setdefault("agent", {})
    if agent.get("pid") != pid:
        from edgeagent import __version__

        out["agent"] = agent = {"state": "starting", "pid": pid, "version": __version__}
        if not note and _disk_full(cfg.state_dir):  # so full that not even the note could be written
            note = f"spool unavailable: no space left on the file system of {cfg.state_dir}"
    if note:
        agent["state"] = note


def _disk_full(path: Any) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fresh_status(cfg: Any) -> dict[str, Any]:
    """The status, asking a running agent to store a fresh one first (SIGUSR2,
    only to agents that announce it: an older agent would die of it); waits at
    most a second, then shows what is stored, with its age."""
    status = _read_status(cfg)
    agent = status.get("agent", {})
    if agent.get("refresh_signal") != "SIGUSR2" or agent.get("state") != "running" or not _alive(agent.get("pid")):
        return status
    before = agent.get("updated")
    try:
        os.kill(agent["pid"], signal.SIGUSR2)
    except OSError:
        return status
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        time.sleep(0.05)
        fresh = _read_status(cfg)
        if fresh.get("agent", {}).get("updated") != before:
            return fresh
    return status


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    status = _fresh_status(cfg)
    agent = status["agent"]
    if "spool_error" in status and "pid" not in agent:  # neither the spool nor a running agent tells anything
        full = f" (no space left on the file system of {cfg.state_dir})" if _disk_full(cfg.state_dir) else ""
        raise CliError(
            f"{cfg.spool_path}: {status['spool_error']}{full}; no agent holds the run lock of {cfg.state_dir}"
        )
    if isinstance(agent.get("updated"), (int, float)):
        agent["age_s"] = round(max(time.time() - agent["updated"], 0.0), 3)
    if args.json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    print("\n".join(_status_lines(status)))
    return 0


def _status_lines(status: dict[str, Any]) -> list[str]:
    agent = status["agent"]
    state = str(agent.get("state"))
    if "pid" in agent:
        state += f" (pid {agent['pid']}, version {agent.get('version')}"
        state += f", started {_when(agent['started'])})" if "started" in agent else ")"
    if "updated" in agent:
        state += f"; as of {_when(agent['updated'])}"
    problem = status.get("spool_error") or status.get("spool_note")
    lines = [f"agent:     {state}", f"spool:     {status['spool']}" + (f" ({problem})" if problem else "")]
    backlog = status["backlog"]
    if backlog:
        lines.append(
            f"backlog:   {backlog['chunks']} chunks, {backlog['records']} records, {backlog['bytes']} bytes"
            + (f", oldest {_age(backlog['oldest_age_s'])} old" if backlog.get("oldest_age_s") is not None else "")
        )
    else:
        lines.append("backlog:   unknown (the spool could not be read)")
    uploader = status.get("uploader") or {}
    if uploader:
        lines.append("uploader:  " + _fields(uploader))
    mqtt = status.get("mqtt") or {}
    if mqtt:
        lines.append("mqtt:      " + _fields(mqtt))
    for name, src in sorted((status.get("sources") or {}).items()):
        lines.append(f"source {name}: " + _fields(src))
    counters = status.get("counters") or {}
    if counters:
        lines.append("counters:  " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    lines.append(f"dead letters: {'unknown' if status['dead_letters'] is None else status['dead_letters']}")
    for name, error in sorted((agent.get("errors") or {}).items()):
        lines.append(f"error in {name}: {error}")
    fleet = status.get("fleet") or {}
    if fleet:
        keys = ("state", "scope", "version", "applied_version", "reason", "at")
        lines.append("fleet:     " + ", ".join(f"{k}={fleet.get(k)}" for k in keys if fleet.get(k) not in ("", None)))
    return lines


# Status fields holding a Unix time (seconds), shown as a date and an age.
_TIME_KEYS = ("since", "started", "updated")


def _fields(values: dict[str, Any]) -> str:
    shown = []
    for key, value in sorted(values.items()):
        if isinstance(value, (dict, list)):
            continue  # details are in --json
        if value is None:
            text = "-"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, (int, float)) and (key in _TIME_KEYS or key.endswith("_at")) and value > 1e8:
            text = _when(value)
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value)
        shown.append(f"{key}={text}")
    return ", ".join(shown)


def _when(unix: float) -> str:
    """'2026-11-30 01:02:03 UTC (5m ago)' or '(in 30s)' for times ahead."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
    delta = time.time() - unix
    return f"{stamp} ({_age(delta)} ago)" if delta >= 0 else f"{stamp} (in {_age(-delta)})"


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cmd_wake(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from edgeagent.statedir import holder

    pid = holder(cfg.state_dir)[0]  # the run lock's holder: right even while its spool is unavailable
    if pid is None or not _alive(pid):
        raise CliError(f"no running agent found for {cfg.spool_path} (is `edgeagent run` running with this config?)")
    os.kill(pid, signal.SIGUSR1)
    return 0


def cmd_spool_dump(args: argparse.Namespace) -> int:
    from edgeagent.codec import ChunkCodec, CorruptChunk
    from edgeagent.spool import Spool

    cfg = _load_config(args)
    items, extra = Spool.read_readonly(cfg.spool_path, lambda spool: _dump_items(spool, args.dead_letters, args.limit))
    codec = ChunkCodec()  # decoded and written once read: a second read (see `read_readonly`) repeats no line
    out = sys.stdout
    for chunk_id, payload in items:
        try:
            records = codec.records(payload)
        except CorruptChunk as e:
            detail = "".join(f"; {k} {v}" for k, v in extra.get(chunk_id, {}).items())
            print(f"edgeagent: chunk {chunk_id} cannot be decoded: {e}{detail}", file=sys.stderr)
            continue
        for record in records:
            record["chunk_id"] = chunk_id
            record.update(extra.get(chunk_id, {}))
            out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return 0


def _dump_items(
    spool: Spool | None, dead_letters: bool, limit: int
) -> tuple[list[tuple[str, bytes]], dict[str, dict[str, str]]]:
    """What `spool dump` shows, read from `spool` (None: none yet): (chunk id, payload) oldest first, and per
    chunk id the fields added to each of its records (a dead letter's reason and time)."""
    import datetime

    if spool is None:
        return [], {}
    if not dead_letters:
        return [(c.chunk_id, c.payload) for c in spool.oldest(limit or 10**9)], {}
    items = spool.dead_letter_payloads()
    extra: dict[str, dict[str, str]] = {}
    for dead in spool.dead_letters(limit=len(items) + 1000):
        at = datetime.datetime.fromtimestamp(dead["rejected_ns"] / 1e9, datetime.UTC)
        extra[dead["chunk_id"]] = {"dead_letter_reason": dead["reason"], "dead_letter_at": at.isoformat()}
    return items, extra

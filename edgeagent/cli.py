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
from pathlib import Path
from typing import Any

from edgeagent import __version__

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeagent", description="A log agent that does not lose a line.")
    parser.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=None,
            help="config file (default: $EDGEAGENT_CONFIG or /etc/edgeagent/edgeagent.toml)",
        )
        return p

    with_config(commands.add_parser("run", help="run the agent in the foreground"))
    status = with_config(commands.add_parser("status", help="backlog, sources, uploader and connectivity"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    with_config(commands.add_parser("check-config", help="validate and print the effective config"))
    with_config(commands.add_parser("wake", help="make a running agent try to upload now (SIGUSR1)"))
    spool = commands.add_parser("spool", help="inspect the spool")
    spool_commands = spool.add_subparsers(dest="spool_command", metavar="SPOOL_COMMAND")
    dump = with_config(spool_commands.add_parser("dump", help="decode spooled chunks to JSON lines"))
    dump.add_argument("--dead-letters", action="store_true", help="dump the dead letters instead")
    dump.add_argument("--limit", type=int, default=0, help="at most this many chunks")
    from edgeagent.fleet.arguments import add_fleet_commands

    add_fleet_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
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
    from edgeagent import agent
    from edgeagent.config import ConfigError
    from edgeagent.spool import SpoolError

    try:
        return agent.run(cfg)
    except SpoolError as e:
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
    from edgeagent.spool import Spool

    spool = Spool.open_readonly(cfg.spool_path)
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
    try:
        out.update(spool.status())
        backlog = spool.backlog()
        backlog["oldest_age_s"] = round(time.time() - backlog["oldest_ns"] / 1e9, 3) if backlog["oldest_ns"] else None
        out["backlog"] = backlog
        out["counters"] = spool.counters()
        out["dead_letters"] = spool.dead_letter_count()
        out["files"] = spool.file_sizes()
    finally:
        spool.close()
    agent = out.get("agent", {})
    if agent.get("state") == "running" and not _alive(agent.get("pid")):
        agent["state"] = "not running (last seen running; killed or crashed)"
    return out


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


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    status = _read_status(cfg)
    if args.json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    agent = status["agent"]
    backlog = status["backlog"]
    lines = [
        f"agent:     {agent.get('state')}"
        + (f" (pid {agent['pid']}, version {agent.get('version')})" if "pid" in agent else ""),
        f"spool:     {status['spool']}",
        f"backlog:   {backlog['chunks']} chunks, {backlog['records']} records, {backlog['bytes']} bytes"
        + (f", oldest {backlog['oldest_age_s']:.0f} s ago" if backlog.get("oldest_age_s") is not None else ""),
    ]
    uploader = status.get("uploader") or {}
    if uploader:
        lines.append(
            "uploader:  " + ", ".join(f"{k}={v}" for k, v in sorted(uploader.items()) if not isinstance(v, dict))
        )
    for name, src in sorted((status.get("sources") or {}).items()):
        lines.append(
            f"source {name}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(src.items()) if not isinstance(v, (dict, list)))
        )
    counters = status.get("counters") or {}
    if counters:
        lines.append("counters:  " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    lines.append(f"dead letters: {status['dead_letters']}")
    errors = agent.get("errors") or {}
    for name, error in sorted(errors.items()):
        lines.append(f"error in {name}: {error}")
    print("\n".join(lines))
    return 0


def cmd_wake(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    agent = _read_status(cfg).get("agent", {})
    pid = agent.get("pid")
    if agent.get("state") != "running" or not _alive(pid):
        raise CliError(f"no running agent found for {cfg.spool_path} (is `edgeagent run` running with this config?)")
    os.kill(pid, signal.SIGUSR1)
    return 0


def cmd_spool_dump(args: argparse.Namespace) -> int:
    import zstandard

    from edgeagent.otlp import DecodeError, decode_request
    from edgeagent.spool import Spool

    cfg = _load_config(args)
    spool = Spool.open_readonly(cfg.spool_path)
    if spool is None:
        return 0
    dctx = zstandard.ZstdDecompressor()
    out = sys.stdout
    try:
        if args.dead_letters:
            items = [(chunk_id, payload, None) for chunk_id, payload in spool.dead_letter_payloads()]
        else:
            items = [(c.chunk_id, c.payload, c) for c in spool.oldest(args.limit or 10**9)]
        for chunk_id, payload, _chunk in items:
            try:
                records = decode_request(dctx.decompress(payload))
                for record in records:
                    record["chunk_id"] = chunk_id
                    out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            except (zstandard.ZstdError, DecodeError) as e:
                print(f"edgeagent: chunk {chunk_id} cannot be decoded: {e}", file=sys.stderr)
    finally:
        spool.close()
    return 0

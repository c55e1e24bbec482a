"""The `edgeagent fleet ...` command-line arguments (design.md, "Operator CLI").

Kept apart from `operator` so building the CLI parser does not import paho.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_fleet_arguments(fleet: argparse.ArgumentParser) -> None:
    """The sub-commands of `edgeagent fleet` and their arguments, added to its parser."""
    sub = fleet.add_subparsers(dest="fleet_command", metavar="FLEET_COMMAND", required=True)
    keygen = sub.add_parser("keygen", help="write an Ed25519 private key to OUT (0600) and its public key to OUT.pub")
    keygen.add_argument("out", type=Path, metavar="OUT")

    def broker_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        p.add_argument("--ca-file", default="", help="CA certificates to verify the broker")
        p.add_argument("--cert-file", default="", help="client certificate")
        p.add_argument("--key-file", default="", help="client certificate's private key")
        p.add_argument("--username", default="")
        p.add_argument("--password-file", default="", help="file holding the password")
        return p

    push = broker_options(sub.add_parser("push", help="sign, version and publish a desired config (retained)"))
    target = push.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID")
    target.add_argument("--group", metavar="NAME")
    push.add_argument("--key", metavar="PRIVATE_KEY", help="sign with this key (from `edgeagent fleet keygen`)")
    push.add_argument("--version", type=int, default=0, metavar="N", help="default: one above the highest retained")
    push.add_argument("--wait", type=float, default=0.0, metavar="S", help="collect the devices' reports for S seconds")
    push.add_argument("config_file", type=Path, metavar="CONFIG.toml")
    status = broker_options(sub.add_parser("status", help="one line per device: state, versions, reason, last seen"))
    status.add_argument("--device", metavar="ID")
    status.add_argument("--json", action="store_true", help="machine-readable output")

"""The OpenWrt package's scripts, run for real in busybox ash (or dash) against
stub procd/UCI/logger functions: the procd command line, the TOML rendered from
UCI (parsed by tomllib and by `edgeagent check-config`), and the iface hotplug
script waking a real running agent. Plus shellcheck on every shell script we
ship."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, wait_for

import edgeagent

FILES = REPO / "openwrt" / "utils" / "edgeagent" / "files"
INIT = FILES / "edgeagent.init"
HOTPLUG = FILES / "edgeagent.hotplug"
ENTRY = Path(sys.executable).parent / "edgeagent"

# What /lib/functions.sh and procd.sh provide, reduced to recording calls.
# UCI values come from variables UCI_<section>_<option>; a list is
# newline-separated.
STUBS = r"""
procd_open_instance() { echo "open_instance" >> "$CALLS"; }
procd_close_instance() { echo "close_instance" >> "$CALLS"; }
procd_set_param() { echo "set_param $*" >> "$CALLS"; }
procd_add_reload_trigger() { echo "reload_trigger $*" >> "$CALLS"; }
logger() { echo "logger $*" >> "$CALLS"; }
config_load() { echo "config_load $1" >> "$CALLS"; }
config_get() {
    eval "_value=\${UCI_$2_$3-\$4}"
    eval "$1=\$_value"
}
config_get_bool() {
    config_get "$@"
    eval "case \"\$$1\" in 1|on|true|yes|enabled) $1=1 ;; *) $1=0 ;; esac"
}
config_list_foreach() {
    eval "_list=\${UCI_$1_$2-}"
    _fn=$3
    set -f
    _ifs=$IFS
    IFS='
'
    for _item in $_list; do IFS=$_ifs; "$_fn" "$_item"; done
    IFS=$_ifs
    set +f
}
"""


def shell() -> list[str]:
    if shutil.which("busybox"):
        return ["busybox", "sh"]
    return ["dash" if shutil.which("dash") else "sh"]


def run_init(tmp_path: Path, uci: dict[str, str], action: str = "start_service; service_triggers") -> Path:
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {
        "PATH": os.environ["PATH"],
        "CALLS": str(calls),
        "EDGEAGENT_RUN_DIR": str(tmp_path / "run"),
        "EDGEAGENT_PROG": str(ENTRY),
        **{f"UCI_main_{k}": v for k, v in uci.items()},
    }
    script = STUBS + f". {INIT}\n{action}\n"
    out = subprocess.run([*shell(), "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return calls


def uci_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"state_dir": str(tmp_path / "state"), "device_id": "owrt-1", **extra}


def test_init_script_starts_the_agent_under_procd_with_rendered_toml(tmp_path: Path) -> None:
    uci = uci_for(
        tmp_path,
        broker="mqtts://broker.example.net:8883",
        ca_file="/etc/edgeagent/ca.pem",
        file='/tmp/log/a.log\n/tmp/log/with "quote" and \\ backslash.log',
        kmsg_min_priority="warning",
        pstore="0",
    )
    calls = run_init(tmp_path, uci).read_text().splitlines()
    conf = tmp_path / "run" / "edgeagent.toml"
    assert calls == [
        "config_load edgeagent",
        "open_instance",
        f"set_param command {ENTRY} run --config {conf}",
        "set_param respawn 3600 5 5",
        f"set_param file {conf}",
        "set_param reload_signal HUP",
        "set_param term_timeout 30",
        "set_param stdout 1",
        "set_param stderr 1",
        "set_param no_new_privs 1",
        "close_instance",
        "reload_trigger edgeagent",
    ]
    config = tomllib.loads(conf.read_text())
    assert config["device_id"] == "owrt-1"
    assert config["state_dir"] == str(tmp_path / "state")
    assert config["kmsg"] == {"enabled": True, "min_priority": "warning", "pstore": False}
    assert config["files"] == [{"include": ["/tmp/log/a.log", '/tmp/log/with "quote" and \\ backslash.log']}]
    assert config["spool"] == {"max_size": "8MiB", "durability": "full"}
    assert config["upload"] == {"to": "mqtt"}
    assert config["mqtt"]["url"] == "mqtts://broker.example.net:8883"
    assert config["mqtt"]["ca_file"] == "/etc/edgeagent/ca.pem"
    assert "username" not in config["mqtt"]  # empty UCI options are left out
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "state").is_dir()


def test_rendered_toml_passes_check_config(tmp_path: Path) -> None:
    run_init(tmp_path, uci_for(tmp_path, upload="none", file="/tmp/log/*.log"))
    conf = tmp_path / "run" / "edgeagent.toml"
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "check-config", "-c", str(conf)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    effective = tomllib.loads(out.stdout)
    assert effective["device_id"] == "owrt-1" and effective["log_format"] == "plain"
    assert effective["spool"]["max_size"] == 8 * 1024**2


def test_shipped_uci_defaults_render_a_valid_config(tmp_path: Path) -> None:
    """The defaults of /etc/config/edgeagent, as the init script reads them."""
    uci: dict[str, str] = {}
    for line in (FILES / "edgeagent.config").read_text().splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] == "option":
            uci[parts[1]] = parts[2].strip("'")
    assert uci["state_dir"].startswith("/etc/"), "state must be on flash: /var and /tmp are RAM on OpenWrt"
    uci["state_dir"] = str(tmp_path / "state")
    run_init(tmp_path, uci)
    conf = tmp_path / "run" / "edgeagent.toml"
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent", "check-config", "-c", str(conf)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr


def test_disabled_service_does_not_start(tmp_path: Path) -> None:
    calls = run_init(tmp_path, uci_for(tmp_path, enabled="0"), action="start_service").read_text().splitlines()
    assert calls == ["config_load edgeagent"]
    assert not (tmp_path / "run" / "edgeagent.toml").exists()


def run_hotplug(tmp_path: Path, action: str, conf: Path) -> list[str]:
    calls = tmp_path / "hotplug-calls"
    calls.write_text("")
    env = {
        "PATH": os.environ["PATH"],
        "CALLS": str(calls),
        "ACTION": action,
        "INTERFACE": "wan",
        "EDGEAGENT": str(ENTRY),
        "EDGEAGENT_CONF": str(conf),
    }
    out = subprocess.run(
        [*shell(), "-c", STUBS + f". {HOTPLUG}\n"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return calls.read_text().splitlines()


def test_hotplug_ifup_wakes_the_running_agent(tmp_path: Path) -> None:
    run_init(tmp_path, uci_for(tmp_path, upload="none", kmsg="0", pstore="0", log_level="debug"))
    conf = tmp_path / "run" / "edgeagent.toml"
    # Nothing runs yet: the wake fails and says so through logger.
    calls = run_hotplug(tmp_path, "ifup", conf)
    assert len(calls) == 1 and calls[0].startswith("logger -t edgeagent -p daemon.notice ifup wan: ")
    assert "no running agent" in calls[0]
    stderr = tmp_path / "agent.err"
    with open(stderr, "wb") as err:
        agent = subprocess.Popen([str(ENTRY), "run", "--config", str(conf)], stderr=err, cwd=tmp_path)
    try:
        status = [str(ENTRY), "status", "--json", "--config", str(conf)]
        wait_for(
            lambda: f'"pid": {agent.pid}' in subprocess.run(status, capture_output=True, text=True).stdout,
            30,
            what="agent running",
        )
        assert run_hotplug(tmp_path, "ifdown", conf) == []
        assert run_hotplug(tmp_path, "ifup", conf) == []  # woken: no error to log
    finally:
        agent.terminate()
        assert agent.wait(30) == 0, stderr.read_text()


def test_package_version_matches_the_checkout() -> None:
    makefile = (REPO / "openwrt" / "utils" / "edgeagent" / "Makefile").read_text()
    assert f"PKG_VERSION:={edgeagent.__version__}\n" in makefile


@pytest.mark.parametrize(
    "script",
    [INIT, HOTPLUG, REPO / "packaging" / "sysvinit" / "edgeagent"],
    ids=["procd-init", "hotplug", "sysvinit"],
)
def test_shellcheck_clean(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck) - the scripts were not checked")
    # The shebang or a `shell=` directive picks the dialect: POSIX sh for the sysvinit script, dash for the
    # OpenWrt ones (busybox ash is POSIX sh plus `local`; shellcheck 0.9 has no busybox dialect).
    out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout

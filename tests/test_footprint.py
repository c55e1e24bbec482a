"""What the running agent imports: modules that cost RSS for as long as it runs are loaded only when used.

Each check runs in a fresh interpreter (the test process has imported everything already)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, AgentProcess, Broker, wait_for


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_paho_does_not_load_urllib_request_until_it_is_used() -> None:
    out = run_python(
        "import sys\n"
        "import edgeagent.agent, edgeagent.uploaders.mqtt\n"
        "print(sorted(m for m in ('http.client', 'email.message', 'tenacity') if m in sys.modules))\n"
        "import urllib.request\n"
        "assert urllib.request.getproxies() is not None  # first use runs the module\n"
        "print('http.client' in sys.modules, urllib.request.Request.__name__)\n"
    )
    assert out.splitlines() == ["[]", "True Request"]


def test_deferred_module_works_for_code_that_imports_it_afterwards() -> None:
    out = run_python(
        "import edgeagent.mqtt.client\n"
        "from urllib.request import urlopen, pathname2url\n"
        "print(pathname2url('/a b'), callable(urlopen))\n"
    )
    assert out.split() == ["/a%20b", "True"]


def test_running_agent_imports_only_what_its_config_uses(mosquitto: Broker, tmp_path: Path) -> None:
    """The real `edgeagent run` (kmsg off, one file, logs over mqtt://), with `-X importtime`: none of
    the modules of other sources, other uploaders, fleet or TLS ran (importtime lists every import
    attempted; `ssl` may show as attempted: it is refused, and /proc/PID/maps is checked too)."""
    state_dir = tmp_path / "state"
    log = tmp_path / "app.log"
    log.touch()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "{state_dir}"\n[kmsg]\nenabled = false\n[[files]]\ninclude = ["{log}"]\n'
        f'[upload]\nto = "mqtt"\n[mqtt]\nurl = "{mosquitto.url}"\nfirst_connect_delay = "0s"\n'
    )
    agent = AgentProcess(config, state_dir)
    with open(agent.stderr_path, "wb") as stderr:
        agent.proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "edgeagent", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=REPO,
        )
    try:
        wait_for(agent.ready, 30, what="agent ready")
        wait_for(lambda: agent.status().get("uploader", {}).get("connected"), 30, what="connected to the broker")
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    finally:
        assert agent.stop() == 0
    imported = {line.split("|")[-1].strip() for line in agent.stderr().splitlines() if line.startswith("import time:")}
    assert {"edgeagent.sources.files", "edgeagent.uploaders.mqtt", "asyncio", "sqlite3"} <= imported
    unused = {
        "edgeagent.uploaders.otlp_http",
        "edgeagent.sources.journald",
        "edgeagent.sources.syslog",
        "edgeagent.sources.kmsg",
        "edgeagent.fleet.device",
        "pyudev",
        "http.client",
        "email.message",
        "tenacity",
        "sqlite_utils",
        "tomli_w",
    }
    assert imported & unused == set()
    assert not any(name in maps for name in ("libssl.so", "libcrypto.so", "_ssl.", "_hashlib."))

"""What the running agent imports: modules that cost RSS for as long as it runs are loaded only when used.

Each check runs in a fresh interpreter (the test process has imported everything already)."""

from __future__ import annotations

import subprocess
import sys


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

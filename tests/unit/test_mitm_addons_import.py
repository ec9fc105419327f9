"""The proxy loads mitmproxy's Master and its three addon modules without mitmproxy/addons/__init__.py (every default
addon, Flask's onboarding app among them: half the proxy's start-up in a TCG guest), and leaves the real package
importable afterwards."""
from __future__ import annotations

import subprocess
import sys

from tests.support.env import ROOT

PROBE = """
import sys
import filters.proxy.lean, filters.proxy.nextlayer
loaded = sorted(k for k in sys.modules if k.startswith("mitmproxy.addons"))
print(" ".join(loaded))
import mitmproxy.addons
print(len(mitmproxy.addons.default_addons()), mitmproxy.addons.proxyserver is filters.proxy.lean.proxyserver)
"""


def _run(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_the_proxy_imports_no_default_addon_and_the_package_stays_whole() -> None:
    loaded, after = _run(PROBE)
    assert loaded.split() == ["mitmproxy.addons.next_layer", "mitmproxy.addons.proxyserver",
                              "mitmproxy.addons.termlog", "mitmproxy.addons.tlsconfig"]
    count, same = after.split()
    assert int(count) > 20 and same == "True"   # the real __init__ ran and bound the modules already loaded


def test_with_the_package_already_imported_the_same_modules_are_used() -> None:
    out = _run("import mitmproxy.addons, filters.proxy.lean as lean\n"
               "print(lean.proxyserver is mitmproxy.addons.proxyserver, lean.Master.__module__)")
    assert out == ["True mitmproxy.master"]

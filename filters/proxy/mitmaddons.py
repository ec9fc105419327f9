"""mitmproxy's Master and the three addon modules the proxy uses, imported without mitmproxy/addons/__init__.py."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

PACKAGE = "mitmproxy.addons"


def _import_bare(*names: str) -> list[types.ModuleType]:
    """Each named module (mitmproxy.master imports mitmproxy.addons.termlog), with mitmproxy/addons/__init__.py not run.

    That __init__ imports every default addon (Flask's onboarding app, client playback, the flow filter language,
    ...): about half of the proxy's start-up, and in a TCG guest booting that is a minute of CPU before the proxy
    answers. A placeholder package (the real directory as its path) stands in while the submodules load, then it is
    taken out again: a later `import mitmproxy.addons` (mitmproxy's own test helpers, say) runs the real __init__,
    which finds these submodules already loaded and binds them."""
    if PACKAGE in sys.modules:  # the real package is already there: nothing to save
        return [importlib.import_module(n) for n in names]
    parent = importlib.import_module("mitmproxy")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{PACKAGE} not found beside {parent.__file__}")
    stub = types.ModuleType(PACKAGE, "placeholder while single addon modules load (filters/proxy/mitmaddons.py)")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__package__ = PACKAGE
    sys.modules[PACKAGE] = stub
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        if sys.modules.get(PACKAGE) is stub:
            del sys.modules[PACKAGE]
        if getattr(parent, "addons", None) is stub:
            delattr(parent, "addons")


master, next_layer, proxyserver, tlsconfig = _import_bare("mitmproxy.master", f"{PACKAGE}.next_layer", f"{PACKAGE}.proxyserver",
                                                          f"{PACKAGE}.tlsconfig")
Master = master.Master

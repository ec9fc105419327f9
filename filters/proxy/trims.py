"""Hot-path trims of mitmproxy 11.0 internals for the workers (profiled; none changes behaviour); env switch off."""
from __future__ import annotations

import copy
import os

from mitmproxy import addonmanager, flow, hooks, http, optmanager

TRIMS_ENV = "APPLIANCE_PROXY_TRIMS"  # "0": no mitmproxy hot-path trims (for comparison)


def apply() -> None:
    """Hot-path trims of mitmproxy 11.0 internals, each found with a profiler, none changing behaviour:

    - `http.MessageData.__post_init__` only type-checks the fields, and mitmproxy defines it only `if __debug__`;
    - `_Option.current` deep-copies the value on every `ctx.options.x` read; immutable values are returned as they
      are (deepcopy would return the same object anyway), anything else is still deep-copied;
    - `AddonManager.handle_lifecycle` walks every addon twice per hook (the hook, then an `update` hook for flows);
      hooks that no addon implements are skipped (the set of implemented hooks is recomputed when addons change).

    `APPLIANCE_PROXY_TRIMS=0` turns them off (for comparison)."""
    if os.environ.get(TRIMS_ENV, "1") == "0":
        return
    http.MessageData.__post_init__ = lambda self: None
    scalar = (str, int, float, bool, bytes, type(None))

    def current(self):
        v = self._default if self.value is optmanager.unset else self.value
        if isinstance(v, scalar) or (type(v) is tuple and all(isinstance(x, scalar) for x in v)):
            return v
        return copy.deepcopy(v)

    optmanager._Option.current = current

    def implemented(mgr) -> frozenset:
        key = (len(mgr.lookup), len(mgr.chain))
        cached = mgr.__dict__.get("_cg_hooks")
        if cached is None or cached[0] != key:
            addons = list(addonmanager.traverse(mgr.chain))
            names = frozenset(n for n in hooks.all_hooks if any(callable(getattr(a, n, None)) for a in addons))
            cached = mgr.__dict__["_cg_hooks"] = (key, names)
        return cached[1]

    async def handle_lifecycle(self, event):
        names = implemented(self)
        if event.name in names:
            await self.trigger_event(event)
        if "update" in names and isinstance(event.args()[0], flow.Flow):
            await self.trigger_event(hooks.UpdateHook([event.args()[0]]))

    addonmanager.AddonManager.handle_lifecycle = handle_lifecycle

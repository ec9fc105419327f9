"""The status page rendered from a snapshot (gather.snapshot) with the jinja2 template."""
from __future__ import annotations

import time

import jinja2

from appliance.admin.chart import chart
from appliance.admin.template import PAGE

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
_TEMPLATE = _ENV.from_string(PAGE)


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "unknown"


def holder(s: dict) -> str | None:
    """Who holds the main VIP: this node when MASTER, else the peer that says MASTER."""
    if s.get("role") == "MASTER":
        return s.get("node")
    return next((name for name, p in (s.get("peers") or {}).items() if p.get("role") == "MASTER"), None)


def render(s: dict) -> str:
    c = s.get("counters") or {}
    blocks = sum(int(v) for k, v in c.items() if k.startswith("appliance_proxy_blocks_total"))
    refused = sum(int(v) for k, v in c.items() if k.startswith("appliance_proxy_refused_total"))
    return _TEMPLATE.render(s=s, c=c, g=chart(s["traffic"]["chart"]), holder=holder(s), when=when,
                            blocks=blocks, refused=refused)

"""What the fast liveness layer shows: `appliance status` lines, the Prometheus text, the causes as metric labels."""
from __future__ import annotations


def summary(s: dict | None) -> list[str]:
    """`appliance status` lines: each peer's heartbeat age on each path, and what the layer did."""
    if not s:
        return []
    def age(a: float | None) -> str:
        return "never heard" if a is None else f"{a:.2f} s ago"
    witness = {"ok": "; LAN witness answers", "lost": "; LAN witness silent"}.get(s.get("witness") or "", "")
    out = [f"fast: heartbeats every {s['interval']:g} s, takeover after {s['misses']} missed on both paths"
           + ("" if s["acting"] else " (report only)") + witness
           + (f"; this node: {s['failure']}" if s["failure"] else "")]
    for name, p in sorted(s["peers"].items()):
        out.append(f"fast: {name} sync {age(p['sync_age'])}, lan {age(p['lan_age'])}"
                   + (f", roles {' '.join(f'{v}:{r}' for v, r in sorted(p['roles'].items()))}" if p["roles"] else ""))
    done = ", ".join(f"{k} {n}" for k, n in s["takeovers"].items())
    # stale: genuine but not for this run, or late (each start and each held-back beat); the rest are attacks or bugs
    refused = {k[4:]: n for k, n in s["counters"].items() if k.startswith("bad_") and k != "bad_stale"}
    if done or refused:
        out.append(f"fast: takeovers {done or 'none'}; heartbeats refused {sum(refused.values())}"
                   + (f" ({', '.join(f'{k} {n}' for k, n in refused.items())})" if refused else ""))
    return out


def kind_of(cause: str) -> str:
    """The takeover/handover cause as a metric label."""
    for word, kind in (("handed over", "handover"), ("cut off", "lan_cut"), ("silent", "silent"), ("LAN link", "lan_link"),
                       ("exited", "proxy_exit"), ("hung", "proxy_hung"), ("says", "peer_failing")):
        if word in cause:
            return kind
    return "other"


def prometheus(s: dict) -> str:
    out = ["# HELP appliance_ha_heartbeat_age_seconds seconds since the last fresh heartbeat from a peer, per path",
           "# TYPE appliance_ha_heartbeat_age_seconds gauge"]
    for name, p in sorted(s["peers"].items()):
        for path in ("sync", "lan"):
            a = p[f"{path}_age"]
            out.append(f'appliance_ha_heartbeat_age_seconds{{peer="{name}",path="{path}"}} '
                       f'{"+Inf" if a is None else a}')
    out += ["# HELP appliance_ha_takeovers_total fast takeovers by this node, by cause",
            "# TYPE appliance_ha_takeovers_total counter"]
    for cause in ("silent", "handover", "peer_failing", "lan_cut", "other"):
        out.append(f'appliance_ha_takeovers_total{{cause="{cause}"}} {s["takeovers"].get(cause, 0)}')
    out += ["# HELP appliance_ha_heartbeats_total heartbeats by direction/verdict and path",
            "# TYPE appliance_ha_heartbeats_total counter"]
    for k, n in s["counters"].items():
        out.append(f'appliance_ha_heartbeats_total{{what="{k}"}} {n}')
    return "\n".join(out) + "\n"

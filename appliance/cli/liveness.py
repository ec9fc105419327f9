"""`appliance liveness`: the fast liveness layer beside kernel CARP (FreeBSD; on Linux `appliance carp` runs it)."""
from __future__ import annotations

import os
import signal
import sys
import threading

import click

from appliance.cli import Ctx, fail, main
from appliance.ha import role
from appliance.ha.kernel_carp import KernelCarp
from appliance.ha.liveness import Liveness, View

# tests run the FreeBSD command on Linux against a fake ifconfig (the variable names the fake's directory on PATH)
KERNEL_CARP_TEST = "APPLIANCE_KERNEL_CARP_TEST"


@main.command("liveness")
@click.pass_obj
def liveness_cmd(ctx: Ctx) -> None:
    """FreeBSD: heartbeats on the sync link and the LAN, takeover and hand-over through ifconfig (docs/ha.md)."""
    if not sys.platform.startswith("freebsd") and not os.environ.get(KERNEL_CARP_TEST):
        fail("appliance liveness runs beside kernel CARP (FreeBSD); on Linux `appliance carp` runs the fast liveness "
             "layer itself", 2)
    cfg, node, paths = ctx.cfg, ctx.node, ctx.paths
    if cfg.ha.fast_interval <= 0:
        fail(f"ha.fast_interval is 0 in {ctx.config_path}: the fast liveness layer is off", 2)
    paths.run.mkdir(parents=True, exist_ok=True)
    k = KernelCarp(cfg, node, paths)

    def view() -> View:
        roles, skews = k.roles()
        return View(roles, skews, k.demoted())

    fast = Liveness(cfg, node, paths, view, k.command, lambda msg: role.log_line(msg, paths),
                    on_failure=lambda: k.set_demoted(bool(fast.failure)), link=k.link)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        fast.start(stop)
    except OSError as e:
        fail(f"cannot open the heartbeat sockets (udp {cfg.ha.fast_port} on {fast.addr['sync']} and "
             f"{fast.addr['lan']}): {e.strerror or e}", 1)
    role.log_line(f"fast: liveness every {cfg.ha.fast_interval:g} s beside kernel CARP on {k.iface}", paths)
    while not stop.wait(1.0):
        pass

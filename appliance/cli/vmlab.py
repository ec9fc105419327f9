"""`appliance vmlab up|down|status|failover`: the cluster's images booted as qemu VMs in a lab namespace (root)."""
from __future__ import annotations

import os
import time

import click

from appliance.cli import Ctx, emit_json, fail, main
from appliance.cli.lab import down_lab, load_lab, show_up
from appliance.lab import vmfail, vmlab
from appliance.lab.model import LabError
from appliance.lab.vmmodel import VMLAB, BootError


@main.group("vmlab")
def vmlab_group() -> None:
    """The cluster booted, not simulated: each node's image in qemu (KVM if it works, else TCG) on lab bridges."""


@vmlab_group.command("up")
@click.option("--name", help="lab name (default: random; prefixes the namespaces, so labs can coexist)")
@click.option("--images", type=click.Path(file_okay=False, path_type=str),
              default=lambda: os.environ.get("APPLIANCE_VMLAB_IMAGES", "dist"), show_default="dist",
              help="the image build's out dir: NODE.qcow2, the admin key, the host keys [env APPLIANCE_VMLAB_IMAGES]")
@click.option("--wait", type=click.FloatRange(10, 3600), default=vmlab.WAIT, show_default=True,
              help="seconds for the VMs to reach multi-user and serve")
@click.option("--json", "as_json", is_flag=True, help="print the lab description as JSON")
@click.pass_obj
def up_cmd(ctx: Ctx, name: str | None, images: str, wait: float, as_json: bool) -> None:
    """Boot every node's image (a copy-on-write overlay) and wait until all reached multi-user and one serves."""
    ctx.cfg  # validate first: a bad config fails with its file:line message
    t0 = time.monotonic()
    log = (lambda msg: None) if as_json else (lambda msg: click.echo(f"[{time.monotonic() - t0:6.1f} s] {msg}"))
    try:
        lab = vmlab.up(ctx.config_path, images, name, wait, log)
    except BootError as e:
        click.echo(e.tail, err=True)
        fail(str(e), 1)
    except LabError as e:
        fail(str(e), 1)
    d = vmlab.describe(lab)
    if not show_up(d, as_json, f"VM lab {lab.name} up in {time.monotonic() - t0:.1f} s ({lab.accel}; state in {lab.dir})"):
        return
    for node, n in d["nodes"].items():
        click.echo(f"{node}: qemu pid {n['qemu_pid']} console {n['console']}")
        click.echo(f"  exec: {' '.join(n['exec'])} CMD")
    click.echo(f"try: appliance vmlab status; appliance vmlab failover; appliance vmlab down --name {lab.name}")


@vmlab_group.command("down")
@click.option("--name", help="which lab (default: the only one)")
@click.pass_obj
def down_cmd(ctx: Ctx, name: str | None) -> None:
    """Power off the VMs and remove taps, bridges, namespaces and overlays (also after a crash)."""
    down_lab(name, VMLAB, vmlab.down, removed="the VMs and ")


@vmlab_group.command("status")
@click.option("--name", help="which lab (default: the only one)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status_cmd(ctx: Ctx, name: str | None, as_json: bool) -> None:
    """Each VM's qemu and boot state (over SSH), and who answers ARP for the VIP."""
    d = vmlab.status(load_lab(name, VMLAB))
    if as_json:
        emit_json(d)
        return
    click.echo(f"VM lab {d['name']} ({d['accel']}): vip {d['vip']} held by {', '.join(d['holders']) or 'nobody'}")
    for node, n in d["nodes"].items():
        click.echo(f"{node}: qemu {n['qemu_pid']}{'' if n['qemu_alive'] else ' (off)'}; {n['state']}")


@vmlab_group.command("failover")
@click.option("--name", help="which lab (default: the only one)")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(vmfail.KINDS), help="failures to run (default: all)")
@click.option("--runs", type=click.IntRange(1, 20), default=1, help="repetitions of each kind")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def failover_cmd(ctx: Ctx, name: str | None, kinds: tuple[str, ...], runs: int, as_json: bool) -> None:
    """A client request every 0.2 s (at most two open) through the VIP while the master fails in each way and
    comes back."""
    lab = load_lab(name, VMLAB)
    try:
        results = vmfail.run_all(lab, kinds or vmfail.KINDS, runs, None if as_json else click.echo)
    except LabError as e:
        fail(str(e), 1)
    if as_json:
        emit_json(_finite(results))


def _finite(v):
    """JSON has no Infinity: an outage that never ended is null."""
    if isinstance(v, float) and v == float("inf"):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v

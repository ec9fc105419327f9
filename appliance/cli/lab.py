"""`appliance lab up|down|status|exec|failover`: the cluster in network namespaces, and the failover measurement."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import click

from appliance.cli import Ctx, emit_json, fail, main
from appliance.ha import ip as netns
from appliance.ha import supervisor as carp
from appliance.lab import lifecycle
from appliance.lab.daemons import node_env
from appliance.lab.faults import FAST_KINDS, KINDS
from appliance.lab.measure import Probe, fmt_result, measure
from appliance.lab.model import LAB, LabError, LabKind


@main.group("lab")
def lab_group() -> None:
    """A whole cluster on this machine in network namespaces (root): nodes, client, LAN bridge, sync link, origin."""


def load_lab(name: str | None, kind: LabKind = LAB) -> Any:
    """The lab (a VM lab with kind=VMLAB) from its state file, or the error for the user."""
    try:
        return kind.load(name)
    except LabError as e:
        fail(str(e))


def show_up(d: dict, as_json: bool, head: str) -> bool:
    """`up`'s description: as JSON (False: nothing more to print), or `head` and the client's view of the lab."""
    if as_json:
        emit_json(d)
        return False
    click.echo(head)
    click.echo(f"vip {d['vip']}:{d['proxy_port']}  origin {d['origin']}  client netns {d['client']['netns']}")
    return True


def down_lab(name: str | None, kind: LabKind, down: Callable[[str | None], list[str]], removed: str = "") -> None:
    """`lab down` and `vmlab down`: take the lab apart; a name that is neither a lab dir nor has namespaces is an
    error (nothing removed). `removed` names what went besides the namespaces."""
    try:
        known = name is None or kind.dir(name).exists()
        spaces = down(name)
    except LabError as e:
        fail(str(e))
    if not known and not spaces:
        fail(f"--name {name!r}: no such {kind.what} (no {kind.dir(name)}, no namespaces {name}-*); nothing removed")
    click.echo(f"removed {removed}{len(spaces)} namespaces: {' '.join(spaces) or '-'}")


@lab_group.command("up")
@click.option("--name", help="lab name (default: random; prefixes the namespaces, so labs can coexist)")
@click.option("--engine", type=click.Choice(carp.ENGINES), help=f"CARP engine (default {carp.DEFAULT_ENGINE})")
@click.option("--deadratio", type=click.IntRange(1, 10), help="engine deadratio (default: the engine's)")
@click.option("--json", "as_json", is_flag=True, help="print the lab description as JSON")
@click.pass_obj
def up_cmd(ctx: Ctx, name: str | None, engine: str | None, deadratio: int | None, as_json: bool) -> None:
    """Build the lab from the cluster file and start origin, proxies and CARP engines; waits until ready."""
    ctx.cfg  # validate first: a bad config fails with its file:line message
    t0 = time.monotonic()
    try:
        lab = lifecycle.up(ctx.config_path, name, engine, deadratio)
    except LabError as e:
        fail(str(e), 1)
    d = lifecycle.describe(lab)
    if not show_up(d, as_json, f"lab {d['name']} up in {time.monotonic() - t0:.1f} s (state in {d['dir']})"):
        return
    for node, n in d["nodes"].items():
        click.echo(f"{node}: netns {n['netns']} engine pid {n['engine_pid']} proxy pid {n['proxy_pid']} sshd pid {n['sshd_pid']} config {n['config']}")
    click.echo(f"try: appliance lab exec {next(iter(d['nodes']))} -- appliance status;  appliance lab exec {next(iter(d['nodes']))} -- appliance sync;  appliance lab failover;  "
               f"appliance lab down --name {d['name']}")


@lab_group.command("down")
@click.option("--name", help="which lab (default: the only one)")
@click.pass_obj
def down_cmd(ctx: Ctx, name: str | None) -> None:
    """Stop everything and delete the namespaces (also after a crash: works from the lab state file)."""
    down_lab(name, LAB, lifecycle.down)


@lab_group.command("status")
@click.option("--name", help="which lab (default: the only one)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status_cmd(ctx: Ctx, name: str | None, as_json: bool) -> None:
    """Who holds the VIP (ip addr in each namespace), each node's role and process PIDs."""
    lab = load_lab(name)
    d = lifecycle.status(lab)
    if as_json:
        emit_json(d)
        return
    for v, h in d["holders"].items():
        click.echo(f"vhid {v} vip {lab.vips[v]}: held by {', '.join(h) or 'nobody'}")
    for node, n in d["nodes"].items():
        click.echo(f"{node}: role {n['role_state']} engine {n['engine_pid']} proxy {n['proxy_pid']}"
                   f"{'' if n['proxy_alive'] else ' (dead)'} sshd {n['sshd_pid']}{'' if n['sshd_alive'] else ' (dead)'}"
                   f" healthy {n['healthy']}")


@lab_group.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--name", help="which lab (default: the only one)")
@click.argument("node_name", metavar="NODE")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_cmd(ctx: Ctx, name: str | None, node_name: str, argv: tuple[str, ...]) -> None:
    """Run a command in NODE's namespace with its environment: appliance lab exec fw1 -- appliance status"""
    lab = load_lab(name)
    try:
        n = lab.node(node_name)
    except LabError as e:
        fail(str(e))
    args = list(argv[1:] if argv and argv[0] == "--" else argv)
    if not args:
        fail("nothing to run: appliance lab exec NODE -- CMD ...")
    env = {**os.environ, **node_env(lab, node_name)}
    sys.stdout.flush()
    os.execvpe(netns.tool("ip"), ["ip", "netns", "exec", n.netns] + args, env)


QUIET = ("sync-cut", "lan-cut")    # no takeover expected: measure() would wait its whole timeout


@lab_group.command("failover")
@click.option("--name", help="which lab (default: the only one)")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(KINDS + FAST_KINDS),
              help=f"failures of the master to run (default: {', '.join(KINDS)}); sync-cut and lan-cut "
                   "move nothing: watched for 4 s")
@click.option("--runs", type=click.IntRange(1, 20), default=1, help="repetitions of each kind")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def failover_cmd(ctx: Ctx, name: str | None, kinds: tuple[str, ...], runs: int, as_json: bool) -> None:
    """Client loop through the VIP while the master fails in each way and comes back; prints every outage."""
    lab = load_lab(name)
    results = []
    with Probe(lab) as probe:
        for _ in range(runs):
            for kind in kinds or KINDS:
                try:
                    r = measure(lab, probe, kind, timeout=4.0 if kind in QUIET else 20.0)
                except LabError as e:
                    fail(str(e), 1)
                results.append(r)
                if not as_json:
                    click.echo(fmt_result(r))
    if as_json:
        emit_json(results)

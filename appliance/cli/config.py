"""`appliance check` and `appliance render`: validate the cluster file and show one node's effective config."""
from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from appliance.cli import Ctx, emit_json, fail, main
from appliance.core import reference
from appliance.core.loader import to_data
from appliance.core.model import Appliance
from filters import ruleset
from filters.lists import count_file

LIST_FILES = ("domains", "urls", "expressions")


def list_summary(cfg: Appliance, base: Path) -> dict:
    """Per category: entries and bad lines per list file, counted by the rule engine's own parser (as the proxy sees them)."""
    lists_dir = cfg.lists_dir(base)
    out: dict = {}
    for cat in sorted(cfg.filter.categories()):
        entry: dict = {"entries": 0, "bad_lines": 0, "files": {}}
        for name in LIST_FILES:
            f = lists_dir / cat / name
            if not f.exists():
                continue
            good, bad = count_file(f, name)
            entry["files"][name] = {"entries": good, "bad_lines": bad}
            entry["entries"] += good
            entry["bad_lines"] += bad
        out[cat] = entry
    return out


def summary(cfg: Appliance, path: Path) -> dict:
    c = cfg.cluster
    return {
        "ok": True,
        "config": str(path),
        "cluster": {
            "vip": str(c.vip),
            "vhid": c.vhid,
            "advbase": c.advbase,
            "preempt": c.preempt,
            "interface": c.interface,
            "sync_interface": c.sync_interface,
            "freebsd": c.freebsd,
            "expected_master": cfg.expected_master(),
            "extra_vhids": [{"vhid": x.vhid, "vip": str(x.vip)} for x in c.extra_vhids],
        },
        "nodes": {
            name: {"lan": str(n.lan), "sync": str(n.sync), "advskew": n.advskew}
            for name, n in sorted(cfg.nodes.items(), key=lambda kv: kv[1].advskew)
        },
        "proxy": {
            "listen": f"{cfg.proxy.listen}:{cfg.proxy.port}",
            "clients": [str(n) for n in cfg.proxy.clients],
            "tls": cfg.proxy.tls,
            "workers": cfg.proxy.worker_count(),
        },
        "filter": {
            "block": cfg.filter.block,
            "allow": cfg.filter.allow,
            "policies": [
                {"name": p.name or f"policy[{i}]", "clients": [str(n) for n in p.clients], "block": p.block, "allow": p.allow,
                 "schedule": str(p.schedule) if p.schedule else None}
                for i, p in enumerate(cfg.filter.policies)
            ],
            "lists": list_summary(cfg, path.resolve().parent),
        },
        "sync": {"schedule": cfg.sync.schedule, "user": cfg.sync.user, "keep_releases": cfg.sync.keep_releases},
    }


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    c = s["cluster"]
    con.print(f"[bold]{s['config']}[/bold]: OK")
    con.print(f"cluster: VIP {c['vip']} vhid {c['vhid']} advbase {c['advbase']} preempt {'on' if c['preempt'] else 'off'} "
              f"on {c['interface']} (sync link on {c['sync_interface']}), FreeBSD {c['freebsd']}")
    for x in c["extra_vhids"]:
        con.print(f"  extra: vhid {x['vhid']} VIP {x['vip']}")
    t = Table("node", "lan", "sync", "advskew", "expected role")
    for name, n in s["nodes"].items():
        t.add_row(name, n["lan"], n["sync"], str(n["advskew"]), "MASTER" if name == c["expected_master"] else "BACKUP")
    con.print(t)
    p = s["proxy"]
    con.print(f"proxy: {p['listen']} tls={p['tls']} workers={p['workers']} clients={', '.join(p['clients'])}")
    f = s["filter"]
    con.print(f"filter: block {', '.join(f['block']) or '-'}; allow {', '.join(f['allow']) or '-'}; {len(f['policies'])} policies")
    lt = Table("category", "entries", "bad lines")
    for cat, e in f["lists"].items():
        lt.add_row(cat, str(e["entries"]), str(e["bad_lines"]))
    con.print(lt)
    sy = s["sync"]
    con.print(f"sync: '{sy['schedule']}' as {sy['user']}, keep {sy['keep_releases']} releases")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--compile", "compile_", is_flag=True, help="also compile the lists into the index the proxy maps")
@click.pass_obj
def check(ctx: Ctx, as_json: bool, compile_: bool) -> None:
    """Validate the cluster file and the list directories; print a summary of the cluster."""
    cfg = ctx.cfg
    s = summary(cfg, ctx.config_path)
    if compile_:
        try:
            rep = ruleset.compile_index(cfg, ctx.base_dir)
        except (ruleset.ListError, OSError) as e:
            fail(str(e))
        s["filter"]["index"] = {"path": str(rep.path), "entries": rep.entries, "bad_lines": rep.bad_count,
                                "seconds": round(rep.seconds, 3), "bytes": rep.size, "parsed": rep.parsed,
                                "reused": rep.reused}
        s["filter"]["index"]["bad"] = rep.bad
        if not as_json:
            for b in rep.bad:  # file:line: why, so the admin can fix the list
                click.echo(f"appliance: warning: bad list line skipped: {b}", err=True)
            if rep.bad_count > len(rep.bad):
                click.echo(f"appliance: warning: ... {rep.bad_count - len(rep.bad)} more bad lines", err=True)
            click.echo(f"index: {rep.path}: {rep.entries} entries, {rep.bad_count} bad lines skipped, "
                       f"{rep.size} bytes, compiled in {rep.seconds:.2f} s", err=True)
    if as_json:
        emit_json(s)
    else:
        print_summary(s)


def effective(cfg: Appliance, node: str, reveal: bool) -> dict:
    """This node's view: its own addresses and skew, its peers, and every section with defaults filled in."""
    data = to_data(cfg, reveal_secrets=reveal)
    n = cfg.nodes[node]
    cluster = data.pop("cluster")
    nodes = data.pop("nodes")
    me = nodes.pop(node)
    return {
        "node": node,
        "hostname": n.hostname or node,
        "role_expected": "MASTER" if cfg.expected_master() == node else "BACKUP",
        "carp": {**{k: cluster[k] for k in ("vip", "vhid", "password", "advbase", "preempt", "interface")},
                 "advskew": n.advskew, "srcip": str(n.lan.ip), "extra_vhids": [
                     {"vhid": x.vhid, "vip": str(x.vip), "advskew": x.advskew.get(node, n.advskew)} for x in cfg.cluster.extra_vhids]},
        "lan": me["lan"],
        "sync_link": {"address": me["sync"], "interface": cluster["sync_interface"]},
        "peers": nodes,
        "freebsd": cluster["freebsd"],
        "proxy": {**data.pop("proxy"), "workers": cfg.proxy.worker_count()},
        **data,
    }


@main.command()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML")
@click.option("--show-secrets", is_flag=True, help="include the CARP password (otherwise masked)")
@click.pass_obj
def render(ctx: Ctx, as_json: bool, show_secrets: bool) -> None:
    """Print the effective configuration of this node (defaults filled in, this node's values picked)."""
    eff = effective(ctx.cfg, ctx.node, show_secrets)
    if as_json:
        emit_json(eff)
    else:
        sys.stdout.write(yaml.safe_dump(eff, sort_keys=False))


@main.command("config-reference")
@click.option("--update", "readme", metavar="README", type=click.Path(exists=True, dir_okay=False), help="rewrite the generated block in this README")
def config_reference(readme: str | None) -> None:
    """Print the config reference table (generated from the config model)."""
    if readme:
        changed = reference.update_readme(Path(readme))
        click.echo(f"{readme}: {'updated' if changed else 'already current'}")
    else:
        click.echo(reference.markdown())

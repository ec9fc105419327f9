"""`appliance proxy`, `appliance reload` and `appliance explain`: run the filter proxy, reload it, ask it why."""
from __future__ import annotations

import datetime as dt
import ipaddress
import sys

import click

from appliance.cli import Ctx, emit_json, fail, main
from appliance.core.errors import ConfigError
from appliance.core.loader import load
from filters import ruleset
from filters.index import IndexFormatError
from filters.lists import norm_host
from filters.proxy import control as proxyctl
from filters.proxy import main as proxy_main


@main.command()
@click.option("--listen", metavar="HOST:PORT", help="override proxy.listen and proxy.port")
@click.option("--access-log", metavar="PATH|-", help="override proxy.access_log ('-' = stdout)")
@click.pass_obj
def proxy(ctx: Ctx, listen: str | None, access_log: str | None) -> None:
    """Run the filtering proxy (workers, SIGHUP reload, SIGUSR1 log reopen, /metrics on loopback)."""
    sys.exit(proxy_main.run(ctx.config_path, listen, access_log))


@main.command()
@click.pass_obj
def reload(ctx: Ctx) -> None:
    """Check the config and lists, then tell the running proxy to reload them (old rules stay if they fail)."""
    try:
        cfg = load(ctx.config_path)
        ruleset.ensure_index(cfg, ctx.base_dir)
    except ConfigError as e:
        fail(f"{e}\nnot reloading: the proxy keeps its current rules")
    except ruleset.ListError as e:
        fail(f"{e}\nnot reloading: the proxy keeps its current rules")
    try:
        pid = proxyctl.reload()
    except RuntimeError as e:
        fail(str(e), 1)
    click.echo(f"reload requested (proxy pid {pid})")


@main.command()
@click.argument("url")
@click.option("--client", default="127.0.0.1", show_default=True, metavar="IP", help="client address to decide for")
@click.option("--at", "at", metavar='"YYYY-MM-DD HH:MM"', help="local time to decide at (schedules); default now")
@click.option("--sni", metavar="HOST", help="TLS SNI the client sends (CONNECT tunnels)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.pass_obj
def explain(ctx: Ctx, url: str, client: str, at: str | None, sni: str | None, as_json: bool) -> None:
    """What would the proxy do with URL, and why (verdict, category, list file:line, policy). Sends no traffic."""
    when = None
    if at:
        try:
            when = dt.datetime.strptime(at.strip(), "%Y-%m-%d %H:%M")
        except ValueError:
            fail(f'--at {at!r}: expected "YYYY-MM-DD HH:MM"')
    try:
        ipaddress.IPv4Address(client)
    except ValueError:
        fail(f"--client {client!r}: not an IPv4 address")
    host, full, connect = _target(url)
    if host is None:
        fail(f"{url!r}: not a URL or host name")
    port = _port(url)
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        fail(f"{url!r}: port {port!r} is not 1-65535")
    try:
        cfg, engine, _ = ruleset.load(ctx.config_path)
    except ConfigError as e:
        fail(str(e))
    except (ruleset.ListError, IndexFormatError) as e:
        fail(str(e))
    if full.lower().startswith("https://") and cfg.proxy.tls == "sni":
        connect = True  # without interception the proxy sees only the CONNECT host and the SNI
    d = engine.decide(client, host, None if connect else full, when)
    step = "CONNECT" if connect else "request"
    if connect and not d.blocked and sni:
        d2 = engine.decide(client, sni, None, when)
        if d2.blocked:
            d, step = d2, "TLS SNI"
    out = {"url": url, "client": client, "at": (when or engine.clock()).strftime("%Y-%m-%d %H:%M"), "step": step,
           "tls": cfg.proxy.tls, **d.to_json()}
    if as_json:
        emit_json(out)
        return
    what = {"allow": "ALLOW", "block": "BLOCK", "deny": "DENY (client not in proxy.clients)"}[d.verdict]
    click.echo(f"{what}: {url} for {client} at {out['at']} ({step})")
    if d.category:
        click.echo(f"  category: {d.category}")
    if d.source:
        click.echo(f"  source:   {d.source}" + (f"  (entry {d.rule})" if d.rule else ""))
    if d.policy:
        click.echo(f"  policy:   {d.policy}" + (f" (schedule {d.schedule})" if d.schedule else ""))
    if d.verdict == "allow" and not d.category:
        click.echo("  no list matched")


def _target(url: str) -> tuple[str | None, str, bool]:
    """(host, full URL, is a CONNECT target) from 'http://h/p', 'https://h/p', 'h:443' or 'h'."""
    u = url.strip()
    if "://" in u:
        scheme, rest = u.split("://", 1)
        hostport = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        host = norm_host(hostport)
        return host, u, False
    if "/" in u:
        hostport = u.split("/", 1)[0]
        return norm_host(hostport), "http://" + u, False
    host = norm_host(u)
    connect = u.rsplit(":", 1)[-1] == "443" if ":" in u else False
    return host, f"http://{u}/", connect


def _port(url: str) -> str | None:
    """The port written in URL's authority ('h:8080', 'http://h:8080/p', '[v6]:443'), else None."""
    u = url.strip()
    hostport = u.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    if hostport.startswith("["):
        rest = hostport.partition("]")[2]
        return rest[1:] if rest.startswith(":") else None
    return hostport.rpartition(":")[2] if hostport.count(":") == 1 else None

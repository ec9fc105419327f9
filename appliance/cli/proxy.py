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
from filters.hosts import BadHost, canonical_host, host_port
from filters.proxy import control as proxyctl
from filters.proxy import main as proxy_main
from filters.proxy.guard import Guard, bad_host


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
    _refuse_unusable(url, _split(url, "sni")[0])  # before loading: a bad argument compiles no index
    try:
        cfg, engine, _ = ruleset.load(ctx.config_path)
    except ConfigError as e:
        fail(str(e))
    except (ruleset.ListError, IndexFormatError) as e:
        fail(str(e))
    guard = Guard.from_config(cfg)
    d, step, host, port, connect, refused = _decide(url, client, sni, when, cfg, engine, guard)
    out = {"url": url, "client": client, "at": (when or engine.clock()).strftime("%Y-%m-%d %H:%M"), "step": step,
           "tls": cfg.proxy.tls, "host": host, "port": port, "method": "CONNECT" if connect else "GET", **d.to_json(),
           "reason": refused.reason if refused else None, "status": refused.status if refused else
           (403 if d.verdict != "allow" else None)}
    if as_json:
        emit_json(out)
        return
    what = {"allow": "ALLOW", "block": "BLOCK", "deny": "DENY (client not in proxy.clients)"}[d.verdict]
    click.echo(f"{what}: {url} for {client} at {out['at']} ({step})")
    if d.category:
        click.echo(f"  category: {d.category}")
    if d.source:
        click.echo(f"  source:   {d.source}" + (f"  (entry {d.rule})" if d.rule and refused is None else ""))
    if d.policy:
        click.echo(f"  policy:   {d.policy}" + (f" (schedule {d.schedule})" if d.schedule else ""))
    if refused is not None:
        click.echo(f"  reason:   {refused.reason} (HTTP {refused.status}, logged {refused.log_status})")
    if d.verdict == "allow" and not d.category:
        click.echo("  no list matched")
    if d.verdict == "allow" and host and not _is_ip(host):
        click.echo(f"  the proxy also checks every address {host} resolves to (not done here: explain sends no traffic)")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _split(url: str, tls: str) -> tuple[str, int | None, str | None, bool]:
    """(authority, default port, full URL or None, is a CONNECT) from 'http://h/p', 'https://h/p', 'h:443' or 'h/p'."""
    u = url.strip()
    if "://" in u:
        scheme, rest = u.split("://", 1)
        scheme = scheme.lower()
        authority, _, path = rest.partition("/")
        authority = authority.rsplit("@", 1)[-1]
        default = 443 if scheme == "https" else 80
        if scheme == "https" and tls == "sni":
            return authority, default, None, True  # without interception the proxy sees the CONNECT host and the SNI
        return authority, default, "/" + path, False
    authority, slash, path = u.partition("/")
    if slash:
        return authority, 80, "/" + path, False
    return authority, None, None, True  # host:port, as a CONNECT target


def _refuse_unusable(url: str, authority: str) -> None:
    """Bad CLI input (exit 2): what no request line can carry (nothing, white space, control characters) or a port
    outside 1-65535. A host that could be sent but is not a valid name gets the proxy's own answer (bad-host) instead."""
    if not authority or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url.strip()):
        fail(f"{url!r}: not a URL or host name")
    port = authority.rpartition("]")[2].rpartition(":")[2] if ":" in authority.rpartition("]")[2] else None
    if port is not None and not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        fail(f"{url!r}: port {port!r} is not 1-65535")


def _decide(url: str, client: str, sni: str | None, when, cfg, engine, guard: Guard):
    """The proxy's own order (filters/proxy/addon.py, tunnel.py): the host model (bad-host), the client ACL, the guard
    (never-proxied addresses, ports), the lists, then the SNI. Returns (decision, step, host, port, connect, Refusal)."""
    authority, default, path, connect = _split(url, cfg.proxy.tls)
    if connect and default is None and ":" not in authority.rpartition("]")[2]:
        default = 80  # a bare host name: explained as plain HTTP to it
        connect, path = False, "/"
    try:
        host, port = host_port(authority, default)
        if port is None:
            raise BadHost(authority, "a CONNECT target needs a port")
    except BadHost as e:
        r = bad_host(e)
        return r.as_decision(), "guard", None, None, connect, r
    full = None if connect else f"http://{host.authority}{'' if port == 80 else f':{port}'}{path}"
    if path is not None and url.strip().lower().startswith("https://"):
        full = f"https://{host.authority}{'' if port == 443 else f':{port}'}{path}"
    d = engine.decide(client, host.name, full, when)
    if d.verdict == "deny":
        return d, "CONNECT" if connect else "request", host.name, port, connect, None
    r = guard.check_target(host, port, connect)
    if r is not None:
        return r.as_decision(), "guard", host.name, port, connect, r
    step = "CONNECT" if connect else "request"
    if connect and not d.blocked and sni:
        try:
            name = canonical_host(sni).name
        except BadHost as e:
            r = bad_host(e)
            return r.as_decision(), "TLS SNI", host.name, port, connect, r
        if name != host.name:
            d2 = engine.decide(client, name, None, when)
            if d2.blocked:
                d, step = d2, "TLS SNI"
    return d, step, host.name, port, connect, None

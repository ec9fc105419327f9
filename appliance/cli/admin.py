"""`appliance admin serve|cert|hash-password`: the read-only status page (HTML, /status.json, /metrics) over HTTPS."""
from __future__ import annotations

import getpass
import grp
import logging
import os
import pwd
import signal
import sys
import threading
from pathlib import Path

import click

from appliance.admin import access, gather, probe, tls
from appliance.admin.server import AdminServer
from appliance.admin.traffic import Traffic
from appliance.cli import Ctx, fail, main
from appliance.cli.ha import collect_status
from appliance.core.loader import load
from filters.proxy import ca, metrics

log = logging.getLogger("appliance.admin")


@main.group("admin")
def admin_group() -> None:
    """The read-only status page of this node (docs/status-page.md)."""


def _metrics(ctx: Ctx) -> str:
    """The proxy's /metrics (it includes the HA files); when the proxy is down, the HA files alone."""
    text = probe.proxy_metrics(ctx.cfg.proxy.metrics_port)
    if text is not None:
        return text
    return "appliance_proxy_up 0\n" + metrics.node_files(ctx.paths.run)


def build(ctx: Ctx, port: int | None = None, access_log: str | None = None) -> AdminServer:
    """The server for this node's config: addresses, certificate, gate and sources (nothing bound yet)."""
    cfg, node, paths = ctx.cfg, ctx.node, ctx.paths
    addresses = access.bind_addresses(cfg, node)
    # made by `admin cert` (root) before the service starts; made here only for a hand-run server (tests)
    cert, key = tls.ensure_cert(paths, node, addresses, _ca_pem(ctx))
    me = cfg.nodes[node]
    peers = gather.Peers({n: str(x.sync.ip) for n, x in cfg.nodes.items() if n != node}, cfg.admin.port,
                         str(me.sync.ip))
    sources = gather.Sources(paths=paths, status=lambda: collect_status(ctx, probe=False),
                             metrics=lambda: _metrics(ctx), traffic=Traffic(access_log or cfg.proxy.access_log),
                             peers=peers)
    return AdminServer(addresses, cfg.admin.port if port is None else port, tls.server_context(cert, key),
                       access.Gate.from_config(cfg, node), sources)


def node_file(ctx: Ctx) -> Path:
    """This node's name as `admin cert` resolved it (as root), beside the certificate."""
    return ctx.paths.state / "admin" / "node"


def _ca_pem(ctx: Ctx) -> Path:
    return ca.ca_dir(ctx.base_dir) / f"{ca.BASENAME}-ca.pem"


@admin_group.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="instead of admin.port (0: any free one)")
@click.option("--access-log", metavar="FILE", help="instead of proxy.access_log (the chart and today's summary)")
@click.option("--config-copy", metavar="FILE", help="read the cluster file's text from FILE, a copy only this server "
              "can read (systemd's LoadCredential=); -c still names the original (the node identity beside it)")
@click.pass_obj
def serve_cmd(ctx: Ctx, port: int | None, access_log: str | None, config_copy: str | None) -> None:
    """Serve the status page in the foreground until SIGTERM (for systemd and rc.d)."""
    if config_copy:
        # the list directories sit beside the original, which this user cannot see: the proxy checks them
        ctx._cfg = load(config_copy, check_lists=False)  # noqa: SLF001 - the one config this command then uses
    # node.yaml is root's (unreadable to the server's user): `admin cert`, run as root first, wrote the name here
    named = node_file(ctx)
    if not ctx.node_arg and not os.environ.get("APPLIANCE_NODE") and named.is_file():
        ctx.node_arg = named.read_text(encoding="utf-8").strip()
    server = build(ctx, port, access_log)
    try:
        bound = server.start()
    except OSError as e:
        fail(f"admin: {e}", 1)
    where = ", ".join(f"https://{a}:{p}/" for a, p in bound)
    auth = "password required (but for the peers' /status.json)" if ctx.cfg.admin.password_hash else "no password"
    click.echo(f"admin: status page on {where} ({auth})", err=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()


@admin_group.command("cert")
@click.option("--owner", metavar="USER", help="give the key (0600) and the certificate to USER, the server's user")
@click.pass_obj
def cert_cmd(ctx: Ctx, owner: str | None) -> None:
    """Make the status page's certificate and key if they are missing (as root, before the server starts: signing
    reads the appliance CA's key, which the server itself must never be able to read)."""
    node = ctx.node
    cert, key = tls.ensure_cert(ctx.paths, node, access.bind_addresses(ctx.cfg, node), _ca_pem(ctx))
    named = node_file(ctx)
    named.write_text(node + "\n", encoding="utf-8")  # not a secret: the server, which cannot read node.yaml, reads this
    os.chmod(named, 0o644)
    if owner:
        try:
            user = pwd.getpwnam(owner)
        except KeyError:
            fail(f"admin cert --owner: no user {owner!r}")
        for f in (cert, key):
            os.chown(f, user.pw_uid, user.pw_gid)
        os.chmod(key, 0o600)
        click.echo(f"admin: {cert} and {key} belong to {owner} ({grp.getgrgid(user.pw_gid).gr_name})", err=True)


@admin_group.command("hash-password")
@click.option("--rounds", type=click.IntRange(10, 16), default=12, show_default=True, help="bcrypt cost")
def hash_password_cmd(rounds: int) -> None:
    """Read a password (twice from a terminal, one line from stdin otherwise); print its bcrypt hash for
    admin.password_hash."""
    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            fail("the two passwords differ; nothing printed")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        fail("empty password; nothing printed")
    if len(pw.encode()) > 72:
        fail("bcrypt uses only the first 72 bytes of a password: use a shorter one")
    click.echo(access.hash_password(pw, rounds))

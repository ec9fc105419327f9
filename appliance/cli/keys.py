"""`appliance keys init|authorize|revoke|known-hosts`: this node's own sync key, the peers' authorized_keys lines
(per node, revocable alone), the pinned host keys."""
from __future__ import annotations

import pwd
import stat
from pathlib import Path

import click

from appliance.cli import Ctx, fail, main
from appliance.core.fsio import write_text_atomic
from appliance.core.model import Appliance
from sync import keys as keymod


@main.group("keys")
def keys_group() -> None:
    """The sync key pair and the peers' authorized_keys lines."""


def _make_key(key: Path, force: bool, comment: str = "appliance-sync") -> str:
    """Make the sync key unless it exists (or --force); its public line."""
    pub = key.with_name(key.name + ".pub")
    if key.exists() and not force:
        click.echo(f"# {key} exists (--force replaces it)", err=True)
    else:
        try:
            keymod.keygen(key, comment)
        except keymod.KeygenError as e:
            fail(str(e), 1)
        click.echo(f"# wrote {key} (0600) and {pub}", err=True)
    pubkey = pub.read_text().strip() if pub.exists() else ""
    if not pubkey:
        fail(f"{pub}: missing or empty; run `appliance keys init --force`", 1)
    return pubkey


def _print_rules(cfg: Appliance, elevate: str, appliance_bin: str) -> None:
    rule_file, rules = keymod.elevation_rules(elevate, cfg.sync.user, appliance_bin)
    if rules:
        click.echo(f"# on every node, {rule_file} (root-owned, mode 0440/0600) must hold:")
        click.echo("".join(f"#   {r}\n" for r in rules), nl=False)
    elif cfg.sync.user == "root":
        click.echo("# sync.user is root: the peers' sshd needs `PermitRootLogin forced-commands-only`")


@keys_group.command("init")
@click.option("--force", is_flag=True, help="replace an existing key pair")
@click.option("--for", "for_node", metavar="NODE", help="print only the line NODE must authorise")
@click.option("--appliance-bin", default="/usr/local/bin/appliance", show_default=True,
              help="the appliance command on the peers (the forced command runs `<it> sync-serve`)")
@click.option("--elevate", type=click.Choice(["auto", *keymod.ELEVATE]), default="auto", show_default=True,
              help="how the forced command becomes root on the peers: doas (FreeBSD), sudo (Linux), none (sync.user: root); "
                   "auto picks none for root, else doas on FreeBSD, sudo elsewhere")
@click.pass_obj
def keys_init(ctx: Ctx, force: bool, for_node: str | None, appliance_bin: str, elevate: str = "auto") -> None:
    """Make THIS node's own ed25519 sync key (0600, node-local, never synced); print the line each peer authorises."""
    cfg, me = ctx.cfg, ctx.node
    if for_node is not None and (for_node not in cfg.nodes or for_node == me):
        fail(f"--for: {for_node!r} is not one of the other nodes ({', '.join(n for n in cfg.nodes if n != me)})")
    if elevate == "auto":
        elevate = keymod.default_elevate(cfg.sync.user)
    try:  # before the key is made: a bad --appliance-bin leaves nothing behind
        keymod.serve_command(appliance_bin, elevate)
    except ValueError as e:
        fail(f"--appliance-bin: {e}")
    key = ctx.paths.sync_key
    key.parent.mkdir(parents=True, exist_ok=True)
    key.parent.chmod(0o700)
    pubkey = _make_key(key, force, f"{keymod.KEY_COMMENT}@{me}")
    nodes = [for_node] if for_node else [n for n in cfg.nodes if n != me]
    if not for_node:
        _print_rules(cfg, elevate, appliance_bin)
        legacy = keymod.sync_key(ctx.base_dir)
        if legacy.exists():
            click.echo(f"# the old shared key {legacy} is no longer used by {me}: once every node has its own, delete "
                       f"keys/{keymod.SYNC_KEY}* from the tree on the master and sync; remove its lines (ending "
                       f"`{keymod.KEY_COMMENT}`) from each node's authorized_keys")
    for n in nodes:
        if not for_node:
            click.echo(f"# {n}: `appliance keys authorize {me} FILE.pub` there, or add to ~{cfg.sync.user}/.ssh/authorized_keys:")
        click.echo(keymod.authorized_keys_line(cfg, n, pubkey, appliance_bin, elevate=elevate, owner=me))


def _authorized_keys(ctx: Ctx, path: str | None) -> Path:
    if path:
        return Path(path)
    try:
        return Path(pwd.getpwnam(ctx.cfg.sync.user).pw_dir) / ".ssh" / "authorized_keys"
    except KeyError:
        fail(f"sync.user {ctx.cfg.sync.user!r} does not exist on this node; pass --authorized-keys FILE")


@keys_group.command("authorize")
@click.argument("peer", metavar="NODE")
@click.argument("pubfile", type=click.Path(dir_okay=False))
@click.option("--authorized-keys", "ak", metavar="FILE", help="default: ~<sync.user>/.ssh/authorized_keys")
@click.option("--appliance-bin", default="/usr/local/bin/appliance", show_default=True)
@click.option("--elevate", type=click.Choice(["auto", *keymod.ELEVATE]), default="auto", show_default=True)
@click.pass_obj
def keys_authorize(ctx: Ctx, peer: str, pubfile: str, ak: str | None, appliance_bin: str, elevate: str) -> None:
    """Let NODE's own sync key (PUBFILE) push to this node: its line replaces any earlier line of NODE's."""
    cfg, me = ctx.cfg, ctx.node
    if peer not in cfg.nodes or peer == me:
        fail(f"{peer!r} is not one of the other nodes ({', '.join(n for n in cfg.nodes if n != me)})")
    words = Path(pubfile).read_text().split() if Path(pubfile).is_file() else []
    if len(words) < 2 or not words[0].startswith("ssh-"):
        fail(f"{pubfile}: not an OpenSSH public key")
    elevate = keymod.default_elevate(cfg.sync.user) if elevate == "auto" else elevate
    path = _authorized_keys(ctx, ak)
    text, _, _ = keymod.revoke(path.read_text() if path.exists() else "", peer)
    line = keymod.authorized_keys_line(cfg, me, " ".join(words[:2]), appliance_bin, elevate=elevate, owner=peer)
    write_text_atomic(path, text + line + "\n", 0o600 if cfg.sync.user == "root" else 0o640)
    click.echo(f"{path}: {peer}'s sync key authorised (from {cfg.nodes[peer].sync.ip} only)")


@keys_group.command("revoke")
@click.argument("peer", metavar="NODE")
@click.option("--authorized-keys", "ak", metavar="FILE", help="default: ~<sync.user>/.ssh/authorized_keys")
@click.pass_obj
def keys_revoke(ctx: Ctx, peer: str, ak: str | None) -> None:
    """Stop NODE's sync key pushing to this node (run it on every other node); the other nodes' keys keep working."""
    if peer not in ctx.cfg.nodes:
        fail(f"{peer!r} is not one of the nodes ({', '.join(ctx.cfg.nodes)})")
    path = _authorized_keys(ctx, ak)
    if not path.exists():
        fail(f"{path}: no such file", 1)
    text, removed, shared = keymod.revoke(path.read_text(), peer)
    write_text_atomic(path, text, stat.S_IMODE(path.stat().st_mode))
    click.echo(f"{path}: {removed} line(s) of {peer}'s key removed")
    if shared:
        click.echo(f"warning: {shared} line(s) of the old SHARED key remain: every peer holds that key, so {peer} can "
                   f"still push with it; re-key every peer (`appliance keys init`) and remove them (docs/security.md)", err=True)
    if not removed:
        fail(f"{path}: no line of {peer}'s own key (ending `{keymod.KEY_COMMENT}@{peer}`)", 1)


@keys_group.command("known-hosts")
@click.argument("pairs", nargs=-1, metavar="[NODE=HOST_KEY.pub]...")
@click.pass_obj
def keys_known_hosts(ctx: Ctx, pairs: tuple[str, ...]) -> None:
    """Pin the nodes' SSH host keys: write keys/known_hosts (sync address [+ port] -> key; never trust-on-first-use).

    Without arguments the keys come from keys/hosts/<node>/ssh_host_ed25519_key.pub in the config dir."""
    cfg = ctx.cfg
    given: dict[str, Path] = {}
    for p in pairs:
        node, eq, path = p.partition("=")
        if not eq or node not in cfg.nodes:
            fail(f"{p!r}: expected NODE=FILE with NODE one of {', '.join(cfg.nodes)}")
        given[node] = Path(path)
    if not pairs:
        given = {n: keymod.host_key(ctx.base_dir, n).with_suffix(".pub") for n in cfg.nodes}
    pubs = {}
    for node, path in given.items():
        try:
            words = path.read_text().split()
        except OSError as e:
            fail(f"{path}: cannot read the host key of {node}: {e.strerror}")
        if len(words) < 2 or not words[0].startswith(("ssh-", "ecdsa-")):
            fail(f"{path}: not an OpenSSH public key (host key of {node})")
        pubs[node] = " ".join(words[:2])
    out = keymod.known_hosts(ctx.base_dir)
    write_text_atomic(out, "".join(l + "\n" for l in keymod.known_hosts_lines(cfg, pubs)), 0o644)
    click.echo(f"wrote {out}: {', '.join(pubs)}")

"""`appliance keys init|known-hosts`: the sync key pair, the peers' authorized_keys lines, the pinned host keys."""
from __future__ import annotations

from pathlib import Path

import click

from appliance.cli import Ctx, fail, main
from appliance.core.fsio import write_text_atomic
from appliance.core.model import Appliance
from sync import keys as keymod


@main.group("keys")
def keys_group() -> None:
    """The sync key pair and the peers' authorized_keys lines."""


def _make_key(key: Path, force: bool) -> str:
    """Make the sync key unless it exists (or --force); its public line."""
    pub = key.with_name(key.name + ".pub")
    if key.exists() and not force:
        click.echo(f"# {key} exists (--force replaces it)", err=True)
    else:
        try:
            keymod.keygen(key, "appliance-sync")
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
@click.option("--for", "for_node", metavar="NODE", help="print only NODE's authorized_keys line")
@click.option("--appliance-bin", default="/usr/local/bin/appliance", show_default=True,
              help="the appliance command on the peers (the forced command runs `<it> sync-serve`)")
@click.option("--elevate", type=click.Choice(["auto", *keymod.ELEVATE]), default="auto", show_default=True,
              help="how the forced command becomes root on the peers: doas (FreeBSD), sudo (Linux), none (sync.user: root); "
                   "auto picks none for root, else doas on FreeBSD, sudo elsewhere")
@click.pass_obj
def keys_init(ctx: Ctx, force: bool, for_node: str | None, appliance_bin: str, elevate: str = "auto") -> None:
    """Make the ed25519 sync key (0600) in the config tree; print the authorized_keys line(s) for the peers."""
    cfg = ctx.cfg
    if for_node is not None and for_node not in cfg.nodes:
        fail(f"--for: {for_node!r} is not one of the nodes ({', '.join(cfg.nodes)})")
    if elevate == "auto":
        elevate = keymod.default_elevate(cfg.sync.user)
    try:  # before the key is made: a bad --appliance-bin leaves nothing behind
        keymod.serve_command(appliance_bin, elevate)
    except ValueError as e:
        fail(f"--appliance-bin: {e}")
    pubkey = _make_key(keymod.sync_key(ctx.base_dir), force)
    nodes = [for_node] if for_node else list(cfg.nodes)
    try:
        lines = {n: keymod.authorized_keys_line(cfg, n, pubkey, appliance_bin, elevate=elevate) for n in nodes}
    except ValueError as e:
        fail(f"--appliance-bin: {e}")
    if not for_node:
        _print_rules(cfg, elevate, appliance_bin)
    for n in nodes:
        if not for_node:
            click.echo(f"# ~{cfg.sync.user}/.ssh/authorized_keys on {n}:")
        click.echo(lines[n])


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

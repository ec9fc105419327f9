"""`appliance sync`, `sync-receive`, `sync-serve`, `releases`, `keys init`, `cron`: config sync master -> backups."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import click

from appliance.core import config as cfgmod
from sync import keys as keymod
from appliance.cli import Ctx, emit_json, fail, main

CRON_FILE = "/etc/cron.d/appliance-sync"


def _sync_error(e: Exception, as_json: bool) -> None:
    code = getattr(e, "code", 2)
    if as_json:
        emit_json({"ok": False, "error": str(e), "exit": code})
        sys.exit(code)
    fail(str(e), code)


def _print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=False)
    if r.get("skipped"):
        con.print(r["skipped"])
        return
    head = f"generation {r['generation']}"
    head += f" (cut from the tree: {'; '.join(r['reasons'])})" if r.get("cut") else " (no change on this node)"
    con.print(("[dry run] " if r.get("dry_run") else "") + head)
    t = Table("peer", "action", "was", "added", "changed", "removed", "bytes sent", "seconds", "message")
    for p in r["peers"]:
        t.add_row(p["peer"], p["action"], str(p.get("generation_before", "?")), str(len(p.get("added", []))),
                  str(len(p.get("changed", []))), str(len(p.get("removed", []))), str(p.get("bytes_sent", "-")),
                  str(p.get("seconds", "-")), p.get("error", "") or "")
    con.print(t)
    con.print(f"{'OK' if r['ok'] else 'FAILED: ' + ', '.join(r['failed'])} in {r['seconds']} s")


@main.command("sync")
@click.option("--dry-run", is_flag=True, help="show what would be cut and sent; change nothing")
@click.option("--force", is_flag=True, help="push even if a peer's generation is newer (cuts a generation above it)")
@click.option("--json", "as_json", is_flag=True, help="JSON report (for cron and scripts)")
@click.option("--bwlimit", type=click.IntRange(1, 10**9), metavar="KBPS", help="rsync bandwidth limit per peer")
@click.pass_obj
def sync_cmd(ctx: Ctx, dry_run: bool, force: bool, as_json: bool, bwlimit: int | None) -> None:
    """On the MASTER: cut a generation if the tree changed, push it to every peer's staging dir, swap it in there.

    Exit 0 ok (or not MASTER: a logged no-op), 1 a peer failed, 2 bad input / config refused,
    3 split brain, 4 a peer is newer, 5 another sync is running."""
    from sync.errors import SyncError
    from sync.push import sync as do_sync

    try:
        ctx._cfg = cfgmod.load(ctx.config_path)
    except cfgmod.ConfigError as e:
        _sync_error(e, as_json)
    cfg, node = ctx.cfg, ctx.node
    progress_cb = None  # replaced by the rich progress bar on a terminal
    bar = None
    if not as_json and sys.stdout.isatty():
        from rich.progress import Progress, SpinnerColumn, TextColumn, BarColumn

        bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), transient=True)
        tasks: dict[str, int] = {}
        steps = {"status": 0, "cut": 0, "transfer": 1, "receive": 2, "done": 3, "failed": 3}

        def progress_cb(peer: str, stage: str) -> None:
            if peer not in tasks:
                tasks[peer] = bar.add_task(peer, total=3)
            bar.update(tasks[peer], description=f"{peer}: {stage}", completed=steps.get(stage, 0))

        bar.start()
    try:
        report = do_sync(cfg, node, ctx.config_path, cfgmod.state_dir(), force=force, dry_run=dry_run, bwlimit=bwlimit,
                         progress=progress_cb)
    except SyncError as e:
        if bar:
            bar.stop()
        _sync_error(e, as_json)
    if bar:
        bar.stop()
    if as_json:
        emit_json(report)
    else:
        _print_report(report)
    sys.exit(report["exit"])


@main.command("sync-receive")
@click.argument("generation")
@click.argument("digest", metavar="HASH")
@click.option("--force", is_flag=True, help="accept a generation not newer than the live one")
@click.option("--json", "as_json", is_flag=True)
def sync_receive(generation: str, digest: str, force: bool, as_json: bool) -> None:
    """Check the staged tree (<state>/sync/staging) and swap it in as GENERATION (what the master runs over SSH)."""
    from sync.errors import SyncError
    from sync.receive import receive, source_of_connection
    from sync.releases import parse_generation, parse_hash

    try:
        r = receive(cfgmod.state_dir(), parse_generation(generation), parse_hash(digest), force, source=source_of_connection())
    except SyncError as e:
        _sync_error(e, as_json)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"generation {r['generation']}: {r['action']} (was {r['previous']})")


@main.command("sync-serve")
def sync_serve() -> None:
    """The forced command of the sync key on a peer: runs SSH_ORIGINAL_COMMAND if it is a sync command."""
    from sync.serve import dispatch

    sys.exit(dispatch(os.environ.get("SSH_ORIGINAL_COMMAND"), cfgmod.state_dir()))


@main.command("releases")
@click.option("--rollback", "rollback_to", metavar="GEN", help="make release GEN live again (and reload the proxy)")
@click.option("--json", "as_json", is_flag=True)
def releases_cmd(rollback_to: str | None, as_json: bool) -> None:
    """List this node's config generations (time, hash, live), or roll back to one."""
    from sync.errors import SyncError
    from sync.receive import rollback
    from sync.releases import Releases, parse_generation

    state = cfgmod.state_dir()
    if rollback_to is not None:
        try:
            r = rollback(state, parse_generation(rollback_to, "--rollback"))
        except SyncError as e:
            _sync_error(e, as_json)
        if as_json:
            emit_json(r)
        else:
            click.echo(f"generation {r['generation']} is live (was {r['previous']}); {r['proxy']}")
        return
    rows = Releases(state).listing()
    if as_json:
        emit_json({"state": str(state), "releases": rows})
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("gen", "live", "time", "hash", "source", "intact")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["time"]).strftime("%Y-%m-%d %H:%M:%S") if r.get("time") else "-"
        t.add_row(str(r["generation"]), "*" if r["live"] else "", when, r["hash"][:16], str(r["source"]),
                  "yes" if r["intact"] else "EDITED")
    Console().print(t if rows else f"no releases in {state}/releases")


@main.group("keys")
def keys_group() -> None:
    """The sync key pair and the peers' authorized_keys lines."""


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
    key = keymod.sync_key(ctx.base_dir)
    pub = key.with_name(key.name + ".pub")
    if for_node is not None and for_node not in cfg.nodes:
        fail(f"--for: {for_node!r} is not one of the nodes ({', '.join(cfg.nodes)})")
    if elevate == "auto":
        elevate = keymod.default_elevate(cfg.sync.user)
    try:  # before the key is made: a bad --appliance-bin leaves nothing behind
        keymod.serve_command(appliance_bin, elevate)
    except ValueError as e:
        fail(f"--appliance-bin: {e}")
    if key.exists() and not force:
        click.echo(f"# {key} exists (--force replaces it)", err=True)
    else:
        key.parent.mkdir(parents=True, exist_ok=True)
        for p in (key, pub):
            p.unlink(missing_ok=True)
        old = os.umask(0o077)
        try:
            r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "appliance-sync", "-f", str(key)],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
        finally:
            os.umask(old)
        if r.returncode != 0:
            fail(f"ssh-keygen failed: {r.stderr.strip()}", 1)
        os.chmod(key, 0o600)
        os.chmod(pub, 0o644)
        click.echo(f"# wrote {key} (0600) and {pub}", err=True)
    pubkey = pub.read_text().strip() if pub.exists() else ""
    if not pubkey:
        fail(f"{pub}: missing or empty; run `appliance keys init --force`", 1)
    nodes = [for_node] if for_node else list(cfg.nodes)
    try:
        lines = {n: keymod.authorized_keys_line(cfg, n, pubkey, appliance_bin, elevate=elevate) for n in nodes}
    except ValueError as e:
        fail(f"--appliance-bin: {e}")
    rule_file, rules = keymod.elevation_rules(elevate, cfg.sync.user, appliance_bin)
    if not for_node:
        if rules:
            click.echo(f"# on every node, {rule_file} (root-owned, mode 0440/0600) must hold:")
            click.echo("".join(f"#   {r}\n" for r in rules), nl=False)
        elif cfg.sync.user == "root":
            click.echo("# sync.user is root: the peers' sshd needs `PermitRootLogin forced-commands-only`")
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
    lines = keymod.known_hosts_lines(cfg, pubs)
    out = keymod.known_hosts(ctx.base_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(l + "\n" for l in lines))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    click.echo(f"wrote {out}: {', '.join(pubs)}")


def cron_line(cfg: cfgmod.Appliance, config_path: Path, appliance_bin: str) -> str:
    return (f"{cfg.sync.schedule} root {appliance_bin} -c {config_path} sync --json "
            f">>/var/log/appliance/sync.json 2>&1")


@main.command("cron")
@click.option("--install", is_flag=True, help=f"write the line to {CRON_FILE} (or --file)")
@click.option("--file", "cron_file", default=CRON_FILE, show_default=True, help="cron.d file to install")
@click.option("--appliance-bin", default=None, help="the appliance command cron runs [default: this one]")
@click.pass_obj
def cron_cmd(ctx: Ctx, install: bool, cron_file: str, appliance_bin: str | None) -> None:
    """Print (or --install) the cron.d line that runs `appliance sync` on sync.schedule (on every node)."""
    from sync.check import appliance_bin as this_bin

    cfg = ctx.cfg
    if appliance_bin is not None and (not appliance_bin.startswith("/") or any(c.isspace() or c in "\\;&|<>`$'\"" for c in appliance_bin)):
        fail(f"--appliance-bin {appliance_bin!r}: must be one absolute path (cron runs the line through sh)")
    line = cron_line(cfg, Path(os.path.abspath(ctx.config_path)), appliance_bin or this_bin())
    if not install:
        click.echo(line)
        return
    path = Path(cron_file)
    text = ("# appliance config sync (written by `appliance cron --install`); runs on every node,\n"
            "# a no-op unless the node is MASTER\nSHELL=/bin/sh\nPATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin\n"
            f"{line}\n")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        fail(f"--file {path}: cannot write ({e.filename}: {e.strerror or e})")
    click.echo(f"installed {path}: {line}")

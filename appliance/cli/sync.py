"""`appliance sync`, `sync-receive`, `sync-serve`, `releases`, `cron`: config sync master -> backups."""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from appliance.cli import Ctx, emit_json, fail, main
from appliance.core.errors import ApplianceError
from appliance.core.fsio import write_text_atomic
from appliance.core.loader import load
from appliance.core.model import Appliance
from appliance.core.paths import appliance_bin as this_bin
from sync.errors import SyncError, failure_reply
from sync.releases import Releases, parse_generation, parse_hash

# rich, the master's push and the peer's receive are imported by the commands that use them: a peer runs
# `sync-serve` three times per push (status, rsync, receive), and each start-up pays for what this module imports.

CRON_FILE = "/etc/cron.d/appliance-sync"


def _sync_error(e: ApplianceError, as_json: bool) -> NoReturn:
    """With --json the error is the JSON answer (cron appends it to a JSON log): shown there, not on stderr."""
    if as_json:
        emit_json({"ok": False, "error": str(e), "exit": e.exit_code})
        e.reported = True
    raise e


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


def _progress_bar():
    """(rich progress bar, the sync's progress callback) for a terminal."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), transient=True)
    tasks: dict[str, int] = {}
    steps = {"status": 0, "cut": 0, "transfer": 1, "receive": 2, "done": 3, "failed": 3}

    def progress_cb(peer: str, stage: str) -> None:
        if peer not in tasks:
            tasks[peer] = bar.add_task(peer, total=3)
        bar.update(tasks[peer], description=f"{peer}: {stage}", completed=steps.get(stage, 0))

    return bar, progress_cb


@main.command("sync")
@click.option("--dry-run", is_flag=True, help="show what would be cut and sent; change nothing")
@click.option("--force", is_flag=True, help="push even if a peer's generation is newer (cuts a generation above it)")
@click.option("--json", "as_json", is_flag=True, help="JSON report (for cron and scripts)")
@click.option("--bwlimit", type=click.IntRange(1, 10**9), metavar="KBPS", help="rsync bandwidth limit per peer")
@click.option("--wait", "wait_lock", type=click.FloatRange(0, 3600), default=0, show_default=True, metavar="SECONDS",
              help="when another sync is running (the timer's), wait up to this long for it instead of exit 5")
@click.pass_obj
def sync_cmd(ctx: Ctx, dry_run: bool, force: bool, as_json: bool, bwlimit: int | None, wait_lock: float) -> None:
    """On the MASTER: cut a generation if the tree changed, push it to every peer's staging dir, swap it in there.

    Exit 0 ok (or not MASTER: a logged no-op), 1 a peer failed, 2 bad input / config refused,
    3 split brain, 4 a peer is newer, 5 another sync is running."""
    try:
        ctx._cfg = load(ctx.config_path)
    except ApplianceError as e:
        _sync_error(e, as_json)
    node = ctx.node
    bar, progress_cb = _progress_bar() if not as_json and sys.stdout.isatty() else (None, None)
    if bar:
        bar.start()
    from sync.push import sync as do_sync  # deferred: the master's push, only for `sync`

    try:
        report = do_sync(ctx.cfg, node, ctx.config_path, ctx.paths, force=force, dry_run=dry_run, bwlimit=bwlimit,
                         progress=progress_cb, wait_lock=wait_lock)
    except SyncError as e:
        _sync_error(e, as_json)
    finally:
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
@click.pass_obj
def sync_receive(ctx: Ctx, generation: str, digest: str, force: bool, as_json: bool) -> None:
    """Check the staged tree (<state>/sync/staging) and swap it in as GENERATION (what the master runs over SSH)."""
    from sync.receive import receive, source_of_connection  # deferred: only for `sync-receive`

    try:
        r = receive(ctx.paths, parse_generation(generation), parse_hash(digest), force, source=source_of_connection())
    except SyncError as e:
        _sync_error(e, as_json)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"generation {r['generation']}: {r['action']} (was {r['previous']})")


@main.command("sync-serve")
@click.pass_obj
def sync_serve(ctx: Ctx) -> None:
    """The forced command of the sync key on a peer: runs SSH_ORIGINAL_COMMAND if it is a sync command.

    The master reads the one-line JSON reply on stdout ({"ok": false, "code": N, "error": ...} when refused)."""
    from sync.serve import dispatch  # deferred: only for `sync-serve` (three start-ups per push on a peer)

    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    try:
        reply = dispatch(command, ctx.paths)
    except SyncError as e:
        if not (command or "").lstrip().startswith("rsync"):  # an rsync client reads stdout as its protocol: stderr only
            click.echo(json.dumps(failure_reply(e)))
        raise
    click.echo(json.dumps(reply))


@main.command("releases")
@click.option("--rollback", "rollback_to", metavar="GEN", help="make release GEN live again (and reload the proxy)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def releases_cmd(ctx: Ctx, rollback_to: str | None, as_json: bool) -> None:
    """List this node's config generations (time, hash, live), or roll back to one."""
    from rich.console import Console
    from rich.table import Table

    from sync.receive import rollback  # deferred: only for `releases`

    state = ctx.paths.state
    if rollback_to is not None:
        try:
            r = rollback(ctx.paths, parse_generation(rollback_to, "--rollback"))
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
    t = Table("gen", "live", "time", "hash", "source", "intact")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["time"]).strftime("%Y-%m-%d %H:%M:%S") if r.get("time") else "-"
        t.add_row(str(r["generation"]), "*" if r["live"] else "", when, r["hash"][:16], str(r["source"]),
                  "yes" if r["intact"] else "EDITED")
    Console().print(t if rows else f"no releases in {state}/releases")


def cron_line(cfg: Appliance, config_path: Path, appliance_bin: str) -> str:
    return (f"{cfg.sync.schedule} root {appliance_bin} -c {config_path} sync --json "
            f">>/var/log/appliance/sync.json 2>&1")


@main.command("cron")
@click.option("--install", is_flag=True, help=f"write the line to {CRON_FILE} (or --file)")
@click.option("--file", "cron_file", default=CRON_FILE, show_default=True, help="cron.d file to install")
@click.option("--appliance-bin", default=None, help="the appliance command cron runs [default: this one]")
@click.pass_obj
def cron_cmd(ctx: Ctx, install: bool, cron_file: str, appliance_bin: str | None) -> None:
    """Print (or --install) the cron.d line that runs `appliance sync` on sync.schedule (on every node)."""
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
    try:
        write_text_atomic(path, text, 0o644)
    except OSError as e:
        fail(f"--file {path}: cannot write ({e.filename}: {e.strerror or e})")
    click.echo(f"installed {path}: {line}")

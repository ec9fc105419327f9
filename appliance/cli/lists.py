"""`appliance lists update`: take category lists from a UT1/Shallalist tarball, directory or https URL."""
from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from appliance.cli import Ctx, emit_json, main
from appliance.core.errors import ApplianceError
from appliance.lists.update import Request, update


@main.group("lists")
def lists_group() -> None:
    """Category list updates (docs/lists.md)."""


def _print(r: dict) -> None:
    con = Console()
    if r.get("skipped") and "categories" not in r:
        con.print(r["skipped"])
        return
    head = f"{'[dry run] ' if r['dry_run'] else ''}{r['source']} ({r['layout']} layout)"
    click.echo(head + (f", SHA-256 {r['sha256']}" if r.get("sha256") else ""))
    t = Table("category", "from", "before", "entries", "bad lines")
    for cat, c in r["categories"].items():
        t.add_row(cat, ", ".join(c["from"]), str(c["before"]), str(c["entries"]), str(c["bad_lines"]))
    con.print(t)
    if r.get("skipped_count"):
        con.print(f"not extracted (links, devices): {r['skipped_count']}, e.g. {', '.join(r['skipped'][:5])}")
    if r["dry_run"]:
        con.print("nothing changed (--dry-run)")
        return
    click.echo(f"live in {r['lists']}; {r.get('proxy', '')}")
    s = r.get("sync")
    if s is not None:
        click.echo(f"sync: generation {s.get('generation')} {'cut and pushed' if s.get('ok') else 'FAILED'}"
                  + (f": {s['error']}" if s.get("error") else "") + (f" ({', '.join(s['failed'])} failed)"
                                                                      if s.get("failed") else ""))


@lists_group.command("update")
@click.argument("source", required=False)
@click.option("--sha256", "sha256", metavar="HEX", help="the tarball's SHA-256; a download that differs is refused "
              "[default: lists.sha256 when SOURCE is lists.source]")
@click.option("--dry-run", is_flag=True, help="fetch, check and compile, show what would change; change nothing")
@click.option("--force", is_flag=True, help="update on a node that is not MASTER (the master's next sync replaces it)")
@click.option("--scheduled", is_flag=True, help="what the timer/cron runs: a logged no-op unless this node is MASTER")
@click.option("--no-sync", "no_sync", is_flag=True, help="on the MASTER: do not run `appliance sync` after the swap "
              "(the next scheduled sync cuts and pushes the change)")
@click.option("--json", "as_json", is_flag=True, help="JSON report (for the timer and scripts)")
@click.pass_obj
def update_cmd(ctx: Ctx, source: str | None, sha256: str | None, dry_run: bool, force: bool, scheduled: bool,
               no_sync: bool, as_json: bool) -> None:
    """Take category lists from SOURCE (default lists.source): a UT1 or Shallalist tarball, a directory, or an
    https URL. Checked, compiled and swapped in atomically, the proxy reloaded; on the MASTER the change is cut as a
    sync generation and pushed.

    Exit 0 ok, 1 a download / swap / the sync's push failed, 2 refused (bad source, SHA-256, layout, size floor,
    not MASTER without --force), 5 a sync holds the lock."""
    try:
        if force and scheduled:
            raise ApplianceError("--force and --scheduled: the schedule never updates a node that is not MASTER", 2)
        req = Request(ctx.cfg, ctx.config_path, ctx.node, ctx.paths, source, sha256, dry_run, force, scheduled,
                      not no_sync)
        r = update(req)
    except ApplianceError as e:
        if as_json:  # the timer appends the JSON answer to its log: the error is shown there, not on stderr
            emit_json({"ok": False, "error": str(e), "exit": e.exit_code})
            e.reported = True
        raise
    if as_json:
        emit_json(r)
    else:
        _print(r)
    sys.exit(r["exit"])

"""`appliance report`: figures from the access log (this node's, given files, or every node's with --cluster)."""
from __future__ import annotations

import ipaddress
import itertools
import json
import os
from pathlib import Path

import click
from rich.console import Console

from appliance.cli import Ctx, fail, main
from appliance.core.logfiles import with_rotations
from appliance.report import page, textview
from appliance.report.figures import DEFAULT_CAP, Figures, Source
from appliance.report.reader import Window, read_all, read_lines
from appliance.report.summary import TOP, summary
from appliance.report.times import HELP, parse_when


def _window(since: str | None, until: str | None, client: str | None) -> Window:
    lo = parse_when(since, "--since") if since else None
    hi = parse_when(until, "--until") if until else None
    if lo is not None and hi is not None and hi <= lo:
        fail(f"--until {until!r} is not after --since {since!r}")
    try:
        net = ipaddress.ip_network(client, strict=False) if client else None
    except ValueError:
        fail(f"--client {client!r}: not an address or network (e.g. 192.168.1.0/24)")
    return Window(lo, hi, net)


def _local_files(ctx: Ctx, files: tuple[str, ...]) -> tuple[list[Path], bool]:
    """The files to read and whether they are the config's log (then rotations are included and the files checked)."""
    if files:
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            fail(f"{missing[0]}: no such file")
        return [Path(f) for f in files], False
    log = ctx.cfg.proxy.access_log
    if log in ("-", "none", ""):
        fail(f"{ctx.config_path}: proxy.access_log is {log!r}: there is no log file to read (give files as arguments)")
    found = with_rotations(Path(log))
    if not found:
        fail(f"{log}: no access log here (proxy.access_log of {ctx.config_path}); give files as arguments")
    return found, True


def _cluster(ctx: Ctx, fig: Figures, window: Window, strict: bool) -> None:
    """Every peer's records over the sync link (read-only `logs` verb), each file counted as its own source."""
    from sync import keys as keymod  # deferred: the sync client, only for --cluster
    from sync import logs as synclogs  # deferred: as above
    from sync import peer as syncpeer  # deferred: as above
    from sync.errors import SyncError  # deferred: as above

    key = keymod.push_key(ctx.paths.sync_key, ctx.base_dir)
    for peer in syncpeer.make_peers(ctx.cfg, ctx.node, ctx.base_dir, key):
        try:
            stream = synclogs.remote_lines(peer, window.since)
            for name, group in itertools.groupby(stream, key=lambda t: t[0]):
                src = Source(f"{peer.name}:{name}", peer.name)
                fig.sources.append(src)
                read_lines((line for _, line in group), src, fig, window, strict)
        except SyncError as e:
            fail(textview.printable(f"--cluster: {e}"), 1)  # a peer's words: never a raw terminal escape


@main.command("report")
@click.argument("files", nargs=-1, metavar="[FILE]...")
@click.option("--since", metavar="WHEN", help=f"only records from then on: {HELP}")
@click.option("--until", metavar="WHEN", help="only records before then (same forms as --since)")
@click.option("--client", "client", metavar="NET", help="only requests from this address or network")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON (schema in docs/report.md)")
@click.option("--html", "html", metavar="FILE", type=click.Path(dir_okay=False), help="write a self-contained HTML page")
@click.option("--cluster", is_flag=True, help="also every peer's log, fetched read-only over the sync link")
@click.option("--strict", is_flag=True, help="stop at the first line that is not an access-log record (file:line)")
@click.option("--top", type=click.IntRange(1, 1000), default=TOP, show_default=True, help="rows per top table")
@click.pass_obj
def report(ctx: Ctx, files: tuple[str, ...], since: str | None, until: str | None, client: str | None,
           as_json: bool, html: str | None, cluster: bool, strict: bool, top: int) -> None:
    """Requests, blocked share, bytes, top categories, blocked domains and clients, per hour, refusals by reason.

    Reads the config's proxy.access_log with its rotations (access.log.1, access.log.2.gz, ...), or the FILEs
    given (plain, .gz, .bz2, .xz), in constant memory."""
    window = _window(since, until, client)
    if cluster and files:
        fail("--cluster reads the config's access log on every node: give no files with it")
    if html and Path(html).parent and not Path(html).parent.is_dir():
        fail(f"--html {html}: directory {Path(html).parent} does not exist")
    paths, own = _local_files(ctx, files)
    fig = Figures(cap=int(os.environ.get("APPLIANCE_REPORT_CAP", DEFAULT_CAP)))
    read_all(paths, fig, window, strict, node=ctx.node if cluster else None, skip_old=own)
    if cluster:
        _cluster(ctx, fig, window, strict)
    s = summary(fig, window, top)
    if html:
        tmp = Path(html).with_name(f".{Path(html).name}.tmp")
        tmp.write_text(page.render(s), encoding="utf-8")
        os.replace(tmp, html)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        textview.render(s, Console(highlight=False))
        if html:
            click.echo(f"wrote {html}")

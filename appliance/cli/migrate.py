"""`appliance import squidguard`: a squidGuard.conf (pfSense's too) as the filter: section and its list directories."""
from __future__ import annotations

import ipaddress
import os
import shutil
from pathlib import Path

import click
import yaml

from appliance.cli import emit_json, fail, main
from appliance.core.errors import EXIT_FAILED
from appliance.core.model import Filter
from appliance.migrate import listplan
from appliance.migrate.parser import parse_file
from appliance.migrate.translate import Result, translate

HEADER = """\
# The filter: section translated from {conf} by `appliance import squidguard`.
# Paste it into appliance.yaml (replacing its filter: section) and copy lists/ beside that file.
# Policies never overlap: each covers the addresses and minutes in which SquidGuard used one pass list.
"""


@main.group("import")
def import_group() -> None:
    """Bring another filter's configuration over (docs/migration.md)."""


@import_group.command("squidguard")
@click.argument("conf", type=click.Path(dir_okay=False))
@click.option("--out", "out", default="squidguard-import", show_default=True, type=click.Path(file_okay=False),
              help="new directory for filter.yaml and lists/ (must not exist, or be empty)")
@click.option("--dbhome", type=click.Path(file_okay=False), help="where the relative list paths are "
              "(default: the file's dbhome, e.g. a copy of pfSense's /var/db/squidGuard)")
@click.option("--clients", metavar="NET[,NET...]", help="the addresses that use the proxy (your proxy.clients): "
              "policies are cut to them, which keeps the default acl's client list short")
@click.option("--strict", is_flag=True, help="exit 1 when anything could not be carried over exactly")
@click.option("--json", "as_json", is_flag=True, help="the section and the not-carried list as JSON")
def squidguard(conf: str, out: str, dbhome: str | None, clients: str | None, strict: bool, as_json: bool) -> None:
    """Translate squidGuard.conf CONF into OUT/filter.yaml and OUT/lists/; list what is not carried."""
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        fail(f"--out {dest}: exists and is not an empty directory (nothing written)")
    if dbhome is not None and not Path(dbhome).is_dir():
        fail(f"--dbhome {dbhome}: no such directory")
    nets = _clients(clients) if clients is not None else None
    res = translate(parse_file(conf), dbhome, nets)  # SquidGuardError: file:line, exit 2
    try:
        Filter.model_validate(res.filter)
    except ValueError as e:  # a bug here, not the admin's input: say so rather than write a file that will not load
        fail(f"the translated filter section does not validate (please report): {e}", EXIT_FAILED)
    _write(dest, conf, res)
    if as_json:
        emit_json({"out": str(dest), "filter": res.filter, "not_carried": [n.to_json() for n in res.notes]})
    else:
        _show(dest, res)
    if strict and res.notes:
        fail(f"--strict: {len(res.notes)} construct(s) not carried over exactly (listed above)", EXIT_FAILED)


def _clients(text: str) -> list:
    try:
        return [ipaddress.IPv4Network(n.strip()) for n in text.split(",") if n.strip()] or fail("--clients: empty")
    except ValueError as e:
        fail(f"--clients: {e}")


def _write(dest: Path, conf: str, res: Result) -> None:
    """Everything into a temporary directory beside dest, then renamed: dest is complete or absent."""
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    try:
        (tmp / "lists").mkdir(parents=True)
        listplan.write(tmp / "lists", res.categories, res.generated)
        notes = "".join(f"#   {n}\n" for n in res.notes) or "#   nothing\n"
        text = (HEADER.format(conf=conf) + yaml.safe_dump({"filter": res.filter}, sort_keys=False)
                + "# Not carried over exactly:\n" + notes)
        (tmp / "filter.yaml").write_text(text)
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except OSError as e:
        fail(f"--out {dest}: cannot write: {e.strerror or e} (nothing written)", EXIT_FAILED)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _show(dest: Path, res: Result) -> None:
    pols = len(res.filter.get("policies", []))
    click.echo(f"wrote {dest / 'filter.yaml'} ({pols} policies) and {dest / 'lists'}/ "
               f"({len(res.categories) + len(res.generated)} categories)")
    if not res.notes:
        click.echo("everything was carried over")
        return
    click.echo(f"not carried over exactly ({len(res.notes)}):")
    for n in res.notes:
        click.echo(f"  {n}")

"""`appliance carp-rotate [--finish]`: the CARP pass rotation's phases 2 and 3, as edits of the cluster file."""
from __future__ import annotations

import re
from pathlib import Path

import click

from appliance.cli import Ctx, fail, main
from appliance.core.errors import ConfigError
from appliance.core.fsio import write_text_atomic
from appliance.core.loader import load
from appliance.core.rotation import pass_step_error

_KEY = re.compile(r"^(?P<indent>[ \t]+)(?P<key>password|password_next):[ \t]*(?P<value>.*?)[ \t]*$")


def set_passes(text: str, password: str, password_next: str | None) -> str:
    """The cluster file with cluster.password set and cluster.password_next set right after it (None: removed);
    every other line, comments included, kept."""
    out, in_cluster = [], False
    for line in text.splitlines():
        if re.match(r"^\S", line):
            in_cluster = line.startswith("cluster:")
        m = _KEY.match(line) if in_cluster else None
        if m is None:
            out.append(line)
        elif m["key"] == "password":
            out.append(f"{m['indent']}password: {password}")
            if password_next is not None:
                out.append(f"{m['indent']}password_next: {password_next}")
    return "\n".join(out) + "\n"


@main.command("carp-rotate")
@click.option("--finish", is_flag=True, help="phase 3: drop the old pass (cluster.password_next) once every node has the new one")
@click.pass_obj
def carp_rotate(ctx: Ctx, finish: bool) -> None:
    """Rotate the CARP pass on the master (docs/security.md): phase 1 is yours (set cluster.password_next, sync);
    this makes it the pass and keeps the old one accepted (phase 2); --finish drops the old one (phase 3). Sync after each."""
    path = Path(ctx.config_path).resolve()
    old = ctx.cfg
    c = old.cluster
    if c.password_next is None:
        fail(f"{path}: cluster.password_next is not set: phase 1 first (set it to the new pass, `appliance sync`)")
    cur, nxt = c.password.get_secret_value(), c.password_next.get_secret_value()
    text = path.read_text(encoding="utf-8")
    new_text = set_passes(text, cur, None) if finish else set_passes(text, nxt, cur)
    tmp = path.with_name(f".{path.name}.rotate")
    write_text_atomic(tmp, new_text, 0o600)
    try:
        new = load(tmp)
        err = pass_step_error(old.cluster, new.cluster)
        if err:
            raise ConfigError(err)
    except (ConfigError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        fail(f"{path}: the rotation edit did not come out right, nothing changed: {e}")
    tmp.replace(path)
    click.echo(f"{path}: " + ("the old pass is no longer accepted (phase 3)" if finish else
                              "the next pass is now the pass; the old one stays accepted (phase 2)") + "; run `appliance sync`")

"""`appliance image`: build the FreeBSD appliance images (overlay, mtree, tar, UFS; full disk with --freebsd-dist)."""
from __future__ import annotations

from pathlib import Path

import click

from appliance.cli import Ctx, emit_json, main
from image.build import Options, build


@main.command()
@click.option("--out", "out", default="dist", show_default=True, type=click.Path(file_okay=False, path_type=Path), help="output directory")
@click.option("--freebsd-dist", "freebsd_dist", type=click.Path(path_type=Path), help="a release's base.txz + kernel.txz + MANIFEST: also build the root fs, a GPT disk and qcow2")
@click.option("--only", "only", multiple=True, metavar="NAME", help="build only this node (repeatable); default every node")
@click.option("--ufs-version", type=click.Choice(["1", "2"]), default="1", show_default=True, help="UFS1 (default: superblock where every FreeBSD looks) or UFS2")
@click.option("--json", "as_json", is_flag=True, help="print the build summary as JSON")
@click.option("-q", "--quiet", is_flag=True, help="no progress output")
@click.pass_obj
def image(ctx: Ctx, out: Path, freebsd_dist: Path | None, only: tuple[str, ...], ufs_version: str, as_json: bool, quiet: bool) -> None:
    """Render each node's overlay from the cluster file and build reproducible images into --out."""
    cfg = ctx.cfg  # a bad config exits 2 with the config error
    # a BuildError carries its exit code (2 bad input, 3 missing tool, 1 otherwise) to the group's handler
    res = build(cfg, ctx.config_path, Options(out=out, freebsd_dist=freebsd_dist, only=list(only), ufs_version=int(ufs_version), quiet=quiet))
    if as_json:
        emit_json(res)
        return
    for node, info in res["nodes"].items():
        names = ", ".join(info["outputs"])
        click.echo(f"{node}: {info['entries']} entries -> {names}")
    click.echo(f"{out}/SHA256SUMS, {out}/manifest.json written in {res['seconds']} s (SOURCE_DATE_EPOCH={res['epoch']})")

"""`appliance image`: per node overlay, checks, mtree, tar, UFS; with a FreeBSD dist the full root fs, GPT disk, qcow2."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.core.model import Appliance

from image import checks, debian, disk, dist, keygen, manifest, mtree, render, tarball, ufs
from image.errors import BadInput, BuildError
from image.tree import Entry, Tree

DEFAULT_EPOCH = 1704067200  # 2024-01-01T00:00:00Z, used when SOURCE_DATE_EPOCH is not set


def source_date_epoch() -> int:
    v = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not v:
        return DEFAULT_EPOCH
    if not v.isdigit():
        raise BadInput(f"SOURCE_DATE_EPOCH={v!r} is not a number of seconds")
    return int(v)


class Reporter:
    """Progress on a terminal (rich), one line per step otherwise."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.progress = None
        self.task = None

    def __enter__(self) -> "Reporter":
        if self.console.is_terminal and not self.quiet:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("image", total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def total(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, total=n)

    def step(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=msg)
            self.progress.advance(self.task)
        elif not self.quiet:
            self.console.print(f"image: {msg}", soft_wrap=True)

    def note(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"image: {msg}", soft_wrap=True)


@dataclass
class Options:
    out: Path
    freebsd_dist: Path | None = None
    only: list[str] = field(default_factory=list)
    ufs_version: int = ufs.DEFAULT_VERSION
    quiet: bool = False
    deb: Path | None = None  # cluster.os: debian: the carpguard .deb to install (default: built from HEAD, cached)


def _users(tree: Tree) -> dict[str, tuple[int, int]]:
    users = {e.uname: (e.uid, e.gid) for e in tree if e.uname != "root"}
    for e in tree:  # a group used without its user (root:appliance-sync) still needs a name for makefs -N
        if e.gname not in ("wheel", "root"):
            users.setdefault(e.gname, (e.gid, e.gid))
    return users


def _merge_rootfs(base: dict[str, Entry], overlay: Tree, root: Path, fstab: str) -> Tree:
    """Base + kernel metadata with the overlay written over it; base keeps its directories' attributes."""
    merged = Tree()
    merged.entries.update(base)
    merged.entries.setdefault("/", Entry("/", "dir", 0o755))
    over = Tree()
    over.entries.update(overlay.entries)
    over.file("/etc/fstab", fstab, source="template:fstab.j2")
    for e in over:
        if e.path == "/":
            continue
        dst = root / e.path.lstrip("/")
        old = merged.entries.get(e.path)
        if e.kind == "dir":
            if old is not None and old.kind == "dir":
                continue
            if old is not None or dst.is_symlink():
                raise BuildError(f"overlay directory {e.path} collides with a {old.kind if old else 'symlink'} in the FreeBSD dist")
            dst.mkdir(parents=True, exist_ok=True)
        else:
            if old is not None and old.kind == "dir":
                raise BuildError(f"overlay {e.kind} {e.path} collides with a directory in the FreeBSD dist")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            if e.kind == "link":
                os.symlink(e.target, dst)
            else:
                dst.write_bytes(e.data)
                os.chmod(dst, 0o644)
        merged.entries[e.path] = e
    return merged


def build(cfg: Appliance, config_path: Path, opts: Options) -> dict:
    """Build every node's outputs; they hold the CARP pass and private keys, so each is created 0600 (umask 077)."""
    old = os.umask(0o077)
    try:
        return _build(cfg, config_path, opts)
    finally:
        os.umask(old)


def _build(cfg: Appliance, config_path: Path, opts: Options) -> dict:
    epoch = source_date_epoch()
    if cfg.cluster.os == "debian":  # the same node model, the Debian templates and disk (image/debian)
        return _build_debian(cfg, config_path, opts, epoch)
    out = opts.out
    nodes = opts.only or sorted(cfg.nodes)
    for n in nodes:
        if n not in cfg.nodes:
            raise BadInput(f"--only {n}: not one of the nodes in {config_path} ({', '.join(sorted(cfg.nodes))})")
    ufs.makefs_bin()  # fail early and clearly when makefs is missing
    sets = dist.check(opts.freebsd_dist) if opts.freebsd_dist else None
    if sets:
        for t, pkg in (("sgdisk", "gdisk"), ("qemu-img", "qemu-utils"), ("mkfs.vfat", "dosfstools"), ("mcopy", "mtools"), ("mmd", "mtools")):
            disk.tool(t, pkg)
    out.mkdir(parents=True, exist_ok=True)
    password = cfg.cluster.password.get_secret_value().encode()
    result: dict = {"epoch": epoch, "config": config_path.name, "freebsd": cfg.cluster.freebsd, "nodes": {}}
    if sets:
        result["freebsd_dist"] = {name: manifest.sha256(p) for name, p in sets.items()}
    t0 = time.monotonic()
    with Reporter(opts.quiet) as rep:
        rep.total(len(nodes) * (9 if sets else 6) + 2)
        made = keygen.ensure_keys(cfg, config_path.resolve().parent)
        for k in made:
            rep.note(f"generated {k} (a build input from now on: keep it, later builds reuse it)")
        rep.step("keys ready")
        outputs: list[Path] = []
        for node in nodes:
            rep.step(f"{node}: rendering overlay")
            tree = render.render_node(cfg, config_path, node, exclude=[out])
            rep.step(f"{node}: checking rc.conf, sysctl.conf, devd rules, scripts, secrets")
            checks.enforce(tree, password)
            ndir = out / node
            overlay = ndir / "overlay"
            if ndir.exists():
                _rmtree(ndir)
            tree.write(overlay)
            spec = out / f"{node}.mtree"
            spec.write_text(mtree.spec(tree, epoch))
            rep.step(f"{node}: tar")
            tarball.write_tar(tree, out / f"{node}.tar", epoch)
            rep.step(f"{node}: makefs UFS{opts.ufs_version}")
            norm = ufs.build(out / f"{node}.ufs", overlay, spec, epoch, _users(tree), opts.ufs_version)
            info = {"entries": sum(1 for _ in tree), "files": sum(1 for e in tree if e.kind == "file"),
                    "ufs": norm, "outputs": {}}
            node_out = [spec, out / f"{node}.tar", out / f"{node}.ufs"]
            if sets:
                node_out += _full_disk(cfg, node, tree, sets, out, epoch, opts, rep, info)
            for p in node_out:
                info["outputs"][p.name] = {"bytes": p.stat().st_size, "sha256": manifest.sha256(p)}
            outputs += node_out
            result["nodes"][node] = info
            rep.step(f"{node}: done")
        mf = manifest.write_manifest(out, result)
        manifest.write_sums(out, outputs + [mf])
        rep.step("SHA256SUMS written")
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


def _build_debian(cfg: Appliance, config_path: Path, opts: Options, epoch: int) -> dict:
    if opts.freebsd_dist:
        raise BadInput(f"--freebsd-dist: {config_path} is cluster.os: debian (the Debian image needs no dist)")
    for n in opts.only:
        if n not in cfg.nodes:
            raise BadInput(f"--only {n}: not one of the nodes in {config_path} ({', '.join(sorted(cfg.nodes))})")
    with Reporter(opts.quiet) as rep:
        return debian.build(cfg, config_path, opts.out, only=opts.only, epoch=epoch, deb=opts.deb, log=rep.note)


def _full_disk(cfg: Appliance, node: str, tree: Tree, sets: dict, out: Path, epoch: int, opts: Options, rep: Reporter, info: dict) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix=f".{node}-root-", dir=out) as work:
        work_p = Path(work)
        root = work_p / "root"
        rep.step(f"{node}: extracting base.txz and kernel.txz")
        base = dist.extract(sets, root)
        fstab = render.template("fstab.j2", root_label=disk.LABELS["root"], efi_label=disk.LABELS["efi"])
        merged = _merge_rootfs(base, tree, root, fstab)
        spec = work_p / "root.mtree"
        spec.write_text(mtree.spec(merged, epoch, digests=False))
        rep.step(f"{node}: makefs root file system")
        rootfs = out / f"{node}-root.ufs"
        norm = ufs.build(rootfs, root, spec, epoch, _users(tree), opts.ufs_version, free="20%")
        rep.step(f"{node}: GPT disk (gptboot, EFI, UFS root) and qcow2")
        img = out / f"{node}.img"
        layout = disk.build_disk(img, node, rootfs, root / "boot/pmbr", root / "boot/gptboot", root / "boot/loader.efi", epoch, work_p)
        q = out / f"{node}.qcow2"
        disk.qcow2(img, q)
        info["rootfs"] = {"entries": len(merged.entries), "ufs": norm}
        info["disk"] = layout
        return [rootfs, img, q]


def _rmtree(path: Path) -> None:
    def onerror(func, p, exc):
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    for d, dirs, _files in os.walk(path):
        for x in dirs:
            sub = os.path.join(d, x)
            if not os.path.islink(sub):  # Linux cannot chmod a symlink itself; its target is not ours to change
                try:
                    os.chmod(sub, 0o700)
                except OSError:
                    pass  # rmtree's onerror gets another go at it
    shutil.rmtree(path, onerror=onerror)

"""Bootable Debian images per node: build_images() / build_node_image() -> dist/NAME.img, NAME.qcow2 (see docs/image.md)."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.core.model import Appliance

from image import keygen, manifest, render
from image.debian import boot, cache, ext4, overlay, rootfs, tree
from image.errors import BadInput, BuildError
from image.tree import Tree

NEED_PER_NODE = 5 << 30  # bytes free in --out for one node: its tree copy, ext4, raw disk and qcow2 (plus the shared tree)


@dataclass
class NodeImage:
    """What the VM lab boots: `qcow2` (or `img`), root logs in with `admin_key` over SSH at `lan`/`sync`."""

    node: str
    img: Path
    qcow2: Path
    admin_key: Path | None  # private key for `ssh -i KEY root@<lan>`; None when keys/ holds only your .pub
    lan: str
    sync: str
    console: str = "ttyS0"  # the kernel's and getty's serial console (qemu -serial file:... shows the boot)


def _space(out: Path, nodes: int) -> None:
    free = shutil.disk_usage(out).free
    need = NEED_PER_NODE * (nodes + 1)
    if free < need:
        raise BuildError(f"{out}: {free >> 20} MiB free, the Debian image build needs about {need >> 20} MiB "
                         f"({nodes} node(s)); nothing was written")


def _node(cfg: Appliance, config_path: Path, node: str, common: Path, work: Path, out: Path, epoch: int) -> dict:
    """One node: its copy of the common tree, the overlay, ext4, the GPT disk with GRUB, the qcow2."""
    root = work / node
    rootfs.run(["cp", "-a", str(common), str(root)], f"{node}: copying the tree")
    kernel = boot.kernel_version(root)
    root_uuid = ext4.fs_uuid(node, epoch)
    t = populate(cfg, config_path, node, root, out, epoch, kernel, root_uuid)
    early = work / f"{node}-early.cfg"
    early.write_text(render.template("debian/grub-early.cfg.j2", root_uuid=root_uuid))
    fs = ext4.make_ext4(work / f"{node}.ext4", root, node, epoch, work=work)
    rootfs.run(["rm", "-rf", str(root)], f"{node}: removing the tree copy")
    img, q = out / f"{node}.img", out / f"{node}.qcow2"
    part_img, part_q = work / img.name, work / q.name
    layout = boot.make_disk(part_img, node, epoch, work / f"{node}.ext4", common, early, work)
    (work / f"{node}.ext4").unlink()
    rootfs.run([rootfs.tool("qemu-img", "qemu-utils"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(part_img), str(part_q)],
               f"{node}: qemu-img convert")
    os.replace(part_img, img)
    os.replace(part_q, q)
    return {"kernel": kernel, "root": fs, "disk": layout, "entries": sum(1 for _ in t),
            "outputs": {p.name: {"bytes": p.stat().st_size, "sha256": manifest.sha256(p)} for p in (img, q)}}


def populate(cfg: Appliance, config_path: Path, node: str, root: Path, out: Path, epoch: int, kernel: str,
             root_uuid: str) -> Tree:
    """Write the node's overlay over its copy of the common tree and compile its release's list index; returns the
    overlay. Everything of the root file system but make_ext4's normalisation and the boot loader."""
    groups = tree.ids(root)[1]
    t = render.render_node(cfg, config_path, node, exclude=[out], sync_gid=groups.get(cfg.sync.user, 0),
                           admin_gid=groups.get(overlay.ADMIN_GROUP, 0))
    overlay.boot_files(t, cfg, node, kernel, root_uuid)
    overlay.check(t, cfg.cluster.password.get_secret_value().encode())
    tree.apply(t, root)
    tree.bake_index(root, overlay.RELEASE, epoch)
    return t


def build(cfg: Appliance, config_path: Path, out: Path, only: list[str] | None = None, epoch: int = 1704067200,
          deb: Path | None = None, log=print, use_cache: bool = True) -> dict:
    """Every node's (or `only`'s) image into `out`, then SHA256SUMS and manifest.json; returns the manifest. A node
    whose inputs (overlay, base packages, .deb, epoch, image code) match its last build is copied from the cache.
    The images hold private keys and the CARP pass: everything is created under umask 077."""
    old = os.umask(0o077)
    try:
        return _build(cfg, config_path, out, only, epoch, deb, log, use_cache)
    finally:
        os.umask(old)


def _build(cfg: Appliance, config_path: Path, out: Path, only: list[str] | None, epoch: int, deb: Path | None, log,
           use_cache: bool) -> dict:
    if cfg.cluster.os != "debian":
        raise BadInput(f"{config_path}: cluster.os is {cfg.cluster.os}; the Debian image needs cluster.os: debian")
    nodes = only or sorted(cfg.nodes)
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    config_dir = config_path.resolve().parent
    for k in keygen.ensure_keys(cfg, config_dir) + overlay.ensure_admin_key(config_dir):
        log(f"generated {k} (a build input from now on: keep it, later builds reuse it)")
    deb = deb or tree.carpguard_deb(log)
    deb_sha = manifest.sha256(deb)
    base = rootfs.base_key(cfg.cluster.debian, epoch)
    keys = {n: cache.fingerprint(n, cache.tree_digest(render.render_node(cfg, config_path, n, exclude=[out])), base, deb_sha, epoch)
            for n in nodes}
    hits = {n: cache.lookup(n, keys[n]) for n in nodes} if use_cache else {}
    todo = [n for n in nodes if not hits.get(n)]
    if todo:
        _space(out, len(todo))
    result = {"os": "debian", "debian": cfg.cluster.debian, "suite": rootfs.SUITES[cfg.cluster.debian], "epoch": epoch,
              "config": config_path.name, "deb": {"file": deb.name, "sha256": deb_sha}, "nodes": {}}
    outputs: list[Path] = []
    try:
        for n in nodes:
            if hits.get(n):
                log(f"{n}: unchanged inputs, copied from {hits[n][0]}")
                outputs += cache.restore(hits[n][0], n, out)
                result["packages"] = hits[n][1].pop("packages")
                result["nodes"][n] = hits[n][1]
        if todo:
            _fresh(cfg, config_path, todo, out, epoch, deb, log, result, keys if use_cache else None)
            outputs += [out / f"{n}.{ext}" for n in todo for ext in ("img", "qcow2")]
        result["nodes"] = dict(sorted(result["nodes"].items()))
        mf = manifest.write_manifest(out, result)
        manifest.write_sums(out, sorted(outputs) + [mf])
    except OSError as e:
        for p in outputs + [out / "manifest.json", out / "SHA256SUMS"]:
            p.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise BuildError(f"{out}: no space left on the device while building the Debian image; nothing was kept") from None
        raise
    _admin_copy(config_dir, out)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def _fresh(cfg: Appliance, config_path: Path, nodes: list[str], out: Path, epoch: int, deb: Path, log, result: dict,
           keys: dict[str, str] | None) -> None:
    """Build `nodes` from the shared tree; with `keys`, keep each in the cache."""
    try:
        with tempfile.TemporaryDirectory(prefix=".debian-work-", dir=out) as work:
            log("base tree (mmdebstrap, cached) + the .deb")
            common, versions = tree.common(Path(work), cfg.cluster.debian, epoch, deb, log)
            result["packages"] = versions
            for node in nodes:
                log(f"{node}: overlay, ext4, GPT disk with GRUB (BIOS + UEFI), qcow2")
                info = _node(cfg, config_path, node, common, Path(work), out, epoch)
                result["nodes"][node] = info
                if keys:
                    cache.store(node, keys[node], {**info, "packages": versions}, out / f"{node}.img", out / f"{node}.qcow2")
            rootfs.run(["rm", "-rf", str(common)], "removing the shared tree")
    except BaseException:
        for n in nodes:
            for ext in ("img", "qcow2"):
                (out / f"{n}.{ext}").unlink(missing_ok=True)
        raise


def _admin_copy(config_dir: Path, out: Path) -> None:
    """dist/admin_ed25519 (0600): root's SSH key for the images, beside them (the VM lab's `ssh -i`)."""
    key = overlay.admin_key(config_dir)
    if key.exists():
        dst = out / overlay.ADMIN_KEY
        dst.unlink(missing_ok=True)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.read_bytes())


def build_node_image(cfg: Appliance, config_path: Path, node: str, out: Path, **kw) -> NodeImage:
    """One node's image (out/NODE.img raw GPT disk, out/NODE.qcow2) and how to reach it once booted."""
    if node not in cfg.nodes:
        raise BadInput(f"{node}: not one of the nodes in {config_path} ({', '.join(sorted(cfg.nodes))})")
    build(cfg, config_path, out, only=[node], **kw)
    key = out / overlay.ADMIN_KEY
    n = cfg.nodes[node]
    return NodeImage(node, out / f"{node}.img", out / f"{node}.qcow2", key if key.exists() else None, str(n.lan.ip), str(n.sync.ip))

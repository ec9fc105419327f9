"""Finished node images kept in the cache by a fingerprint of every input, so an unchanged rebuild is a copy."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from image.debian import rootfs
from image.tree import Tree

IMAGE_DIR = Path(__file__).resolve().parent.parent  # image/: the code and templates that shape the bytes
FILTERS_DIR = IMAGE_DIR.parent / "filters"  # the list compiler: the build bakes each release's index with it


def tree_digest(t: Tree) -> str:
    h = hashlib.sha256()
    for e in t:
        h.update(f"{e.path}|{e.kind}|{e.mode:o}|{e.uname}|{e.gname}|{e.target}|{len(e.data)}|".encode() + e.data)
    return h.hexdigest()


def code_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(IMAGE_DIR.rglob("*")) + sorted(FILTERS_DIR.glob("*.py")):
        if f.is_file() and f.suffix in (".py", ".j2") and "__pycache__" not in f.parts:
            h.update(f.relative_to(IMAGE_DIR.parent).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def fingerprint(node: str, overlay: str, base: str, deb_sha: str, epoch: int) -> str:
    doc = {"node": node, "overlay": overlay, "base": base, "deb": deb_sha, "epoch": epoch, "code": code_digest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _dir(node: str) -> Path:
    return rootfs.cache_root() / "images" / node


def lookup(node: str, key: str) -> tuple[Path, dict] | None:
    d = _dir(node)
    meta = d / "node.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if info.get("key") != key or not all((d / f"{node}.{ext}").exists() for ext in ("img", "qcow2")):
        return None
    return d, info["info"]


def store(node: str, key: str, info: dict, img: Path, qcow2: Path) -> None:
    """Keep the latest build of each node (older ones go: a node image is 2 GB)."""
    d = _dir(node)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for src in (img, qcow2):
        rootfs.run(["cp", "--sparse=always", str(src), str(d / src.name)], f"caching {src.name}")
    (d / "node.json").write_text(json.dumps({"key": key, "info": info}, indent=1, sort_keys=True) + "\n")


def restore(d: Path, node: str, out: Path) -> list[Path]:
    paths = []
    for ext in ("img", "qcow2"):
        dst = out / f"{node}.{ext}"
        part = out / f".{node}.{ext}.part"
        rootfs.run(["cp", "--sparse=always", str(d / dst.name), str(part)], f"copying the cached {dst.name}")
        part.replace(dst)
        paths.append(dst)
    return paths

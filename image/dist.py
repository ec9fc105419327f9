"""A FreeBSD release dist dir: check base.txz/kernel.txz against its MANIFEST, extract them with their metadata."""
from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path

from image.errors import BadDist
from image.manifest import sha256
from image.tree import Entry

SETS = ("base.txz", "kernel.txz")
BOOTCODE = ("boot/pmbr", "boot/gptboot", "boot/loader.efi")


def read_manifest(dist: Path) -> dict[str, str]:
    """MANIFEST lines: `name<TAB>sha256<TAB>files<TAB>set<TAB>"description"<TAB>on|off`."""
    mf = dist / "MANIFEST"
    if not dist.is_dir():
        raise BadDist(f"{dist}: not a directory (FREEBSD_DIST must hold base.txz, kernel.txz and MANIFEST)")
    if not mf.is_file():
        raise BadDist(f"{mf}: missing; take it from the same release as base.txz (e.g. .../releases/amd64/14.3-RELEASE/MANIFEST)")
    out = {}
    for i, line in enumerate(mf.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or len(parts[1]) != 64 or any(c not in "0123456789abcdef" for c in parts[1].lower()):
            raise BadDist(f"{mf}:{i}: not a MANIFEST line (name<TAB>sha256<TAB>...): {line[:80]!r}")
        out[parts[0]] = parts[1].lower()
    return out


def check(dist: Path) -> dict[str, Path]:
    """Verify the sets against MANIFEST; return {set name: path}. Raises BadDist naming the file."""
    manifest = read_manifest(dist)
    sets = {}
    for name in SETS:
        p = dist / name
        if not p.is_file():
            raise BadDist(f"{p}: missing (FREEBSD_DIST needs {', '.join(SETS)})")
        if name not in manifest:
            raise BadDist(f"{dist / 'MANIFEST'}: has no line for {name}")
        got = sha256(p)
        if got != manifest[name]:
            raise BadDist(f"{p}: SHA-256 {got} does not match MANIFEST ({manifest[name]}); corrupt or from another release")
        sets[name] = p
    return sets


def _clean(name: str) -> str | None:
    n = posixpath.normpath("/" + name.lstrip("/"))
    if n == "/":
        return "/"
    if ".." in n.split("/"):
        return None
    return n


def extract(sets: dict[str, Path], root: Path) -> dict[str, Entry]:
    """Extract the sets under `root` (contents and modes); return their metadata by image path."""
    meta: dict[str, Entry] = {}
    root.mkdir(parents=True, exist_ok=True)
    for name, path in sets.items():
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    p = _clean(m.name)
                    if p is None:
                        raise BadDist(f"{path}: member {m.name!r} escapes the root")
                    dst = root / p.lstrip("/") if p != "/" else root
                    e = Entry(p, "dir", m.mode & 0o7777, m.uname or ("root" if m.uid == 0 else str(m.uid)),
                              m.gname or ("wheel" if m.gid == 0 else str(m.gid)), m.uid, m.gid, source=f"{name}")
                    if m.isdir():
                        dst.mkdir(parents=True, exist_ok=True)
                    elif m.issym():
                        e.kind, e.target, e.mode = "link", m.linkname, 0o755
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        if dst.is_symlink() or dst.exists():
                            dst.unlink()
                        os.symlink(m.linkname, dst)
                    elif m.islnk():
                        src = _clean(m.linkname)
                        if src is None or src not in meta:
                            raise BadDist(f"{path}: hard link {m.name!r} to unknown {m.linkname!r}")
                        e = Entry(**{**meta[src].__dict__, "path": p})
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        if dst.exists():
                            dst.unlink()
                        os.link(root / src.lstrip("/"), dst)
                    elif m.isfile():
                        e.kind = "file"
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        if dst.exists():
                            dst.unlink()
                        with tf.extractfile(m) as src_f, open(dst, "wb") as out:
                            while chunk := src_f.read(1 << 20):
                                out.write(chunk)
                        os.chmod(dst, 0o644)
                    else:
                        continue  # devices, fifos: not in a release set
                    meta[p] = e
        except (tarfile.TarError, EOFError, OSError) as err:
            if isinstance(err, BadDist):
                raise
            raise BadDist(f"{path}: cannot read: {err}") from None
    missing = [b for b in BOOTCODE if "/" + b not in meta]
    if missing:
        raise BadDist(f"{sets['base.txz']}: has no {', '.join(missing)} (the bootcode comes from base.txz, never downloaded)")
    return meta

"""Deterministic tar of an image tree: sorted, fixed mtime, numeric and named owners, `./` paths like a dist set."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from image.tree import Tree


def write_tar(tree: Tree, path: Path, epoch: int) -> None:
    """Same tree, same bytes: no pax times, no builder uid, entries in path order; extracts over / (bsdinstall, tar -xpf)."""
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in tree:
            if e.path == "/":
                continue
            ti = tarfile.TarInfo(e.rel)
            ti.mtime = epoch
            ti.mode = e.mode
            ti.uid, ti.gid, ti.uname, ti.gname = e.uid, e.gid, e.uname, e.gname
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif e.kind == "link":
                ti.type = tarfile.SYMTYPE
                ti.linkname = e.target
                tf.addfile(ti)
            else:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))

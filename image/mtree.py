"""mtree(5) specifications of an image tree: owners, modes, times, sizes and SHA-256 digests."""
from __future__ import annotations

import hashlib
import re

from image.tree import Entry, Tree

_PLAIN = re.compile(rb"[A-Za-z0-9/._+,:=@~%^-]")


def escape(path: str) -> str:
    """mtree's vis(3)-style encoding: anything unusual (space, #, \\, non-ASCII) as \\ooo."""
    out = []
    for b in path.encode():
        ch = bytes([b])
        out.append(ch.decode() if _PLAIN.fullmatch(ch) else f"\\{b:03o}")
    return "".join(out)


def line(e: Entry, epoch: int, digests: bool = True, flags: str = "") -> str:
    kw = [f"type={e.kind}", f"uname={e.uname}", f"gname={e.gname}", f"uid={e.uid}", f"gid={e.gid}", f"mode={e.mode:04o}",
          f"time={epoch}.000000000"]
    if e.kind == "link":
        kw.append(f"link={escape(e.target)}")
    elif e.kind == "file" and digests:
        kw.append(f"size={len(e.data)}")
        if True:
            kw.append(f"sha256digest={hashlib.sha256(e.data).hexdigest()}")
    if flags:
        kw.append(f"flags={flags}")
    return f"{escape(e.rel)} {' '.join(kw)}"


def spec(tree: Tree, epoch: int, digests: bool = True) -> str:
    """One full-path line per entry, parents first; readable by FreeBSD mtree -f, makefs -F and bsdtar."""
    lines = ["#mtree 2.0", "# carpguard image tree (root:wheel unless noted)"]
    lines += [line(e, epoch, digests) for e in tree]
    return "\n".join(lines) + "\n"

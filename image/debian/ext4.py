"""A reproducible ext4 root file system from a directory: mke2fs -d, fixed UUID/hash seed/times, atimes and ctimes normalised."""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from image.debian.rootfs import run, tool

NAMESPACE = uuid.UUID("0d5b0f0a-4a8e-4f55-8c1e-6a1e2f3b9c10")
BLOCK = 4096
INODE_RATIO = 16384  # bytes per inode: a root fs of many small files (Debian's "small" usage type)
SLACK = 1.25  # the file system is its contents plus 25 % (logs, a sync's releases), at least FLOOR bytes
FLOOR = 1536 << 20


def fs_uuid(node: str, epoch: int, what: str = "root") -> str:
    return str(uuid.uuid5(NAMESPACE, f"{node}:{epoch}:{what}"))


def tree_bytes(root: Path) -> int:
    """Bytes the tree needs on ext4: each file rounded up to a block, plus an inode's worth of metadata each."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += (st.st_size + BLOCK - 1) // BLOCK * BLOCK + 256
    return total


def size_for(root: Path) -> int:
    need = max(int(tree_bytes(root) * SLACK), FLOOR)
    return (need + (1 << 20) - 1) >> 20 << 20


def clamp_times(root: Path, epoch: int) -> None:
    """Every mtime later than the epoch becomes the epoch; atime = mtime (mke2fs -d copies both)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            m = os.lstat(p).st_mtime_ns
            t = min(m, epoch * 10**9)
            os.utime(p, ns=(t, t), follow_symlinks=False)
    os.utime(root, ns=(epoch * 10**9, epoch * 10**9))


def used_inodes(image: Path) -> list[int]:
    """Inode numbers in use, from dumpe2fs's per-group free-inode ranges."""
    out = run([tool("dumpe2fs", "e2fsprogs"), str(image)], "dumpe2fs").stdout
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)", out, re.M).group(1))
    used: list[int] = []
    for g, free in enumerate(re.findall(r"^\s+Free inodes: ?(.*)$", out, re.M)):
        lo, hi = g * per_group + 1, (g + 1) * per_group
        gone = set()
        for part in filter(None, (x.strip() for x in free.split(","))):
            a, _, b = part.partition("-")
            gone.update(range(int(a), int(b or a) + 1))
        used += [i for i in range(lo, hi + 1) if i not in gone]
    return used


def make_ext4(image: Path, root: Path, node: str, epoch: int, label: str = "root", work: Path | None = None) -> dict:
    """mke2fs -d with a UUID and hash seed derived from the node and epoch, every time = epoch (E2FSPROGS_FAKE_TIME
    for the file system's own, clamped mtimes, and a debugfs pass setting every used inode's atime and ctime, which
    mke2fs copies from the build tree)."""
    uid = fs_uuid(node, epoch)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch), "LC_ALL": "C", "TZ": "UTC"}
    clamp_times(root, epoch)
    size = size_for(root)
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    run([tool("mke2fs", "e2fsprogs"), "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-i", str(INODE_RATIO), "-L", label,
         "-U", uid, "-E", f"hash_seed={uid},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
         "-d", str(root), str(image)], "mke2fs", env=env)
    script = (work or image.parent) / f".{image.name}.ctime"
    fields = ("atime", "ctime")  # atimes: reading the tree (cp, mke2fs's own readdir) moves them under relatime
    script.write_text("".join(f"sif <{i}> {f} @{epoch}\nsif <{i}> {f}_extra 0\n" for i in used_inodes(image) for f in fields))
    try:
        run([tool("debugfs", "e2fsprogs"), "-w", "-f", str(script), str(image)], "debugfs (ctime)", env=env)
    finally:
        script.unlink(missing_ok=True)
    return {"uuid": uid, "bytes": size, "label": label}

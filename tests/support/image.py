"""Helpers for the image tests: run `appliance image`, open UFS images and GPT disks with dissect, the start of a
script run in a Debian root tree."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.env import APPLIANCE

# The start of a script run in a Debian root tree (the .deb test's chroot, a copy of an image's root): every step
# must pass, apt asks nothing, and `snap FILE` lists the tree's files (not what the kernel, apt and dpkg own) and its
# users, so two states of the tree compare with diff.
DEBIAN_TREE_SH = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin
snap() {
  find / -xdev \( -path /proc -o -path /dev -o -path /sys -o -path /tmp -o -path /run -o -path /var/log \
      -o -path /var/cache -o -path /var/lib/dpkg -o -path /var/lib/apt -o -name '*-' \) -prune -o -print | sort > "$1"
  cat /etc/passwd /etc/group /etc/shadow /etc/gshadow > "$1.users"
}
"""


def run_image(config: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    e.pop("SOURCE_DATE_EPOCH", None)
    e.update(env or {})
    return subprocess.run([APPLIANCE, "image", "-c", str(config), "--out", str(out), *args],
                          capture_output=True, text=True, env=e, timeout=300)


def ufs(path_or_fh):
    from dissect.ffs import FFS

    fh = open(path_or_fh, "rb") if isinstance(path_or_fh, (str, Path)) else path_or_fh
    return FFS(fh)


def attrs(fs, path: str) -> tuple[int, int, int]:
    """(permission bits, uid, gid) of a path in a UFS image, without following a final symlink."""
    node = fs.get(path)
    return node.inode.di_mode & 0o7777, node.inode.di_uid, node.inode.di_gid

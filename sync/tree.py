"""Config tree content: what is synced, its SHA-256 hash and per-file manifest, and the payload safety check."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from sync.errors import BAD_INPUT, SyncError

META_FILE = ".release.json"  # per-release metadata (generation, hash, time); never part of the hash or the transfer
# Node-local paths (relative to the tree root), never synced, never hashed, carried over on a swap.
NODE_LOCAL = ("node.yaml", "keys/hosts")
# Derived from the tree by `appliance check --compile` (the filter's list index): not hashed and not transferred;
# every node rebuilds it from the synced lists while checking a release, so each release still carries its index.
DERIVED = ("compiled",)
# rsync leftovers that must not count as content
TRANSIENT_PREFIXES = (".rsync-partial",)


def rsync_excludes(transfer: bool = True) -> list[str]:
    """rsync --exclude patterns (anchored at the root): what never leaves a node, plus derived files on the wire."""
    local = [f"/{META_FILE}", *(f"/{p}" for p in NODE_LOCAL), ".rsync-partial/"]
    return local + [f"/{p}" for p in DERIVED] if transfer else local


def _skipped(rel: str) -> bool:
    if rel == META_FILE or any(rel == p or rel.startswith(p + "/") for p in NODE_LOCAL + DERIVED):
        return True
    return any(part.startswith(TRANSIENT_PREFIXES) for part in rel.split("/"))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest(root: Path) -> dict[str, str]:
    """relative path -> "f:<sha256>:<mode>" | "l:<target>" | "d:<mode>" for everything that is synced."""
    root = Path(root)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        keep = []
        for d in sorted(dirnames):
            rel = f"{rel_dir}/{d}" if rel_dir else d
            if _skipped(rel):
                continue
            full = Path(dirpath) / d
            if full.is_symlink():
                out[rel] = "l:" + os.readlink(full)
                continue
            out[rel] = f"d:{stat.S_IMODE(full.lstat().st_mode):o}"
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if _skipped(rel):
                continue
            full = Path(dirpath) / name
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "l:" + os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"f:{_file_digest(full)}:{stat.S_IMODE(st.st_mode):o}"
            else:
                out[rel] = "x:special"
    return dict(sorted(out.items()))


def tree_hash(root: Path, files: dict[str, str] | None = None) -> str:
    """One SHA-256 over the sorted manifest: equal trees give equal hashes on every node."""
    files = manifest(root) if files is None else files
    h = hashlib.sha256()
    for rel, entry in files.items():
        h.update(rel.encode() + b"\0" + entry.encode() + b"\n")
    return h.hexdigest()


def diff(old: dict[str, str], new: dict[str, str]) -> dict[str, list[str]]:
    """Files added / changed / removed between two manifests (directories left out)."""
    def files(m: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in m.items() if not v.startswith("d:")}

    a, b = files(old), files(new)
    return {
        "added": sorted(set(b) - set(a)),
        "changed": sorted(k for k in set(a) & set(b) if a[k] != b[k]),
        "removed": sorted(set(a) - set(b)),
    }


def check_safe(root: Path) -> None:
    """Refuse a staged tree with special files or symlinks that leave the tree (path traversal)."""
    root = Path(root).resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root)
            if _skipped(str(rel)):
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                resolved = (full.parent / target).resolve() if not os.path.isabs(target) else Path(target).resolve()
                if os.path.isabs(target) or not (resolved == root or root in resolved.parents):
                    raise SyncError(f"{rel}: symlink to {target!r} points outside the config tree (refused)", BAD_INPUT)
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise SyncError(f"{rel}: not a regular file or directory (refused)", BAD_INPUT)

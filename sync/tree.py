"""Config tree content: what is synced, its SHA-256 hash and per-file manifest, and the payload safety check."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Callable

from sync.errors import BAD_INPUT, SyncError
from sync.policy import rule_no_code

META_FILE = ".release.json"  # per-release metadata (generation, hash, time); never part of the hash or the transfer
# Node-local paths (relative to the tree root), never synced, never hashed, carried over on a swap.
NODE_LOCAL = ("node.yaml", "keys/hosts")
# Derived from the tree by `appliance check --compile` (the filter's list index): not hashed and not transferred;
# every node rebuilds it from the synced lists while checking a release, so each release still carries its index.
DERIVED = ("compiled",)
# rsync leftovers that must not count as content
TRANSIENT_PREFIXES = (".rsync-partial",)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


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
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | O_NONBLOCK)  # never through a symlink, never blocks on a FIFO
    with os.fdopen(fd, "rb") as f:
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


# ---------------------------------------------------------------- what a received tree may hold
# A synced tree holds regular files and directories only: no symlinks (nothing in a config tree needs one, and a
# link is a way out of the tree), no hard links, devices, FIFOs or sockets, no setuid/setgid/sticky bits, nothing
# group- or world-writable; no file over the size cap (sync.max_file_mb) and at most MAX_FILES entries.
MAX_FILE_BYTES = 256 << 20  # the default of sync.max_file_mb
MAX_FILES = 100_000
MAX_SHOWN = 10  # problems named in one refusal
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX

Rule = Callable[[str, os.stat_result], "str | None"]  # (relative path, lstat) -> why it is refused, or None


def _rule_type(rel: str, st: os.stat_result) -> str | None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symlink (refused: a synced tree holds regular files and directories only)"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return f"{kind} (refused: a synced tree holds regular files and directories only)"


def _rule_links(rel: str, st: os.stat_result) -> str | None:
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        return f"a hard link ({st.st_nlink} names for one file; refused)"
    return None


def _rule_mode(rel: str, st: os.stat_result) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return None
    if mode & SPECIAL_BITS:
        return f"mode {mode:o} has setuid/setgid/sticky bits (refused)"
    if mode & 0o022:
        return f"mode {mode:o} is group/world-writable (refused; chmod go-w)"
    return None


# Every entry of a staged tree goes through each rule; a rule returns why the entry is refused, or None.
RULES: list[Rule] = [_rule_type, _rule_links, _rule_mode, rule_no_code]


def show(rel: str) -> str:
    """A pushed path as it may appear in a message: printable, one line, bounded."""
    text = rel if rel.isprintable() else ascii(rel)[1:-1]
    return text if len(text) <= 200 else text[:200] + "..."


def _entries(root: Path, max_files: int):
    """(relative path, lstat) of every entry under root, walked through directory fds, never following a link."""
    count = 0
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            count += 1
            if count > max_files:
                yield "", None
                return
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            yield (name if rel_dir == "." else f"{rel_dir}/{name}"), st


def check_staged(root: Path, max_file_bytes: int = MAX_FILE_BYTES, max_files: int = MAX_FILES,
                 rules: list[Rule] | None = None) -> list[str]:
    """Every problem of a received tree as "path: why", checking every entry (no skip list). Reads no content."""
    root = Path(root)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        return [f"{root}: not a directory (refused)"]
    problems: list[str] = []
    for rel, st in _entries(root, max_files):
        if st is None:
            problems.append(f"more than {max_files} files and directories (refused)")
            break
        for rule in rules if rules is not None else RULES:
            why = rule(rel, st)
            if why:
                problems.append(f"{show(rel)}: {why}")
        if stat.S_ISREG(st.st_mode) and st.st_size > max_file_bytes:
            problems.append(f"{show(rel)}: {st.st_size} bytes, over the cap of {max_file_bytes} "
                            f"(sync.max_file_mb; refused)")
    return problems


def refuse(problems: list[str], what: str = "the staged tree") -> None:
    """Raise SyncError(BAD_INPUT) naming the first problems; nothing of any file's content is in the message."""
    if problems:
        more = f" (and {len(problems) - MAX_SHOWN} more)" if len(problems) > MAX_SHOWN else ""
        raise SyncError(f"{what} is refused: " + "; ".join(problems[:MAX_SHOWN]) + more, BAD_INPUT)


def check_safe(root: Path, max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """check_staged, raising SyncError(BAD_INPUT) on the first problems."""
    refuse(check_staged(root, max_file_bytes))

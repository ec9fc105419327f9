"""Release generations on one node: <state>/releases/<gen>, the atomic `current` symlink, metadata, pruning, rollback."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from sync import tree
from sync.errors import BAD_INPUT, SyncError

log = logging.getLogger("appliance.sync")

GEN_RE = re.compile(r"^[1-9][0-9]{0,8}$")  # 1 .. 999999999
HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def parse_generation(text: str, what: str = "generation") -> int:
    """A generation number from untrusted text: a positive decimal integer without sign or leading zeros."""
    if not isinstance(text, str) or not GEN_RE.match(text):
        raise SyncError(f"{what}: {text!r} is not a generation number (a positive integer, 1-999999999)", BAD_INPUT)
    return int(text)


def parse_hash(text: str) -> str:
    if not isinstance(text, str) or not HASH_RE.match(text):
        raise SyncError(f"hash: {text!r} is not a SHA-256 tree hash (64 lower-case hex digits)", BAD_INPUT)
    return text


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mirror(src: Path, dst: Path, carry_from: Path | None = None) -> None:
    """Make dst hold the synced content of src (local rsync: only changed files are rewritten)."""
    dst.mkdir(parents=True, exist_ok=True)
    cmd = ["rsync", "-a", "--delete", *(f"--exclude={e}" for e in tree.rsync_excludes(transfer=False)), f"{src}/", f"{dst}/"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SyncError(f"copying {src} to {dst} failed: {r.stderr.strip()}", 1)
    if carry_from is not None:
        carry_node_local(carry_from, dst)


def carry_node_local(src: Path, dst: Path) -> None:
    """Copy node-local files (node.yaml, keys/hosts/) from the live release into a new one."""
    for rel in tree.NODE_LOCAL:
        s, d = src / rel, dst / rel
        if not s.exists() or d.exists():
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d, symlinks=True)
        else:
            shutil.copy2(s, d)


class Releases:
    """The releases of one node under its state dir."""

    def __init__(self, state: Path):
        self.state = Path(state)
        self.dir = self.state / "releases"
        self.current = self.state / "current"
        self.staging = self.state / "sync" / "staging"

    # ------------------------------------------------------------ reading
    def generations(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.dir.iterdir() if GEN_RE.match(p.name) and p.is_dir())

    def path(self, gen: int) -> Path:
        return self.dir / str(gen)

    def live(self) -> int | None:
        """The generation `current` points to, or None when there is no release yet."""
        try:
            target = os.readlink(self.current)
        except (FileNotFoundError, OSError):
            return None
        name = Path(target).name
        return int(name) if GEN_RE.match(name) and self.path(int(name)).is_dir() else None

    def meta(self, gen: int, compute: bool = True) -> dict:
        """The release's metadata; a release without it (the image's releases/1) gets its hash computed."""
        p = self.path(gen)
        try:
            data = json.loads((p / tree.META_FILE).read_text())
            if isinstance(data, dict) and HASH_RE.match(str(data.get("hash", ""))):
                return {**data, "generation": gen, "meta": True}
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        out = {"generation": gen, "meta": False, "time": p.stat().st_mtime if p.exists() else None}
        if compute and p.is_dir():
            out["hash"] = tree.tree_hash(p)
        return out

    def listing(self) -> list[dict]:
        live = self.live()
        out = []
        for g in self.generations():
            m = self.meta(g)
            current = tree.tree_hash(self.path(g)) if m.get("meta") else m["hash"]
            out.append({"generation": g, "live": g == live, "time": m.get("time"), "hash": m["hash"],
                        "source": m.get("source", "image" if not m.get("meta") else "?"),
                        "intact": current == m["hash"]})
        return out

    # ------------------------------------------------------------ writing
    def cleanup(self) -> None:
        """Remove leftovers of an interrupted install (never a numbered release)."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith((".incoming-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)
        for p in self.state.glob(".current.*"):
            p.unlink(missing_ok=True)

    def install(self, src: Path, gen: int, digest: str, source: str, carry_from: Path | None = None,
                expect: str | None = None) -> Path:
        """Copy src into releases/<gen> (via a temp dir and a rename) with its metadata; not yet live."""
        live = self.live()
        if gen == live:
            raise SyncError(f"generation {gen} is live; it cannot be replaced", BAD_INPUT)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cleanup()
        tmp = self.dir / f".incoming-{gen}"
        mirror(src, tmp, carry_from)
        got = tree.tree_hash(tmp)
        if got != (expect or digest):
            shutil.rmtree(tmp, ignore_errors=True)
            raise SyncError(f"release {gen}: copied tree hash {got[:12]} is not {(expect or digest)[:12]} (changed while copying?)", 1)
        meta = {"generation": gen, "hash": digest, "time": time.time(), "source": source}
        (tmp / tree.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        dst = self.path(gen)
        if dst.exists():  # an old, not live release with this number (e.g. after a rollback): replace it
            trash = self.dir / f".trash-{gen}"
            os.rename(dst, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, dst)
        fsync_dir(self.dir)
        return dst

    def activate(self, gen: int) -> int | None:
        """Point `current` at releases/<gen> with one atomic rename; return the generation that was live."""
        if not self.path(gen).is_dir():
            raise SyncError(f"generation {gen}: no such release in {self.dir} (have: {', '.join(map(str, self.generations())) or 'none'})", BAD_INPUT)
        old = self.live()
        if self.current.exists() and not self.current.is_symlink():
            raise SyncError(f"{self.current} is not a symlink; move it to {self.dir}/1 first", BAD_INPUT)
        tmp = self.state / f".current.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(f"releases/{gen}", tmp)
        os.replace(tmp, self.current)
        fsync_dir(self.state)
        return old

    def prune(self, keep: int) -> list[int]:
        """Delete the oldest releases beyond `keep`; never the live one."""
        live = self.live()
        gens = [g for g in self.generations() if g != live]
        excess = max(0, len(gens) + (1 if live is not None else 0) - keep)
        removed = []
        for g in gens[:excess]:
            trash = self.dir / f".trash-{g}"
            os.rename(self.path(g), trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(g)
        return removed

    def write_staging_meta(self, gen: int, digest: str) -> None:
        (self.staging / tree.META_FILE).write_text(json.dumps({"generation": gen, "hash": digest, "time": time.time()}) + "\n")

    def staging_meta(self) -> dict | None:
        try:
            data = json.loads((self.staging / tree.META_FILE).read_text())
            return data if isinstance(data, dict) else None
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def restore_pristine(self, gen: int) -> bool:
        """After a cut, put back the content release <gen> had when it went live (the admin edited it in place).

        The staging dir mirrors the last release that went live on this node; it is used only when its
        hash still equals that release's recorded hash."""
        m = self.meta(gen, compute=False)
        sm = self.staging_meta()
        if not m.get("meta") or not sm or sm.get("generation") != gen or gen == self.live():
            return False
        if tree.tree_hash(self.staging) != m["hash"] or tree.tree_hash(self.path(gen)) == m["hash"]:
            return False
        mirror(self.staging, self.path(gen))
        return True

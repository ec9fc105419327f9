"""Release generations on one node: <state>/releases/<gen>, the atomic `current` symlink, metadata, pruning, rollback."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

from appliance.core.fsio import write_json_atomic
from filters.ruleset import PARSER_VERSION
from sync import tree
from sync.errors import BAD_INPUT, SyncError

STAGING_TOKEN = "staging"  # what the master writes as the remote path; the peer puts its staging dir there

log = logging.getLogger("appliance.sync")

GEN_RE = re.compile(r"^[1-9][0-9]{0,8}$")  # 1 .. 999999999
MAX_GEN = 999_999_999
# How far one push may move a node's generation forward. A forged or runaway number beyond it is refused (it would
# leave no room above it for the master's next cut); `--force` overrides, and is logged as a warning on both sides.
MAX_STEP = 1000
STATE_MODE = 0o711  # <state> and releases/: no listing; the proxy (unprivileged on FreeBSD) reaches current/ through it
PRIVATE_MODE = 0o700  # <state>/sync, the staging dir and a release being installed: root only
HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def parse_generation(text: str, what: str = "generation") -> int:
    """A generation number from untrusted text: a positive decimal integer without sign or leading zeros."""
    if not isinstance(text, str) or not GEN_RE.fullmatch(text):
        raise SyncError(f"{what}: {text!r} is not a generation number (a positive integer, 1-999999999)", BAD_INPUT)
    return int(text)


def parse_hash(text: str) -> str:
    if not isinstance(text, str) or not HASH_RE.fullmatch(text):
        raise SyncError(f"hash: {text!r} is not a SHA-256 tree hash (64 lower-case hex digits)", BAD_INPUT)
    return text


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, mode: int) -> Path:
    """Create a directory with `mode`, or narrow an existing one that is wider; never through a symlink."""
    path = Path(path)
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise SyncError(f"{path} is a symlink; refusing to use it as a state directory", 1)
    if stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode, follow_symlinks=False)
    return path


def mirror(src: Path, dst: Path, carry_from: Path | None = None, transfer: bool = False) -> None:
    """Make dst hold the synced content of src (local rsync: only changed files are rewritten).

    Regular files and directories only (no -l, no -D: a link or a device is never copied); transfer=True also
    leaves out the derived files (compiled/), as on the wire."""
    dst.mkdir(parents=True, exist_ok=True)
    cmd = ["rsync", "-rtpgo", "--delete", *(f"--exclude={e}" for e in tree.rsync_excludes(transfer=transfer)),
           f"{src}/", f"{dst}/"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SyncError(f"copying {src} to {dst} failed: {r.stderr.strip()}", 1)
    if carry_from is not None:
        carry_node_local(carry_from, dst)


def carry_node_local(src: Path, dst: Path) -> None:
    """Copy node-local files (node.yaml, keys/hosts/) from the live release into a new one (never a symlink)."""
    no_links = lambda d, names: [n for n in names if os.path.islink(os.path.join(d, n))]  # noqa: E731
    for rel in tree.NODE_LOCAL:
        s, d = src / rel, dst / rel
        if s.is_symlink():
            log.warning("%s is a symlink; not carried into the new release", s)
            continue
        if not s.exists() or d.exists() or d.is_symlink():
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d, symlinks=True, ignore=no_links)
        else:
            shutil.copy2(s, d, follow_symlinks=False)


class Releases:
    """The releases of one node under its state dir."""

    def __init__(self, state: Path):
        self.state = Path(state)
        self.dir = self.state / "releases"
        self.current = self.state / "current"
        self.staging = self.state / "sync" / "staging"
        self.staging_json = self.state / "sync" / "staging.json"  # beside the staging dir: nothing pushed touches it

    def prepare_dirs(self) -> None:
        """The state dirs with their modes (existing wider ones narrowed): sync/ and staging/ are root's alone."""
        ensure_dir(self.state, STATE_MODE)
        ensure_dir(self.dir, STATE_MODE)
        ensure_dir(self.state / "sync", PRIVATE_MODE)
        ensure_dir(self.staging, PRIVATE_MODE)

    def clear_staging(self) -> None:
        """Empty the staging dir (after a refused receive nothing pushed stays); the next push reseeds it."""
        self.staging_json.unlink(missing_ok=True)
        if self.staging.is_symlink():
            self.staging.unlink()
        elif self.staging.exists():
            shutil.rmtree(self.staging)  # fd-based: never follows a link inside
        ensure_dir(self.staging, PRIVATE_MODE)

    # ------------------------------------------------------------ reading
    def generations(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.dir.iterdir() if GEN_RE.fullmatch(p.name) and p.is_dir())

    def path(self, gen: int) -> Path:
        return self.dir / str(gen)

    def live(self) -> int | None:
        """The generation `current` points to, or None when there is no release yet."""
        try:
            target = os.readlink(self.current)
        except (FileNotFoundError, OSError):
            return None
        name = Path(target).name
        return int(name) if GEN_RE.fullmatch(name) and self.path(int(name)).is_dir() else None

    def meta(self, gen: int, compute: bool = True) -> dict:
        """The release's metadata; a release without it (the image's releases/1) gets its hash computed."""
        p = self.path(gen)
        try:
            data = json.loads((p / tree.META_FILE).read_text())
            if isinstance(data, dict) and HASH_RE.fullmatch(str(data.get("hash", ""))):
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
                expect: str | None = None, derived: bool = True) -> Path:
        """Copy src into releases/<gen> (via a temp dir and a rename) with its metadata; not yet live.
        derived=False leaves out src's compiled/ (stale: the caller compiles the release's own)."""
        tmp = self.incoming(src, gen, carry_from, transfer=not derived)
        got = tree.tree_hash(tmp)
        if got != (expect or digest):
            shutil.rmtree(tmp, ignore_errors=True)
            raise SyncError(f"release {gen}: copied tree hash {got[:12]} is not {(expect or digest)[:12]} (changed while copying?)", 1)
        return self.commit(tmp, gen, digest, source)

    def incoming(self, src: Path, gen: int, carry_from: Path | None = None, transfer: bool = False) -> Path:
        """A fresh releases/.incoming-<gen> (0700, made here) holding a copy of src; transfer=True leaves out
        compiled/ too (a received tree: the receiver compiles its own index into the copy)."""
        if gen == self.live():
            raise SyncError(f"generation {gen} is live; it cannot be replaced", BAD_INPUT)
        ensure_dir(self.dir, STATE_MODE)
        self.cleanup()
        tmp = self.dir / f".incoming-{gen}"
        os.mkdir(tmp, PRIVATE_MODE)
        mirror(src, tmp, carry_from, transfer=transfer)
        return tmp

    def commit(self, tmp: Path, gen: int, digest: str, source: str) -> Path:
        """Write the metadata into a checked incoming copy and rename it to releases/<gen>."""
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
        """Delete the oldest releases beyond `keep`, and any numbered more than MAX_STEP above the live one (a
        forged or runaway number, replaced by a forced sync); never the live one."""
        live = self.live()
        gens = [g for g in self.generations() if g != live]
        out_of_range = [g for g in gens if live is not None and g > live + MAX_STEP]
        gens = [g for g in gens if g not in out_of_range]
        if out_of_range:
            log.warning("releases %s are more than %d above the live generation %s: removed", out_of_range, MAX_STEP, live)
        excess = max(0, len(gens) + (1 if live is not None else 0) - keep)
        removed = []
        for g in gens[:excess] + out_of_range:
            trash = self.dir / f".trash-{g}"
            os.rename(self.path(g), trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(g)
        return removed

    def write_staging_meta(self, gen: int, digest: str) -> None:
        """Record what the staging mirror holds, with the list parser that checked it (sync/delta.py trusts its
        lines only under the same parser)."""
        ensure_dir(self.staging_json.parent, PRIVATE_MODE)
        write_json_atomic(self.staging_json, {"generation": gen, "hash": digest, "time": time.time(),
                                              "parser": PARSER_VERSION}, mode=0o600)

    def staging_meta(self) -> dict | None:
        try:
            data = json.loads(self.staging_json.read_text())
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
        mirror(self.staging, self.path(gen), transfer=True)  # its compiled/ stays (a sync may be compiling from it)
        return True

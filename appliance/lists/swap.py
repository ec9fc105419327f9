"""A new lists tree beside the live one: built from the live tree and the source, compiled by the proxy's own
compiler, then swapped in with one rename; the old tree stays until the swap and the index are done."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from appliance.core.limits import LimitExceeded, run_bounded
from appliance.core.model import Appliance
from appliance.lists.errors import failed, refused
from filters import ruleset
from filters.lists import KINDS
from sync import tree

NEW_TAG, OLD_TAG = ".update-", ".old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def leftovers(live: Path) -> list[Path]:
    """Trees an interrupted update left beside the live one (`.<name>.update-PID`, `.<name>.old-PID`)."""
    if not live.parent.is_dir():
        return []
    heads = (f".{live.name}{NEW_TAG}", f".{live.name}{OLD_TAG}")
    return sorted(p for p in live.parent.iterdir() if p.name.startswith(heads) and p.is_dir() and not p.is_symlink())


def build(live: Path, at: Path, source, targets: dict[str, list[tuple[str, dict[str, str]]]]) -> Path:
    """The new tree at `at`: the live tree's categories (a local allowlist stays as it is), with each taken category
    replaced by what the source has for it (two upstream categories mapped to one are appended)."""
    if live.is_dir():
        shutil.copytree(live, at, symlinks=True, copy_function=shutil.copy2)
    else:
        at.mkdir(parents=True)
    os.chmod(at, 0o755)
    files: dict[str, Path] = {}
    for cat, ups in targets.items():
        d = at / cat
        if d.is_symlink() or d.is_file():
            d.unlink()
        elif d.is_dir():
            shutil.rmtree(d)
        d.mkdir(mode=0o755)
        for _, kinds in ups:
            for kind in KINDS:
                if kind in kinds:
                    files[kinds[kind]] = d / kind
    source.copy(files)
    return at


def _compile(cfg: Appliance, base: Path, out: Path | None) -> int:
    return ruleset.compile_index(cfg, base, out).entries


def compile_check(cfg: Appliance, base: Path, new: Path, out: Path) -> int:
    """Compile the new tree with the proxy's compiler into a throw-away index, in a child bounded in memory and
    CPU (the source is not ours); a list it rejects (filter.bad_lines: reject) refuses the update."""
    trial = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"lists": str(new.resolve())})})
    try:
        return run_bounded(_compile, trial, base, out, what=f"the compile of the new lists ({new})")
    except (ruleset.ListError, LimitExceeded) as e:
        raise refused(f"{e}\nthe live lists are unchanged") from None
    finally:
        out.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): both names stay valid throughout. False where the system has no such call."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap(live: Path, new: Path) -> Path | None:
    """Make `new` the live tree; returns where the old tree now is (None: there was none). One exchange of the two
    names where the system has it (Linux), else two renames with the old name put back if the second fails."""
    if not live.exists():
        os.rename(new, live)
        return None
    if _exchange(new, live):
        return new
    old = live.with_name(f".{live.name}{OLD_TAG}{os.getpid()}")
    os.rename(live, old)
    try:
        os.rename(new, live)
    except OSError:
        os.rename(old, live)
        raise
    return old


def unswap(live: Path, old: Path | None, failed_at: Path) -> None:
    """Put the old tree back after a failure past the swap; the new one goes to failed_at (then removed)."""
    if old is None:
        os.rename(live, failed_at)
    elif not _exchange(old, live):
        os.rename(live, failed_at)
        os.rename(old, live)
    else:
        os.rename(old, failed_at)
    shutil.rmtree(failed_at, ignore_errors=True)


def install(cfg: Appliance, base: Path, live: Path, new: Path) -> None:
    """Swap the checked tree in and compile the live index for it; any failure puts the old tree back."""
    try:
        old = swap(live, new)
    except OSError as e:
        raise failed(f"cannot swap {new} in as {live}: {e}; the live lists are unchanged") from None
    try:
        ruleset.ensure_index(cfg, base)
    except (ruleset.ListError, OSError) as e:
        unswap(live, old, live.with_name(f".{live.name}{NEW_TAG}{os.getpid()}-failed"))
        raise failed(f"the new lists were swapped in but their index failed ({e}); the old lists are back") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _entries_beside(base: Path, skip: set[Path]) -> int:
    """Entries of the release under `base` outside the `skip` directories (the live and the new lists trees)."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(base):  # does not follow directory links; bounded by the tree
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        n += len(dirnames) + len(filenames)
    return n


def sync_check(cfg: Appliance, base: Path, live: Path, new: Path) -> None:
    """The sync's own check of a tree (sync.tree.check_staged: entry types and modes, sync.max_file_mb, at most
    sync.tree.MAX_FILES entries) on the release as it will be with the new lists: a tree every later sync would
    refuse is refused here, before the swap (review F5)."""
    inside = live.resolve().is_relative_to(base.resolve())
    beside = _entries_beside(base, {live, new}) + 1 if inside else 0  # + 1: the lists directory itself
    problems = tree.check_staged(new, cfg.sync.max_file_mb << 20, max(tree.MAX_FILES - beside, 0))
    if problems:
        shown = "; ".join(problems[:tree.MAX_SHOWN])
        raise refused(f"the release with the new lists would be refused by every sync: {shown}; the live lists are "
                      f"unchanged")

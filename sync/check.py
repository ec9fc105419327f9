"""Validate a config tree with the same checks as `appliance check --compile`: the config model, the list
directories, then the filter's list compiler (which writes the index into the tree)."""
from __future__ import annotations

import os
from pathlib import Path

from appliance.core.errors import ConfigError
from appliance.core.limits import LimitExceeded, run_bounded
from appliance.core.loader import load
from appliance.core.model import Appliance
from filters import ruleset
from sync.errors import BAD_INPUT, SyncError

CONFIG_NAME = "appliance.yaml"


def compile_lists_into(cfg: Appliance, base: Path, previous: Path | None = None) -> ruleset.CompileReport:
    """ruleset.compile_index into base/compiled/, reusing the categories of `previous` whose list bytes are unchanged:
    a private copy of an index root compiled, checked against its recorded sha256 (sync/indextrust.py). None: every
    category parsed, never the index already in base (a live release's compiled/ may belong to the proxy user)."""
    return ruleset.compile_index(cfg, base, previous=previous if previous is not None else ruleset.NO_PREVIOUS)


def validate_tree(root: Path, compile_lists: bool = True, confine: bool = False, previous: Path | None = None) -> Appliance:
    """Load root/appliance.yaml with the config validator, then compile its lists.

    confine: a received tree; its lists must be inside it (filter.lists relative, no '..'), so that the check reads
    nothing outside the tree. previous: this node's own index of its live release (see compile_lists_into).
    Raises SyncError(BAD_INPUT) carrying the validator's or the compiler's own message."""
    path = Path(root) / CONFIG_NAME
    try:
        cfg = load(path)
    except ConfigError as e:
        raise SyncError(str(e), BAD_INPUT) from None
    lists = Path(cfg.filter.lists)
    if confine and (lists.is_absolute() or ".." in lists.parts):
        raise SyncError(f"{CONFIG_NAME}: filter.lists: {cfg.filter.lists!r} is outside the config tree; a synced "
                        f"tree carries its lists (use a relative path such as lists/)", BAD_INPUT)
    if compile_lists and os.environ.get("APPLIANCE_SYNC_NO_COMPILE") != "1":
        try:
            compile_lists_into(cfg, path.resolve().parent, previous)
        except (ruleset.ListError, OSError) as e:
            raise SyncError(str(e), BAD_INPUT) from None
    return cfg


def validate_tree_bounded(root: Path, **kw) -> Appliance:
    """validate_tree on a pushed tree, in a child bounded in memory, CPU and time (appliance.core.limits): a crafted
    config or list file costs this node a bounded amount; hitting a bound is SyncError(BAD_INPUT)."""
    try:
        return run_bounded(validate_tree, Path(root), what=f"the check of {Path(root) / CONFIG_NAME}", **kw)
    except LimitExceeded as e:
        raise SyncError(str(e), BAD_INPUT) from None

"""Validate a config tree with the same checks as `appliance check` (config model + list directories, list compile)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from appliance.core import config as cfgmod
from sync.errors import BAD_INPUT, SyncError

CONFIG_NAME = "appliance.yaml"


def appliance_bin() -> str:
    """The `appliance` entry point of this install (beside the running interpreter), else the one on PATH."""
    here = Path(sys.executable).parent / "appliance"
    if here.exists():
        return str(here)
    arg0 = Path(sys.argv[0])
    return str(arg0.resolve()) if arg0.name == "appliance" and arg0.exists() else "appliance"


@functools.lru_cache(maxsize=1)
def has_compile_check() -> bool:
    """Whether this install's `appliance check` has --compile (the filter engine's list compiler)."""
    try:
        from appliance.cli import main

        check = main.commands.get("check")
        if check is not None:
            return any("--compile" in getattr(p, "opts", []) for p in check.params)
    except ImportError:
        pass
    try:
        r = subprocess.run([appliance_bin(), "check", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "--compile" in r.stdout


def validate_tree(root: Path, compile_lists: bool = True) -> cfgmod.Appliance:
    """Load root/appliance.yaml with the config validator; then the list compiler when available.

    Raises SyncError(BAD_INPUT) carrying the validator's own message."""
    path = Path(root) / CONFIG_NAME
    try:
        cfg = cfgmod.load(path)
    except cfgmod.ConfigError as e:
        raise SyncError(str(e), BAD_INPUT) from None
    if compile_lists and os.environ.get("APPLIANCE_SYNC_NO_COMPILE") != "1" and has_compile_check():
        r = subprocess.run([appliance_bin(), "check", "--compile", "-c", str(path)], capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            msg = "\n".join(l.removeprefix("appliance: error: ") for l in r.stderr.strip().splitlines()) or f"check --compile exited {r.returncode}"
            raise SyncError(msg, BAD_INPUT)
    return cfg

"""The libexec due scripts (appliance-sync-due, appliance-lists-due) loaded as modules, their exec recorded."""
from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

from tests.support.env import ROOT


def load(name: str, config_text: str, tmp_path: Path, monkeypatch) -> ModuleType:
    """packaging/debian/libexec/NAME with CONFIG = tmp_path/appliance.yaml holding config_text, the state dir
    tmp_path, and os.execv recorded in mod.execs (argv lists) instead of run."""
    script = ROOT / "packaging/debian/libexec" / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(script))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(mod)
    (tmp_path / "appliance.yaml").write_text(config_text)
    monkeypatch.setattr(mod, "CONFIG", str(tmp_path / "appliance.yaml"))
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path))
    execs: list[list[str]] = []
    monkeypatch.setattr(mod.os, "execv", lambda path, argv: execs.append(argv))
    mod.execs = execs
    return mod

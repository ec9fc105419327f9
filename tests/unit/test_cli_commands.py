"""The CLI's command table: complete, and a command loads only its own module (the role scripts stay light)."""
from __future__ import annotations

import importlib
import subprocess
import sys

from appliance.cli import COMMAND_MODULES, COMMANDS, main


def test_the_table_names_every_command_and_its_module() -> None:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    found = {name: cmd.callback.__module__ for name, cmd in main.commands.items()}
    assert found == COMMANDS


def test_role_loads_neither_the_proxy_nor_the_image_nor_the_lab() -> None:
    probe = ("import sys, appliance.cli as c; c.main(['role', '--help'], standalone_mode=False); "
             "print(' '.join(sorted(m for m in sys.modules if m.startswith(('filters.proxy', 'image', 'appliance.lab', "
             "'mitmproxy', 'appliance.cli.')))))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.split("\n")[-2].split()
    assert loaded == ["appliance.cli.ha"], loaded

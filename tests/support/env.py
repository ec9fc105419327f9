"""Where things are (repo, examples, the appliance entry point), free loopback ports, skips for a missing tool."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
APPLIANCE = str(Path(sys.executable).parent / "appliance")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def need_tool(*names: str) -> None:
    for n in names:
        if not shutil.which(n, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            pytest.skip(f"needs {n} (make test installs it with apt-get when root)")


def make_config(path: Path, **sections) -> Path:
    """The example config with some sections changed, e.g. ha={"hook_timeout": 1}."""
    data = yaml.safe_load(path.read_text())
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(data))
    return path

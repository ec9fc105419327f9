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
# what `make image` / `make run` leave in examples/ (git-ignored; issue 9: any make target in any order on one clone)
BUILD_LEFTOVERS = ("compiled", "keys")


def copy_examples(dst: Path, examples: Path = EXAMPLES) -> Path:
    """examples/ as on a clean clone (appliance.yaml, debian.yaml, lists/), without what a build left there."""
    examples = Path(examples)
    shutil.copytree(examples, dst, ignore=lambda d, names: list(BUILD_LEFTOVERS) if Path(d) == examples else [])
    return dst


def config_tree(dst: Path, examples: Path = EXAMPLES) -> Path:
    """A node's config tree from the examples: the one cluster file (appliance.yaml) and lists/, nothing else (not
    debian.yaml, a second cluster file with its own CARP pass, nor a build's keys/ or compiled/)."""
    examples = Path(examples)
    shutil.copytree(examples / "lists", dst / "lists")
    shutil.copy2(examples / "appliance.yaml", dst / "appliance.yaml")
    return dst


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

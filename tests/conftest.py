"""Shared test fixtures: paths, free loopback ports, the example config copied to a temp dir, root/tool skips."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
APPLIANCE = str(Path(sys.executable).parent / "appliance")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces / privileged ports); CI runs as root")


def need_tool(*names: str) -> None:
    for n in names:
        if not shutil.which(n, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            pytest.skip(f"needs {n} (make test installs it with apt-get when root)")


@pytest.fixture
def example_tree(tmp_path: Path) -> Path:
    """A writable copy of examples/ (appliance.yaml + lists/); returns the config file path."""
    shutil.copytree(EXAMPLES, tmp_path / "etc")
    return tmp_path / "etc" / "appliance.yaml"


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def origin():
    """A local 1 KB HTTP origin on loopback for one test module (the proxy tests); yields its port."""
    from tests.test_proxy_support import start_origin

    srv, port = start_origin()
    yield port
    srv.shutdown()

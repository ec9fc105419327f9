"""One Debian image build of examples/debian.yaml per test session, shared by the image tests and the VM lab tests."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from appliance.core import loader
from image import debian
from image.debian import tree
from tests.support.env import EXAMPLES, need_tool

TOOLS = ("mmdebstrap", "sgdisk", "mke2fs", "debugfs", "dumpe2fs", "qemu-img", "mkfs.vfat", "mcopy", "dpkg-deb", "unshare")


def _log(msg: str) -> None:
    print(f"image: {msg}", file=sys.stderr)


@pytest.fixture(scope="session")
def debian_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ (debian.yaml, lists/, the git-ignored keys/ when a build made them: same keys, same bytes)."""
    need_tool(*TOOLS)
    d = tmp_path_factory.mktemp("etc")
    shutil.copytree(EXAMPLES, d, dirs_exist_ok=True)
    return d / "debian.yaml"


@pytest.fixture(scope="session")
def debian_deb() -> Path:
    """One .deb for every build of the session: others may commit while the tests run, and a new HEAD is a new .deb."""
    return tree.carpguard_deb(_log)


@pytest.fixture(scope="session")
def debian_dist(debian_config: Path, debian_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The build's out dir (NODE.img, NODE.qcow2, SHA256SUMS, manifest.json, admin_ed25519) and its result."""
    out = tmp_path_factory.mktemp("dist")
    try:
        res = debian.build(loader.load(debian_config), debian_config, out, deb=debian_deb, log=_log)
    except debian.BuildError as e:
        if "mmdebstrap" in str(e) and "deb.debian.org" in str(e):
            pytest.skip(f"no Debian mirror and no cached packages: {str(e).splitlines()[0]}")
        raise
    return out, res

"""One Debian image build of examples/debian.yaml per test run, shared by the image tests and the VM lab tests (also
when they run on different pytest-xdist workers)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.core import loader
from image import debian
from image.debian import tree
from tests.support.env import EXAMPLES, need_tool

SHARE_ENV = "CARPGUARD_TEST_SHARE"
TOOLS = ("mmdebstrap", "sgdisk", "mke2fs", "debugfs", "dumpe2fs", "qemu-img", "mkfs.vfat", "mcopy", "dpkg-deb", "unshare")


def _log(msg: str) -> None:
    print(f"image: {msg}", file=sys.stderr)


@contextmanager
def _shared(tmp_path_factory: pytest.TempPathFactory, name: str):
    """A dir, held under a lock, that every xdist worker of this run sees (their base temp dirs share a parent), or
    $CARPGUARD_TEST_SHARE when set (make test sets it: its parts are separate pytest runs, and the VM part boots the
    image the parallel part built); in a run without workers, one of this session's own. The first to take the lock
    fills it, the others reuse it: one build takes minutes."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get(SHARE_ENV):
        base = Path(os.environ[SHARE_ENV])
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    d = base / name
    d.mkdir(exist_ok=True)
    with open(d.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the holder dies
        yield d, d.parent / f".{name}.done"  # the marker lives beside the dir: the tests check what is in it


@pytest.fixture(scope="session")
def debian_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ (debian.yaml, lists/, the git-ignored keys/ when a build made them: same keys, same bytes)."""
    need_tool(*TOOLS)
    with _shared(tmp_path_factory, "debian-etc") as (d, done):
        if not done.exists():
            shutil.copytree(EXAMPLES, d, dirs_exist_ok=True)
            done.touch()
    return d / "debian.yaml"


@pytest.fixture(scope="session")
def debian_deb() -> Path:
    """One .deb for every build of the session: others may commit while the tests run, and a new HEAD is a new .deb."""
    return tree.carpguard_deb(_log)


@pytest.fixture(scope="session")
def debian_dist(debian_config: Path, debian_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The build's out dir (NODE.img, NODE.qcow2, SHA256SUMS, manifest.json, admin_ed25519) and its manifest."""
    with _shared(tmp_path_factory, "debian-dist") as (out, done):
        if not done.exists():
            try:
                debian.build(loader.load(debian_config), debian_config, out, deb=debian_deb, log=_log)
            except debian.BuildError as e:
                if "mmdebstrap" in str(e) and "deb.debian.org" in str(e):
                    pytest.skip(f"no Debian mirror and no cached packages: {str(e).splitlines()[0]}")
                raise
            done.touch()
    return out, json.loads((out / "manifest.json").read_text())

"""Make targets in any order on one clone: `make image` leaves examples/keys/, and the sync harness still builds."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.core.loader import load
from image.keygen import ensure_keys
from sync import keys as keymod
from tests.support.env import EXAMPLES, need_tool
from tests.support.image import run_image
from tests.support.sync_lab import SyncLab


def _examples_copy(tmp_path: Path) -> Path:
    ex = tmp_path / "examples"
    shutil.copytree(EXAMPLES, ex, ignore=lambda d, names: [keymod.KEYS_DIR] if Path(d) == EXAMPLES else [])
    return ex


@pytest.mark.root
def test_sync_harness_builds_over_examples_with_keys(tmp_path: Path) -> None:
    """What `make image` does to examples/ (keys/ made once, then reused), then the sync harness on that tree."""
    ex = _examples_copy(tmp_path)
    made = ensure_keys(load(ex / "appliance.yaml"), ex)
    built = [keymod.node_sync_key(ex, n) for n in ("fw1", "fw2")]  # the build's per-node keys (keys/hosts/<node>/)
    assert set(built) <= set(made) and not keymod.sync_key(ex).exists()
    lab = SyncLab(tmp_path / "lab", examples=ex)
    try:
        # the lab's own keys: no shared key in its tree (not the one the build left in examples/, nor another), and
        # each node pushes with its own node-local key (sync.keys per-node keys), none of them the build's
        assert not keymod.sync_key(lab.root / "seed").exists() and not keymod.sync_key(lab.master.tree).exists()
        own = {n: node.key.read_bytes() for n, node in lab.nodes.items()}
        assert len(set(own.values())) == len(own) and not {k.read_bytes() for k in built} & set(own.values())
    finally:
        lab.close()


@pytest.mark.root
@pytest.mark.slow
def test_image_then_sync_harness(tmp_path: Path) -> None:
    """`appliance image` (what `make image` runs) into a tmp out dir, then a first sync through the harness."""
    need_tool("makefs", "shellcheck", "ssh-keygen")
    ex = _examples_copy(tmp_path)
    r = run_image(ex / "appliance.yaml", tmp_path / "dist", "-q")
    assert r.returncode == 0, r.stderr
    assert keymod.node_sync_key(ex, "fw1").exists()  # the image step left keys/ behind, as on a clone
    lab = SyncLab(tmp_path / "lab", examples=ex)
    lab.backup.start_sshd()
    try:
        code, rep = lab.master.sync()
        assert code == 0 and rep["peers"][0]["action"] == "pushed", rep
    finally:
        lab.close()

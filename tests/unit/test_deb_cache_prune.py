"""The per-commit .deb cache (image/debian/tree.py) keeps the current commit's package and the newest few others,
and touches nothing else in the cache dir."""
from __future__ import annotations

import os
from pathlib import Path

from image.debian.tree import KEEP_DEBS, prune_debs


def test_keeps_the_newest_commits_and_the_current_one(tmp_path: Path) -> None:
    for i in range(7):
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "carpguard_0.1.0_amd64.deb").write_bytes(b"x")
        os.utime(d, (1000 + i, 1000 + i))
    (tmp_path / ".build.lock").write_text("")
    gone = prune_debs(tmp_path, "c0", keep=3)  # c0 is the oldest, yet the current commit's
    assert sorted(gone) == ["c1", "c2", "c3", "c4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".build.lock", "c0", "c5", "c6"]
    assert prune_debs(tmp_path, "c6", keep=3) == []  # c0, c5, c6: three already
    assert KEEP_DEBS >= 2  # an older checkout's run keeps its package while the newest builds one

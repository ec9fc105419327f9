"""The master's changed-lines check (sync/delta.py): which lines it parses, its base, its refusals (file:line)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from sync import delta, tree
from sync.errors import BAD_INPUT, SyncError
from sync.releases import Releases, mirror
from tests.support.env import config_tree


def _covered(old: bytes, new: bytes) -> None:
    """Every line of new that old does not have is among the lines changed_lines gives, at its own number."""
    first, lines = delta.changed_lines(old, new)
    given = {first + i: l for i, l in enumerate(lines) if l}
    have = set(old.split(b"\n"))
    for no, line in enumerate(new.split(b"\n"), 1):
        if line and line not in have:
            assert given.get(no) == line, (old, new, first, lines, no)


def test_changed_lines_covers_every_new_line() -> None:
    rnd = random.Random(7)
    for _ in range(5000):  # bounded: random small edits, line-wise and byte-wise
        old = bytes(rnd.choice(b"ab.\n") for _ in range(rnd.randint(0, 14)))
        new = bytearray(old)
        for _ in range(rnd.randint(1, 3)):
            op, at = rnd.randint(0, 2), rnd.randint(0, len(new))
            if op == 0 and new:
                new[min(at, len(new) - 1)] = rnd.choice(b"abx\n")
            elif op == 1:
                new[at:at] = rnd.choice([b"x", b"\n", b"ab\nx", b"b"])
            elif new:
                del new[min(at, len(new) - 1)]
        _covered(old, bytes(new))


def test_a_one_line_change_in_a_big_list_gives_that_line() -> None:
    lines = [b"d%d.example" % i for i in range(200_000)]
    old = b"\n".join(lines) + b"\n"
    lines[123_456] = b"changed.example"
    first, got = delta.changed_lines(old, b"\n".join(lines) + b"\n")
    assert (first, got) == (123_457, [b"changed.example"])


@pytest.fixture
def node(tmp_path: Path):
    """A master's state: live generation 2 (checked, mirrored into staging) and its working tree."""
    seed = config_tree(tmp_path / "seed")
    rel = Releases(tmp_path / "state")
    rel.prepare_dirs()
    rel.install(seed, 2, tree.tree_hash(seed), "test")
    rel.activate(2)
    mirror(rel.path(2), rel.staging, transfer=True)
    rel.write_staging_meta(2, tree.tree_hash(rel.staging))
    return rel, rel.path(2)


def _bad_lines(work: Path, mode: str) -> None:
    cfg = work / "appliance.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["filter"]["bad_lines"] = mode
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))


def test_base_is_the_staging_mirror_only_while_it_is_what_went_live(node) -> None:
    rel, _ = node
    assert delta.base_tree(rel) == rel.staging
    domains = rel.staging / "lists" / "adult" / "domains"
    domains.write_text(domains.read_text() + "bad name!\n")  # the mirror changed after it went live: not trusted
    assert delta.base_tree(rel) is None
    rel.write_staging_meta(1, tree.tree_hash(rel.staging))  # a mirror of another generation: not trusted either
    assert delta.base_tree(rel) is None


def test_a_bad_changed_line_is_refused_with_file_and_line(node) -> None:
    rel, work = node
    _bad_lines(work, "reject")
    _bad_lines(rel.staging, "reject")
    domains = work / "lists" / "adult" / "domains"
    n = len(domains.read_text().splitlines())
    domains.write_text(domains.read_text() + "good.example\nbad name!\n")
    with pytest.raises(SyncError) as e:
        delta.check_changed(work, rel.staging)
    assert e.value.exit_code == BAD_INPUT
    assert f"lists/adult/domains:{n + 2}: " in str(e.value) and "bad name!" in str(e.value)
    assert "good.example" not in str(e.value)


def test_a_changed_file_is_checked_and_an_unchanged_bad_line_under_skip_stays_skipped(node) -> None:
    rel, work = node
    domains = work / "lists" / "malware" / "domains"
    domains.write_text(domains.read_text() + "bad name!\n")  # skip (the example's mode): counted, not refused
    assert delta.check_changed(work, rel.staging) is not None
    urls = work / "lists" / "malware" / "urls"
    urls.write_text(urls.read_text() + "http://[::1/x\n")
    assert delta.check_changed(work, rel.staging) is not None


def test_a_stricter_bad_lines_mode_is_the_full_check(node) -> None:
    """Under skip the live lists may hold bad lines that were skipped: reject then needs every line checked."""
    rel, work = node
    _bad_lines(work, "reject")
    assert delta.check_changed(work, rel.staging) is None


def test_a_new_list_file_is_checked_whole(node) -> None:
    rel, work = node
    _bad_lines(work, "reject")
    _bad_lines(rel.staging, "reject")
    new = work / "lists" / "phishing" / "urls"
    new.write_text("example.org/ok\nbad host!/x\n")
    with pytest.raises(SyncError, match=r"lists/phishing/urls:2: "):
        delta.check_changed(work, rel.staging)


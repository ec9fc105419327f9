"""Issue 12, finding 8: a YAML alias bomb is refused while parsing (file:line, small memory), and the check a peer
runs on a pushed tree is bounded in memory, CPU and time (appliance.core.limits.run_bounded)."""
from __future__ import annotations

import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.core import limits
from appliance.core.errors import ApplianceError, ConfigError
from appliance.core.loader import MAX_CONFIG_BYTES, NO_ALIASES, load, parse_yaml
from sync.check import validate_tree_bounded
from sync.errors import BAD_INPUT, SyncError
from tests.support.env import APPLIANCE, EXAMPLES

# the review's file: nine levels of nine aliases (9**9 = 387 million strings if ever expanded), under 2 KB
BOMB = "cluster:\n  vhid: 1\n" + 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def test_the_bomb_is_small() -> None:
    assert len(BOMB) < 2048


def test_aliases_and_anchors_are_refused_with_file_and_line() -> None:
    with pytest.raises(ConfigError) as e:
        parse_yaml(BOMB, "x.yaml")
    assert str(e.value) == f"x.yaml:3:4: {NO_ALIASES} (anchor &a)"
    with pytest.raises(ConfigError, match=rf"y.yaml:2:4: {NO_ALIASES} \(alias \*a\)"):
        parse_yaml("a: 1\nb: *a\n", "y.yaml")  # an alias with no anchor is refused as an alias, not a syntax error
    with pytest.raises(ConfigError, match=rf"z.yaml:2:7: {NO_ALIASES}"):
        parse_yaml("base: {a: 1}\nmore: &m {<<: {b: 2}}\n", "z.yaml")


def test_size_cap(tmp_path: Path) -> None:
    big = tmp_path / "appliance.yaml"
    with open(big, "wb") as f:
        f.write(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load(big)


def test_appliance_check_on_the_bomb_exits_2_with_file_line(tmp_path: Path) -> None:
    p = tmp_path / "appliance.yaml"
    p.write_text(BOMB)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run([APPLIANCE, "-c", str(p), "check"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"appliance: error: {p}:3:4: {NO_ALIASES} (anchor &a)" in r.stderr, r.stderr
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert rss_kb < 300 * 1024 or rss_kb == before, f"`appliance check` reached {rss_kb} KB"


@pytest.mark.timeout(60)
def test_a_pushed_tree_with_the_bomb_is_refused_in_a_small_child(tmp_path: Path) -> None:
    tree = tmp_path / "staging"
    shutil.copytree(EXAMPLES, tree, ignore=shutil.ignore_patterns("compiled", "keys"))
    (tree / "appliance.yaml").write_text(BOMB)
    usage: dict = {}
    with pytest.raises(SyncError) as e:
        validate_tree_bounded(tree, usage=usage)
    assert e.value.exit_code == BAD_INPUT and f"appliance.yaml:3:4: {NO_ALIASES}" in str(e.value)
    here = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert usage["maxrss_kb"] < here + 64 * 1024, usage  # the fork's own pages plus little


@pytest.mark.timeout(60)
def test_a_good_tree_passes_through_the_bound(tmp_path: Path) -> None:
    tree = tmp_path / "staging"
    shutil.copytree(EXAMPLES, tree, ignore=shutil.ignore_patterns("compiled", "keys"))
    cfg = validate_tree_bounded(tree)
    assert cfg.cluster.vhid == load(EXAMPLES / "appliance.yaml").cluster.vhid
    assert (tree / "compiled" / "filter.idx").is_file()  # the child's compile wrote into the tree


def _hog_memory() -> int:
    blocks = []
    for _ in range(64):
        blocks.append(bytearray(64 << 20))  # 4 GiB in all, far past the bound
    return len(blocks)


def _spin() -> None:
    while True:
        pass


def _fail() -> None:
    raise SyncError("refused for a reason", 4)


@pytest.mark.timeout(60)
def test_run_bounded_stops_memory_cpu_and_time() -> None:
    with pytest.raises(limits.LimitExceeded, match="memory bound"):
        limits.run_bounded(_hog_memory, mem_bytes=128 << 20, what="the hog")
    with pytest.raises(limits.LimitExceeded, match="more than 1 s of CPU"):
        limits.run_bounded(_spin, cpu_seconds=1, what="the spin")
    with pytest.raises(limits.LimitExceeded, match="longer than 1 s"):
        limits.run_bounded(__import__("time").sleep, 30, wall=1.0, what="the sleep")
    with pytest.raises(SyncError, match="refused for a reason") as e:
        limits.run_bounded(_fail)
    assert e.value.exit_code == 4
    assert limits.run_bounded(sum, [1, 2, 3]) == 6
    assert isinstance(limits.LimitExceeded("x"), ApplianceError)


# review 12, L1: deep nesting made PyYAML's recursive composer raise RecursionError (a traceback, `receive` exit 1)

def _deep(kind: str, n: int) -> str:
    base = (EXAMPLES / "appliance.yaml").read_text()
    if kind == "list":
        return base + "\nx: " + "[" * n + "]" * n + "\n"
    return base + "\nx: " + "{a: " * n + "1" + "}" * n + "\n"


@pytest.mark.parametrize("kind,n", [("list", 50_000), ("map", 20_000), ("list", 65)])
def test_deep_nesting_is_refused_while_composing(kind, n) -> None:
    with pytest.raises(ConfigError, match=r"^cfg.yaml:\d+:\d+: nested too deeply \(more than 64 levels\)"):
        parse_yaml(_deep(kind, n), "cfg.yaml")


def test_nesting_up_to_the_limit_still_parses() -> None:
    data = parse_yaml("x: " + "[" * 60 + "]" * 60 + "\n", "cfg.yaml")
    assert isinstance(data["x"], list)


def test_appliance_check_on_deep_nesting_exits_2_without_a_traceback(tmp_path: Path) -> None:
    p = tmp_path / "appliance.yaml"
    p.write_text(_deep("list", 50_000))
    r = subprocess.run([APPLIANCE, "-c", str(p), "check"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and f"{p}:" in r.stderr and "nested too deeply" in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_a_pushed_tree_with_deep_nesting_is_refused_as_bad_input(tmp_path: Path) -> None:
    tree = tmp_path / "staging"
    shutil.copytree(EXAMPLES, tree, ignore=shutil.ignore_patterns("compiled", "keys"))
    (tree / "appliance.yaml").write_text(_deep("map", 20_000))
    with pytest.raises(SyncError) as e:
        validate_tree_bounded(tree)
    assert e.value.exit_code == BAD_INPUT and "nested too deeply" in str(e.value)

"""appliance.lists: safe tarball reading, layout detection, mapping and selection, the size floor, the swap."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from appliance.core.loader import load
from appliance.lists import archive, fetch, layout, swap, validate
from appliance.lists.errors import ListsError
from filters import lists as flists
from sync import tree as sync_tree
from tests.support.env import config_tree


def tarball(path: Path, files: dict[str, bytes | str], links: dict[str, str] | None = None,
            hardlinks: dict[str, str] | None = None, devices: tuple[str, ...] = ()) -> Path:
    """A .tar.gz with these regular files (name -> content), symlinks, hard links and character devices."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(raw), 0o644
            tf.addfile(info, io.BytesIO(raw))
        for kind, table in ((tarfile.SYMTYPE, links or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in table.items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tf.addfile(info)
        for name in devices:
            info = tarfile.TarInfo(name)
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tf.addfile(info)
    return path


def domains(n: int, stem: str) -> str:
    return "".join(f"site{i}.{stem}.test\n" for i in range(n))


def ut1(path: Path, adult: int = 40, extra: dict | None = None) -> Path:
    """A UT1-layout tarball: blacklists/<cat>/{domains,urls}, plus a category alias link as UT1 has them."""
    return tarball(path, {"blacklists/adult/domains": domains(adult, "adult"),
                          "blacklists/adult/urls": "porn.test/videos/\n", "blacklists/adult/usage": "black\n",
                          "blacklists/malware/domains": domains(10, "malware"), "blacklists/README": "UT1\n",
                          **(extra or {})}, links={"blacklists/porn": "adult"})


def shalla(path: Path) -> Path:
    return tarball(path, {"BL/porn/domains": domains(30, "porn"), "BL/spyware/domains": domains(5, "spy"),
                          "BL/recreation/sports/domains": domains(4, "sports"), "BL/COPYRIGHT": "shalla\n"})


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return config_tree(tmp_path / "etc")


# ---------------------------------------------------------------- the archive


def test_links_and_devices_are_never_extracted(tmp_path: Path) -> None:
    t = tarball(tmp_path / "a.tgz", {"blacklists/adult/domains": "x.test\n"}, links={"blacklists/adult/urls": "/etc/passwd"},
                hardlinks={"blacklists/adult/expressions": "/etc/shadow"}, devices=("blacklists/adult/dev",))
    listing = archive.TarSource(t, "a.tgz").listing()
    assert list(listing.files) == ["blacklists/adult/domains"]
    assert sorted(listing.skipped) == ["blacklists/adult/dev", "blacklists/adult/expressions", "blacklists/adult/urls"]


@pytest.mark.parametrize("name,needle", [("../../etc/cron.d/x", "'..'"), ("blacklists/../../x/domains", "'..'"),
                                         ("/etc/passwd", "absolute path")])
def test_a_member_leading_out_refuses_the_whole_archive(tmp_path: Path, name: str, needle: str) -> None:
    t = tarball(tmp_path / "evil.tgz", {"blacklists/adult/domains": "x.test\n", name: "owned\n"})
    with pytest.raises(ListsError) as e:
        archive.TarSource(t, "evil.tgz").listing()
    assert needle in str(e.value) and e.value.exit_code == 2


@pytest.mark.parametrize("cut", [0, 1, 100, -40])
def test_empty_and_truncated_tarballs_are_refused(tmp_path: Path, cut: int) -> None:
    whole = ut1(tmp_path / "ut1.tgz", adult=3000).read_bytes()
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(whole[:cut] if cut >= 0 else whole[:cut])
    with pytest.raises(ListsError) as e:
        src = archive.TarSource(bad, "bad.tgz")
        src.listing()
        src.copy({"blacklists/adult/domains": tmp_path / "out"})
    assert "truncated" in str(e.value) or "not a readable tarball" in str(e.value)


def test_member_count_and_size_caps(tmp_path: Path, monkeypatch) -> None:
    t = ut1(tmp_path / "ut1.tgz")
    monkeypatch.setattr(archive, "MAX_MEMBERS", 3)
    with pytest.raises(ListsError, match="more than 3 members"):
        archive.TarSource(t, "ut1.tgz").listing()
    monkeypatch.setattr(archive, "MAX_MEMBERS", 100)
    monkeypatch.setattr(archive, "MAX_TOTAL", 100)
    with pytest.raises(ListsError, match="unpacked; not a list archive"):
        archive.TarSource(t, "ut1.tgz").listing()


def test_a_directory_source_skips_symlinks(tmp_path: Path) -> None:
    d = tmp_path / "src" / "adult"
    d.mkdir(parents=True)
    (d / "domains").write_text("a.test\n")
    (d / "urls").symlink_to("/etc/passwd")
    listing = archive.DirSource(tmp_path / "src", "src").listing()
    assert listing.files == {"adult/domains": 7} and listing.skipped == ["adult/urls"]


# ---------------------------------------------------------------- layout, mapping, selection


def test_layouts_are_detected() -> None:
    lay = layout.detect(["blacklists/adult/domains", "blacklists/adult/usage", "blacklists/README"], "s")
    assert (lay.name, lay.root, lay.categories) == ("UT1", "blacklists", {"adult": {"domains": "blacklists/adult/domains"}})
    lay = layout.detect(["BL/porn/domains", "BL/recreation/sports/urls"], "s")
    assert lay.name == "Shallalist" and set(lay.categories) == {"porn", "recreation/sports"}
    lay = layout.detect(["shallalist/BL/porn/domains"], "s")  # one wrapping directory
    assert lay.name == "Shallalist" and lay.root == "shallalist/BL"
    lay = layout.detect(["adult/domains", "adult/expressions", "README"], "s")
    assert lay.name == "plain" and lay.categories["adult"] == {"domains": "adult/domains", "expressions": "adult/expressions"}


@pytest.mark.parametrize("files", [[], ["README", "docs/index.html"], ["a/b/c/d/domains"]])
def test_an_unknown_layout_is_refused_naming_what_is_there(files: list[str]) -> None:
    with pytest.raises(ListsError, match="unknown layout") as e:
        layout.detect(files, "x.tgz")
    assert e.value.exit_code == 2
    assert ("README" in str(e.value)) == ("README" in files)


def test_mapping_renames_merges_and_leaves_the_rest() -> None:
    lay = layout.detect(["BL/porn/domains", "BL/adult/domains", "BL/spyware/domains", "BL/recreation/sports/domains"], "s")
    sel = layout.select(lay, {"porn": "adult", "adult": "adult", "recreation/sports": "sport"}, "s")
    assert sorted(sel.take) == ["adult", "sport"]
    assert [u for u, _ in sel.take["adult"]] == ["adult", "porn"] and sel.left == ["spyware"]
    everything = layout.select(lay, {}, "s")
    assert sorted(everything.take) == ["adult", "porn", "recreation-sports", "spyware"] and everything.left == []


def test_a_mapped_category_missing_upstream_is_refused() -> None:
    lay = layout.detect(["blacklists/adult/domains"], "s")
    with pytest.raises(ListsError, match=r"lists.categories: 'gambling' not in s \(UT1 layout; it has adult\)"):
        layout.select(lay, {"gambling": "gambling", "adult": "adult"}, "s")


# ---------------------------------------------------------------- source, sha


def test_source_and_sha_resolution(tree: Path, tmp_path: Path) -> None:
    cfg = load(tree / "appliance.yaml")
    with pytest.raises(ListsError, match="lists.source is not set"):
        fetch.resolve(None, None, cfg, tree)
    with pytest.raises(ListsError, match="only https:// URLs"):
        fetch.resolve("http://lists.example/ut1.tgz", None, cfg, tree)
    with pytest.raises(ListsError, match="no such file or directory"):
        fetch.resolve(str(tmp_path / "nope.tgz"), None, cfg, tree)
    with pytest.raises(ListsError, match="not a SHA-256"):
        fetch.resolve("https://lists.example/x.tgz", "abc", cfg, tree)
    t = ut1(tmp_path / "ut1.tgz")
    pinned = cfg.model_copy(update={"lists": cfg.lists.model_copy(update={"source": str(t), "sha256": "0" * 64})})
    assert fetch.resolve(None, None, pinned, tree).sha256 == "0" * 64  # lists.sha256 belongs to lists.source
    other = tmp_path / "other.tgz"
    other.write_bytes(t.read_bytes())
    assert fetch.resolve(str(other), None, pinned, tree).sha256 is None  # another SOURCE: --sha256 or nothing
    assert fetch.resolve(str(tmp_path), None, cfg, tree).kind == "directory"
    with pytest.raises(ListsError, match="is a directory"):
        fetch.resolve(str(tmp_path), "a" * 64, cfg, tree)
    with open(t, "rb") as f:
        with pytest.raises(ListsError, match="is not the expected"):
            fetch.check_sha(f, "0" * 64, "ut1.tgz")
        assert fetch.check_sha(f, None, "ut1.tgz") == fetch.file_sha256(f) == hashlib.sha256(t.read_bytes()).hexdigest()


def test_the_tarball_hashed_is_the_tarball_read(tmp_path: Path) -> None:
    """What was hashed is what is unpacked: the source reads the one open file, so a path swapped after the check
    (a local tarball replaced meanwhile) changes nothing."""
    t = ut1(tmp_path / "ut1.tgz")
    with open(t, "rb") as f:
        fetch.check_sha(f, hashlib.sha256(t.read_bytes()).hexdigest(), "ut1.tgz")
        os.replace(tarball(tmp_path / "evil.tgz", {"blacklists/evil/domains": domains(50, "evil")}), t)
        assert "blacklists/evil/domains" not in archive.open_source("tarball", f, "ut1.tgz").listing().files


def test_a_member_twice_after_normalisation_is_refused(tmp_path: Path) -> None:
    """Review F5b: `blacklists/adult/domains` then `./blacklists/adult/domains`: the listing kept the last size, the
    copy the first content, so a 6 MB file passed a 1 MiB sync.max_file_mb."""
    t = tarball(tmp_path / "dup.tgz", {"blacklists/adult/domains": domains(3000, "big"),
                                        "./blacklists/adult/domains": domains(2, "small")})
    with pytest.raises(ListsError, match="'blacklists/adult/domains' appears twice; nothing was unpacked"):
        archive.TarSource(t, "dup.tgz").listing()
    with pytest.raises(ListsError, match="appears twice"):
        archive.TarSource(tarball(tmp_path / "fl.tgz", {"blacklists/adult/domains": "a.test\n"},
                                  links={"./blacklists/adult/domains": "/etc/passwd"}), "fl.tgz").listing()


def test_the_number_of_categories_taken_is_capped() -> None:
    """Review F5a: 60k categories (an empty lists.categories takes all) made a tree every sync refused."""
    many = layout.Layout("UT1", "blacklists", {f"c{i}": {"domains": f"blacklists/c{i}/domains"}
                                               for i in range(layout.MAX_CATEGORIES + 1)})
    with pytest.raises(ListsError, match=f"{layout.MAX_CATEGORIES + 1} categories to take, over the "
                                         f"{layout.MAX_CATEGORIES}"):
        layout.select(many, {}, "many.tgz")
    assert len(layout.select(many, {"c1": "one"}, "many.tgz").take) == 1


def test_a_release_the_sync_would_refuse_is_refused_before_the_swap(tree: Path, tmp_path: Path) -> None:
    """Review F5: the sync's own staged-tree check (file count, sync.max_file_mb) runs on the release as it would
    be with the new lists, before the swap."""
    cfg = load(tree / "appliance.yaml")
    new, _ = _build(tree, tmp_path, ut1(tmp_path / "ut1.tgz"))
    swap.sync_check(cfg, tree, tree / "lists", new)  # as it is: fine
    (new / "adult" / "domains").write_bytes(b"x.test\n" * ((1 << 20) // 7 + 1))
    small = cfg.model_copy(update={"sync": cfg.sync.model_copy(update={"max_file_mb": 1})})
    with pytest.raises(ListsError, match=r"refused by every sync: adult/domains: \d+ bytes, over the cap of 1048576"):
        swap.sync_check(small, tree, tree / "lists", new)
    beside = sum(1 for _ in tree.rglob("*")) - sum(1 for _ in (tree / "lists").rglob("*"))
    monkey = pytest.MonkeyPatch()
    try:
        monkey.setattr(sync_tree, "MAX_FILES", beside + sum(1 for _ in new.rglob("*")) - 1)  # one entry too many
        with pytest.raises(ListsError, match="more than .* files and directories"):
            swap.sync_check(cfg, tree, tree / "lists", new)
        monkey.setattr(sync_tree, "MAX_FILES", beside + sum(1 for _ in new.rglob("*")))
        swap.sync_check(cfg, tree, tree / "lists", new)
    finally:
        monkey.undo()


# ---------------------------------------------------------------- the floor, the swap


def _build(tree: Path, tmp_path: Path, src: Path, mapping: dict | None = None) -> tuple[Path, dict]:
    source = archive.TarSource(src, src.name)
    sel = layout.select(layout.detect(list(source.listing().files), "s"), mapping or {}, "s")
    new = swap.build(tree / "lists", tmp_path / "new", source, sel.take)
    return new, {c: [u for u, _ in ups] for c, ups in sel.take.items()}


def test_the_floor_refuses_an_emptied_or_shrunk_category(tree: Path, tmp_path: Path) -> None:
    cfg = load(tree / "appliance.yaml")
    new, taken = _build(tree, tmp_path, ut1(tmp_path / "ut1.tgz", adult=40))
    rep = validate.check(cfg, new, tree / "lists", taken)
    assert rep["adult"]["entries"] == 41 and rep["adult"]["files"]["urls"] == {"entries": 1, "bad_lines": 0}
    big = cfg.model_copy(update={"lists": cfg.lists.model_copy(update={"min_entries": 20})})
    with pytest.raises(ListsError, match=r"malware \(from malware\): 10 entries, below lists.min_entries \(20\)"):
        validate.check(big, new, tree / "lists", taken)
    with pytest.raises(ListsError, match=r"adult \(from adult\): 3 entries, below lists.min_ratio \(0.5\) of the 41"):
        validate.check(cfg, _build(tree, tmp_path / "b", ut1(tmp_path / "small.tgz", adult=2))[0], new, taken)


def test_bad_lines_are_counted_per_file(tree: Path, tmp_path: Path) -> None:
    cfg = load(tree / "appliance.yaml")
    src = ut1(tmp_path / "ut1.tgz", extra={"blacklists/adult/domains": "good.test\nbad host!!\n/slash\n"})
    new, taken = _build(tree, tmp_path, src, {"adult": "adult"})
    assert validate.check(cfg, new, tree / "lists", taken)["adult"]["files"]["domains"] == {"entries": 1, "bad_lines": 2}


def test_build_keeps_local_categories_and_replaces_taken_ones(tree: Path, tmp_path: Path) -> None:
    (tree / "lists" / "adult" / "expressions").write_text("local-only\n")
    new, _ = _build(tree, tmp_path, shalla(tmp_path / "bl.tgz"), {"porn": "adult", "spyware": "malware"})
    assert (new / "allowlist" / "domains").read_bytes() == (tree / "lists" / "allowlist" / "domains").read_bytes()
    assert not (new / "adult" / "expressions").exists()  # a taken category is what the source has, nothing else
    assert (new / "adult" / "domains").read_text() == domains(30, "porn")
    assert (new / "adult" / "domains").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_and_unswap(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(swap, "_exchange", lambda a, b: False)  # FreeBSD: two renames
    live, new = tmp_path / "lists", tmp_path / ".lists.update-1"
    for d, text in ((live, "old"), (new, "new")):
        d.mkdir()
        (d / "f").write_text(text)
    old = swap.swap(live, new)
    assert (live / "f").read_text() == "new" and (old / "f").read_text() == "old"
    swap.unswap(live, old, tmp_path / "failed")
    assert (live / "f").read_text() == "old" and not (tmp_path / "failed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lists"]


def test_a_failed_index_puts_the_old_lists_back(tree: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = load(tree / "appliance.yaml")
    before = (tree / "lists" / "adult" / "domains").read_text()
    new, _ = _build(tree, tmp_path, ut1(tmp_path / "ut1.tgz"))
    at = tree / ".lists.update-9"
    new.rename(at)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(swap.ruleset, "ensure_index", boom)
    with pytest.raises(ListsError, match="the old lists are back"):
        swap.install(cfg, tree, tree / "lists", at)
    assert (tree / "lists" / "adult" / "domains").read_text() == before
    assert swap.leftovers(tree / "lists") == []


def test_counts_stream_in_bounded_memory_and_agree_with_the_proxys_parser(tmp_path: Path) -> None:
    """Review F6: 10 MB of `-` lines took 850 MB and one 200 MB line 1.08 GB in the main process. The count now keeps
    no line (counts only, each line read at most MAX_LINE at a time) and runs in the bounded child (check())."""
    mixed = tmp_path / "mixed"
    mixed.write_bytes(b"# c\n\na.test\nWWW.B.TEST.\n*.c.test\n.d.test\nbad host\n/x\n1.2.3.4\n01.2.3.4\n\xff.test\n"
                      b"xn--bcher-kva.test\n\xc3\xa9.test\n" + b"e" * 300 + b".test\n-\n")
    assert validate.count_file(mixed, "domains") == dict(zip(("entries", "bad_lines"), flists.count_file(mixed, "domains")))
    urls = tmp_path / "urls"
    urls.write_bytes(b"a.test/x\nhttp://b.test:80/y?q\nbad url/ x\n[::1]/z\nhttp://[nope/\n")
    assert validate.count_file(urls, "urls") == dict(zip(("entries", "bad_lines"), flists.count_file(urls, "urls")))
    bomb = tmp_path / "domains"
    with open(bomb, "wb") as f:
        f.write(b"ok.test\n" + b"-\n" * (1 << 17) + b"a" * (24 << 20) + b"\nlast.test")
    tracemalloc.start()
    try:
        got = validate.count_file(bomb, "domains")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == {"entries": 2, "bad_lines": (1 << 17) + 1} and peak < 4 << 20, peak

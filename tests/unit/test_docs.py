"""README.md and docs/: every relative link resolves (file, and heading anchor when given); the README stays a front door."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, REPO / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    fenced = False
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            found.append((no, m.group(1)))
    return found


def _relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


CASES = [(p, no, t) for p in PAGES if p.exists() for no, t in links(p) if _relative(t)]


def test_the_pages_exist_and_have_links():
    for name in ("config", "filter", "ha", "carp-speaker", "sync", "image", "lab", "benchmarks", "testing", "limits"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert (REPO / "CHANGELOG.md").is_file()
    assert len(CASES) > 50, "the link scanner found almost nothing: is the pattern broken?"


@pytest.mark.parametrize(("page", "line", "target"), CASES,
                         ids=[f"{p.relative_to(REPO)}:{no}:{t}" for p, no, t in CASES])
def test_relative_link_resolves(page: Path, line: int, target: str):
    where = f"{page.relative_to(REPO)}:{line}: link {target!r}"
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    assert dest.exists(), f"{where}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist"
    assert dest.is_relative_to(REPO), f"{where}: points outside the repository"
    if anchor and dest.suffix == ".md":
        have = anchors(dest)
        assert anchor in have, f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}"


def test_slug_matches_github():
    assert slug("`appliance explain`") == "appliance-explain"
    assert slug("Config sync (master -> backups)") == "config-sync-master---backups"
    assert slug("Writing and boot-testing the disk (`FREEBSD_DIST`)") == "writing-and-boot-testing-the-disk-freebsd_dist"
    assert slug("CARP engines: ucarp and the speaker") == "carp-engines-ucarp-and-the-speaker"


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, f"README.md has {len(text.splitlines())} lines; details belong in docs/"
    assert "make run" in text and "make test" in text


def test_config_reference_in_docs_is_current():
    from appliance.core import reference

    page = DOCS / "config.md"
    assert reference.markdown() in page.read_text(), (
        "docs/config.md's config reference is stale: run `appliance config-reference --update docs/config.md`")

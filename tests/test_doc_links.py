"""README.md and docs/*.md: every relative link resolves (the file exists, a `#anchor` is a heading of
the target under GitHub's slug rules), and the README stays a front door of at most 300 lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a link-like string in code is not a link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page offers; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(page: Path) -> list[str]:
    targets = []
    for line in prose_lines(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link either
        targets += [t for t in LINK.findall(line) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    return targets


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """One line per link of `page` whose file or anchor does not exist, paths relative to `root`."""
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        shown = resolved.relative_to(root) if resolved.is_relative_to(root) else resolved
        where = f"{page.relative_to(root)}: ({target})"
        if not resolved.exists():
            broken.append(f"{where}: no file {shown}")
        elif anchor and (resolved.is_dir() or anchor not in anchors(resolved)):
            broken.append(f"{where}: no heading with anchor #{anchor} in {shown}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = broken_links(page)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_door():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a docs/ page (at most {README_MAX_LINES})"


@pytest.mark.parametrize("heading, slug", [
    ("Reading `log/`", "reading-log"),
    ("DeepSpeed's Adam kernels", "deepspeeds-adam-kernels"),
    ("Full size: the SD 1.5 architecture (`bench/scale.py`)", "full-size-the-sd-15-architecture-benchscalepy"),
    ("Results, 2026-12-01", "results-2026-12-01"),
    ("Fine-tune SD 1.5 or SDXL on your data", "fine-tune-sd-15-or-sdxl-on-your-data"),
    ("Resume, export, sample", "resume-export-sample"),
    ("snake_case and ×", "snake_case-and-"),
])
def test_slugs_follow_github(heading, slug):
    assert github_slug(heading) == slug


def test_a_missing_file_and_a_missing_anchor_are_both_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-section) [dup](other.md#a-section-1) [self](#here) [web](https://example.com/x)\n"
        "## Here\n`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-heading)\n"
    )
    targets = relative_links(page)
    assert targets == ["other.md#a-section", "other.md#a-section-1", "#here", "missing.md", "other.md#no-such-heading"]
    assert anchors(tmp_path / "other.md") == {"title", "a-section", "a-section-1"}
    assert broken_links(page, root=tmp_path) == [
        "page.md: (missing.md): no file missing.md",
        "page.md: (other.md#no-such-heading): no heading with anchor #no-such-heading in other.md",
    ]

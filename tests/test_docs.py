"""The manual holds together: every relative link and ``#anchor`` in ``README.md`` and
``docs/*.md`` points to a file and a heading that exist, and the README stays a front door."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"!?\[[^\[\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for m in _LINK.finditer(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        target = m.group(1)
        if re.match(r"^[a-z]+:", target):
            continue  # an absolute URL
        path, _, fragment = target.partition("#")
        dest = (page.parent / urllib.parse.unquote(path)).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_a_broken_link_is_seen(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Real heading\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#real-heading) [gone](c.md) [no](b.md#nope) [web](https://x.y)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert broken_links(page) == ["c.md: no such file", "b.md#nope: no such heading"]


def test_the_readme_is_a_front_door() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    every_page = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", "\n".join(lines)))
    assert every_page <= linked, f"not linked from the README: {every_page - linked}"

"""Relative links in docs/*.md and README.md point at files that exist, and #anchors at headings that exist
(GitHub's heading ids). External links are not fetched (no network in CI)."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / "docs").glob("*.md")) + [p for p in [REPO / "README.md"] if p.is_file()]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def strip_fences(markdown: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1\s*$", "", markdown, flags=re.S | re.M)


def strip_code(markdown: str) -> str:
    return re.sub(r"`[^`\n]*`", "", strip_fences(markdown))


def heading_ids(markdown: str) -> set[str]:
    """Ids GitHub gives headings: lowercase, punctuation dropped, spaces to '-', repeats numbered."""
    ids, seen = set(), {}
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", strip_fences(markdown), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def links(page: Path) -> list[str]:
    return [a or b for a, b in LINK.findall(strip_code(page.read_text()))]


def test_the_checker_sees_links_and_anchors():
    quickstart = REPO / "docs" / "quickstart.md"
    assert "training_guide.md#data-requirements" in links(quickstart)
    assert "rejected-utterances-rejectsjsonl" in heading_ids((REPO / "docs" / "troubleshooting.md").read_text())
    assert heading_ids("# A b\n## A b\n```\n# not a heading\n```\n") == {"a-b", "a-b-1"}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest.read_text()):
            broken.append(f"{target}: no heading with id #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)

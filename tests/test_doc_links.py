"""The README, the docs and the generated results pages link only to files and headings that
exist: a moved doc or a renamed figure must not leave a dead link on the front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "results").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def dead_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # commands, not links
    dead = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+\s+(.*)$", file.read_text(), re.M)
            if anchor not in {heading_anchor(h) for h in headings}:
                dead.append(target)
    return dead


def test_the_anchor_rule_matches_githubs():
    assert (
        heading_anchor("Reading the leaderboard: intervals, ties, ranks")
        == "reading-the-leaderboard-intervals-ties-ranks"
    )
    assert heading_anchor("`bench.latency.compile` modes") == "benchlatencycompile-modes"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert dead_links(page) == []


def test_a_dead_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading) [web](https://x.org/y) ![gone](gone.png) "
        "[bad anchor](there.md#elsewhere)\n```\n[not a link](nowhere)\n```\n"
    )
    assert dead_links(page) == ["gone.png", "there.md#elsewhere"]

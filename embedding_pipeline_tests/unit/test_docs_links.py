"""Every relative link in README.md and docs/*.md leads somewhere: the file exists and, for a `#anchor`, a heading
of the target makes that anchor (GitHub's rules). The README stays a short entry point; the reference lives in docs/.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target), the target up to whitespace or ")", an optional "title" after it.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)


def prose_lines(text: str, keep_code: bool = False) -> list[str]:
    """The lines outside fenced code blocks; inline code spans blanked unless kept (a link inside code is no link,
    but a heading's code is part of its anchor)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line if keep_code else re.sub(r"(`+)(?:(?!\1).)+?\1", "", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than hyphens and spaces removed,
    spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the headings of a markdown file produce; repeated headings get -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8"), keep_code=True):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append(definition.group(1))
        found.extend(INLINE_LINK.findall(line))
    return [link for link in found if link and not EXTERNAL.match(link)]


def broken(path: Path) -> list[str]:
    problems = []
    for link in links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / unquote(target)).resolve() if target else path
        if not file.exists():
            problems.append(
                f"{link}: {file.relative_to(REPO_ROOT) if file.is_relative_to(REPO_ROOT) else file} does not exist"
            )
        elif anchor and file.suffix == ".md" and unquote(anchor).lower() not in anchors(file):
            problems.append(f"{link}: no heading in {file.relative_to(REPO_ROOT)} makes #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(page):
    problems = broken(page)
    assert not problems, f"{page.relative_to(REPO_ROOT)} has broken links:\n" + "\n".join(problems)


def test_the_readme_stays_short():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, f"README.md has {count} lines; move reference text into docs/"


def test_the_docs_pages_are_checked():
    assert {page.name for page in PAGES} >= {
        "README.md",
        "architecture.md",
        "configuration.md",
        "operations.md",
        "http-api.md",
        "benchmarks.md",
    }


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Retention: deleting a drop", "retention-deleting-a-drop"),
        ("Vector index, filters and remote Milvus", "vector-index-filters-and-remote-milvus"),
        (
            "Extraction, insert and search (`embedding-pipeline bench`)",
            "extraction-insert-and-search-embedding-pipeline-bench",
        ),
        (
            "Running the `onnxruntime` flavour in NVIDIA's container",
            "running-the-onnxruntime-flavour-in-nvidias-container",
        ),
        ("The instance: `deploy/dagster.yaml`", "the-instance-deploydagsteryaml"),
        ("Schedules, sensor, pools and retries", "schedules-sensor-pools-and-retries"),
    ],
)
def test_slugs_follow_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Usage\n\n```\n## not a heading\n```\n\n## Usage\n\n### Usage\n## The `x` flag\n")
    assert anchors(page) == {"title", "usage", "usage-1", "usage-2", "the-x-flag"}


def test_links_in_code_are_not_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        '[a](a.md) `[b](b.md)` ![c](img/c.png "C")\n\n```\n[d](d.md)\n```\n[e]: e.md\n'
        "[f](https://example.com) [g](mailto:x@example.com) [h](#here)\n"
    )
    assert links(page) == ["a.md", "img/c.png", "e.md", "#here"]

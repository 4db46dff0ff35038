"""The README and the manual in docs/: every page has its Chinese page beside it, relative links and their anchors
resolve, the README stays an entry page and gives the test command CI runs (.ci/run)."""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
READMES = (REPO_ROOT / "README.md", REPO_ROOT / "README_zh.md")
README_MAX_LINES = 250
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"(#{1,6}) (.*)")


def markdown_files() -> list[Path]:
    """The README pair and every page of docs/."""
    return [*READMES, *sorted(DOCS.glob("*.md"))]


def outside_code(text: str) -> list[str]:
    """The lines of a markdown text that are not inside fenced code blocks."""
    lines, fenced = [], False
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("```") and not stripped.startswith("````"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of a page (lower case, punctuation dropped, spaces to hyphens)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in outside_code(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            anchor = re.sub(r"[^\w\- ]", "", match.group(2).strip().lower()).replace(" ", "-")
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def page_name(path: Path) -> str:
    """A page's name without .md / .zh.md."""
    return path.name.removesuffix(".md").removesuffix(".zh")


def test_every_page_has_its_chinese_page():
    english = {page_name(path) for path in DOCS.glob("*.md") if not path.name.endswith(".zh.md")}
    chinese = {page_name(path) for path in DOCS.glob("*.zh.md")}
    assert english, "docs/ holds no pages"
    assert english == chinese, f"without a Chinese page: {english - chinese}; without an English page: {chinese - english}"


@pytest.mark.parametrize("document", markdown_files(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_relative_links_resolve(document: Path):
    problems = []
    for line in outside_code(document.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            linked = (document.parent / path_part).resolve() if path_part else document
            if not linked.exists():
                problems.append(f"{target}: no such file")
                continue
            if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not problems, f"{document.name}: " + "; ".join(problems)


@pytest.mark.parametrize("readme", READMES, ids=lambda path: path.name)
def test_readme_is_an_entry_page_with_the_test_command(readme: Path):
    text = readme.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, f"{readme.name} has grown past {README_MAX_LINES} lines"
    assert "bash scripts/test.sh" in text
    assert "PYTHONPATH=" not in text, f"{readme.name} tells users to set PYTHONPATH; the project is installable"

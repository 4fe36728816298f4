"""README.md and docs/*.md hold together: every relative link (and #anchor) resolves, every
`make <target>` they name is a Makefile target. Fast: markdown-it parses, no TensorFlow.

Links are read by a CommonMark parser rather than a regex, so a `[x](y)` inside a code block is not
a link and a link split over two lines still is one. Anchors follow GitHub's heading ids, since
GitHub is where the pages are read.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_parser = MarkdownIt("commonmark").enable("table")
# A make command inside code: `make [VAR=value ...] target`; prose ("make sure") is not code.
_MAKE_COMMAND = re.compile(r"(?:^|[\s;&|(])make\s+(?:[A-Z_][A-Z0-9_]*=\S*\s+)*([a-z][a-z0-9_-]*)", re.M)
_MAKE_TARGET = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*:(?!=)", re.M)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    tokens = _parser.parse(markdown)
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type != "heading_open":
            continue
        text = "".join(child.content for child in inline.children or [] if child.type in ("text", "code_inline"))
        base = github_anchor(text)
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def link_targets(markdown: str) -> list[str]:
    """The href of every link and the src of every image, in page order."""
    targets = []
    for token in _parser.parse(markdown):
        for child in token.children or []:
            if child.type == "link_open":
                targets.append(child.attrGet("href"))
            elif child.type == "image":
                targets.append(child.attrGet("src"))
    return targets


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` whose file, or whose #anchor in a Markdown file, does not exist."""
    broken = []
    for target in link_targets(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:|^//", target):
            continue  # http(s), mailto: not this test's business (no network)
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    return broken


def make_commands(markdown: str) -> set[str]:
    """The targets of `make ...` commands in code spans and code blocks."""
    code = []
    for token in _parser.parse(markdown):
        if token.type in ("fence", "code_block"):
            code.append(token.content)
        code.extend(child.content for child in token.children or [] if child.type == "code_inline")
    return {match for snippet in code for match in _MAKE_COMMAND.findall(snippet)}


def makefile_targets(makefile: str) -> set[str]:
    return set(_MAKE_TARGET.findall(makefile))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path):
    assert broken_links(page) == []


def test_every_make_target_the_docs_name_exists():
    targets = makefile_targets((REPO / "Makefile").read_text())
    named = {page.name: make_commands(page.read_text()) for page in PAGES}
    missing = {name: sorted(commands - targets) for name, commands in named.items() if commands - targets}
    assert missing == {}
    assert {"train-local", "test", "train-cluster"} <= named["README.md"]


def test_readme_stays_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for command in ("make train-local", "make test", "make train-cluster", "kubectl apply -f manifests/"):
        assert command in readme


def test_each_docs_page_says_who_it_is_for():
    for page in PAGES[1:]:
        paragraphs = [block for block in page.read_text().split("\n\n") if block.strip()]
        assert paragraphs[0].startswith("# ") and paragraphs[1].startswith("For "), page.name


def test_docs_images_stay_small():
    for image in (REPO / "docs" / "img").glob("*"):
        assert image.stat().st_size < 200_000, image.name


def test_code_and_manifests_point_at_docs_that_exist():
    # Comments and messages say `docs/cluster.md, "Prerequisites"`: the page, and the words quoted
    # after it, must be there (the README's sections moved to docs/ once; a move must not strand them).
    sources = [path for folder in ("src", "jobs", "manifests", "bench", "tests") for path in (REPO / folder).rglob("*")
               if path.suffix in (".py", ".yaml", ".md") and path.name != "test_docs.py"]
    stale = []
    for path in [*sources, REPO / "Makefile", REPO / "Dockerfile"]:
        for page, section in re.findall(r'(docs/[\w-]+\.md)(?:, \\?"([^"\\]+))?', path.read_text()):
            if not (REPO / page).is_file():
                stale.append(f"{path.relative_to(REPO)}: {page}")
            elif section and section not in (REPO / page).read_text():
                stale.append(f'{path.relative_to(REPO)}: {page}, "{section}"')
    assert stale == []


# The checks themselves must bite: a page with known faults, and one without.

def test_broken_links_names_a_missing_file_and_a_missing_anchor(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Without the launcher: `kubectl apply -f manifests/`\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n## Same\n\n## Same\n\n"
        "[ok](docs/other.md) [ok](docs/other.md#without-the-launcher-kubectl-apply--f-manifests)\n"
        "[ok](#title) [ok](#same-1) [web](https://example.com/missing.md) ![img](docs/other.md)\n"
        "[gone](docs/gone.md) [bad anchor](docs/other.md#nowhere) [bad local](#same-2)\n"
        "[split over\nlines](docs/also-gone.md)\n\n"
        "    [in code](docs/not-a-link.md)\n")
    assert broken_links(page) == [
        "docs/gone.md: no such file",
        "docs/other.md#nowhere: no heading with anchor #nowhere in other.md",
        "#same-2: no heading with anchor #same-2 in README.md",
        "docs/also-gone.md: no such file",
    ]


def test_make_commands_are_read_from_code_only():
    markdown = ("Make sure to `make train-local` first; make docs is prose.\n\n"
                "```bash\nmake push IMAGE=$IMAGE   # builds\nmake train-cluster PROJECT=p DRY_RUN=1 && make no-such\n```\n")
    assert make_commands(markdown) == {"train-local", "push", "train-cluster", "no-such"}
    targets = makefile_targets(".PHONY: push\npush: image ## Push\nVAR := 1\n$(VENV)/.stamp: x\ntrain-local: setup\n")
    assert targets == {"push", "train-local"}
    assert make_commands(markdown) - targets == {"train-cluster", "no-such"}

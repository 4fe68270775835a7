"""No two modules of stp/ import each other, counting every import: at module level, inside functions and under
``if TYPE_CHECKING:`` (type-only imports included). A subpackage also counts as one module (``stp.methods`` finds and
imports every method module, so a method module importing ``stp.config`` while ``stp.config`` imports
``stp.methods`` is such a pair). tests/test_layers.py checks the layers and longer cycles of executed imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_pairs_graph(root: Path = ROOT, package: str = "stp") -> dict[str, set[str]]:
    """{module: the modules of ``package`` it imports anywhere in its source}."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def pairs(graph: dict[str, set[str]], depth: int | None = None) -> list[tuple[str, str]]:
    """The pairs (a, b) with a -> b and b -> a, modules cut to their first ``depth`` dotted parts (None: whole)."""
    cut = (lambda m: ".".join(m.split(".")[:depth])) if depth else (lambda m: m)
    edges = {(cut(a), cut(b)) for a, deps in graph.items() for b in deps if cut(a) != cut(b)}
    return sorted((a, b) for a, b in edges if a < b and (b, a) in edges)


def test_the_pair_finder_finds_pairs(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import X\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.d\n")
    (pkg / "d.py").write_text("from pkg import sub\n")
    graph = import_pairs_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert pairs(graph) == [("pkg.a", "pkg.b")]  # a type-only import and a function-level one
    assert pairs(graph, depth=2) == [("pkg.a", "pkg.b"), ("pkg.d", "pkg.sub")]  # through the subpackage


def test_no_two_modules_of_stp_import_each_other():
    graph = import_pairs_graph()
    assert "stp.config" in graph and "stp.methods.diffpo" in graph and graph["stp.config"]
    assert "stp.methods" in graph["stp.config"] and "stp.settings" in graph["stp.methods.diffpo"]
    bad = pairs(graph) + pairs(graph, depth=2)
    assert not bad, f"modules that import each other: {bad}"

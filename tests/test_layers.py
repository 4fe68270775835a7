"""The package's layers: no import cycle inside stp/ and stp_kernels/, and the model layer imports no training or
evaluation code.

Imports are read from the source (module level and inside functions alike: a function-level import is still a
dependency), except those under ``if TYPE_CHECKING:`` (annotations only, never executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted([*ROOT.glob("stp/**/*.py"), *ROOT.glob("stp_kernels/**/*.py")]):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """{module: modules of stp / stp_kernels it imports}; ``from pkg import name`` points at ``pkg.name`` when that
    is a module, else at ``pkg``."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "stp.trainer" in graph and "stp_kernels" in graph and graph["stp.trainer"]
    bad = _cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")"
                       for c in bad)
    assert not bad, f"import cycles: {detail}"


def test_layers_import_only_downwards():
    """kernels <- models <- sampler / likelihood / loss <- methods <- trainer <- command-line tools."""
    graph = import_graph()
    below_trainer = {"stp.trainer", "stp.train", "stp.eval", "stp.evaluation", "stp.pretrain", "stp.prior",
                     "stp.anchors", "stp.variance", "stp.checkpoint", "stp.metrics", "stp.policy", "stp.data_order"}
    layers = {
        "stp_kernels": {m for m in graph if m.startswith("stp.")},
        "stp.models": {m for m in graph if m.startswith("stp.") and not m.startswith("stp.models")},
        "stp.sampler": {m for m in graph if m.startswith(("stp.methods", "stp.config"))} | below_trainer,
        "stp.likelihood": {m for m in graph if m.startswith(("stp.methods", "stp.config"))} | below_trainer,
        "stp.loss": {m for m in graph if m.startswith(("stp.methods", "stp.config"))} | below_trainer,
        "stp.trajectory_ratio": {m for m in graph if m.startswith(("stp.methods", "stp.config"))} | below_trainer,
        "stp.methods": below_trainer - {"stp.prior", "stp.anchors"},
        # the evaluation library sits under the command-line tools (stp.pretrain and the trainer call it)
        "stp.evaluation": {"stp.eval", "stp.pretrain", "stp.train", "stp.trainer"},
    }
    wrong = []
    for prefix, forbidden in layers.items():
        for mod, deps in graph.items():
            if mod == prefix or mod.startswith(prefix + "."):
                wrong += [f"{mod} -> {d}" for d in sorted(deps & forbidden) if not d.startswith(prefix)]
    assert not wrong, f"imports against the layers: {wrong}"

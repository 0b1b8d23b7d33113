"""The package reads one way: no import cycles in fmtrain, and fmtrain/attention imports
nothing from the rest of fmtrain (the trainer may use attention, never the reverse).

Imports are read from the source (module level and inside functions alike), so a lazy
import cannot hide a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fmtrain"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """fmtrain modules that ``name`` imports (a ``from pkg import x`` of a submodule counts as it)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fmtrain"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fmtrain":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
            found |= subs or {target}
            if not subs or len(subs) < len(node.names):
                found.add(target)
    # Importing a submodule imports its packages first: those edges are not dependencies.
    return {m for m in found if m in modules and not name.startswith(m + ".") and m != name}


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_attention_imports_nothing_above_it():
    graph = _graph()
    bad = {name: sorted(m for m in deps if not m.startswith("fmtrain.attention"))
           for name, deps in graph.items() if name.startswith("fmtrain.attention")}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_check_sees_real_imports():
    """Guard against a reader that finds nothing: known edges are there."""
    graph = _graph()
    assert "fmtrain.attention.hierarchy" in graph["fmtrain.attention.summaries"]
    assert "fmtrain.attention.cores" in graph["fmtrain.attention.blocked"]
    assert "fmtrain.checkpoint" in graph["fmtrain.generate"]  # a lazy import, inside main()

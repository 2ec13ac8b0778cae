"""The architecture's rules, checked on the source (docs/ARCHITECTURE.md): imports run one way, functions stay
short, and the dashboard reads the store only through core's API."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted([*ROOT.glob("core/**/*.py"), *ROOT.glob("dashboard/**/*.py")]):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports, at module level or inside functions."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in mods and t != name:
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_counting_function_level_imports():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert not _cycles(graph)
    assert not any(m.startswith("dashboard") for deps in
                   (graph[m] for m in mods if m.startswith("core")) for m in deps)  # core never imports the UI


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_longer_than_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long


def test_dashboard_never_opens_a_store_file_itself():
    """No Parquet read or run.json/progress.json path in dashboard/: it asks core.store (RunStore, Run)."""
    bad = []
    for name, path in _modules().items():
        if not name.startswith("dashboard"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(
            n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("read_parquet", "read_table", "ParquetFile"):
                bad.append(f"{name}:{node.lineno} {node.attr}")
            # a file name or path piece ("run.json", f"{name}.parquet"), not words shown to the user
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings and \
                    " " not in node.value and any(f in node.value for f in ("run.json", "progress.json", ".parquet")):
                bad.append(f"{name}:{node.lineno} {node.value[:40]!r}")
    assert not bad

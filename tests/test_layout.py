"""The package layout: the import graph (built from the source) has no cycles, the library never
imports the command line, and every function is short or says why it is not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "slimtune"
MAX_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module that ``import name`` / ``from name import x`` binds (longest known prefix)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> slimtune modules it imports (``from a import b`` counts ``a.b`` when b is a module).

    With ``top_level_only`` only imports executed at import time count (module body, not
    function bodies): the edges that can make an import circle fail.
    """
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = _resolve(f"{node.module}.{alias.name}", modules) or _resolve(node.module, modules)
                    if target and target != mod:
                        graph[mod].add(target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    target = _resolve(alias.name, modules)
                    if target and target != mod:
                        graph[mod].add(target)
    # importing a.b.c runs a/__init__ and a/b/__init__: they are edges too
    for mod in modules:
        parts = mod.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and parent != mod:
                graph[mod].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_has_no_cycles() -> None:
    """No circle, counting every import (also those inside functions)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_library_never_imports_cli() -> None:
    graph = import_graph()
    bad = sorted(m for m, deps in graph.items()
                 if not m.startswith("slimtune.cli") and any(d.startswith("slimtune.cli") for d in deps))
    assert not bad, f"library modules importing slimtune.cli: {bad}"


def _function_imports(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    out.append((node.lineno, name or ""))
    return out


def test_imports_inside_functions_say_why() -> None:
    """Imports sit at the top of files; one inside a function (an optional heavy dependency, or
    one that would slow ``slimtune --help``) carries a comment on its line saying why."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, name in _function_imports(ast.parse("\n".join(lines))):
            line = lines[lineno - 1]
            if "#" not in line:
                bad.append(f"{path.relative_to(SRC)}:{lineno}: import {name}")
    assert not bad, f"{len(bad)} imports inside functions without a reason:\n" + "\n".join(bad[:40])


def test_long_functions_say_why() -> None:
    """No function over 80 lines unless its docstring says why (a line starting 'Long because')."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_LINES and "Long because" not in doc:
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.name} ({n} lines)")
    assert not bad, "functions over 80 lines without a reason:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["config", "data", "models", "methods", "train", "evaluate",
                                     "compress/distill", "compress/prune", "compress/quant", "runtime",
                                     "benchmark", "report", "serve", "pipeline", "cli"])
def test_pipeline_packages_exist(package: str) -> None:
    init = PKG / package / "__init__.py"
    assert init.is_file(), f"missing package {package}"
    assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{package}/__init__.py has no docstring"

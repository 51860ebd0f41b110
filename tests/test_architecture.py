"""The package's shape: modules are the stages, imports run one way, and the library never imports its tests.

The import graph is read from the source with `ast` (every `import`/`from ... import` of `deita_hub`, at module
level and inside functions, since a lazy import closes a cycle just as well at run time), not by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deita_hub"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "_data" not in p.parts}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The deita_hub module an import names: itself, or the nearest enclosing package that exists."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str) -> set[str]:
    """The deita_hub modules `name` imports anywhere in its source (relative imports resolved)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one, else a name of `pkg`.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "deita_hub" or target.startswith("deita_hub."):
                resolved = _resolve(target)
                if resolved and resolved != name:
                    found.add(resolved)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        edges = _imports(name)
        if _is_package(name):
            # A package's __init__ re-exporting its own submodules is its public face, not a dependency.
            edges = {e for e in edges if not e.startswith(name + ".")}
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    # The reader is what the other tests stand on: it must see imports inside functions, and it must report a
    # cycle that is there.
    assert "deita_hub.scoring.vllm_backend" in _imports("deita_hub.scoring.run")  # inside make_scorer
    assert "deita_hub.distributed" in _imports("deita_hub.embedding")  # inside embed_pool
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_deita_hub_modules():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("deita_hub.testing")))
def test_the_library_never_imports_its_test_support(name):
    assert not {m for m in _imports(name) if m == "deita_hub.testing" or m.startswith("deita_hub.testing.")}


def test_ray_plumbing_imports_no_stage():
    # The stages hand their actor classes to deita_hub.distributed; it imports only the shared error types.
    assert _imports("deita_hub.distributed") <= {"deita_hub.errors"}


def test_each_stage_has_its_module():
    # A newcomer finds where a thing happens from the file names alone.
    for name in (
        "deita_hub.pool",
        "deita_hub.scoring",
        "deita_hub.embedding",
        "deita_hub.selection",
        "deita_hub.subsets",
        "deita_hub.dataset",
        "deita_hub.training",
        "deita_hub.cards.model",
        "deita_hub.cards.dataset",
        "deita_hub.hub",
        "deita_hub.models",
        "deita_hub.records",
        "deita_hub.io",
        "deita_hub.tiny",
    ):
        assert name in MODULES, name
    # The scoring package's __init__ only re-exports: no function or class is defined there.
    tree = ast.parse(MODULES["deita_hub.scoring"].read_text(encoding="utf-8"))
    assert not [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]

"""``multiway/`` has no import cycle among its modules' module-level imports.

Python tolerates some cycles (a half-initialised module is handed out), but they make the import order
matter and break as soon as a name is used at import time. The graph is read from the source with ``ast``
(nothing is imported): an edge ``a -> b`` for every module-level ``import``/``from ... import`` in ``a`` that
names module ``b`` of the package (``from pkg import sub`` names the submodule ``pkg.sub`` when it exists,
else the package). Imports inside functions (deliberately lazy) and under ``if TYPE_CHECKING:`` are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "multiway"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (packages by their ``__init__.py``)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements executed when the module is imported (top level, and inside top-level if/try blocks)."""
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body])
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_multiway_has_no_import_cycle():
    graph = import_graph(module_files())
    assert "multiway.model.factory" in graph and graph["multiway.model.factory"], "the graph reader found no imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_checkpoints_do_not_reach_back_into_factory():
    """``factory`` builds models and loads checkpoints; ``checkpoints`` must not need ``factory``, not even lazily."""
    graph = import_graph(module_files())
    assert "multiway.model.checkpoints" in graph["multiway.model.factory"]
    tree = ast.parse((ROOT / "model" / "checkpoints.py").read_text())
    named = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not {m for m in named if m and m.endswith("factory")}, named


@pytest.mark.parametrize(
    "sources, cycle",
    [
        ({"a": "from . import b\n", "b": "from .a import x\n"}, True),
        ({"a": "from .b import f\n", "b": "def f():\n    from .a import y\n"}, False),  # lazy import: no edge
        ({"a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import T\n", "b": "from .a import z\n"}, False),
        ({"a": "try:\n    from .b import q\nexcept ImportError:\n    q = None\n", "b": "import pkg.a\n"}, True),
    ],
)
def test_cycle_finder_on_small_packages(tmp_path, sources, cycle):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in sources.items():
        (pkg / f"{name}.py").write_text(text)
    found = find_cycle(import_graph(module_files(pkg)))
    assert (found is not None) == cycle, found

"""The library's import graph: no cycles, and nothing imported upward from pipelines/ or
components/ (they import the library; it finds the pipelines through entry points).

Every import counts, including those inside functions (a deferred import is still a
dependency, and a cycle through one breaks as soon as someone hoists it), except those
under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import flywheel

UPWARD = ("pipelines", "components")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            todo.extend(node.orelse)  # the `else:` of a TYPE_CHECKING block does run
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> package modules it imports, module -> top-level packages it imports)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    inner: dict[str, set[str]] = {}
    outer: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: list[str] = []
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            targets += [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        inner[name], outer[name] = set(), set()
        for target in targets:
            outer[name].add(target.split(".")[0])
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                inner[name].add(target)
    return inner, outer


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by depth-first search (each as [a, b, ..., a])."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


ROOT = Path(flywheel.__file__).parent


def test_the_library_has_no_import_cycle():
    graph, _ = import_graph(ROOT)
    assert len(graph) > 50  # the walk found the package, not an empty directory
    assert "flywheel.errors" in graph["flywheel.config"]  # edges are found at all
    assert cycles(graph) == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles(graph))


def upward_names(root: Path) -> dict[str, list[str]]:
    """Module -> what it imports from pipelines/ or components/, by import statement or by a
    module path in a string (`importlib.import_module("pipelines.retrain")`)."""
    _, outer = import_graph(root)
    found = {m: sorted(t & set(UPWARD)) for m, t in outer.items() if t & set(UPWARD)}
    dotted = re.compile(rf"({'|'.join(UPWARD)})(\.\w+)+(:\w+)?")
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and dotted.fullmatch(text):
                found.setdefault(_module_name(path, root), []).append(text)
    return found


def test_the_library_never_imports_pipelines_or_components():
    assert upward_names(ROOT) == {}


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "files",
    [
        # a deferred import closes the cycle
        {"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "def f():\n    from pkg import a\n"},
        # a private helper imported back from the package's __init__
        {
            "__init__.py": "from pkg.sub.jobs import run\n",
            "sub/__init__.py": "",
            "sub/jobs.py": "def run():\n    from pkg import _hint\n",
        },
        # relative imports resolve like absolute ones
        {"__init__.py": "", "a.py": "from . import b\n", "b.py": "from .a import x\n"},
    ],
)
def test_the_check_finds_a_cycle(tmp_path, files):
    graph, _ = import_graph(_package(tmp_path, files))
    assert cycles(graph), graph


def test_type_checking_imports_and_upward_imports_are_told_apart(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import pkg.b\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
            "c.py": "def f():\n    import pipelines.retrain\n",
            "d.py": "import importlib\nMOD = importlib.import_module('components.train')\n",
        },
    )
    graph, _ = import_graph(root)
    assert cycles(graph) == [] and graph["pkg.b"] == set()
    assert upward_names(root) == {"pkg.c": ["pipelines"], "pkg.d": ["components.train"]}

"""No import cycles among the project's packages (TYPE_CHECKING imports included).

A cycle that only works because one side imports lazily or under ``TYPE_CHECKING`` still
ties the two modules together: each must be read to understand the other, and moving one
import to module level breaks the package at import time. So every import counts here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ("lit_modules", "callbacks", "explain", "audit_report")


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``packages``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def absolute_module(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` in module ``name`` reads from.

    Relative: level 1 is the module's own package (the module itself for an
    ``__init__.py``), each further level one package up.
    """
    if not node.level:
        return node.module or ""
    anchor = name.split(".")
    drop = node.level - 1 if is_package else node.level
    anchor = anchor[: len(anchor) - drop] if drop else anchor
    return ".".join([*anchor, node.module] if node.module else anchor)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (file ``path``) imports.

    Every import statement anywhere in the file counts (module level, functions,
    ``if TYPE_CHECKING:``). ``from pkg import x`` names ``pkg.x`` when that is a module,
    else ``pkg``. The implicit import of a module's parent packages is not counted: a
    package that imports its own submodules would otherwise always form a cycle.
    """
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute_module(name, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    # "import a.b.c" names a.b.c; keep the longest known prefix of each name.
    out = set()
    for target in found:
        parts = target.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts and ".".join(parts) != name:
            out.add(".".join(parts))
    return out


def missing_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the scanned packages that ``name`` imports from but that do not exist.

    ``from .gone import X`` under ``TYPE_CHECKING`` never runs, so nothing else catches a
    stale one; the cycle search would also misread it as an import of the package.
    """
    packages = {k.split(".")[0] for k in known}
    is_package = path.name == "__init__.py"
    missing = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = absolute_module(name, is_package, node)
            if base.split(".")[0] in packages and base not in known:
                missing.add(base)
    return missing


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graphs here are tiny
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        # Walk inside the component from its first node until a node repeats.
        members, path = set(component), [component[0]]
        while path.count(path[-1]) < 2:
            path.append(sorted(graph[path[-1]] & members)[0])
        cycles.append(path[path.index(path[-1]) :])
    return cycles


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def test_the_graph_sees_the_imports_it_must() -> None:
    graph = import_graph()
    assert {"lit_modules.data.cue", "lit_modules.data.split"} <= graph["lit_modules.data.fast"]
    assert "lit_modules.data.fast" in graph["lit_modules.data.base"]
    assert "lit_modules.data.base" in graph["lit_modules.data"]  # a package's relative import


def test_a_type_checking_cycle_is_found(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from .b import B\nclass A: ...\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\nclass B: ...\n"
    )
    (pkg / "c.py").write_text("def f():\n    from . import a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_imports_of_missing_modules_are_found(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .gone import A\n"
        "from pkg import b\nfrom os import path\n"
    )
    (pkg / "b.py").write_text("")
    known = set(module_files(tmp_path, ("pkg",)))
    assert missing_modules("pkg.a", pkg / "a.py", known) == {"pkg.gone"}
    assert missing_modules("pkg.b", pkg / "b.py", known) == set()


def test_no_imports_of_missing_modules() -> None:
    files = module_files()
    missing = {n: m for n, p in files.items() if (m := missing_modules(n, p, set(files)))}
    assert not missing, f"imports of modules that do not exist: {missing}"


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)

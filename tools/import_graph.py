"""The import graph of ivtlr_jax/ and experiments/: its circles and its back-up imports.

Usage: python tools/import_graph.py [--edges]   (exit status 1 when there is a circle or a back-up import)

Every `import` and `from ... import` of a project module counts, at module level and inside functions (a lazy
import still runs, later); imports under `if TYPE_CHECKING:` do not (they never run). Importing `a.b.c` also runs
`a` and `a.b`, so those are edges too, except to the importer's own packages (always loaded before it).

- A circle is a strongly connected component of that graph (two or more modules that reach each other).
- A back-up import is an import inside a function that exists to dodge a circle: its target reaches the
  importer again, so at module level it would close the circle at import time (a partly initialised module,
  or an order that works only by luck).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("ivtlr_jax", "experiments")


class Edge(NamedTuple):
    src: str  # importing module
    dst: str  # imported project module
    lazy: bool  # inside a function
    line: int


def module_files(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file path, for every .py under the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            for f in sorted(filenames):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, inside a function) for every import statement that can run."""
    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    yield from walk(ast.Module(body=[c], type_ignores=[]), lazy)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            yield from walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def _targets(node, module: str, is_package: bool, modules) -> list[str]:
    """The project modules an import statement loads (deepest first is not needed: all of them)."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        for a in node.names:
            names.append(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    out = []
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            out.append(".".join(parts[:i]))
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}  # the importer's packages
    return [t for t in dict.fromkeys(out) if t in modules and t not in own and t != module]


def import_edges(root: str = ROOT) -> list[Edge]:
    modules = module_files(root)
    edges = []
    for mod, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        for node, lazy in _imports(tree):
            edges.extend(Edge(mod, t, lazy, node.lineno) for t in _targets(node, mod, is_package, modules))
    return edges


def _reach(start: str, adjacency: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in adjacency.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def circles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with two or more modules, over all imports (lazy ones included)."""
    adj: dict[str, set[str]] = {}
    for e in edges:
        adj.setdefault(e.src, set()).add(e.dst)
    reach = {n: _reach(n, adj) for n in {e.src for e in edges} | {e.dst for e in edges}}
    comps, done = [], set()
    for n in sorted(reach):
        if n in done:
            continue
        comp = sorted({n} | {m for m in reach[n] if n in reach[m]})
        done.update(comp)
        if len(comp) > 1:
            comps.append(comp)
    return comps


def back_up_imports(edges: list[Edge]) -> list[Edge]:
    """Imports inside functions whose target reaches the importer."""
    adj: dict[str, set[str]] = {}
    for e in edges:
        adj.setdefault(e.src, set()).add(e.dst)
    return [e for e in edges if e.lazy and e.src in _reach(e.dst, adj)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", action="store_true", help="also print every import edge (lazy ones marked)")
    args = ap.parse_args(argv)
    edges = import_edges()
    if args.edges:
        for e in sorted(edges):
            print(f"{e.src} -> {e.dst}" + (f"  (in a function, line {e.line})" if e.lazy else ""))
    comps, back = circles(edges), back_up_imports(edges)
    print(f"{len(comps)} circle(s)")
    for comp in comps:
        inside = [e for e in edges if e.src in comp and e.dst in comp]
        print("  " + ", ".join(comp))
        for e in sorted(inside):
            print(f"    {e.src} -> {e.dst} (line {e.line}{', in a function' if e.lazy else ''})")
    print(f"{len(back)} back-up import(s)")
    for e in sorted(back):
        print(f"  {e.src} -> {e.dst} (line {e.line})")
    return 1 if comps or back else 0


if __name__ == "__main__":
    sys.exit(main())

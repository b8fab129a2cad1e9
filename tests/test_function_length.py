"""No function in ivtlr_jax/ is over 80 lines (nested functions count in their parent too): a longer one holds
several jobs; split it where they meet."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 80


def long_functions(package: str = "ivtlr_jax", limit: int = MAX_LINES) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    tree = ast.parse(fh.read(), path)
                out += [f"{os.path.relpath(path, ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
                        for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and n.end_lineno - n.lineno + 1 > limit]
    return out


def test_no_function_in_the_library_is_over_80_lines():
    assert long_functions() == []
    assert len(long_functions(limit=40)) > 5  # the scan sees long functions where there are some

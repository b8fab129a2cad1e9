"""Nothing in ivtlr_jax/ or experiments/ is dead: every module-level function, class and constant, and every
method, is referenced from code outside tests/ (ivtlr_jax/, experiments/, tools/), or is on ALLOWED with a reason.

An AST scan, by name: a definition counts as used when its name appears anywhere else as a name, an attribute or
a "module:Name" / dotted string (the backbone registry names its classes so); a name brought in under another
name (`import X as Y`) counts as X. Same-named definitions elsewhere can hide a dead one, never flag a live one.
A helper only tests use belongs in tests/ (tests/stored.py)."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("ivtlr_jax", "experiments")
USERS = ("ivtlr_jax", "experiments", "tools")
ALLOWED = {  # "path:name" -> why it stays though nothing here names it
    "experiments/train.py:_ConsoleFilter.filter": "logging.Filter's hook: the logging module calls it",
}
_DOTTED = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")


def _files(root, dirs):
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, d)):
            dirnames[:] = [x for x in dirnames if x != "__pycache__"]
            yield from (os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))


def definitions(tree):
    """(name, node): module-level functions, classes and assigned names, and methods as Class.method."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node
        if isinstance(node, ast.ClassDef):
            yield from ((f"{node.name}.{m.name}", m) for m in node.body
                        if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name) and t.id not in ("__all__", "logger"):
                    yield t.id, node


def references(tree):
    """(name, line) of every use: names (aliases mapped back), attributes, dotted and "module:Name" strings."""
    aliases = {a.asname: a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in n.names if a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield aliases.get(node.id, node.id), node.lineno
        elif isinstance(node, ast.Attribute):
            yield node.attr, node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.match(node.value):
            yield re.split(r"[.:]", node.value)[-1], node.lineno


def unreferenced(root=ROOT, scanned=SCANNED, users=USERS) -> list[str]:
    """"path:name" of every definition nothing outside its own body refers to."""
    uses: dict[str, list] = {}
    for path in _files(root, users):
        with open(path) as f:
            for name, line in references(ast.parse(f.read(), path)):
                uses.setdefault(name, []).append((path, line))
    out = []
    for path in _files(root, scanned):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for name, node in definitions(tree):
            short = name.split(".")[-1]
            if short.startswith("__") and short.endswith("__"):
                continue  # the language calls these
            if not any(p != path or not node.lineno <= line <= node.end_lineno for p, line in uses.get(short, ())):
                out.append(f"{os.path.relpath(path, root)}:{name}")
    return out


def test_nothing_is_dead():
    dead = [d for d in unreferenced() if d not in ALLOWED]
    assert not dead, ("defined but referenced nowhere outside tests/ (delete it, move a test-only helper to "
                      "tests/, or add it to ALLOWED with a reason):\n  " + "\n  ".join(dead))


def test_every_allowed_entry_is_still_unreferenced():
    assert sorted(set(ALLOWED) - set(unreferenced())) == [], "remove these from ALLOWED: now referenced or gone"


def test_the_scan_finds_dead_definitions(tmp_path):
    (tmp_path / "ivtlr_jax").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "ivtlr_jax" / "a.py").write_text(
        "LIMIT = 3\nUNUSED = 4\nREGISTRY = {'x': 'ivtlr_jax.a:Named'}\n"
        "def helper(n):\n    return helper(n - 1) if n else LIMIT\n"
        "class Named:\n    def used(self):\n        return self.gone\n    def only_tests(self):\n        pass\n"
        "from ivtlr_jax.a import helper as h\nh(1)\nNamed().used()\nREGISTRY\n")
    (tmp_path / "tests" / "test_a.py").write_text("from ivtlr_jax.a import UNUSED\nUNUSED\nNamed().only_tests()\n")
    assert unreferenced(str(tmp_path), ("ivtlr_jax",), ("ivtlr_jax",)) == [
        "ivtlr_jax/a.py:UNUSED", "ivtlr_jax/a.py:Named.only_tests"]

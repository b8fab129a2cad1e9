"""The import graph of ivtlr_jax/ and experiments/ has no circle and no import inside a function that dodges one
(tools/import_graph.py); the checker itself is shown to find both on a small tree."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("import_graph", os.path.join(ROOT, "tools", "import_graph.py"))
ig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ig)


def test_no_circles_and_no_back_up_imports():
    edges = ig.import_edges()
    assert len({e.src for e in edges}) > 50  # it saw the project
    assert ig.circles(edges) == []
    assert ig.back_up_imports(edges) == []


def test_the_checker_finds_a_circle_closed_inside_a_function(tmp_path):
    files = {
        "ivtlr_jax/__init__.py": "",
        "ivtlr_jax/low.py": "from ivtlr_jax.mid import thing\n",
        "ivtlr_jax/mid.py": "import ivtlr_jax.high as h\n",
        "ivtlr_jax/high.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ivtlr_jax import top\n"
                              "def f():\n    from ivtlr_jax import low\n"),
        "ivtlr_jax/top.py": "from . import low\n",
        "experiments/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = ig.import_edges(str(tmp_path))
    assert ig.circles(edges) == [["ivtlr_jax.high", "ivtlr_jax.low", "ivtlr_jax.mid"]]
    assert [(e.src, e.dst, e.line) for e in ig.back_up_imports(edges)] == [("ivtlr_jax.high", "ivtlr_jax.low", 5)]
    assert ("ivtlr_jax.top", "ivtlr_jax.low") in {(e.src, e.dst) for e in edges}  # a relative import resolves
    assert "ivtlr_jax.top" not in {e.dst for e in edges}  # TYPE_CHECKING imports never run

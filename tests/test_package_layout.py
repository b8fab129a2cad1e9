"""Only `ivtlr_jax/models/` names a concrete backbone: everything else takes a backbone object.

The check walks the syntax tree of every module of `ivtlr_jax/` outside `models/` and flags any identifier,
attribute, argument, import or non-prose string constant that names a registered backbone (case-insensitive,
`_` and `-` ignored: qwen2_vl, Qwen2VL, QWEN2VL, qwen2-vl, chameleon, CHAMELEON_PROMPT, ...). A string with
whitespace in it is prose (docstrings, comments' kin, error messages that mention a model as an example).
"""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ivtlr_jax")


def _normalise(text: str) -> str:
    return re.sub(r"[_\-.]", "", text.lower())


def backbone_words() -> set[str]:
    """Each registered model_type, and its family name (its leading letters: qwen, chameleon, ...)."""
    from ivtlr_jax.models import BACKBONES

    words = set()
    for model_type in BACKBONES:
        words.add(_normalise(model_type))
        words.add(re.match(r"[a-z]+", model_type).group(0))
    return words


def _names(node: ast.AST):
    """(text, what) of every name-like thing in one node that is not prose."""
    if isinstance(node, ast.Name):
        yield node.id, "name"
    elif isinstance(node, ast.Attribute):
        yield node.attr, "attribute"
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        yield node.name, "definition"
    elif isinstance(node, ast.arg):
        yield node.arg, "argument"
    elif isinstance(node, ast.keyword) and node.arg:
        yield node.arg, "keyword"
    elif isinstance(node, ast.alias):
        yield node.name, "import"
        if node.asname:
            yield node.asname, "import"
    elif isinstance(node, ast.ImportFrom) and node.module:
        yield node.module, "import"
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not re.search(r"\s", node.value):
        yield node.value, "string"


def offenders_in(source: str, words: set[str]) -> list[tuple[int, str, str]]:
    """(line, what, text) of every place in `source` that names one of `words`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        for text, what in _names(node):
            if any(w in _normalise(text) for w in words):
                found.append((getattr(node, "lineno", 0), what, text))
    return found


def package_offenders() -> dict[str, list[tuple[int, str, str]]]:
    words = backbone_words()
    out = {}
    for dirpath, dirs, files in os.walk(PACKAGE):
        rel = os.path.relpath(dirpath, PACKAGE)
        if rel.split(os.sep)[0] == "models":
            dirs[:] = []
            continue
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    bad = offenders_in(fh.read(), words)
                if bad:
                    out[os.path.relpath(path, ROOT)] = bad
    return out


def test_the_checker_sees_every_form_and_lets_prose_pass():
    words = backbone_words()
    assert {"qwen", "chameleon", "qwen2vl"} <= words
    probe = '''
"""Docstrings may say Qwen2-VL or Chameleon."""
from ivtlr_jax.models.qwen2_vl import ModelConfig
import ivtlr_jax.models.chameleon as cham
from ivtlr_jax.config import CHAMELEON_PROMPT
x = QWEN2VL_PROMPT
y = bb.qwen2_vl_thing
def chameleon_crop(qwen_arg): ...
f(processor="chameleon", backbone_kind="qwen2-vl")
g(use_qwen=True)
raise ValueError(f"position_mode={m!r} is not valid for chameleon; use 'sequential'")
raise ValueError("e.g. Qwen2-VL-7B-Instruct, chameleon-7b: its config")
'''
    found = {(line, text) for line, _, text in offenders_in(probe, words)}
    assert found == {
        (3, "ivtlr_jax.models.qwen2_vl"), (4, "ivtlr_jax.models.chameleon"),
        (5, "CHAMELEON_PROMPT"), (6, "QWEN2VL_PROMPT"), (7, "qwen2_vl_thing"),
        (8, "chameleon_crop"), (8, "qwen_arg"), (9, "chameleon"), (9, "qwen2-vl"), (10, "use_qwen"),
    }, found


def test_no_backbone_is_named_outside_models():
    offenders = package_offenders()
    lines = [f"{path}:{line}: {what} {text!r}" for path, bad in offenders.items() for line, what, text in bad]
    assert not lines, "a concrete backbone is named outside ivtlr_jax/models/:\n" + "\n".join(lines)

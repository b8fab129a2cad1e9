"""Config machinery every layer shares: value coercion, the prompt format, dtype and option checks.

The backbone configs live in their packages under `ivtlr_jax.models` (`ivtlr_jax.models.model_config_from_dict`
picks the class from `model_type`).
Every config class coerces its values to the field types on construction (`coerce`: PyYAML reads `1e-3`
as a string), and `config_from_dict` builds any of them, nested sections included, from a mapping.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- coercion
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_TYPE_NAMES = {int: "an int", float: "a float", bool: "a bool (true or false)", str: "a string"}


def _expected(tp) -> str:
    """How an error names the type a value should have: 'a float', 'an int or null', 'a list of ints'."""
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in sorted(args, key=lambda a: a is type(None)))
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_expected(args[0]).split(' ', 1)[1].split(' (')[0]}s"
        kinds = {_expected(a).split(" ", 1)[1].split(" (")[0] for a in args}
        return f"a list of {len(args)} {kinds.pop()}s" if len(kinds) == 1 else f"a list of {len(args)} values"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _scalar(value, tp):
    """value as int, float, bool or str, or None when it is not one (bools are not numbers here)."""
    is_bool = isinstance(value, (bool, np.bool_))
    text = value.strip() if isinstance(value, str) else None
    if tp is bool:
        if is_bool or (isinstance(value, numbers.Integral) and value in (0, 1)):
            return bool(value)
        return _BOOL_WORDS.get(text.lower()) if text is not None else None
    if is_bool:
        return None
    if tp is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
        try:
            f = float(text if text is not None else value)
        except (TypeError, ValueError):
            return None
        return int(f) if f.is_integer() else None
    if tp is float:
        if isinstance(value, numbers.Real):
            return float(value)
        try:
            return float(text) if text is not None else None
        except ValueError:
            return None
    if tp is str:
        return value if isinstance(value, str) else str(value) if isinstance(value, numbers.Real) else None
    raise TypeError(f"no coercion to {tp!r}")


def coerce(value, tp, key: str, shown=None):
    """`value` as the type annotation `tp` names (int, float, bool, str, tuples, X | None, a config
    dataclass from a mapping, Any); a ValueError naming `key`, the value and the type when it cannot be."""
    if tp is Any or type(value) is tp:  # already right (fast path: configs are built often)
        return value
    shown = tp if shown is None else shown
    bad = ValueError(f"{key}: {value!r} is not {_expected(shown)}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], key, shown)
        for a in options:
            try:
                return coerce(value, a, key)
            except ValueError:
                pass
        raise bad
    if value is None:
        raise bad
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)):
            raise bad
        items = value.tolist() if isinstance(value, np.ndarray) else value
        items = list(items) if isinstance(items, (list, tuple)) else None
        if len(args) == 2 and args[1] is Ellipsis:
            if isinstance(value, tuple) and all(type(v) is args[0] for v in value):
                return value
            items = [value] if items is None else items  # one value: a list of one
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        if items is None or len(items) != len(args):
            raise bad
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return config_from_dict(tp, value, prefix=f"{key}.")
        raise bad
    if tp in (int, float, bool, str):
        out = _scalar(value, tp)
        if out is None:
            raise bad
        return out
    if isinstance(value, tp):
        return value
    raise bad


@functools.cache
def _field_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def coerce_fields(obj) -> None:
    """Coerce every field of a config dataclass to its annotated type, in place (frozen ones included)."""
    hints = _field_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, coerce(getattr(obj, f.name), hints[f.name], f.name))


def config_from_dict(cls, d: Mapping, prefix: str = ""):
    """A config dataclass from a mapping (YAML, JSON, flags): unknown keys refused, every value coerced to its
    field's type (nested sections too; errors name the key as `section.key`)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__}: {d!r} is not {_expected(cls)}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {[prefix + str(k) for k in unknown]} for {cls.__name__}; valid keys: "
                         f"{sorted(names)}")
    hints = _field_hints(cls)
    return cls(**{k: coerce(v, hints[k], prefix + k) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a backbone's prompts look; the data layer builds prompts from this (no model code needed).

    style "chat": the tokenizer's chat template, user turn [image, text] (Qwen2-VL-Instruct); `chat_template`
    is the backbone's built-in one, used when a tokenizer has none.
    style "plain": no template; the image placeholder sits inside the question (Chameleon's release).
    The image placeholder is repeated once per image token between `image_start` and `image_end`
    (a chat template writes those itself). answer_format: the target names the option by its
    "letter" (A, B, ...) or by its 0-based "index" digit.
    """

    style: str
    image_token: str
    image_start: str | None = None
    image_end: str | None = None
    answer_format: str = "letter"
    chat_template: str | None = None

    def __post_init__(self):
        coerce_fields(self)
        if self.style not in ("chat", "plain"):
            raise ValueError(f"PromptFormat.style={self.style!r} is not valid; use 'chat' or 'plain'")
        if self.answer_format not in ("letter", "index"):
            raise ValueError(f"PromptFormat.answer_format={self.answer_format!r}; use 'letter' or 'index'")


def check_dtype(dtype: str) -> str:
    """Validate a dtype name given by a user."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {list(SUPPORTED_DTYPES)}")
    return dtype


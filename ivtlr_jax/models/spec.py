"""The parameter spec table: one `ParamInfo` per weight, in the backbone's own typed tree.

A backbone builds its parameter tree once with `ParamInfo` leaves (shape, dtype, logical axes,
initializer, the Hugging Face key it comes from and the transform). Everything else is derived here:
random init, abstract shapes, logical axes, trainable/LoRA masks, flat names, and the Hugging Face key
map in both directions. No second list of names or shapes exists anywhere.

Stacked leaves (a leading layer axis) name their Hugging Face key with `{i}`: row i of the array is
the tensor of layer i.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------------------- transforms
@dataclasses.dataclass(frozen=True)
class Transform:
    """How one Hugging Face tensor maps to one (row of a) tree array, and back."""

    name: str
    to_tree: Callable[[np.ndarray], np.ndarray]  # HF tensor -> tree row (a view where possible)
    to_hf: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # tree row, hf shape -> HF tensor
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]] | None  # tree row shape -> HF shape (None: given)


def _flat_t(hf: np.ndarray) -> np.ndarray:
    return hf.reshape(hf.shape[0], -1).T


TRANSFORMS = {
    t.name: t
    for t in (
        Transform("copy", lambda a: a, lambda a, s: np.ascontiguousarray(a).reshape(s), lambda s: tuple(s)),
        # torch Linear (out, in) <-> kernel (in, out)
        Transform("linear", lambda a: a.T, lambda a, s: np.ascontiguousarray(a.T).reshape(s),
                  lambda s: tuple(reversed(s))),
        # a conv weight (out, ...) used as a dense layer on flattened patches: (prod(...), out)
        Transform("flatten_linear", _flat_t, lambda a, s: np.ascontiguousarray(a.T).reshape(s), None),
        # torch Conv2d (out, in, kh, kw) <-> JAX HWIO (kh, kw, in, out)
        Transform("conv2d", lambda a: a.transpose(2, 3, 1, 0),
                  lambda a, s: np.ascontiguousarray(a.transpose(3, 2, 0, 1)), lambda s: (s[3], s[2], s[0], s[1])),
    )
}


@dataclasses.dataclass(frozen=True)
class HFKey:
    """The Hugging Face tensor a leaf comes from: `name` ("{i}" = layer index for stacked leaves)."""

    name: str
    transform: str = "copy"
    hf_shape: tuple[int, ...] | None = None  # needed only when the transform cannot derive it

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform={self.transform!r} is not one of {sorted(TRANSFORMS)}")


# ---------------------------------------------------------------------------- one leaf
INITS = ("normal", "zeros", "ones", "fan_in_uniform")  # fan_in_uniform: U(-1/sqrt(fan_in), +), fan_in = shape[-2]


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One weight: its shape, logical axes, initializer, dtype rule and Hugging Face source.

    dtype None follows the checkpoint's dtype; "float32" pins a leaf (e.g. the VQ encoder) to float32.
    stacked: the leading axis is the layer axis (one HF tensor per layer).
    trainable: full fine-tuning trains it (vision towers and image tokenizers are frozen).
    lora: a LoRA target kernel (in, out) (adapters are the trainer's business).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"
    hf: HFKey | None = None
    dtype: str | None = None
    stacked: bool = False
    trainable: bool = True
    lora: bool = False
    std: float = 0.02

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"ParamInfo: axes {self.axes} do not match shape {self.shape}")
        if self.init not in INITS:
            raise ValueError(f"ParamInfo: init={self.init!r} is not one of {INITS}")

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape

    @property
    def num_rows(self) -> int:
        return self.shape[0] if self.stacked else 1

    @property
    def hf_shape(self) -> tuple[int, ...]:
        t = TRANSFORMS[self.hf.transform]
        return tuple(self.hf.hf_shape) if self.hf.hf_shape is not None else t.hf_shape(self.row_shape)

    def hf_names(self) -> list[str]:
        """The Hugging Face tensor names of this leaf, one per row."""
        if self.hf is None:
            return []
        if self.stacked:
            return [self.hf.name.format(i=i) for i in range(self.shape[0])]
        return [self.hf.name]

    def leaf_dtype(self, dtype) -> np.dtype:
        return np.dtype(jnp.dtype(self.dtype)) if self.dtype is not None else np.dtype(jnp.dtype(dtype))


def is_info(x) -> bool:
    return isinstance(x, ParamInfo)


# ---------------------------------------------------------------------------- derived trees
def infos(spec) -> list[tuple[str, ParamInfo]]:
    """(flat name, info) of every leaf, in tree order; names look like "llm/layers/q/kernel"."""
    flat, _ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_info)
    return [(path_name(path), info) for path, info in flat]


def path_name(path) -> str:
    """A key path as "a/b/c" (attribute, dict key or sequence index)."""
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten(tree) -> dict[str, Any]:
    """{"llm/layers/q/kernel": leaf, ...} of a params tree (spec or arrays)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_info)
    return {path_name(p): leaf for p, leaf in flat}


def unflatten(spec, flat: dict[str, Any]):
    """The spec's tree with leaves taken from `flat` by name (missing names raise KeyError)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_info)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_name(p)] for p, _ in leaves])


def named_leaves(spec, tree) -> dict[str, Any]:
    """{name: leaf} of a tree shaped like the spec (leaves may be None: a partial tree)."""
    treedef = jax.tree_util.tree_structure(spec, is_leaf=is_info)
    return dict(zip([n for n, _ in infos(spec)], treedef.flatten_up_to(tree), strict=True))


def from_named(spec, named: dict[str, Any]):
    """The spec's tree with leaves from `named` (absent names: None)."""
    treedef = jax.tree_util.tree_structure(spec, is_leaf=is_info)
    return treedef.unflatten([named.get(n) for n, _ in infos(spec)])


def nest(named: dict[str, Any]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}."""
    out: dict = {}
    for name, leaf in named.items():
        node = out
        *head, last = name.split("/")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out


def unnest(nested: dict, names) -> dict[str, Any]:
    """The leaves of a nested dict at the given "a/b" names."""
    out = {}
    for name in names:
        node = nested
        for key in name.split("/"):
            node = node[key]
        out[name] = node
    return out


def to_nested_dict(tree) -> dict:
    """A nested dict of the tree's leaves by name (the on-disk layout of checkpoints)."""
    return nest(flatten(tree))


def map_spec(fn: Callable[[ParamInfo], Any], spec):
    """tree_map over ParamInfo leaves."""
    return jax.tree.map(fn, spec, is_leaf=is_info)


def shapes(spec):
    return map_spec(lambda i: i.shape, spec)


def abstract(spec, dtype, override: Callable[[ParamInfo], Any] | None = None):
    """ShapeDtypeStructs of the params in `dtype` (leaves with a fixed dtype keep theirs)."""
    return map_spec(lambda i: jax.ShapeDtypeStruct(i.shape, override(i) if override else i.leaf_dtype(dtype)), spec)


def initial_value(info: ParamInfo, dtype, zeros, ones, uniform, normal):
    """The spec's initializer rule for one leaf, in whichever array library the four makers come from:
    zeros/ones(shape, dtype), uniform(low, high) and normal() (float32 draws of the leaf's shape)."""
    dt = info.leaf_dtype(dtype)
    if info.init == "zeros":
        return zeros(info.shape, dt)
    if info.init == "ones":
        return ones(info.shape, dt)
    if info.init == "fan_in_uniform":
        bound = 1.0 / np.sqrt(info.shape[-2])
        return uniform(-bound, bound).astype(dt)
    return (normal() * info.std).astype(dt)


def init_leaf(info: ParamInfo, key, dtype):
    """One leaf from its initializer (jax; `dtype` as the caller wants it, pinned dtypes honoured)."""
    return initial_value(info, dtype, jnp.zeros, jnp.ones,
                         lambda lo, hi: jax.random.uniform(key, info.shape, jnp.float32, lo, hi),
                         lambda: jax.random.normal(key, info.shape, jnp.float32))


def init_params(spec, key, dtype="float32"):
    """Random params (jax arrays) from the spec's initializers; jit it with out_shardings to create them sharded."""
    leaves, treedef = jax.tree_util.tree_flatten(spec, is_leaf=is_info)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(treedef, [init_leaf(i, k, dtype) for i, k in zip(leaves, keys)])


def init_params_numpy(spec, seed: int = 0, dtype="float32"):
    """Random params as numpy arrays (host only; for building test and default checkpoints), by the same rule."""
    rng = np.random.default_rng(seed)
    return map_spec(lambda info: initial_value(info, dtype, np.zeros, np.ones,
                                               lambda lo, hi: rng.uniform(lo, hi, info.shape),
                                               lambda: rng.standard_normal(info.shape, np.float32)), spec)


def check_tree(spec, params, what: str = "params") -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped leaves of `params` against `spec`."""
    expected = {n: i.shape for n, i in infos(spec)}
    got = {n: tuple(np.shape(v)) for n, v in flatten(params).items()} if not isinstance(params, dict) else \
        {n: tuple(np.shape(v)) for n, v in _flatten_dict(params).items()}
    missing = sorted(n for n in expected if n not in got)
    unexpected = sorted(n for n in got if n not in expected)
    misshaped = sorted(f"{n}: shape {list(got[n])}, expected {list(expected[n])}"
                       for n in expected if n in got and got[n] != tuple(expected[n]))
    if missing or unexpected or misshaped:
        raise ValueError(f"{what} do not match the backbone's spec table: "
                         + format_mismatch(missing, unexpected, misshaped))


def _flatten_dict(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_dict(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short_list(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}]"


def format_mismatch(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """One message listing missing, unexpected and mis-shaped names (empty lists omitted)."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_short_list(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_short_list(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped {len(misshaped)}: {_short_list(misshaped)}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- the HF key map
@dataclasses.dataclass(frozen=True)
class HFEntry:
    """One Hugging Face tensor: where it goes in the tree and how."""

    hf_name: str
    path: str  # flat tree name
    row: int | None  # layer index for stacked leaves
    info: ParamInfo

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.info.hf_shape

    def to_tree(self, hf_tensor: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.info.hf.transform].to_tree(hf_tensor)

    def to_hf(self, tree_row: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.info.hf.transform].to_hf(tree_row, self.hf_shape)


def hf_entries(spec) -> list[HFEntry]:
    """Every Hugging Face tensor the spec reads, in tree order."""
    out = []
    for name, info in infos(spec):
        for row, hf_name in enumerate(info.hf_names()):
            out.append(HFEntry(hf_name, name, row if info.stacked else None, info))
    return out

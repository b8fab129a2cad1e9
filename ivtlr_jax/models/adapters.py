"""LoRA adapters as data, below the trainer and the converter: their record (`LoRAMeta`: r, alpha and the one
scale), their spec (derived from the params spec's `lora` flags) and the one rule that folds them into a kernel.
Applying them with dropout is the trainer's (`train/lora.py`); reading and writing them is the converter's.

The adapters mirror the params tree: a `LoRAAdapter` (A (L, in, r), B (L, r, out), float32) where the
backbone's spec marks a kernel as a LoRA target (q, k, v, o, gate, up, down of the LLM), None elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.layers import Linear


@dataclasses.dataclass(frozen=True)
class LoRAMeta:
    """What a set of adapters is: rank r and alpha. `scale` (alpha / r) is the only place the scale is made;
    `to_dict` is the one schema it is written under ({"r", "alpha"})."""

    r: int
    alpha: float

    def __post_init__(self):
        object.__setattr__(self, "r", int(self.r))
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha}

    @classmethod
    def from_dict(cls, record: Mapping, where: str) -> LoRAMeta:
        """From {"r", "alpha"}, or {"lora_r", "lora_alpha"} (run checkpoints written before the one schema)."""
        for r, alpha in (("r", "alpha"), ("lora_r", "lora_alpha")):
            if r in record and alpha in record:
                return cls(record[r], record[alpha])
        raise ValueError(f"{where}: no LoRA r and alpha in {sorted(record)}; expected the keys 'r' and 'alpha' "
                         "(or 'lora_r' and 'lora_alpha' of older run checkpoints)")


@struct.dataclass
class LoRAAdapter:
    a: Any  # (L, in, r)
    b: Any  # (L, r, out)


def is_linear(x) -> bool:
    return isinstance(x, Linear)


def adapter_spec(spec, rank: int):
    """Adapter spec mirroring the params spec: A/B ParamInfos where a kernel is a LoRA target, None elsewhere."""
    if rank < 1:
        raise ValueError(f"lora rank r={rank} must be >= 1")

    def one(node):
        if not is_linear(node) or not node.kernel.lora:
            return None
        k = node.kernel
        *lead, din, dout = k.shape
        *lead_axes, ax_in, ax_out = k.axes
        # The kernel's own axis, then FSDP's: a factor has no other large dimension to shard.
        return LoRAAdapter(
            a=sp.ParamInfo((*lead, din, rank), (*lead_axes, (ax_in, "embed"), "lora_rank"), init="fan_in_uniform",
                           dtype="float32", stacked=k.stacked),
            b=sp.ParamInfo((*lead, rank, dout), (*lead_axes, "lora_rank", (ax_out, "embed")), init="zeros",
                           dtype="float32", stacked=k.stacked))

    out = jax.tree.map(one, spec, is_leaf=lambda x: is_linear(x) or sp.is_info(x))
    if not jax.tree_util.tree_leaves(out, is_leaf=sp.is_info):
        raise ValueError("the backbone's spec marks no LoRA target kernels")
    return out


def fold_lora(kernel, a, b, scale: float):
    """kernel (..., in, out) + scale * a (..., in, r) @ b (..., r, out), in float32: the one merge rule.

    numpy arrays are folded on the host with in-place arithmetic (one float32 copy of the kernel); jax arrays
    on their devices at the highest matmul precision. The result is float32; callers cast it.
    """
    if isinstance(kernel, np.ndarray) and isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        out = np.matmul(a.astype(np.float32, copy=False), b.astype(np.float32, copy=False))
        out *= np.float32(scale)
        out += kernel.astype(np.float32, copy=False)
        return out
    delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return delta * jnp.float32(scale) + jnp.asarray(kernel).astype(jnp.float32)


def fold_adapters(params, adapters, scale: float, dtype=None, in_place: bool = False):
    """params with each adapted kernel replaced by `fold_lora` of it, stored in `dtype` (or the kernel's own).

    numpy kernels are folded one (in, out) matrix at a time; `in_place` (the caller owns the params) writes into
    a kernel that already has the output dtype (host memory: one layer's float32 copy). jax arrays are folded in
    one call on their devices (jit it, with the params donated, to fold on a mesh).
    """

    def fold(p, ad):
        if ad is None:
            return p
        if not isinstance(p.kernel, np.ndarray):
            kernel = fold_lora(p.kernel, ad.a, ad.b, scale)
            return p.replace(kernel=kernel.astype(p.kernel.dtype if dtype is None else dtype))
        kernel = p.kernel
        here = in_place and (dtype is None or np.dtype(dtype) == kernel.dtype) and kernel.flags.writeable
        out = kernel if here else np.empty(kernel.shape, kernel.dtype if dtype is None else dtype)
        a, b = np.asarray(ad.a), np.asarray(ad.b)
        for idx in np.ndindex(kernel.shape[:-2]):
            out[idx] = fold_lora(kernel[idx], a[idx], b[idx], scale)
        return p.replace(kernel=out)

    return jax.tree.map(fold, params, adapters, is_leaf=is_linear)

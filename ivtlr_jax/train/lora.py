"""LoRA in training: initialising adapters and applying them with dropout; the model only calls its linear layers.

The adapters' spec and the merge rule live below the trainer, in `models/adapters.py` (the converter uses them
too). `apply_lora` swaps those `Linear`s for `LoRALinear`s, which compute x W + b + s (dropout(x) A) B. A
LoRALinear's dropout keys are folded with the decoder call's index (`fold_in`, through the model's
`layers.for_call`), so the prefix, every latent chunk and the suffix draw their own masks, as PEFT does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import LoRAAdapter, adapter_spec, is_linear
from ivtlr_jax.models.layers import Linear

__all__ = ["LoRAAdapter", "LoRALinear", "adapter_spec", "apply_lora", "init_lora"]


@struct.dataclass
class LoRALinear:
    """A base Linear plus its adapter; called exactly like a Linear (inside the layer scan: one layer's slice)."""

    base: Linear
    a: Any
    b: Any
    key: Any = None  # dropout key per layer, or None (no dropout)
    scale: float = struct.field(pytree_node=False, default=1.0)
    rate: float = struct.field(pytree_node=False, default=0.0)

    def fold_in(self, i):
        """This layer for decoder call i: every dropout key folded with i (a fresh mask per call)."""
        if self.key is None:
            return self
        fold = lambda k: jax.random.fold_in(k, i)
        lead = self.key.ndim - (0 if jax.dtypes.issubdtype(self.key.dtype, jax.dtypes.prng_key) else 1)
        for _ in range(lead):  # one key per stacked layer
            fold = jax.vmap(fold)
        return self.replace(key=fold(self.key))

    def keep_mask(self, shape):
        """The dropout keep mask for an input of this shape, or None without dropout."""
        if self.key is None or self.rate <= 0.0:
            return None
        return jax.random.bernoulli(self.key, 1.0 - self.rate, shape)

    def __call__(self, x):
        y = self.base(x)
        xa = x
        keep = self.keep_mask(x.shape)
        if keep is not None:  # LoRA dropout on the adapter's input
            xa = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        return y + ((xa @ self.a.astype(x.dtype)) @ self.b.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)


def init_lora(spec, rank: int, key):
    """Adapters in float32 (A kaiming-uniform as PEFT, B zero so the model starts unchanged)."""
    return sp.init_params(adapter_spec(spec, rank), key, "float32")


def apply_lora(params, adapters, scale: float, dropout: float = 0.0, key=None):
    """A params tree whose target Linears carry their adapters (used inside the train step)."""
    counter = iter(range(10**6))

    def wrap(p, ad):
        if ad is None:
            return p
        keys = None
        if dropout > 0.0 and key is not None:
            keys = jax.random.split(jax.random.fold_in(key, next(counter)), ad.a.shape[0])
        return LoRALinear(p, ad.a, ad.b, keys, scale=float(scale), rate=float(dropout) if keys is not None else 0.0)

    return jax.tree.map(wrap, params, adapters, is_leaf=is_linear)

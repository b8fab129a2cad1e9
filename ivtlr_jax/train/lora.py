"""LoRA adapters on the LLM's q, k, v, o, gate, up, down projections (stacked over layers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def init_lora(params, rank: int, key, targets=LORA_TARGETS) -> dict:
    """{target: {"a": (L, in, r), "b": (L, r, out)}} in float32; b starts at zero so the model is unchanged."""
    if rank < 1:
        raise ValueError(f"lora rank r={rank} must be >= 1")
    layers = params["llm"]["layers"]
    lora = {}
    for i, name in enumerate(targets):
        if name not in layers:
            raise ValueError(f"LoRA target {name!r} is not an LLM projection; valid: {list(LORA_TARGETS)}")
        n_layers, d_in, d_out = layers[name]["kernel"].shape
        bound = 1.0 / np.sqrt(d_in)  # kaiming-uniform(a=sqrt(5)) bound, as PEFT initialises A
        a = jax.random.uniform(jax.random.fold_in(key, i), (n_layers, d_in, rank), jnp.float32, -bound, bound)
        lora[name] = {"a": a, "b": jnp.zeros((n_layers, rank, d_out), jnp.float32)}
    return lora


def apply_lora(params, lora, scale: float, dropout: float = 0.0, key=None):
    """A params tree whose LLM projections carry the adapters (used inside the train step)."""
    layers = dict(params["llm"]["layers"])
    for i, (name, ab) in enumerate(sorted(lora.items())):
        entry = dict(layers[name])
        entry["lora_a"] = ab["a"]
        entry["lora_b"] = ab["b"] * scale
        if dropout > 0.0 and key is not None:
            n_layers = ab["a"].shape[0]
            entry["lora_key"] = jax.random.split(jax.random.fold_in(key, i), n_layers)
            entry["lora_rate"] = jnp.full((n_layers,), dropout, jnp.float32)
        layers[name] = entry
    return {**params, "llm": {**params["llm"], "layers": layers}}


def merge_lora(params, lora, scale: float):
    """Fold the adapters into the kernels: W + scale * A @ B (numpy, in the kernels' dtype)."""
    layers = dict(params["llm"]["layers"])
    for name, ab in lora.items():
        kernel = np.asarray(layers[name]["kernel"])
        delta = np.einsum("lir,lro->lio", np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32))
        layers[name] = {**layers[name], "kernel": (kernel.astype(np.float32) + scale * delta).astype(kernel.dtype)}
    return {**params, "llm": {**params["llm"], "layers": layers}}

"""The parameter pytree of the Flax Qwen2-VL: names, shapes and logical axes, in one place.

Layers are stacked on a leading axis (vision blocks: `depth`; LLM layers: `num_hidden_layers`).
Linear kernels are stored (in, out), i.e. the transpose of PyTorch's (out, in).
If `tie_word_embeddings` the tree has no `llm/lm_head` and the head is `embed.T`.
"""

from __future__ import annotations

from ivtlr_jax.config import ModelConfig


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of parameter shapes, the contract shared by the model, converter and trainer."""
    v = cfg.vision
    d, e, m = v.depth, v.embed_dim, v.mlp_dim
    merged = e * v.spatial_merge_size**2
    L, h, i = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    vision = {
        "patch_embed": {"kernel": (v.patch_dim, e)},
        "blocks": {
            "norm1": {"scale": (d, e), "bias": (d, e)},
            "norm2": {"scale": (d, e), "bias": (d, e)},
            "qkv": {"kernel": (d, e, 3 * e), "bias": (d, 3 * e)},
            "proj": {"kernel": (d, e, e), "bias": (d, e)},
            "fc1": {"kernel": (d, e, m), "bias": (d, m)},
            "fc2": {"kernel": (d, m, e), "bias": (d, e)},
        },
        "merger": {
            "ln_q": {"scale": (e,), "bias": (e,)},
            "fc1": {"kernel": (merged, merged), "bias": (merged,)},
            "fc2": {"kernel": (merged, h), "bias": (h,)},
        },
    }
    llm = {
        "embed": (cfg.vocab_size, h),
        "layers": {
            "input_norm": (L, h),
            "post_attn_norm": (L, h),
            "q": {"kernel": (L, h, q), "bias": (L, q)},
            "k": {"kernel": (L, h, kv), "bias": (L, kv)},
            "v": {"kernel": (L, h, kv), "bias": (L, kv)},
            "o": {"kernel": (L, q, h)},
            "gate": {"kernel": (L, h, i)},
            "up": {"kernel": (L, h, i)},
            "down": {"kernel": (L, i, h)},
        },
        "norm": (h,),
    }
    if not cfg.tie_word_embeddings:
        llm["lm_head"] = (h, cfg.vocab_size)
    return {"vision": vision, "llm": llm}


def init_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02, dtype="float32") -> dict:
    """Random parameters (numpy): normal(0, std) weights, unit norm scales, zero biases."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def make(path: tuple, shape: tuple):
        name = path[-1]
        if name == "bias":
            return np.zeros(shape, dtype)
        if name == "scale" or name.endswith("norm"):  # LayerNorm scales and RMSNorm weights
            return np.ones(shape, dtype)
        return (rng.standard_normal(shape, np.float32) * std).astype(dtype)

    def walk(tree, path=()):
        if isinstance(tree, dict):
            return {k: walk(v, path + (k,)) for k, v in tree.items()}
        return make(path, tree)

    return walk(param_shapes(cfg))

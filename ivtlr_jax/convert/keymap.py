"""The one table between Hugging Face Qwen2-VL tensor names and paths in the ivtlr_jax parameter tree.

HF names are kept in the old hub layout (`model.layers.*`, `model.embed_tokens.weight`, `visual.*`,
`lm_head.weight`); the transformers-5 layout (`model.language_model.*`, `model.visual.*`) is
normalised to it on reading. PyTorch Linear weights (out, in) become kernels (in, out); per-layer
tensors are row `layer` of a stacked array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ivtlr_jax.config import ModelConfig
from ivtlr_jax.models.layout import param_shapes

# Name prefixes of the transformers-5 layout -> the old hub layout.
_NEW_TO_OLD_PREFIX = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)

# Keys some checkpoints carry that hold no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")

_VISION_BLOCK = (  # (HF name inside visual.blocks.{i}, tree path inside vision/blocks, kind)
    ("norm1.weight", ("norm1", "scale"), "copy"),
    ("norm1.bias", ("norm1", "bias"), "copy"),
    ("norm2.weight", ("norm2", "scale"), "copy"),
    ("norm2.bias", ("norm2", "bias"), "copy"),
    ("attn.qkv.weight", ("qkv", "kernel"), "linear"),
    ("attn.qkv.bias", ("qkv", "bias"), "copy"),
    ("attn.proj.weight", ("proj", "kernel"), "linear"),
    ("attn.proj.bias", ("proj", "bias"), "copy"),
    ("mlp.fc1.weight", ("fc1", "kernel"), "linear"),
    ("mlp.fc1.bias", ("fc1", "bias"), "copy"),
    ("mlp.fc2.weight", ("fc2", "kernel"), "linear"),
    ("mlp.fc2.bias", ("fc2", "bias"), "copy"),
)

_LLM_LAYER = (  # (HF name inside model.layers.{i}, tree path inside llm/layers, kind)
    ("input_layernorm.weight", ("input_norm",), "copy"),
    ("post_attention_layernorm.weight", ("post_attn_norm",), "copy"),
    ("self_attn.q_proj.weight", ("q", "kernel"), "linear"),
    ("self_attn.q_proj.bias", ("q", "bias"), "copy"),
    ("self_attn.k_proj.weight", ("k", "kernel"), "linear"),
    ("self_attn.k_proj.bias", ("k", "bias"), "copy"),
    ("self_attn.v_proj.weight", ("v", "kernel"), "linear"),
    ("self_attn.v_proj.bias", ("v", "bias"), "copy"),
    ("self_attn.o_proj.weight", ("o", "kernel"), "linear"),
    ("mlp.gate_proj.weight", ("gate", "kernel"), "linear"),
    ("mlp.up_proj.weight", ("up", "kernel"), "linear"),
    ("mlp.down_proj.weight", ("down", "kernel"), "linear"),
)


@dataclass(frozen=True)
class Entry:
    """One HF tensor: its name, where it goes in the tree, and how it is transformed.

    kind: "copy" (same layout), "linear" (transposed), "patch" (Conv3d weight flattened then transposed).
    """

    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    kind: str
    hf_shape: tuple[int, ...]
    tree_shape: tuple[int, ...]  # the shape of the whole (stacked) array at `path`


def normalize_key(name: str) -> str:
    """Map a transformers-5 layout name to the old hub layout; old names pass through."""
    for new, old in _NEW_TO_OLD_PREFIX:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def is_ignored_key(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _hf_shape(kind: str, row_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    if kind == "linear":
        return tuple(reversed(row_shape))
    if kind == "patch":
        v = cfg.vision
        return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tuple(row_shape)


def hf_entries(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor the tree of `cfg` needs, in the order of the old hub layout (no lm_head if tied)."""
    shapes = param_shapes(cfg)
    entries: list[Entry] = []

    def add(hf_name, path, layer, kind):
        tree_shape = tuple(get_path(shapes, path))
        row_shape = tree_shape[1:] if layer is not None else tree_shape
        entries.append(Entry(hf_name, path, layer, kind, _hf_shape(kind, row_shape, cfg), tree_shape))

    add("visual.patch_embed.proj.weight", ("vision", "patch_embed", "kernel"), None, "patch")
    for i in range(cfg.vision.depth):
        for name, sub, kind in _VISION_BLOCK:
            add(f"visual.blocks.{i}.{name}", ("vision", "blocks", *sub), i, kind)
    add("visual.merger.ln_q.weight", ("vision", "merger", "ln_q", "scale"), None, "copy")
    add("visual.merger.ln_q.bias", ("vision", "merger", "ln_q", "bias"), None, "copy")
    add("visual.merger.mlp.0.weight", ("vision", "merger", "fc1", "kernel"), None, "linear")
    add("visual.merger.mlp.0.bias", ("vision", "merger", "fc1", "bias"), None, "copy")
    add("visual.merger.mlp.2.weight", ("vision", "merger", "fc2", "kernel"), None, "linear")
    add("visual.merger.mlp.2.bias", ("vision", "merger", "fc2", "bias"), None, "copy")
    add("model.embed_tokens.weight", ("llm", "embed"), None, "copy")
    for i in range(cfg.num_hidden_layers):
        for name, sub, kind in _LLM_LAYER:
            add(f"model.layers.{i}.{name}", ("llm", "layers", *sub), i, kind)
    add("model.norm.weight", ("llm", "norm"), None, "copy")
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", ("llm", "lm_head"), None, "linear")
    return entries


def hf_to_tree(entry: Entry, arr: np.ndarray) -> np.ndarray:
    """One HF tensor in the tree's layout (a view where possible; the caller copies it into place)."""
    if entry.kind == "linear":
        return arr.T
    if entry.kind == "patch":
        return arr.reshape(arr.shape[0], -1).T
    return arr


def tree_to_hf(entry: Entry, arr: np.ndarray) -> np.ndarray:
    """The inverse of `hf_to_tree` for one row of the tree: a contiguous array of `entry.hf_shape`."""
    if entry.kind in ("linear", "patch"):
        arr = arr.T
    return np.ascontiguousarray(arr).reshape(entry.hf_shape)

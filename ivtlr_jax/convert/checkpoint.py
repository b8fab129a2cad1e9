"""The self-contained ivtlr_jax checkpoint folder: orbax params, model config, HF config, tokenizer files.

CKPT_DIR/
  params/             orbax checkpoint of the parameter pytree (layout: ivtlr_jax.models.layout)
  ivtlr_config.json   ModelConfig.save
  hf_config.json      the source config.json (vocab_size kept in sync), used by the export to HF
  tokenizer*, vocab.json, merges.txt, special_tokens_map.json, preprocessor_config.json,
  chat_template.*, generation_config.json, ...   copied from the source
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
from typing import Any

import ml_dtypes
import numpy as np

from ivtlr_jax.config import ModelConfig, check_dtype
from ivtlr_jax.models.layout import param_shapes

PARAMS_DIR = "params"
CONFIG_NAME = "ivtlr_config.json"
HF_CONFIG_NAME = "hf_config.json"

# Tokenizer, processor and generation files that travel with the weights.
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template*",
    "generation_config.json",
)

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def np_dtype(dtype: str) -> np.dtype:
    """numpy dtype for a user-facing dtype name ("float32" | "bfloat16")."""
    return NP_DTYPES[check_dtype(dtype)]


# ---------------------------------------------------------------- tree helpers
def flatten_tree(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"llm/layers/q/kernel": leaf, ...} for a nested dict (tuples of ints count as leaves)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_tree(value, name + "/"))
        else:
            flat[name] = value
    return flat


def map_tree(fn, tree: dict) -> dict:
    """Apply `fn` to every non-dict leaf of a nested dict (shape tuples included)."""
    return {k: map_tree(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _short_list(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}]"


def format_mismatch(missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """One message listing missing, unexpected and mis-shaped keys (empty lists omitted)."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_short_list(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_short_list(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped {len(misshaped)}: {_short_list(misshaped)}")
    return "; ".join(parts)


def check_params(cfg: ModelConfig, params: dict) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped parameters of `params` for `cfg`."""
    expected = flatten_tree(param_shapes(cfg))
    got = flatten_tree(params)
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    misshaped = sorted(
        f"{k}: shape {list(np.shape(got[k]))}, expected {list(expected[k])}"
        for k in expected
        if k in got and tuple(np.shape(got[k])) != tuple(expected[k])
    )
    if missing or unexpected or misshaped:
        raise ValueError(
            "params do not match the parameter layout of the model config (ivtlr_jax.models.layout): "
            + format_mismatch(missing, unexpected, misshaped)
        )


# ---------------------------------------------------------------- HF config
def hf_config_from_model_config(cfg: ModelConfig) -> dict:
    """A transformers-5 style Qwen2-VL config.json for `cfg`, for checkpoints saved without one."""
    v = cfg.vision
    text = {
        "model_type": "qwen2_vl_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": list(cfg.mrope_section),
            "rope_theta": cfg.rope_theta,
        },
        "use_sliding_window": False,
        "bos_token_id": None,  # Qwen2-VL has no BOS in use; the class default (151643) can lie outside a small vocab
        "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else cfg.eos_token_id[0],
        "pad_token_id": cfg.pad_token_id,
    }
    vision = {
        "model_type": "qwen2_vl_vision",
        "depth": v.depth,
        "embed_dim": v.embed_dim,
        "hidden_size": v.out_hidden_size,
        "num_heads": v.num_heads,
        "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "hidden_act": "quick_gelu",
    }
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "text_config": text,
        "vision_config": vision,
    }


def sync_hf_config(hf_config: dict, cfg: ModelConfig, dtype: str | None = None) -> dict:
    """A copy of `hf_config` with vocab_size (top level and/or text_config) and dtype taken from `cfg`."""
    out = copy.deepcopy(hf_config)
    text = out.get("text_config")
    if isinstance(text, dict):
        text["vocab_size"] = cfg.vocab_size
    if "vocab_size" in out or not isinstance(text, dict):
        out["vocab_size"] = cfg.vocab_size
    if dtype is not None:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    return out


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer/processor/generation files (TOKENIZER_PATTERNS) from src to dst; returns their names."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS):
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
    return copied


# ---------------------------------------------------------------- save / load
def _checkpointer():
    """A synchronous orbax PyTree checkpointer that writes numpy arrays without extra host copies.

    By default orbax deep-copies host arrays before writing and holds compressed copies of each chunk;
    together they more than double peak memory. The save here is synchronous (nothing can modify the
    arrays meanwhile) and uncompressed (weights barely compress), so peak memory stays the params' size.
    """
    import jax
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    try:
        registry = th.create_type_handler_registry(
            (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, th.get_type_handler(jax.Array)),
        )
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    except TypeError:  # an orbax without these options: its defaults
        return ocp.PyTreeCheckpointer()
    return ocp.Checkpointer(handler)


def save_checkpoint(
    ckpt_dir: str,
    cfg: ModelConfig,
    params: dict,
    hf_config: dict | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write params (orbax), ivtlr_config.json and hf_config.json into `ckpt_dir`, after `check_params`."""
    check_params(cfg, params)
    ckpt_dir = os.path.abspath(ckpt_dir)
    params_dir = os.path.join(ckpt_dir, PARAMS_DIR)
    if os.path.exists(params_dir) and not overwrite:
        raise ValueError(
            f"--dst {ckpt_dir!r} already holds a checkpoint ({PARAMS_DIR}/ exists); "
            "choose a new folder or pass overwrite=True (--overwrite)"
        )
    os.makedirs(ckpt_dir, exist_ok=True)
    _checkpointer().save(params_dir, params, force=overwrite)
    cfg.save(os.path.join(ckpt_dir, CONFIG_NAME))
    leaf = flatten_tree(params)["llm/embed"]
    dtype = str(np.dtype(leaf.dtype))
    hf = sync_hf_config(hf_config if hf_config is not None else hf_config_from_model_config(cfg), cfg, dtype)
    with open(os.path.join(ckpt_dir, HF_CONFIG_NAME), "w") as f:
        json.dump(hf, f, indent=2)


def load_config(ckpt_dir: str) -> ModelConfig:
    """The ModelConfig of a checkpoint folder, with a clear error if the folder is not one."""
    path = os.path.join(ckpt_dir, CONFIG_NAME)
    if not os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)) or not os.path.exists(path):
        raise ValueError(
            f"checkpoint {ckpt_dir!r} has no {PARAMS_DIR}/ and {CONFIG_NAME}; give a folder written by "
            "tools/convert_weights.py or save_checkpoint"
        )
    return ModelConfig.load(path)


def load_checkpoint(ckpt_dir: str, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a checkpoint folder; params are numpy arrays, cast to `dtype` if given."""
    import orbax.checkpoint as ocp

    target = np_dtype(dtype) if dtype is not None else None
    ckpt_dir = os.path.abspath(ckpt_dir)
    cfg = load_config(ckpt_dir)
    restore_args = map_tree(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=target), param_shapes(cfg))
    params = _checkpointer().restore(
        os.path.join(ckpt_dir, PARAMS_DIR), args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )
    check_params(cfg, params)
    return cfg, params

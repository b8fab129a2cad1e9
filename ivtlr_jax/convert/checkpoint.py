"""Writing the self-contained checkpoint folder (CKPT_DIR, named in `layout`): orbax params, model config, HF
config, tokenizer files and optional unmerged LoRA adapters; its config, LoRA record and stored leaves.
Reading its parameters is `load.load_params`.

The tokenizer*, vocab.json, merges.txt, special_tokens_map.json, preprocessor_config.json, chat_template.*,
generation_config.json, ... of the source travel with the weights (TOKENIZER_PATTERNS).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil

import ml_dtypes
import numpy as np

from ivtlr_jax.config import check_dtype
from ivtlr_jax.convert.layout import CONFIG_NAME, HF_CONFIG_NAME, LORA_CONFIG_NAME, LORA_DIR, PARAMS_DIR
from ivtlr_jax.models import backbone_for
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import LoRAMeta, adapter_spec
from ivtlr_jax.models.config import BackboneConfig

__all__ = ["CONFIG_NAME", "HF_CONFIG_NAME", "LORA_CONFIG_NAME", "LORA_DIR", "PARAMS_DIR", "check_params",
           "check_stored", "copy_tokenizer_files", "hf_config_for", "load_config", "lora_targets", "np_dtype",
           "orbax_checkpointer", "read_lora_meta", "remove_lora", "save_checkpoint", "save_lora", "stored_leaves",
           "sync_hf_config"]

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


# ---------------------------------------------------------------- checks
def check_params(cfg, params) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped parameters of `params` for `cfg`.

    `params` is the backbone's typed tree or the nested-dict layout of a checkpoint.
    """
    sp.check_tree(backbone_for(cfg).param_spec(), params, what="params")


def hf_config_for(cfg) -> dict:
    """A transformers config.json for `cfg`, for checkpoints saved without one."""
    return backbone_for(cfg).hf_config()


def sync_hf_config(hf_config: dict, cfg, dtype: str | None = None) -> dict:
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


# ---------------------------------------------------------------- save
def orbax_checkpointer():
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
    cfg,
    params,
    hf_config: dict | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write params (orbax), ivtlr_config.json and hf_config.json into `ckpt_dir`, after `check_params`."""
    check_params(cfg, params)
    nested = params if isinstance(params, dict) else sp.to_nested_dict(params)
    ckpt_dir = os.path.abspath(ckpt_dir)
    params_dir = os.path.join(ckpt_dir, PARAMS_DIR)
    if os.path.exists(params_dir) and not overwrite:
        raise ValueError(
            f"--dst {ckpt_dir!r} already holds a checkpoint ({PARAMS_DIR}/ exists); "
            "choose a new folder or pass overwrite=True (--overwrite)"
        )
    os.makedirs(ckpt_dir, exist_ok=True)
    remove_lora(ckpt_dir)  # adapters of the params being replaced would no longer fit them
    orbax_checkpointer().save(params_dir, nested, force=overwrite)
    cfg.save(os.path.join(ckpt_dir, CONFIG_NAME))
    dtype = str(np.dtype(nested["llm"]["embed"].dtype))
    hf = sync_hf_config(hf_config if hf_config is not None else hf_config_for(cfg), cfg, dtype)
    with open(os.path.join(ckpt_dir, HF_CONFIG_NAME), "w") as f:
        json.dump(hf, f, indent=2)


def load_config(ckpt_dir: str):
    """The backbone config of a checkpoint folder, with a clear error if the folder is not one."""
    path = os.path.join(ckpt_dir, CONFIG_NAME)
    if not os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)) or not os.path.exists(path):
        raise ValueError(
            f"checkpoint {ckpt_dir!r} has no {PARAMS_DIR}/ and {CONFIG_NAME}; give a folder written by "
            "tools/convert_weights.py or save_checkpoint"
        )
    return BackboneConfig.load(path)


# ---------------------------------------------------------------- unmerged LoRA adapters
def lora_targets(bb) -> list[str]:
    """Flat names of the kernels the backbone's spec marks as LoRA targets."""
    return [name for name, info in sp.infos(bb.param_spec()) if info.lora]


def read_lora_meta(ckpt_dir: str, bb=None) -> LoRAMeta | None:
    """The record of a folder's unmerged adapters, or None when it has none; with the backbone `bb`, their targets
    checked against its LoRA targets."""
    path = os.path.join(ckpt_dir, LORA_CONFIG_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if not os.path.isdir(os.path.join(ckpt_dir, LORA_DIR)) or "targets" not in record:
        raise ValueError(f"checkpoint {ckpt_dir!r}: {LORA_CONFIG_NAME} needs r, alpha, targets and a {LORA_DIR}/ "
                         "folder beside it; convert the release again with --keep-lora")
    meta = LoRAMeta.from_dict(record, f"checkpoint {ckpt_dir!r}: {LORA_CONFIG_NAME}")
    if bb is not None and record["targets"] != lora_targets(bb):
        raise ValueError(f"checkpoint {ckpt_dir!r}: its adapters target {record['targets']} but the backbone's LoRA "
                         f"targets are {lora_targets(bb)}")
    return meta


def save_lora(ckpt_dir: str, bb, adapters, meta: LoRAMeta, source: str | None = None,
              overwrite: bool = False) -> None:
    """Write LoRA adapters (the trainer's LoRAAdapter tree, float32) and their record (r, alpha, targets) beside
    params/."""
    sp.check_tree(adapter_spec(bb.param_spec(), meta.r), adapters, what="LoRA adapters")
    orbax_checkpointer().save(os.path.join(os.path.abspath(ckpt_dir), LORA_DIR), sp.to_nested_dict(adapters),
                         force=overwrite)
    record = {**meta.to_dict(), "targets": lora_targets(bb), "source": source}
    with open(os.path.join(ckpt_dir, LORA_CONFIG_NAME), "w") as f:
        json.dump(record, f, indent=2)


def remove_lora(ckpt_dir: str) -> None:
    """Delete a folder's unmerged adapters (they belong to the params they were saved with)."""
    shutil.rmtree(os.path.join(ckpt_dir, LORA_DIR), ignore_errors=True)
    if os.path.exists(os.path.join(ckpt_dir, LORA_CONFIG_NAME)):
        os.remove(os.path.join(ckpt_dir, LORA_CONFIG_NAME))


def stored_leaves(folder: str) -> dict:
    """{name: (shape, numpy dtype)} of the leaves of an orbax tree folder, from its metadata (no array is read)."""
    import jax

    meta = orbax_checkpointer().metadata(os.path.abspath(folder))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {sp.path_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat
            if getattr(m, "dtype", None) is not None}


def check_stored(spec, folder: str, what: str) -> dict:
    """check_tree of an orbax folder's leaves (names and shapes from its metadata) against `spec`; returns them."""
    stored = stored_leaves(folder)
    shaped = {n: np.broadcast_to(np.zeros((), np.int8), shape) for n, (shape, _) in stored.items()}  # no memory
    sp.check_tree(spec, sp.nest(shaped), what=what)
    return stored

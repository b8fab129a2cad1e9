"""The self-contained ivtlr_jax checkpoint folder: orbax params, model config, HF config, tokenizer files.

CKPT_DIR/
  params/             orbax checkpoint of the parameter tree as nested dicts (names from the backbone's spec)
  ivtlr_config.json   the backbone config (`model_type` says which)
  hf_config.json      the source config.json (vocab_size kept in sync), used by the export to HF
  tokenizer*, vocab.json, merges.txt, special_tokens_map.json, preprocessor_config.json,
  chat_template.*, generation_config.json, ...   copied from the source
  lora/, lora_config.json   optional: LoRA adapters kept unmerged over params/ (r, alpha, targets);
                            load_checkpoint folds them in unless asked for the base weights
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil

import ml_dtypes
import numpy as np

from ivtlr_jax.config import check_dtype, model_config_from_dict
from ivtlr_jax.models import backbone_for
from ivtlr_jax.models import spec as sp

PARAMS_DIR = "params"
CONFIG_NAME = "ivtlr_config.json"
HF_CONFIG_NAME = "hf_config.json"
# Optional: unmerged LoRA adapters over params/ (an imported release with --keep-lora), in the trainer's layout.
LORA_DIR = "lora"
LORA_CONFIG_NAME = "lora_config.json"

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
format_mismatch = sp.format_mismatch


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
    _checkpointer().save(params_dir, nested, force=overwrite)
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
    with open(path) as f:
        return model_config_from_dict(json.load(f))


def load_checkpoint(ckpt_dir: str, dtype: str | None = None, *, lora: str = "merge"):
    """(config, params) of a checkpoint folder; params are the backbone's typed tree of numpy arrays.

    `dtype` casts every leaf except those the spec pins (e.g. the VQ encoder stays float32).
    A folder with unmerged LoRA adapters (lora/): lora="merge" folds them into the kernels in float32
    (the model the folder holds); lora="base" returns the base weights they apply to.
    """
    import orbax.checkpoint as ocp

    if lora not in ("merge", "base"):
        raise ValueError(f"lora={lora!r} is not valid; use 'merge' or 'base'")
    target = np_dtype(dtype) if dtype is not None else None
    ckpt_dir = os.path.abspath(ckpt_dir)
    cfg = load_config(ckpt_dir)
    bb = backbone_for(cfg)
    spec = bb.param_spec()
    adapters = load_lora(ckpt_dir, bb) if lora == "merge" else None
    # With adapters the kernels are read as stored, folded in float32, then cast.
    restore = sp.map_spec(lambda i: ocp.RestoreArgs(
        restore_type=np.ndarray, dtype=None if target is None or (adapters and i.lora) else i.leaf_dtype(target)),
        spec)
    nested = _checkpointer().restore(os.path.join(ckpt_dir, PARAMS_DIR),
                                     args=ocp.args.PyTreeRestore(restore_args=sp.to_nested_dict(restore)))
    check_params(cfg, nested)
    params = sp.from_nested_dict(spec, nested)
    if adapters:
        tree, meta = adapters
        params = fold_adapters(params, tree, float(meta["alpha"]) / int(meta["r"]), target)
    return cfg, params


# ---------------------------------------------------------------- unmerged LoRA adapters
def fold_lora(kernel, a, b, scale: float) -> np.ndarray:
    """kernel (in, out) + scale * a (in, r) @ b (r, out) in float32: the one merge rule, used by every path."""
    delta = np.matmul(np.asarray(a, np.float32), np.asarray(b, np.float32))
    delta *= np.float32(scale)
    delta += np.asarray(kernel).astype(np.float32)
    return delta


def fold_adapters(params, adapters, scale: float, dtype=None):
    """params with each adapted kernel replaced by fold_lora of it, layer by layer, in `dtype` (or its own)."""
    import jax

    from ivtlr_jax.models.layers import Linear

    def fold(p, ad):
        if ad is None:
            return p
        kernel = np.asarray(p.kernel)
        out = np.empty(kernel.shape, dtype if dtype is not None else kernel.dtype)
        a, b = np.asarray(ad.a), np.asarray(ad.b)
        for idx in np.ndindex(kernel.shape[:-2]):  # one (in, out) matrix at a time
            out[idx] = fold_lora(kernel[idx], a[idx], b[idx], scale)
        return p.replace(kernel=out)

    return jax.tree.map(fold, params, adapters, is_leaf=lambda x: isinstance(x, Linear))


def lora_targets(bb) -> list[str]:
    """Flat names of the kernels the backbone's spec marks as LoRA targets."""
    return [name for name, info in sp.infos(bb.param_spec()) if info.lora]


def read_lora_config(ckpt_dir: str) -> dict | None:
    """The {r, alpha, targets, ...} of a folder's unmerged adapters, or None when it has none."""
    path = os.path.join(ckpt_dir, LORA_CONFIG_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if not os.path.isdir(os.path.join(ckpt_dir, LORA_DIR)) or not {"r", "alpha", "targets"} <= set(meta):
        raise ValueError(f"checkpoint {ckpt_dir!r}: {LORA_CONFIG_NAME} needs r, alpha, targets and a {LORA_DIR}/ "
                         "folder beside it; convert the release again with --keep-lora")
    return meta


def save_lora(ckpt_dir: str, bb, adapters, rank: int, alpha: float, source: str | None = None,
              overwrite: bool = False) -> None:
    """Write LoRA adapters (the trainer's LoRAAdapter tree, float32) and their r/alpha/targets beside params/."""
    from ivtlr_jax.train.lora import lora_spec

    sp.check_tree(lora_spec(bb.param_spec(), rank), adapters, what="LoRA adapters")
    _checkpointer().save(os.path.join(os.path.abspath(ckpt_dir), LORA_DIR), sp.to_nested_dict(adapters),
                         force=overwrite)
    meta = {"r": int(rank), "alpha": float(alpha), "targets": lora_targets(bb), "source": source}
    with open(os.path.join(ckpt_dir, LORA_CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def load_lora(ckpt_dir: str, bb):
    """(adapters as the trainer's typed tree of numpy float32 arrays, meta) of a folder, or None."""
    import orbax.checkpoint as ocp

    from ivtlr_jax.train.lora import lora_spec

    meta = read_lora_config(ckpt_dir)
    if meta is None:
        return None
    if meta["targets"] != lora_targets(bb):
        raise ValueError(f"checkpoint {ckpt_dir!r}: its adapters target {meta['targets']} but the backbone's LoRA "
                         f"targets are {lora_targets(bb)}")
    aspec = lora_spec(bb.param_spec(), int(meta["r"]))
    restore = sp.map_spec(lambda i: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32), aspec)
    nested = _checkpointer().restore(os.path.join(os.path.abspath(ckpt_dir), LORA_DIR),
                                     args=ocp.args.PyTreeRestore(restore_args=sp.to_nested_dict(restore)))
    sp.check_tree(aspec, nested, what=f"LoRA adapters in {ckpt_dir!r}")
    return sp.from_nested_dict(aspec, nested), meta


def remove_lora(ckpt_dir: str) -> None:
    """Delete a folder's unmerged adapters (they belong to the params they were saved with)."""
    shutil.rmtree(os.path.join(ckpt_dir, LORA_DIR), ignore_errors=True)
    if os.path.exists(os.path.join(ckpt_dir, LORA_CONFIG_NAME)):
        os.remove(os.path.join(ckpt_dir, LORA_CONFIG_NAME))


def restore_sharded(ckpt_dir: str, spec, targets):
    """The params of a checkpoint folder as jax.Arrays laid out like `targets` (ShapeDtypeStructs with
    shardings, the spec's tree): each device reads only its own shard, cast to the target dtype."""
    import jax
    import orbax.checkpoint as ocp

    args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=t.sharding, dtype=t.dtype,
                                                       global_shape=t.shape), targets)
    nested = ocp.PyTreeCheckpointer().restore(os.path.join(os.path.abspath(ckpt_dir), PARAMS_DIR),
                                              args=ocp.args.PyTreeRestore(restore_args=sp.to_nested_dict(args)))
    return sp.from_nested_dict(spec, nested)

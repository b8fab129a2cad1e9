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

from ivtlr_jax.config import check_dtype
from ivtlr_jax.models import backbone_for, model_config_from_dict
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import adapter_spec, fold_adapters, fold_lora

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
def lora_targets(bb) -> list[str]:
    """Flat names of the kernels the backbone's spec marks as LoRA targets."""
    return [name for name, info in sp.infos(bb.param_spec()) if info.lora]


def read_lora_config(ckpt_dir: str, bb=None) -> dict | None:
    """The {r, alpha, targets, ...} of a folder's unmerged adapters, or None when it has none; with the backbone
    `bb`, checked against its LoRA targets."""
    path = os.path.join(ckpt_dir, LORA_CONFIG_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if not os.path.isdir(os.path.join(ckpt_dir, LORA_DIR)) or not {"r", "alpha", "targets"} <= set(meta):
        raise ValueError(f"checkpoint {ckpt_dir!r}: {LORA_CONFIG_NAME} needs r, alpha, targets and a {LORA_DIR}/ "
                         "folder beside it; convert the release again with --keep-lora")
    if bb is not None and meta["targets"] != lora_targets(bb):
        raise ValueError(f"checkpoint {ckpt_dir!r}: its adapters target {meta['targets']} but the backbone's LoRA "
                         f"targets are {lora_targets(bb)}")
    return meta


def save_lora(ckpt_dir: str, bb, adapters, rank: int, alpha: float, source: str | None = None,
              overwrite: bool = False) -> None:
    """Write LoRA adapters (the trainer's LoRAAdapter tree, float32) and their r/alpha/targets beside params/."""

    sp.check_tree(adapter_spec(bb.param_spec(), rank), adapters, what="LoRA adapters")
    _checkpointer().save(os.path.join(os.path.abspath(ckpt_dir), LORA_DIR), sp.to_nested_dict(adapters),
                         force=overwrite)
    meta = {"r": int(rank), "alpha": float(alpha), "targets": lora_targets(bb), "source": source}
    with open(os.path.join(ckpt_dir, LORA_CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def load_lora(ckpt_dir: str, bb):
    """(adapters as the trainer's typed tree of numpy float32 arrays, meta) of a folder, or None."""
    import orbax.checkpoint as ocp


    meta = read_lora_config(ckpt_dir, bb)
    if meta is None:
        return None
    aspec = adapter_spec(bb.param_spec(), int(meta["r"]))
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


def restore_sharded(ckpt_dir: str, spec, targets, subdir: str | None = None):
    """The non-None leaves of `targets` (ShapeDtypeStructs with shardings, shaped like `spec`) read from a
    checkpoint folder's params/ (or `subdir`) as jax.Arrays: each device reads only its own shard, cast to the
    target dtype on read. None leaves are not read (orbax partial restore); they stay None."""
    import jax
    import orbax.checkpoint as ocp

    wanted = {n: t for n, t in sp.named_leaves(spec, targets).items() if t is not None}
    args = {n: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=t.sharding, dtype=t.dtype, global_shape=t.shape)
            for n, t in wanted.items()}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(os.path.abspath(ckpt_dir), subdir or PARAMS_DIR),
        args=ocp.args.PyTreeRestore(item=sp.nest({n: 0 for n in wanted}), restore_args=sp.nest(args),
                                    partial_restore=True))
    return sp.from_named(spec, sp.unnest(restored, wanted))


# ---------------------------------------------------------------- training checkpoint -> model checkpoint
RUN_STATE_DIR = "state"  # a run checkpoint's train state: step, trainable, opt_state (never read here), rng
RUN_META_FILE = os.path.join("meta", "metadata")


def read_leaf(folder: str, name: str, dtype=None, prefix: tuple[str, ...] = ()) -> np.ndarray:
    """One leaf ("a/b/c" under `prefix`) of an orbax tree as a numpy array, cast to `dtype` on read; nothing else
    of the tree is read (orbax partial restore)."""
    import orbax.checkpoint as ocp

    path = (*prefix, *name.split("/"))
    item = sp.nest({"/".join(path): 0})
    args = sp.nest({"/".join(path): ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)})
    out = _checkpointer().restore(os.path.abspath(folder), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
    for key in path:
        out = out[key]
    return out


def read_run_meta(run_ckpt: str) -> dict:
    """The meta of a training checkpoint folder (RUN_DIR/checkpoints/<step> or RUN_DIR/stage_ends/<stage>)."""
    run_ckpt = os.path.abspath(run_ckpt)
    if not os.path.isdir(os.path.join(run_ckpt, RUN_STATE_DIR)):
        raise ValueError(f"--merge-lora {run_ckpt!r} is not a training checkpoint (no {RUN_STATE_DIR}/ inside); give "
                         "RUN_DIR/checkpoints/<step> or RUN_DIR/stage_ends/<stage>")
    try:
        with open(os.path.join(run_ckpt, RUN_META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--merge-lora {run_ckpt!r}: its {RUN_META_FILE} cannot be read ({e}); give a complete "
                         "training checkpoint") from None
    if meta.get("finetune") not in ("lora", "full"):
        raise ValueError(f"--merge-lora {run_ckpt!r}: meta finetune={meta.get('finetune')!r} is not 'lora' or 'full'")
    return meta


def merge_run_params(run_ckpt: str, base: str | None = None):
    """(config, params as numpy, meta, base folder) of a training checkpoint: the base checkpoint's params with
    the run's LoRA adapters folded in (float32, stored in the base dtype) or its trained leaves (cast to the base
    dtype). Reads only the parameters written, leaf by leaf, never the optimiser state; each adapted kernel is
    folded in place one layer at a time, so host memory stays the output's size plus one layer's float32 copy."""

    meta = read_run_meta(run_ckpt)
    base = base or meta.get("init")
    if not base or not os.path.isdir(base):
        raise ValueError(f"--merge-lora: the run's base checkpoint {base!r} is not a folder; pass --src BASE_CKPT_DIR")
    cfg = load_config(base)
    spec = backbone_for(cfg).param_spec()
    state_dir = os.path.join(os.path.abspath(run_ckpt), RUN_STATE_DIR)
    params_dir = os.path.join(os.path.abspath(base), PARAMS_DIR)
    stored = {n: dt for n, (_, dt) in check_stored(spec, params_dir, f"params in {base!r}").items()}
    trained = {n for n, i in sp.infos(spec) if i.trainable} if meta["finetune"] == "full" else set()
    named = {}
    for name, _ in sp.infos(spec):
        if name in trained:  # the run's leaf, cast on read to the base checkpoint's dtype
            named[name] = read_leaf(state_dir, name, stored.get(name), prefix=("trainable",))
        else:
            named[name] = read_leaf(params_dir, name)  # as stored: the base the run's adapters apply to
    params = sp.from_named(spec, named)
    del named
    if meta["finetune"] == "lora":
        rank = int(meta["lora_r"])
        aspec = adapter_spec(spec, rank)
        scale = float(meta["lora_alpha"]) / rank
        flat = sp.flatten(params)
        for name, _ in sp.infos(aspec):
            if not name.endswith("/a"):
                continue
            owner = name[: -len("/a")]
            a = read_leaf(state_dir, name, np.float32, prefix=("trainable",))
            b = read_leaf(state_dir, owner + "/b", np.float32, prefix=("trainable",))
            kernel = flat[owner + "/kernel"]
            for idx in np.ndindex(kernel.shape[:-2]):  # in place, one (in, out) matrix at a time
                kernel[idx] = fold_lora(kernel[idx], a[idx], b[idx], scale)
    check_params(cfg, params)
    return cfg, params, meta, os.path.abspath(base)


def stored_leaves(folder: str) -> dict:
    """{name: (shape, numpy dtype)} of the leaves of an orbax tree folder, from its metadata (no array is read)."""
    import jax

    meta = _checkpointer().metadata(os.path.abspath(folder))
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


def export_run_checkpoint(run_ckpt: str, dst: str, base: str | None = None, overwrite: bool = False,
                          verbose: bool = True) -> dict:
    """RUN_DIR/checkpoints/<step> (or stage_ends/<stage>) -> a self-contained CKPT_DIR at `dst` (LoRA merged, or
    the fully fine-tuned weights), reading only the parameters it writes (`merge_run_params`)."""
    cfg, params, meta, base = merge_run_params(run_ckpt, base)
    hf_config = None
    if os.path.exists(os.path.join(base, HF_CONFIG_NAME)):
        with open(os.path.join(base, HF_CONFIG_NAME)) as f:
            hf_config = json.load(f)
    save_checkpoint(dst, cfg, params, hf_config=hf_config, overwrite=overwrite)
    copied = copy_tokenizer_files(base, dst)
    nbytes = int(sum(x.nbytes for x in sp.flatten(params).values()))
    summary = {"from": os.path.abspath(run_ckpt), "base": base, "dst": os.path.abspath(dst),
               "finetune": meta.get("finetune"), "stage": meta.get("stage"), "copied": copied, "bytes": nbytes}
    if verbose:
        print(f"merged {summary['finetune']} weights of {summary['from']} into {summary['dst']} (base {base}; "
              f"{nbytes / 2**20:.1f} MiB, optimiser state not read)")
    return summary

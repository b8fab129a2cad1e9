"""A training checkpoint (RUN_DIR/checkpoints/<step>, stage_ends/<stage>) -> a self-contained model checkpoint
(--merge-lora): the base checkpoint's params with the run's LoRA adapters folded in, or its trained leaves.
Only the parameters written are read, never the optimiser state."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from ivtlr_jax.convert.checkpoint import (
    check_params,
    copy_tokenizer_files,
    load_config,
    save_checkpoint,
    stored_leaves,
)
from ivtlr_jax.convert.layout import HF_CONFIG_NAME, META_FILE, PARAMS_DIR, STATE_ITEM, is_run_checkpoint
from ivtlr_jax.convert.load import load_params, read_tree
from ivtlr_jax.models import backbone_for
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import LoRAMeta, adapter_spec, fold_adapters

TRAINABLE_ITEM = ("trainable",)  # where the trained leaves or adapters sit in a run checkpoint's state


def read_run_meta(run_ckpt: str) -> dict:
    """The meta of a training checkpoint folder (RUN_DIR/checkpoints/<step> or RUN_DIR/stage_ends/<stage>)."""
    run_ckpt = os.path.abspath(run_ckpt)
    if not is_run_checkpoint(run_ckpt):
        raise ValueError(f"--merge-lora {run_ckpt!r} is not a training checkpoint (no {STATE_ITEM}/ inside); give "
                         "RUN_DIR/checkpoints/<step> or RUN_DIR/stage_ends/<stage>")
    try:
        with open(os.path.join(run_ckpt, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--merge-lora {run_ckpt!r}: its {META_FILE} cannot be read ({e}); give a complete "
                         "training checkpoint") from None
    if meta.get("finetune") not in ("lora", "full"):
        raise ValueError(f"--merge-lora {run_ckpt!r}: meta finetune={meta.get('finetune')!r} is not 'lora' or 'full'")
    return meta


def run_lora_meta(meta: dict, where: str) -> LoRAMeta:
    """The adapters' record of a LoRA run's checkpoint meta: its "lora" entry ({"r", "alpha"}), or the top-level
    "lora_r" / "lora_alpha" of checkpoints written before the one schema."""
    return LoRAMeta.from_dict(meta.get("lora") or meta, where)


def merge_run_params(run_ckpt: str, base: str | None = None):
    """(config, params as numpy, meta, base folder) of a training checkpoint: the base checkpoint's params with
    the run's LoRA adapters folded in (float32, stored in the base dtype) or its trained leaves (cast to the base
    dtype). Each adapted kernel is folded in place one layer at a time, so host memory stays the output's size
    plus one layer's float32 copy."""
    meta = read_run_meta(run_ckpt)
    base = base or meta.get("init")
    if not base or not os.path.isdir(base):
        raise ValueError(f"--merge-lora: the run's base checkpoint {base!r} is not a folder; pass --src BASE_CKPT_DIR")
    cfg = load_config(base)
    spec = backbone_for(cfg).param_spec()
    state_dir = os.path.join(os.path.abspath(run_ckpt), STATE_ITEM)
    stored = {n: jax.ShapeDtypeStruct(*leaf) for n, leaf in stored_leaves(os.path.join(base, PARAMS_DIR)).items()}
    trained = {n for n, i in sp.infos(spec) if i.trainable} if meta["finetune"] == "full" else set()
    # as stored: the base the run's adapters apply to, or the leaves it did not train
    params = load_params(base, targets=sp.from_named(spec, {n: t for n, t in stored.items() if n not in trained}),
                         lora="base").params
    if meta["finetune"] == "lora":
        lora = run_lora_meta(meta, f"--merge-lora {run_ckpt!r}")
        aspec = adapter_spec(spec, lora.r)
        adapters = read_tree(state_dir, aspec, sp.map_spec(lambda i: jax.ShapeDtypeStruct(i.shape, np.float32),
                                                           aspec), prefix=TRAINABLE_ITEM)
        params = fold_adapters(params, adapters, lora.scale, in_place=True)
    else:  # the run's leaves, cast on read to the base checkpoint's dtype
        run = read_tree(state_dir, spec, sp.from_named(spec, {n: stored[n] for n in trained}), prefix=TRAINABLE_ITEM)
        params = jax.tree.map(lambda b, r: b if r is None else r, params, run, is_leaf=lambda x: x is None)
    check_params(cfg, params)
    return cfg, params, meta, os.path.abspath(base)


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

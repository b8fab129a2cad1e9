"""Turn a training checkpoint into a full model checkpoint (LoRA merged) that IVTLRModel loads."""

from __future__ import annotations

import json
import os

import numpy as np

from ivtlr_jax.models import backbone_for
from ivtlr_jax.models import spec as sp
from ivtlr_jax.train.checkpoints import read_checkpoint
from ivtlr_jax.train.lora import lora_spec, merge_lora


def trainable_tree(bb, state: dict, meta: dict):
    """The run's trainable part as the backbone's typed tree: LoRA adapters, or the trained leaves (None elsewhere)."""
    spec = bb.param_spec()
    if meta.get("finetune") == "lora":
        aspec = lora_spec(spec, int(meta["lora_r"]))
        return sp.from_named(aspec, sp.unnest(state["trainable"], [n for n, _ in sp.infos(aspec)]))
    names = [n for n, i in sp.infos(spec) if i.trainable]
    return sp.from_named(spec, sp.unnest(state["trainable"], names))


def trained_params(bb, state: dict, meta: dict, base_params):
    """Base params with the run's trainable part applied (LoRA folded in, or the trained leaves)."""
    trainable = trainable_tree(bb, state, meta)
    if meta.get("finetune") == "lora":
        return merge_lora(base_params, trainable, float(meta["lora_alpha"]) / float(meta["lora_r"]))
    spec = bb.param_spec()
    base = sp.named_leaves(spec, base_params)
    got = sp.named_leaves(spec, trainable)
    return sp.from_named(spec, {n: (np.asarray(got[n]).astype(base[n].dtype) if got[n] is not None else base[n])
                                for n in base})


def export_trained_checkpoint(ckpt_path: str, dst: str, base: str | None = None, overwrite: bool = False,
                              verbose: bool = True) -> dict:
    """RUN_DIR/checkpoints/<step> (or stage_ends/<stage>) -> a self-contained CKPT_DIR at `dst`."""
    from ivtlr_jax.convert import load_checkpoint, save_checkpoint
    from ivtlr_jax.convert.checkpoint import HF_CONFIG_NAME, copy_tokenizer_files

    state, meta = read_checkpoint(ckpt_path)
    base = base or meta.get("init")
    if not base or not os.path.isdir(base):
        raise ValueError(f"--merge-lora: the run's base checkpoint {base!r} is not a folder; pass --src BASE_CKPT_DIR")
    cfg, params = load_checkpoint(base, lora="base")  # the run's adapters already hold any kept ones
    params = trained_params(backbone_for(cfg), state, meta, params)
    hf_config = None
    if os.path.exists(os.path.join(base, HF_CONFIG_NAME)):
        with open(os.path.join(base, HF_CONFIG_NAME)) as f:
            hf_config = json.load(f)
    save_checkpoint(dst, cfg, params, hf_config=hf_config, overwrite=overwrite)
    copied = copy_tokenizer_files(base, dst)
    summary = {"from": os.path.abspath(ckpt_path), "base": os.path.abspath(base), "dst": os.path.abspath(dst),
               "finetune": meta.get("finetune"), "stage": meta.get("stage"), "copied": copied}
    if verbose:
        print(f"merged {summary['finetune']} weights of {summary['from']} into {summary['dst']} (base {base})")
    return summary

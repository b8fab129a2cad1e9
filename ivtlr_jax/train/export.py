"""Turn a training checkpoint into a full model checkpoint (LoRA merged) that IVTLRModel loads."""

from __future__ import annotations

import json
import os

import numpy as np

from ivtlr_jax.train.checkpoints import read_checkpoint
from ivtlr_jax.train.lora import merge_lora


def trained_params(state: dict, meta: dict, base_params: dict) -> dict:
    """Base params with the run's trainable part applied (LoRA folded in, or the trained LLM)."""
    trainable = state["trainable"]
    if meta.get("finetune") == "lora":
        return merge_lora(base_params, trainable, float(meta["lora_alpha"]) / float(meta["lora_r"]))
    dtype = np.asarray(base_params["llm"]["embed"]).dtype
    llm = {"llm": trainable["llm"]}
    import jax

    llm = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), llm)
    return {**base_params, **llm}


def export_trained_checkpoint(ckpt_path: str, dst: str, base: str | None = None, overwrite: bool = False,
                              verbose: bool = True) -> dict:
    """RUN_DIR/checkpoints/<step> (or stage_ends/<stage>) -> a self-contained CKPT_DIR at `dst`."""
    from ivtlr_jax.convert import load_checkpoint, save_checkpoint
    from ivtlr_jax.convert.checkpoint import HF_CONFIG_NAME, copy_tokenizer_files

    state, meta = read_checkpoint(ckpt_path)
    base = base or meta.get("init")
    if not base or not os.path.isdir(base):
        raise ValueError(f"--merge-lora: the run's base checkpoint {base!r} is not a folder; pass --src BASE_CKPT_DIR")
    cfg, params = load_checkpoint(base)
    params = trained_params(state, meta, params)
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

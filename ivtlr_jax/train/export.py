"""Turn a training checkpoint into a full model checkpoint (LoRA merged) that IVTLRModel loads.

`trained_params` applies a whole restored train state (the reference the leaf-by-leaf export is tested against).
"""

from __future__ import annotations

import numpy as np

from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import adapter_spec, fold_adapters


def trainable_tree(bb, state: dict, meta: dict):
    """The run's trainable part as the backbone's typed tree: LoRA adapters, or the trained leaves (None elsewhere)."""
    spec = bb.param_spec()
    if meta.get("finetune") == "lora":
        aspec = adapter_spec(spec, int(meta["lora_r"]))
        return sp.from_named(aspec, sp.unnest(state["trainable"], [n for n, _ in sp.infos(aspec)]))
    names = [n for n, i in sp.infos(spec) if i.trainable]
    return sp.from_named(spec, sp.unnest(state["trainable"], names))


def trained_params(bb, state: dict, meta: dict, base_params):
    """Base params with the run's trainable part applied (LoRA folded in, or the trained leaves)."""
    trainable = trainable_tree(bb, state, meta)
    if meta.get("finetune") == "lora":
        return fold_adapters(base_params, trainable, float(meta["lora_alpha"]) / float(meta["lora_r"]))
    spec = bb.param_spec()
    base = sp.named_leaves(spec, base_params)
    got = sp.named_leaves(spec, trainable)
    return sp.from_named(spec, {n: (np.asarray(got[n]).astype(base[n].dtype) if got[n] is not None else base[n])
                                for n in base})


def export_trained_checkpoint(ckpt_path: str, dst: str, base: str | None = None, overwrite: bool = False,
                              verbose: bool = True) -> dict:
    """RUN_DIR/checkpoints/<step> (or stage_ends/<stage>) -> a self-contained CKPT_DIR at `dst`, reading only the
    parameters it writes (never the optimiser state): `convert.export_run_checkpoint`."""
    from ivtlr_jax.convert import export_run_checkpoint

    return export_run_checkpoint(ckpt_path, dst, base=base, overwrite=overwrite, verbose=verbose)

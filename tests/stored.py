"""What the tests read back whole of what the library stored: a checkpoint folder's config and params on the host, a
run checkpoint's state and meta, and the params a run trained (the references the library's reads are tested
against)."""

import logging
import os

import numpy as np


def load_checkpoint(ckpt_dir: str, dtype: str | None = None, *, lora: str = "merge"):
    """(config, params as numpy on the host) of a checkpoint folder: `convert.load_params` with no mesh; lora "merge"
    folds unmerged adapters in, "base" leaves them out."""
    from ivtlr_jax.convert import load_params

    loaded = load_params(ckpt_dir, lora=lora, dtype=dtype)
    return loaded.config, loaded.params


def read_checkpoint(path: str):
    """(state, meta) of one checkpoint step folder (RUN_DIR/checkpoints/<step> or stage_ends/<stage>), every array
    on this host's first device."""
    import jax
    import orbax.checkpoint as ocp

    from ivtlr_jax.convert.layout import STATE_ITEM
    from ivtlr_jax.convert.merge import read_run_meta

    path = os.path.abspath(path)
    meta = read_run_meta(path)
    ckptr = ocp.StandardCheckpointer()
    state_dir = os.path.join(path, STATE_ITEM)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # StandardCheckpointer warns about a manager-level file it does not need
    try:
        stored = ckptr.metadata(state_dir)
    finally:
        absl_log.setLevel(level)
    tree = getattr(stored, "item_metadata", stored)
    tree = getattr(tree, "tree", tree)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # any saving topology -> this host
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=local), tree)
    return ckptr.restore(state_dir, target), meta


def trainable_tree(bb, state: dict, meta: dict):
    """The run's trainable part as the backbone's typed tree: LoRA adapters, or the trained leaves (None elsewhere)."""
    from ivtlr_jax.convert.merge import run_lora_meta
    from ivtlr_jax.models import spec as sp
    from ivtlr_jax.models.adapters import adapter_spec

    spec = bb.param_spec()
    if meta.get("finetune") == "lora":
        aspec = adapter_spec(spec, run_lora_meta(meta, "run meta").r)
        return sp.from_named(aspec, sp.unnest(state["trainable"], [n for n, _ in sp.infos(aspec)]))
    names = [n for n, i in sp.infos(spec) if i.trainable]
    return sp.from_named(spec, sp.unnest(state["trainable"], names))


def trained_params(bb, state: dict, meta: dict, base_params):
    """Base params with the run's whole restored trainable part applied (LoRA folded in, or the trained leaves)."""
    from ivtlr_jax.convert.merge import run_lora_meta
    from ivtlr_jax.models import spec as sp
    from ivtlr_jax.models.adapters import fold_adapters

    trainable = trainable_tree(bb, state, meta)
    if meta.get("finetune") == "lora":
        return fold_adapters(base_params, trainable, run_lora_meta(meta, "run meta").scale)
    spec = bb.param_spec()
    base = sp.named_leaves(spec, base_params)
    got = sp.named_leaves(spec, trainable)
    return sp.from_named(spec, {n: (np.asarray(got[n]).astype(base[n].dtype) if got[n] is not None else base[n])
                                for n in base})

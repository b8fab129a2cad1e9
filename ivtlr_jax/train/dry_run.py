"""Ahead-of-time compile of the train step on abstract arrays: per-device memory before renting a pod."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.config import ModelConfig, TrainConfig
from ivtlr_jax.models.layout import param_shapes
from ivtlr_jax.train.step import compute_dtype, make_optimizer, make_train_step, split_params


def _bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of a sharded tree (shard shape x itemsize, summed)."""
    total = 0
    for leaf, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings), strict=True):
        shard = s.shard_shape(tuple(leaf.shape))
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(cfg: ModelConfig, batch: int, prefix: int, tail: int, n: int, k: int, grid=(1, 20, 20)):
    """ShapeDtypeStructs of one train-step batch (one image of `grid` per row)."""
    chunk = k + 1
    total = prefix + n * chunk + tail
    npatch = int(np.prod(grid))
    n_img = npatch // cfg.vision.spatial_merge_size**2
    s = jax.ShapeDtypeStruct
    return {
        "prefix_ids": s((batch, prefix), jnp.int32), "suffix_ids": s((batch, tail), jnp.int32),
        "kv_valid": s((batch, total), jnp.bool_), "positions": s((batch, 3, total), jnp.int32),
        "labels": s((batch, total), jnp.int32), "image_pos": s((batch, n_img), jnp.int32),
        "image_valid": s((batch, n_img), jnp.bool_),
        "pixel_values": s((batch, npatch, cfg.vision.patch_dim), jnp.float32),
        "vision_cos": s((npatch, cfg.vision.head_dim), jnp.float32),
        "vision_sin": s((npatch, cfg.vision.head_dim), jnp.float32),
    }


def dry_run(cfg: ModelConfig, tcfg: TrainConfig, prefix: int = 224, tail: int = 256, n: int = 3,
            platform: str = "tpu") -> dict:
    """Lower and compile the train step for `cfg` on the preset's mesh without loading weights.

    Returns per-device bytes of frozen params, trainable params, optimiser state, and the compiler's
    memory analysis (arguments, outputs, temporaries) for one micro-batch of batch_size / grad_accum rows.
    """
    from ivtlr_jax.train.loop import state_shardings

    mesh = sh.make_mesh(tcfg.mesh)
    dtype = compute_dtype(tcfg, platform)
    shapes = param_shapes(cfg)
    abstract = jax.tree_util.tree_map(lambda shp: jax.ShapeDtypeStruct(shp, dtype), shapes,
                                      is_leaf=lambda x: isinstance(x, tuple))
    trainable, frozen = jax.eval_shape(lambda p: split_params(p, tcfg, jax.random.PRNGKey(0)), abstract)
    tx, schedule = make_optimizer(tcfg, 1000)
    state = jax.eval_shape(lambda t: {"step": jnp.zeros((), jnp.int32), "trainable": t, "opt_state": tx.init(t),
                                      "rng": jax.random.PRNGKey(0)}, trainable)
    frozen_sh, state_sh = state_shardings(mesh, cfg, tcfg, state, frozen)
    micro = tcfg.batch_size // tcfg.grad_accum
    batch = abstract_batch(cfg, micro, prefix, tail, n, tcfg.k)
    rep = sh.replicated(mesh)
    batch_sh = {key: (rep if key.startswith("vision_") else sh.batch_sharding(mesh, len(v.shape), micro))
                for key, v in batch.items()}
    lcfg = tcfg.latent()
    fn = make_train_step(cfg, lcfg, tcfg, tx, schedule, n, dtype)
    jitted = jax.jit(fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                     donate_argnums=(0,))
    lowered = jitted.lower(state, frozen, batch)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    out = {
        "mesh": sh.describe(mesh), "finetune": tcfg.finetune, "compute_dtype": str(dtype),
        "micro_batch": micro, "seq_len": prefix + n * (tcfg.k + 1) + tail,
        "frozen_params_bytes_per_device": _bytes_per_device(frozen, frozen_sh),
        "trainable_params_bytes_per_device": _bytes_per_device(state["trainable"], state_sh["trainable"]),
        "optimizer_state_bytes_per_device": _bytes_per_device(state["opt_state"], state_sh["opt_state"]),
    }
    if mem is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "alias_size_in_bytes", "generated_code_size_in_bytes"):
            out["compiler_" + name] = int(getattr(mem, name, 0) or 0)
        out["compiler_total_bytes_per_device"] = (out["compiler_argument_size_in_bytes"]
                                                  + out["compiler_output_size_in_bytes"]
                                                  - out["compiler_alias_size_in_bytes"]
                                                  + out["compiler_temp_size_in_bytes"])
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        out["flops_per_step"] = float(cost.get("flops", 0.0))
    return out


def format_dry_run(results: list[dict]) -> str:
    gib = 2**30
    lines = [f"{'finetune':<9}{'frozen GiB':>11}{'trainable GiB':>14}{'optimizer GiB':>14}{'compiler total GiB':>19}"
             f"{'  (args/out/temp)':<10}"]
    for r in results:
        total = r.get("compiler_total_bytes_per_device")
        detail = ""
        if total is not None:
            parts = [r[f"compiler_{k}_size_in_bytes"] / gib for k in ("argument", "output", "temp")]
            detail = "  ({:.2f}/{:.2f}/{:.2f})".format(*parts)
        lines.append(f"{r['finetune']:<9}{r['frozen_params_bytes_per_device'] / gib:>11.2f}"
                     f"{r['trainable_params_bytes_per_device'] / gib:>14.3f}"
                     f"{r['optimizer_state_bytes_per_device'] / gib:>14.3f}"
                     f"{(total or 0) / gib:>19.2f}{detail}")
    first = results[0]
    lines.append(f"per device, on {first['mesh']}; micro-batch {first['micro_batch']} rows of "
                 f"{first['seq_len']} tokens, {first['compute_dtype']} compute")
    return "\n".join(lines)


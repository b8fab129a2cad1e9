"""Ahead-of-time compile of the train step on abstract arrays: per-device memory before renting a pod.

The state layout is the one `create_train_state` materialises (`state_layout`), so the state figures here
are the ones a real start reports; the batch is laid out by the same `make_latent_batch` as training.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.latent import LatentBatch, make_latent_batch
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.base import Backbone
from ivtlr_jax.models.layers import resolve_attention
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.remat import resolve_remat
from ivtlr_jax.train.state import state_layout
from ivtlr_jax.train.step import build_train_step, compute_dtype, make_optimizer, micro_batch_size

DRY_RUN_TEXT = 124  # prompt text tokens around the image (the reference prompt: ~124 + 100 image tokens)
DRY_RUN_TAIL = 256  # labelled tokens after the latent steps


def example_batch(bb: Backbone, lcfg, rows: int, text: int = DRY_RUN_TEXT, tail: int = DRY_RUN_TAIL,
                  n: int = 3) -> LatentBatch:
    """A numpy LatentBatch of `rows` rows of [text, one reference image, text] + n latents + tail."""
    cfg = bb.config
    pixel_values, grid, n_img = bb.example_image()
    row = [1] * (text // 2) + [cfg.image_token_id] * n_img + [1] * (text - text // 2)
    row += [cfg.latent_token_id] * n + [1] * tail
    ids = np.tile(np.asarray(row, np.int32), (rows, 1))
    labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - tail, ids, -100)
    pv = np.concatenate([pixel_values] * rows)
    grids = None if grid is None else np.concatenate([grid] * rows)
    return make_latent_batch(bb, lcfg, ids, np.ones_like(ids), labels, pv, grids)


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    out = {"compiler_" + name: int(getattr(mem, name, 0) or 0)
           for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                        "alias_size_in_bytes", "generated_code_size_in_bytes")}
    out["compiler_total_bytes_per_device"] = (out["compiler_argument_size_in_bytes"]
                                              + out["compiler_output_size_in_bytes"]
                                              - out["compiler_alias_size_in_bytes"]
                                              + out["compiler_temp_size_in_bytes"])
    return out


def abstract_step_inputs(bb: Backbone, tcfg: TrainConfig, mesh, layout, text: int = DRY_RUN_TEXT,
                         tail: int = DRY_RUN_TAIL, n: int = 3, processes: int = 1):
    """(state, frozen, micro-batch) as ShapeDtypeStructs with the shardings the trainer's step gets: the batch
    has the trainer's micro-batch rows (`micro_batch_size`), laid out by `make_latent_batch`."""
    data_parallel = int(np.prod([mesh.shape[a] for a in sh.BATCH_AXES if a in mesh.shape]))
    micro = micro_batch_size(tcfg, processes, data_parallel)
    one = example_batch(bb, tcfg.latent(bb.default_k), 1, text, tail, n)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((micro,) + x.shape[1:], x.dtype), one)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                         sh.batch_shardings(mesh, batch))
    return layout.state, layout.frozen, batch


def dry_run(bb: Backbone, tcfg: TrainConfig, text: int = DRY_RUN_TEXT, tail: int = DRY_RUN_TAIL, n: int = 3,
            platform: str = "tpu", compare_remat: bool = True) -> dict:
    """Lower and compile the train step on the preset's mesh without loading weights.

    The step is built by `build_train_step`, the trainer's own builder, and fed the trainer's micro-batch
    (batch_size / grad_accum rows). Returns per-device bytes of frozen params, trainable params, optimiser
    state, the train state's total (`state_bytes_total`), and the compiler's memory analysis. The remat
    policy is resolved ("auto" by model size); with `compare_remat` and a policy other than "full" the
    step is compiled once more with "full" and `remat_cost_bytes_per_device` is the extra temporary
    memory the policy's saved activations take.
    """
    mesh = sh.make_mesh(tcfg.mesh)
    dtype = compute_dtype(tcfg, platform)
    tx, schedule = make_optimizer(tcfg, 1000)
    layout = state_layout(bb, tcfg, mesh, tx, dtype)
    lcfg = tcfg.latent(bb.default_k)
    state, frozen, batch = abstract_step_inputs(bb, tcfg, mesh, layout, text, tail, n,
                                                processes=sh.get_preset(tcfg.mesh).num_hosts or 1)
    micro = batch.batch_size
    remat = resolve_remat(tcfg.remat, bb.dims)
    target = {"gpu": "cuda", None: platform}.get(sh.get_preset(tcfg.mesh).platform, sh.get_preset(tcfg.mesh).platform)

    def compile_with(policy: str):
        step = build_train_step(bb, lcfg, dataclasses.replace(tcfg, remat=policy), tx, schedule, dtype, layout, mesh)
        return step.lower(state, frozen, batch).compile()

    mem = _memory(compile_with(remat))
    report = layout.report()
    out = {
        "model_type": bb.model_type,
        "parameters": int(sum(np.prod(info.shape) for _, info in sp.infos(bb.param_spec()))),
        "mesh": sh.describe(mesh), "finetune": tcfg.finetune, "compute_dtype": str(dtype), "remat": remat,
        "attention": resolve_attention(tcfg.attention, dtype, bb.dims.head_dim, target),  # on the preset's devices
        "attention_compiled": resolve_attention(tcfg.attention, dtype, bb.dims.head_dim),  # here
        "batch_size": tcfg.batch_size, "grad_accum": tcfg.grad_accum, "micro_batch": micro,
        "micro_batch_per_device": micro / mesh.devices.size, "seq_len": int(batch.kv_valid.shape[1]),
        "frozen_params_bytes_per_device": report["frozen_bytes_per_device"],
        "trainable_params_bytes_per_device": report["trainable_bytes_per_device"],
        "optimizer_state_bytes_per_device": report["optimizer_bytes_per_device"],
        "state_bytes_total": report["state_bytes_total"],
        "state_bytes_per_device": report["state_bytes_per_device"],
    }
    out.update(mem)
    if mem and compare_remat and remat != "full":
        full = _memory(compile_with("full"))
        out["compiler_temp_size_in_bytes_remat_full"] = full["compiler_temp_size_in_bytes"]
        out["remat_cost_bytes_per_device"] = mem["compiler_temp_size_in_bytes"] - full["compiler_temp_size_in_bytes"]
    elif mem:
        out["remat_cost_bytes_per_device"] = 0
    return out


def format_dry_run(results: list[dict]) -> str:
    gib = 2**30
    lines = [f"{'finetune':<9}{'frozen GiB':>11}{'trainable GiB':>14}{'optimizer GiB':>14}{'compiler total GiB':>19}"
             f"{'  (args/out/temp)':<24}{'remat cost GiB':>15}"]
    for r in results:
        total = r.get("compiler_total_bytes_per_device")
        detail, cost = "", "n/a"
        if total is not None:
            parts = [r[f"compiler_{k}_size_in_bytes"] / gib for k in ("argument", "output", "temp")]
            detail = "  ({:.2f}/{:.2f}/{:.2f})".format(*parts)
        if r.get("remat_cost_bytes_per_device") is not None:
            cost = f"{r['remat_cost_bytes_per_device'] / gib:.2f}"
        lines.append(f"{r['finetune']:<9}{r['frozen_params_bytes_per_device'] / gib:>11.2f}"
                     f"{r['trainable_params_bytes_per_device'] / gib:>14.3f}"
                     f"{r['optimizer_state_bytes_per_device'] / gib:>14.3f}"
                     f"{(total or 0) / gib:>19.2f}{detail:<24}{cost:>15}")
    first = results[0]
    lines.append(f"{first['model_type']} ({first['parameters'] / 1e9:.2f}B parameters), per device, on "
                 f"{first['mesh']}; optimiser updates of {first['batch_size']} rows in "
                 f"{first['grad_accum']} micro-steps of {first['micro_batch']} rows of "
                 f"{first['seq_len']} tokens, {first['compute_dtype']} compute, attention {first['attention']} "
                 f"(compiled here with {first['attention_compiled']}), "
                 f"remat {first['remat']} (remat cost: its extra temporary memory over remat full)")
    return "\n".join(lines)

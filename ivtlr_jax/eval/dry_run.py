"""The generation dry run: the generation program compiled for a mesh on abstract arrays, memory per device."""

from __future__ import annotations

import json
import os

import numpy as np


def generation_dry_run(cfg, target, dtype: str = "auto", batch_size: int = 16, max_new_tokens: int = 64, n: int = 3,
                       k: int | None = None, latent_text: bool = True, text: int | None = None) -> dict:
    """Compile `generate_jit` for `target` (a `sharding.CompileTarget`: XLA:TPU on a TPU preset's topology, or
    XLA:CPU) on abstract arrays (ShapeDtypeStructs with the inference layout) and report per-device bytes:
    parameters, KV cache, the compiler's memory analysis (arguments, outputs, temporaries) and whether it fits the
    chip's HBM. The batch is the train dry run's reference row (text + one reference image) ending with n latent
    tokens (`train.dry_run.example_batch` with no tail). dtype "auto" and the attention are resolved for the
    target's devices."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from ivtlr_jax import sharding as sh
    from ivtlr_jax.generate import generate_jit
    from ivtlr_jax.latent import LatentConfig
    from ivtlr_jax.model import abstract_params, resolve_dtype
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.models.layers import resolve_attention
    from ivtlr_jax.train.dry_run import (
        DRY_RUN_TEXT,
        compile_with_progress,
        custom_calls,
        example_batch,
        fit_figures,
        memory_figures,
        target_figures,
    )
    from ivtlr_jax.train.step import tree_bytes_per_device

    if cfg.latent_token_id is None:  # any id inside the vocabulary lays the batch out the same way
        cfg = dataclasses.replace(cfg, latent_token_id=cfg.vocab_size - 1)
    bb = backbone_for(cfg).for_compilation()  # ids a config-only checkpoint leaves unset: stand-ins that size arrays
    cfg = bb.config
    mesh = target.mesh
    dtype = resolve_dtype(dtype, target.preset.platform or target.platform)
    k = bb.default_k if k is None else k
    lcfg = LatentConfig(k=k if n else 0, latent_text=latent_text)
    one = example_batch(bb, lcfg, 1, DRY_RUN_TEXT if text is None else text, tail=0, n=n)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype), one)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                         sh.batch_shardings(mesh, batch))
    params = abstract_params(bb, mesh, dtype)
    rep = sh.replicated(mesh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    eos = tuple(cfg.eos_token_id) or (0,)
    compiled, seconds = compile_with_progress(
        lambda: generate_jit.lower(bb, params, lcfg, batch, key, scalar, scalar, max_new_tokens=max_new_tokens,
                                   eos_ids=eos, pad_id=eos[0], greedy=True, mesh=mesh),
        f"generation for {target.preset.name} with {target.compiler.upper()}")
    final_len = int(one.kv_valid.shape[1])
    d = bb.dims
    cache_shape = (d.num_layers, batch_size, final_len + max_new_tokens, d.num_kv_heads, d.head_dim)
    cache_shard = sh.cache_sharding(mesh, cache_shape).shard_shape(cache_shape)
    leaves = jax.tree_util.tree_leaves(params)
    mem = memory_figures(compiled)
    return {
        "model_type": bb.model_type, **target_figures(target), "mesh_axes": dict(mesh.shape), "dtype": dtype,
        "batch_size": batch_size, "prompt_len": int(one.prefix_ids.shape[1]) + n, "final_len": final_len,
        "max_new_tokens": max_new_tokens, "n_latent": n, "k": lcfg.k, "compile_s": seconds,
        "attention": resolve_attention("auto", dtype, d.head_dim, platform=target.platform),
        "param_bytes_total": int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)),
        "param_bytes_per_device": tree_bytes_per_device(params, jax.tree.map(lambda x: x.sharding, params)),
        "kv_cache_bytes_total": 2 * int(np.prod(cache_shape)) * jnp.dtype(dtype).itemsize,
        "kv_cache_bytes_per_device": 2 * int(np.prod(cache_shard)) * jnp.dtype(dtype).itemsize,
        **mem, **fit_figures(target, mem), "custom_calls": custom_calls(compiled),
    }


def format_generation_dry_run(r: dict) -> str:
    """A readable table of `generation_dry_run`'s figures (GiB per device), ending with the verdict."""
    from ivtlr_jax.train.dry_run import fit_verdict

    gib = 2**30
    rows = [("parameters", r["param_bytes_per_device"]), ("KV cache", r["kv_cache_bytes_per_device"])]
    if "compiler_total_bytes_per_device" in r:
        rows += [("compiler: arguments", r["compiler_argument_size_in_bytes"]),
                 ("compiler: outputs", r["compiler_output_size_in_bytes"]),
                 ("compiler: temporaries", r["compiler_temp_size_in_bytes"]),
                 ("compiler: total", r["compiler_total_bytes_per_device"])]
    if "compiler_peak_memory_in_bytes" in r:
        rows.append(("compiler: peak", r["compiler_peak_memory_in_bytes"]))
    topology = f", topology {r['topology']}" if r["topology"] else ""
    lines = [f"generation memory per device on --mesh {r['mesh_preset']} ({r['mesh']})",
             f"{'':<24}{'GiB':>10}"] + [f"{name:<24}{v / gib:>10.3f}" for name, v in rows]
    lines.append(f"{r['model_type']}: batch {r['batch_size']} rows, prompt {r['prompt_len']} tokens ({r['final_len']} "
                 f"with the latent chunks of n={r['n_latent']}, k={r['k']}) + {r['max_new_tokens']} new, {r['dtype']} "
                 f"parameters ({r['param_bytes_total'] / gib:.2f} GiB in all), attention {r['attention']}; the KV "
                 f"cache lives in the temporaries; compiled by {r['compiler'].upper()} ({r['compiler_version']}"
                 f"{topology})")
    lines.append(fit_verdict([r], lambda _: ""))
    return "\n".join(lines)


def save_dry_run(result: dict, out: str | None = None) -> str:
    """Write the dry run's JSON: to `out` when it ends in .json, else to <out>/dry_run.json (default
    eval/dry_run.json). Returns the path."""
    path = out or os.path.join("eval", "dry_run.json")
    if not path.endswith(".json"):
        path = os.path.join(path, "dry_run.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path

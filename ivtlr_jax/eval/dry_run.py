"""The generation dry run: the generation program compiled for a mesh on abstract arrays, memory per device."""

from __future__ import annotations

import json
import os

import numpy as np


def generation_dry_run(cfg, mesh_name: str, dtype: str = "auto", batch_size: int = 16, max_new_tokens: int = 64,
                       n: int = 3, k: int | None = None, latent_text: bool = True, text: int | None = None) -> dict:
    """Compile `generate_jit` for `mesh_name` on abstract arrays (ShapeDtypeStructs with the inference layout) and
    report per-device bytes: parameters, KV cache, and the compiler's memory analysis (arguments, outputs,
    temporaries). The batch is the train dry run's reference row (text + one reference image) ending with n
    latent tokens (`train.dry_run.example_batch` with no tail)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from ivtlr_jax import sharding as sh
    from ivtlr_jax.generate import generate_jit
    from ivtlr_jax.latent import LatentConfig
    from ivtlr_jax.model import abstract_params, resolve_dtype
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.models.layers import resolve_attention
    from ivtlr_jax.train.dry_run import DRY_RUN_TEXT, _memory, example_batch
    from ivtlr_jax.train.step import tree_bytes_per_device

    if cfg.latent_token_id is None:  # any id inside the vocabulary lays the batch out the same way
        cfg = dataclasses.replace(cfg, latent_token_id=cfg.vocab_size - 1)
    bb = backbone_for(cfg).for_compilation()  # ids a config-only checkpoint leaves unset: stand-ins that size arrays
    cfg = bb.config
    preset = sh.get_preset(mesh_name)
    mesh = sh.make_mesh(preset)
    platform = preset.platform or mesh.devices.flat[0].platform
    dtype = resolve_dtype(dtype, platform)
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
    compiled = generate_jit.lower(bb, params, lcfg, batch, key, scalar, scalar, max_new_tokens=max_new_tokens,
                                  eos_ids=eos, pad_id=eos[0], greedy=True, mesh=mesh).compile()
    final_len = int(one.kv_valid.shape[1])
    d = bb.dims
    cache_shape = (d.num_layers, batch_size, final_len + max_new_tokens, d.num_kv_heads, d.head_dim)
    cache_shard = sh.cache_sharding(mesh, cache_shape).shard_shape(cache_shape)
    target = {"gpu": "cuda"}.get(preset.platform, preset.platform or platform)
    leaves = jax.tree_util.tree_leaves(params)
    out = {
        "mesh": mesh_name, "mesh_describe": sh.describe(mesh), "mesh_axes": dict(mesh.shape), "dtype": dtype,
        "batch_size": batch_size, "prompt_len": int(one.prefix_ids.shape[1]) + n, "final_len": final_len,
        "max_new_tokens": max_new_tokens, "n_latent": n, "k": lcfg.k,
        "attention": resolve_attention("auto", dtype, d.head_dim, target),  # on the preset's devices
        "attention_compiled": resolve_attention("auto", dtype, d.head_dim),  # here
        "param_bytes_total": int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)),
        "param_bytes_per_device": tree_bytes_per_device(params, jax.tree.map(lambda x: x.sharding, params)),
        "kv_cache_bytes_total": 2 * int(np.prod(cache_shape)) * jnp.dtype(dtype).itemsize,
        "kv_cache_bytes_per_device": 2 * int(np.prod(cache_shard)) * jnp.dtype(dtype).itemsize,
    }
    out.update(_memory(compiled))
    return out


def format_generation_dry_run(r: dict) -> str:
    """A readable table of `generation_dry_run`'s figures (GiB per device)."""
    gib = 2**30
    rows = [("parameters", r["param_bytes_per_device"]), ("KV cache", r["kv_cache_bytes_per_device"])]
    if "compiler_total_bytes_per_device" in r:
        rows += [("compiler: arguments", r["compiler_argument_size_in_bytes"]),
                 ("compiler: outputs", r["compiler_output_size_in_bytes"]),
                 ("compiler: temporaries", r["compiler_temp_size_in_bytes"]),
                 ("compiler: total", r["compiler_total_bytes_per_device"])]
    lines = [f"generation memory per device on --mesh {r['mesh']} ({r['mesh_describe']})",
             f"{'':<24}{'GiB':>10}"] + [f"{name:<24}{v / gib:>10.3f}" for name, v in rows]
    lines.append(f"batch {r['batch_size']} rows, prompt {r['prompt_len']} tokens ({r['final_len']} with the latent "
                 f"chunks of n={r['n_latent']}, k={r['k']}) + {r['max_new_tokens']} new, {r['dtype']} parameters "
                 f"({r['param_bytes_total'] / gib:.2f} GiB in all), attention {r['attention']} (compiled here with "
                 f"{r['attention_compiled']}); the KV cache lives in the temporaries")
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

"""Train-step throughput: tokens/s, step time, MFU (model FLOPs, see train.step.model_flops) and peak memory.

Random weights drawn on the device (no checkpoint needed), one batch of the IVT-LR layout
(one 280x280 image per row, n latent steps of k+1 vectors, a text suffix), the real sharded train
step of the trainer. Models: `small` (hidden 512, 8 layers, vision 4 x 256) or `2b` (Qwen2-VL-2B's
shape). Writes JSON and prints a table.
Usage: python -m experiments.bench_train [--model small|2b] [--finetune lora|full] [--batch 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

MODELS = {
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12),
                  vision=dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4.0, out_hidden_size=512)),
    "2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, mrope_section=(16, 24, 24), tie_word_embeddings=True,
               vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4.0, out_hidden_size=1536)),
}


def model_config(name: str):
    from ivtlr_jax.config import ModelConfig, VisionConfig

    spec = dict(MODELS[name])
    vision = VisionConfig(**spec.pop("vision"))
    return ModelConfig(**spec, vision=vision, latent_token_id=spec["vocab_size"] - 1, image_token_id=5)


def random_params(cfg, key, dtype):
    """Normal(0, 0.02) weights, unit norms, zero biases, drawn with jax (on the default device)."""
    import jax
    import jax.numpy as jnp

    from ivtlr_jax.models.layout import param_shapes

    leaves, tree = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    out = []
    for i, (path, shape) in enumerate(leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "bias":
            out.append(jnp.zeros(shape, dtype))
        elif name == "scale" or name.endswith("norm"):
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * 0.02).astype(dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def layout_batch(cfg, batch: int, prefix: int, tail: int, n: int, k: int, seed: int = 0) -> dict:
    """A consistent host batch: text around 100 image tokens, n latent chunks, labelled suffix."""
    from ivtlr_jax.models import qwen2_vl as q

    rng = np.random.default_rng(seed)
    chunk = k + 1
    total = prefix + n * chunk + tail
    grid = np.array([[1, 20, 20]])
    vin = q.prepare_vision_inputs(cfg.vision, grid)
    prefix_ids = rng.integers(10, cfg.vocab_size - 10, size=(batch, prefix)).astype(np.int32)
    image_pos = np.tile(np.arange(16, 116, dtype=np.int32), (batch, 1))
    prefix_ids[:, 16:116] = cfg.image_token_id
    suffix = rng.integers(10, cfg.vocab_size - 10, size=(batch, tail)).astype(np.int32)
    labels = np.full((batch, total), -100, np.int32)
    labels[:, prefix + n * chunk:] = suffix
    pos = np.broadcast_to(np.arange(total, dtype=np.int32), (batch, 3, total)).copy()
    return {
        "prefix_ids": prefix_ids, "suffix_ids": suffix, "kv_valid": np.ones((batch, total), bool),
        "positions": pos, "labels": labels, "image_pos": image_pos, "image_valid": np.ones((batch, 100), bool),
        "pixel_values": rng.normal(size=(batch, 400, cfg.vision.patch_dim)).astype(np.float32),
        "vision_cos": vin.cos[0], "vision_sin": vin.sin[0],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=list(MODELS))
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=8, help="rows per step (global)")
    ap.add_argument("--prefix", type=int, default=192, help="prompt tokens (100 of them image tokens)")
    ap.add_argument("--tail", type=int, default=128, help="labelled tokens after the latent steps")
    ap.add_argument("--n", type=int, default=3, help="latent steps")
    ap.add_argument("--k", type=int, default=32, help="image embeddings per latent step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--mesh", default="auto", help="mesh preset")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: by kind)")
    ap.add_argument("--out", default="bench_train.json", help="JSON file for the results")
    args = ap.parse_args(argv)

    import jax

    from ivtlr_jax import sharding as sh
    from ivtlr_jax.config import TrainConfig
    from ivtlr_jax.train.loop import peak_flops, state_shardings
    from ivtlr_jax.train.step import (
        compute_dtype,
        init_state,
        make_optimizer,
        make_train_step,
        model_flops,
        split_params,
    )

    cfg = model_config(args.model)
    tcfg = TrainConfig(finetune=args.finetune, mesh=args.mesh, compute_dtype=args.dtype, k=args.k,
                       batch_size=args.batch, lora_r=64, lora_alpha=16, peak_tflops=args.peak_tflops)
    dtype = compute_dtype(tcfg)
    mesh = sh.make_mesh(tcfg.mesh)
    params = random_params(cfg, jax.random.PRNGKey(0), dtype)
    tx, schedule = make_optimizer(tcfg, 1000)
    trainable, frozen = split_params(params, tcfg, jax.random.PRNGKey(1))
    del params
    state = init_state(trainable, tx, 0)
    frozen_sh, state_sh = state_shardings(mesh, cfg, tcfg, state, frozen)
    frozen = jax.device_put(frozen, frozen_sh)
    state = jax.device_put(state, state_sh)
    host = layout_batch(cfg, args.batch, args.prefix, args.tail, args.n, args.k)
    batch = sh.host_batch_to_global(mesh, {k: v for k, v in host.items() if not k.startswith("vision_")},
                                    replicate_keys=())
    for key in ("vision_cos", "vision_sin"):
        batch[key] = jax.device_put(host[key], sh.replicated(mesh))
    fn = make_train_step(cfg, tcfg.latent(), tcfg, tx, schedule, args.n, dtype)
    step = jax.jit(fn, in_shardings=(state_sh, frozen_sh, {k: v.sharding for k, v in batch.items()}),
                   out_shardings=(state_sh, sh.replicated(mesh)), donate_argnums=(0,))
    lowered = step.lower(state, frozen, batch)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    tokens = int(host["kv_valid"].sum())
    flops = model_flops(cfg, tcfg, args.batch, host["kv_valid"].shape[1], args.batch)
    peak = peak_flops(tcfg)
    ndev = mesh.devices.size
    dev = jax.devices()[0]
    mem = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    res = {
        "model": args.model, "finetune": args.finetune, "dtype": str(dtype), "device": dev.device_kind,
        "devices": ndev, "batch": args.batch, "seq_len": host["kv_valid"].shape[1], "tokens_per_step": tokens,
        "step_s_median": dt, "tokens_per_s": tokens / dt, "compile_s": compile_s, "flops_per_step": flops,
        "mfu": (flops / dt / (peak * ndev)) if (flops and peak) else None, "peak_flops_per_device": peak,
        "loss": float(metrics["loss"]),
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_device_bytes": (mem or {}).get("peak_bytes_in_use"),
    }
    print(f"{'model':<7}{'finetune':<9}{'dtype':<10}{'batch x len':>12}{'step s':>9}{'tokens/s':>11}{'MFU':>7}"
          f"{'host GiB':>10}")
    mfu = f"{res['mfu']:.3f}" if res["mfu"] is not None else "n/a"
    shape = f"{args.batch}x{res['seq_len']}"
    print(f"{args.model:<7}{args.finetune:<9}{str(dtype):<10}{shape:>12}{dt:>9.3f}"
          f"{res['tokens_per_s']:>11.0f}{mfu:>7}{res['peak_host_rss_gib']:>10.2f}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

"""Train-step throughput: tokens/s, step time, MFU (model FLOPs, see train.step.model_flops) and peak memory.

Random weights drawn on the mesh from the spec's initializers (no checkpoint needed), one batch of the
IVT-LR layout (one 280x280 image per row, n latent steps of k+1 vectors, a text suffix) made by the
trainer's own `make_latent_batch`, the real sharded train step of the trainer. Models: `small` (hidden
512, 8 layers, vision 4 x 256), `2b` or `7b` (Qwen2-VL-2B's / -7B's shape). The mesh preset's XLA flags
are set before JAX starts. Writes JSON and prints a table (peak device memory where the device reports it).
Usage: python -m experiments.bench_train [--model small|2b|7b] [--finetune lora|full] [--batch 8]
       [--attention auto|xla|cudnn|pallas|dense] [--remat auto|full|dots_except_mlp|dots|none] [--out FILE]
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file (python experiments/bench_x.py): make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import os
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
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, mrope_section=(16, 24, 24),
               vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4.0, out_hidden_size=3584)),
}


def model_config(name: str):
    from ivtlr_jax.models.qwen2_vl import ModelConfig, VisionConfig

    spec = dict(MODELS[name])
    vision = VisionConfig(**spec.pop("vision"))
    return ModelConfig(**spec, vision=vision, latent_token_id=spec["vocab_size"] - 1, image_token_id=5)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=list(MODELS))
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=8, help="rows per step (global)")
    ap.add_argument("--prefix", type=int, default=192, help="prompt tokens (the image's tokens among them)")
    ap.add_argument("--tail", type=int, default=128, help="labelled tokens after the latent steps")
    ap.add_argument("--n", type=int, default=3, help="latent steps")
    ap.add_argument("--k", type=int, default=32, help="image embeddings per latent step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--mesh", default="auto", help="mesh preset")
    ap.add_argument("--remat", default="auto", choices=["auto", "full", "dots_except_mlp", "dots", "none"],
                    help="layer rematerialisation (auto: by model size)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas", "dense"],
                    help="attention implementation (auto: the platform's fused kernel)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: by kind)")
    ap.add_argument("--out", default="bench_train.json", help="JSON file for the results")
    args = ap.parse_args(argv)

    from ivtlr_jax import sharding as sh

    sh.apply_xla_flags(args.mesh)  # before JAX starts its backend
    import jax

    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.models.layers import resolve_attention
    from ivtlr_jax.train.config import TrainConfig
    from ivtlr_jax.train.dry_run import example_batch
    from ivtlr_jax.train.metrics import peak_flops
    from ivtlr_jax.train.remat import resolve_remat
    from ivtlr_jax.train.state import create_train_state
    from ivtlr_jax.train.step import build_train_step, compute_dtype, make_optimizer, model_flops

    bb = backbone_for(model_config(args.model))
    tcfg = TrainConfig(finetune=args.finetune, mesh=args.mesh, compute_dtype=args.dtype, k=args.k,
                       batch_size=args.batch, lora_r=64, lora_alpha=16, peak_tflops=args.peak_tflops,
                       remat=args.remat, attention=args.attention)
    dtype = compute_dtype(tcfg)
    mesh = sh.make_mesh(tcfg.mesh)
    tx, schedule = make_optimizer(tcfg, 1000)
    state, frozen, report, layout = create_train_state(bb, tcfg, mesh, tx, dtype, None)  # random, on the mesh
    _, _, n_img = bb.example_image()
    host = example_batch(bb, tcfg.latent(), args.batch, text=args.prefix - n_img, tail=args.tail, n=args.n)
    batch = sh.host_batch_to_global(mesh, host)
    step = build_train_step(bb, tcfg.latent(), tcfg, tx, schedule, dtype, layout, mesh)
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
    tokens = host.num_tokens()
    flops = model_flops(bb, tcfg, host)
    peak = peak_flops(tcfg)
    ndev = mesh.devices.size
    dev = jax.devices()[0]
    mem = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    res = {
        "model": args.model, "finetune": args.finetune, "dtype": str(dtype), "device": dev.device_kind,
        "devices": ndev, "batch": args.batch, "seq_len": host.kv_valid.shape[1], "tokens_per_step": tokens,
        "remat": resolve_remat(args.remat, bb.dims), "attention": resolve_attention(args.attention, dtype,
                                                                                      bb.dims.head_dim),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
        "state_bytes_per_device": report["state_bytes_per_device"],
        "step_s_median": dt, "tokens_per_s": tokens / dt, "compile_s": compile_s, "flops_per_step": flops,
        "mfu": (flops / dt / (peak * ndev)) if (flops and peak) else None, "peak_flops_per_device": peak,
        "loss": float(metrics["loss"]),
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_device_bytes": (mem or {}).get("peak_bytes_in_use"),
    }
    print(f"{'model':<7}{'finetune':<9}{'dtype':<10}{'attention':<10}{'remat':<16}{'batch x len':>12}{'step s':>9}"
          f"{'tokens/s':>11}{'MFU':>7}{'peak dev GiB':>13}{'host GiB':>10}")
    mfu = f"{res['mfu']:.3f}" if res["mfu"] is not None else "n/a"
    peak_dev = f"{res['peak_device_bytes'] / 2**30:.2f}" if res["peak_device_bytes"] else "n/a"
    shape = f"{args.batch}x{res['seq_len']}"
    print(f"{args.model:<7}{args.finetune:<9}{str(dtype):<10}{res['attention']:<10}{res['remat']:<16}{shape:>12}"
          f"{dt:>9.3f}{res['tokens_per_s']:>11.0f}{mfu:>7}{peak_dev:>13}{res['peak_host_rss_gib']:>10.2f}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

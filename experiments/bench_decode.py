"""Decode throughput after the latent steps against the memory-bandwidth bound (batch 1 by default).

Random weights of a Qwen2-VL shape (`small`, `2b`, `7b`: the train benchmark's models) drawn on the device;
one prompt row per batch row = text + one 280x280 image + text + n latent tokens, laid out by the trainer's
`make_latent_batch`. `prefill_jit` runs the prefix and the latent steps; `decode_jit` (the cache donated)
then runs the whole decode loop of `--new-tokens` tokens in one call (EOS never stops a row). Only the
decode call is timed: tokens/s = batch * (new_tokens - 1) / seconds (the first token comes from the prefill).

Bytes one decode step reads: every decoder layer's weights, the final norm, the LM head and one embedding
row per row, plus the KV-cache slots the step's phase reads (a static prefix of the cache, see
generate.decode_phase_ends), averaged over the steps, plus the one new cache entry written per layer.
Bound = bandwidth / bytes per step (tokens/s at batch 1); % of bound = measured / bound. Bandwidth by device
kind (HBM peak: H100 SXM 3.35 TB/s, H200 4.8 TB/s, ...) or --bandwidth-gbs.

Usage: python -m experiments.bench_decode [--model small|2b|7b] [--batch 1] [--new-tokens 128] [--out FILE]
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file (python experiments/bench_x.py): make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import os
import statistics
import time

import numpy as np

# Peak memory bandwidth (bytes/s) by device kind, most specific first.
BANDWIDTH = (("h200", 4.8e12), ("h100 nvl", 3.9e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12),
             ("a100-sxm4-80gb", 2.039e12), ("a100 80gb", 2.039e12), ("a100", 1.555e12), ("l4", 0.3e12),
             ("tpu v4", 1.2288e12), ("tpu v5 lite", 0.819e12), ("tpu v5e", 0.819e12), ("tpu v5p", 2.765e12),
             ("tpu v6", 1.64e12))


def bandwidth_of(kind: str) -> float | None:
    kind = kind.lower()
    return next((bw for name, bw in BANDWIDTH if name in kind), None)


def decode_bytes(bb, params, batch: int, total: int, new_tokens: int, cache_itemsize: int) -> dict:
    """Bytes one decode step reads and writes, averaged over the decode steps (see the module docstring)."""
    import jax

    from ivtlr_jax.generate import decode_phase_ends

    d = bb.dims
    llm = params.llm
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    head = llm.embed if d.tie_word_embeddings else llm.lm_head
    weights = nbytes(llm.layers) + nbytes(llm.norm) + nbytes(head) + batch * d.hidden_size * llm.embed.dtype.itemsize
    per_slot = d.num_layers * 2 * batch * d.num_kv_heads * d.head_dim * cache_itemsize  # k and v, every layer
    reads, start = [], 1
    for end in decode_phase_ends(new_tokens):
        reads += [total + end - 2] * (end - start)  # slots the phase's steps read
        start = end
    slots = float(np.mean(reads)) if reads else 0.0
    return {"weight_bytes": int(weights), "cache_bytes_read": slots * per_slot, "cache_bytes_written": per_slot,
            "mean_cache_slots_read": slots, "bytes_per_step": weights + slots * per_slot + per_slot}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=["small", "2b", "7b"])
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default 128)")
    ap.add_argument("--text", type=int, default=124, help="prompt text tokens around the image (default 124)")
    ap.add_argument("--n", type=int, default=3, help="latent steps (default 3)")
    ap.add_argument("--k", type=int, default=32, help="image embeddings per latent step (default 32)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="weights and compute (auto: bfloat16 on accelerators, float32 on CPU)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas", "dense"])
    ap.add_argument("--repeats", type=int, default=3, help="timed decode calls; the median counts (default 3)")
    ap.add_argument("--mesh", default="gpu_1", help="preset whose XLA flags are set (default gpu_1)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="peak memory bandwidth GB/s (default: by kind)")
    ap.add_argument("--out", default="bench_decode.json", help="JSON file for the results")
    args = ap.parse_args(argv)

    from ivtlr_jax import sharding as sh

    sh.apply_xla_flags(args.mesh)  # before JAX starts its backend
    import functools

    import jax
    import jax.numpy as jnp

    from experiments.bench_train import model_config
    from ivtlr_jax.generate import decode_jit, prefill_jit
    from ivtlr_jax.latent import LatentConfig, to_device
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.models.layers import resolve_attention
    from ivtlr_jax.train.dry_run import example_batch

    dev = jax.devices()[0]
    dtype = args.dtype if args.dtype != "auto" else ("float32" if dev.platform == "cpu" else "bfloat16")
    bb = backbone_for(model_config(args.model))
    params = jax.jit(functools.partial(bb.init_params, dtype=dtype))(jax.random.PRNGKey(0))  # on the device
    lcfg = LatentConfig(k=args.k)
    _, _, n_img = bb.example_image()
    batch = to_device(example_batch(bb, lcfg, args.batch, text=args.text, tail=0, n=args.n))
    total = int(batch.kv_valid.shape[1])
    key, temp, top_p = jax.random.PRNGKey(0), jnp.float32(1e-6), jnp.float32(1.0)
    dkw = dict(max_new_tokens=args.new_tokens, eos_ids=(-1,), pad_id=0, greedy=True, attention=args.attention)

    def prefill():
        out = prefill_jit(bb, params, lcfg, batch, key, temp, top_p, max_new_tokens=args.new_tokens, greedy=True,
                          attention=args.attention)
        return jax.block_until_ready(out)

    def decode(cache, first):
        out = decode_jit(bb, params, batch.kv_valid, batch.positions, cache, first, key, temp, top_p, **dkw)
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    cache, first, _ = prefill()
    prefill_first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens, _, steps, _ = decode(cache, first)
    decode_first_s = time.perf_counter() - t0
    assert int(steps) == args.new_tokens, int(steps)
    times, prefill_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cache, first, _ = prefill()
        prefill_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode(cache, first)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    steps = args.new_tokens - 1
    tps = args.batch * steps / dt
    cache_itemsize = jnp.dtype(cache.k.dtype).itemsize
    traffic = decode_bytes(bb, params, args.batch, total, args.new_tokens, cache_itemsize)
    bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else bandwidth_of(dev.device_kind)
    bound = args.batch * bw / traffic["bytes_per_step"] if bw else None
    res = {
        "model": args.model, "device": dev.device_kind, "platform": dev.platform, "jax_version": jax.__version__,
        "dtype": dtype, "attention": resolve_attention(args.attention, jnp.dtype(dtype), bb.dims.head_dim),
        "batch": args.batch, "prompt_tokens": total - args.n * lcfg.chunk_len + args.n,
        "final_prompt_tokens": total, "image_tokens": n_img, "n": args.n, "k": args.k,
        "new_tokens": args.new_tokens, "decode_steps_timed": steps, "decode_s_median": dt,
        "decode_s_all": times, "prefill_s_median": statistics.median(prefill_times),
        "compile_and_first_call_s": {"prefill": prefill_first_s, "decode": decode_first_s},
        "tokens_per_s": tps, "ms_per_step": 1e3 * dt / steps, **traffic, "bandwidth_bytes_per_s": bw,
        "bound_tokens_per_s": bound, "fraction_of_bound": (tps / bound) if bound else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    gb = 1e9
    frac = f"{100 * res['fraction_of_bound']:.1f}%" if bound else "n/a"
    bound_s = f"{bound:.1f}" if bound else "n/a"
    print(f"{'model':<7}{'device':<24}{'dtype':<10}{'attention':<10}{'batch':>6}{'prompt':>8}{'new':>6}"
          f"{'ms/step':>9}{'tokens/s':>10}{'GB/step':>9}{'bound tok/s':>13}{'% bound':>9}")
    print(f"{args.model:<7}{dev.device_kind[:23]:<24}{dtype:<10}{res['attention']:<10}{args.batch:>6}{total:>8}"
          f"{args.new_tokens:>6}{res['ms_per_step']:>9.2f}{tps:>10.1f}{traffic['bytes_per_step'] / gb:>9.3f}"
          f"{bound_s:>13}{frac:>9}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

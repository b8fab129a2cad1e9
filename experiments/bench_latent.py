"""Latent forward in JAX against the release-style recompute in PyTorch, for Qwen2-VL, Qwen2.5-VL, Qwen3-VL or
Chameleon.

Qwen2-VL and Qwen2.5-VL (`--backbone qwen2_5_vl`, a windowed vision tower): n=3, k=32, one 280x280 image
(100 tokens); Qwen3-VL (`--backbone qwen3_vl`, DeepStack): the same with one 320x320 image at patch 16
(100 tokens). Chameleon (`--backbone chameleon`): n=3, k=64, one
64x64 image through a small VQ tokenizer (1024 tokens, as the 7B model's 512x512 images give).
The recompute is tests/oracle.py on transformers' model with eager attention under torch.no_grad():
every latent step re-runs the whole growing sequence, then one more full pass gives the logits.
Also times one plain JAX forward over a sequence of the same final length (the ideal cost) and one
single-token decode step: the floor is that pass plus n decode steps (each latent chunk reads the
weights once). CPU, float32, medians of repeated runs after compilation; the JAX calls are timed in interleaved
rounds (one call of each per round), so load from elsewhere on the machine moves them alike. Writes JSON and
prints a table.
Usage: python -m experiments.bench_latent [--backbone qwen2_vl|qwen2_5_vl|qwen3_vl|chameleon] [--out FILE]
       [--batches 1 4]
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file (python experiments/bench_x.py): make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from experiments import small_model as sm
from ivtlr_jax.models import DEFAULT_MODEL_TYPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=DEFAULT_MODEL_TYPE, choices=sm.BENCH_CHOICES,
                    help="whose small model (ivtlr_jax.models.small_models)")
    ap.add_argument("--out", default=None,
                    help="JSON file for the results (default: bench_latent.json; bench_latent_BACKBONE.json)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes to time")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    ap.add_argument("--n", type=int, default=3, help="latent steps")
    ap.add_argument("--k", type=int, default=None,
                    help="image embeddings per step (default: the backbone's release value, 32; chameleon 64)")
    ap.add_argument("--tail", type=int, default=16, help="suffix tokens after the latent tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = ap.parse_args(argv)

    import jax
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from oracle import oracle_latent_forward

    build, batch_of, default_k = sm.bench_backbone(args.backbone)
    k = args.k if args.k is not None else default_k
    out_path = args.out or ("bench_latent.json" if args.backbone == DEFAULT_MODEL_TYPE else
                            f"bench_latent_{args.backbone}.json")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf, m = build(tmp, attn="eager")
    latent_id = m.config.latent_token_id
    rows = []
    for b in args.batches:
        ids, mask, pv, grid = batch_of(b, n_latent=args.n, tail=args.tail)
        labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - args.tail, ids, -100)

        def run_jax():
            return m.latent_forward(ids, mask, labels, pv, grid, k=k)

        def run_ref():
            return oracle_latent_forward(hf, latent_id, ids, mask, labels, pv, grid, k)

        out, ref = run_jax(), run_ref()
        final_len = out.logits.shape[1]
        diff = float(np.abs(out.logits - ref[1]).max())
        same_picks = bool((out.selected == ref[2]).all())
        # one plain forward over a sequence of the same final length, image encoder included
        image_len = ids.shape[1] - args.n - args.tail - 128  # the prompt's image run (with markers)
        pids, pmask, _, _ = batch_of(b, n_latent=0, text_len=final_len - image_len)
        assert pids.shape[1] == final_len

        def run_plain():
            return m.logits(pids, pmask, pv, grid, position_mode="sequential")

        steps = 16  # one decode step: (generate 1 + steps tokens - generate 1 token) / steps, same prompt

        def gen(t):
            return lambda: m.generate(pids, pmask, pv, grid, max_new_tokens=t, eos_token_ids=[-1])

        row = {
            "batch": b, "final_len": int(final_len), "n": args.n, "k": k, "max_abs_logit_diff": diff,
            "selections_equal_reference": same_picks,
            # the reference first, on its own (PyTorch's threads and XLA's pool slow each other when interleaved)
            "torch_recompute": sm.timeit(run_ref, max(2, args.repeats // 2), warmup=1),
        }
        # the JAX calls in interleaved rounds: a busy shared machine slows the latent forward and its floor alike
        stats, _ = sm.timeit_interleaved({"jax_latent": run_jax, "jax_plain_same_len": run_plain, "gen_1": gen(1),
                                          f"gen_{1 + steps}": gen(1 + steps)}, args.repeats, warmup=2)
        row["jax_latent"], row["jax_plain_same_len"] = stats["jax_latent"], stats["jax_plain_same_len"]
        g1, gs = stats["gen_1"], stats[f"gen_{1 + steps}"]
        row["jax_decode_step"] = max(gs["median_s"] - g1["median_s"], 0.0) / steps
        floor = row["jax_plain_same_len"]["median_s"] + args.n * row["jax_decode_step"]
        row["floor_s"] = floor
        row["speedup_vs_recompute"] = row["torch_recompute"]["median_s"] / row["jax_latent"]["median_s"]
        row["latent_over_plain"] = row["jax_latent"]["median_s"] / row["jax_plain_same_len"]["median_s"]
        row["latent_over_floor"] = row["jax_latent"]["median_s"] / floor
        rows.append(row)
    print(f"{args.backbone}: n={args.n}, k={k}")
    print(f"{'batch':>5}{'L_final':>8}{'jax latent s':>14}{'jax plain s':>13}{'torch recompute s':>19}"
          f"{'speed-up':>10}{'latent/plain':>14}{'latent/floor':>14}")
    for r in rows:
        print(f"{r['batch']:>5}{r['final_len']:>8}{r['jax_latent']['median_s']:>14.4f}"
              f"{r['jax_plain_same_len']['median_s']:>13.4f}{r['torch_recompute']['median_s']:>19.4f}"
              f"{r['speedup_vs_recompute']:>9.2f}x{r['latent_over_plain']:>13.2f}x{r['latent_over_floor']:>13.2f}x")
    res = {"backbone": args.backbone, "device": str(jax.devices()[0]), "torch_threads": args.threads, "rows": rows}
    args.out = out_path
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

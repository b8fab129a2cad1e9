"""Latent forward (n=3, k=32, one 280x280 image) in JAX against the release-style recompute in PyTorch.

The recompute is tests/oracle.py on transformers' model with eager attention under torch.no_grad():
every latent step re-runs the whole growing sequence, then one more full pass gives the logits.
Also times one plain JAX forward over a sequence of the same final length (the ideal cost).
CPU, float32, median of repeated runs after compilation. Writes JSON and prints a table.
Usage: python -m experiments.bench_latent [--out FILE] [--batches 1 4] [--repeats N]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_latent.json", help="JSON file for the results")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes to time")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    ap.add_argument("--n", type=int, default=3, help="latent steps")
    ap.add_argument("--k", type=int, default=32, help="image embeddings per step")
    ap.add_argument("--tail", type=int, default=16, help="suffix tokens after the latent tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = ap.parse_args(argv)

    import jax
    import torch

    from experiments.small_model import prompt_batch, small_models, special_ids, timeit

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from oracle import oracle_latent_forward

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf, m = small_models(tmp, attn="eager")
    rows = []
    for b in args.batches:
        ids, mask, pv, grid = prompt_batch(b, n_latent=args.n, tail=args.tail)
        labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - args.tail, ids, -100)

        def run_jax():
            out = m.latent_forward(ids, mask, labels, pv, grid, k=args.k)
            return out

        def run_ref():
            return oracle_latent_forward(hf, special_ids(8192)["latent"], ids, mask, labels, pv, grid, args.k)

        out, ref = run_jax(), run_ref()
        final_len = out.logits.shape[1]
        diff = float(np.abs(out.logits - ref[1]).max())
        # one plain forward over a sequence of the same final length, vision tower included
        pids, pmask, _, _ = prompt_batch(b, n_latent=0, text_len=final_len - 102)
        assert pids.shape[1] == final_len

        def run_plain():
            return m.logits(pids, pmask, pv, grid, position_mode="sequential")

        row = {
            "batch": b, "final_len": int(final_len), "n": args.n, "k": args.k, "max_abs_logit_diff": diff,
            "jax_latent": timeit(run_jax, args.repeats, warmup=2),
            "jax_plain_same_len": timeit(run_plain, args.repeats, warmup=2),
            "torch_recompute": timeit(run_ref, max(2, args.repeats // 2), warmup=1),
        }
        row["speedup_vs_recompute"] = row["torch_recompute"]["median_s"] / row["jax_latent"]["median_s"]
        row["latent_over_plain"] = row["jax_latent"]["median_s"] / row["jax_plain_same_len"]["median_s"]
        rows.append(row)
    print(f"{'batch':>5}{'L_final':>8}{'jax latent s':>14}{'jax plain s':>13}{'torch recompute s':>19}"
          f"{'speed-up':>10}{'latent/plain':>14}")
    for r in rows:
        print(f"{r['batch']:>5}{r['final_len']:>8}{r['jax_latent']['median_s']:>14.4f}"
              f"{r['jax_plain_same_len']['median_s']:>13.4f}{r['torch_recompute']['median_s']:>19.4f}"
              f"{r['speedup_vs_recompute']:>9.2f}x{r['latent_over_plain']:>13.2f}x")
    res = {"device": str(jax.devices()[0]), "torch_threads": args.threads, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

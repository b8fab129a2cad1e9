"""Prefill time of the JAX Qwen2-VL against transformers' PyTorch model on the same small config.

One 280x280 image plus text (228 tokens), vision tower included, float32 on CPU, median after
compilation. Writes JSON. Usage: python -m experiments.bench_forward [--out FILE] [--repeats N]
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file (python experiments/bench_x.py): make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import os
import tempfile

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_forward.json", help="JSON file for the results")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per side (median reported)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = ap.parse_args(argv)

    import jax
    import torch

    from experiments.small_model import bench_backbone, timeit

    qwen2_vl = bench_backbone("qwen2_vl")  # its inputs (image_grid_thw) are Qwen2-VL's
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf, m = qwen2_vl.models(tmp, attn="sdpa")
    ids, mask, pv, grid = qwen2_vl.batch(args.batch)
    mm = (ids == hf.config.image_token_id).astype(np.int64)
    t_inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                    image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor(mm))

    def run_torch():
        with torch.no_grad():
            return hf(**t_inputs).logits

    def run_jax():
        return m.logits(ids, mask, pv, grid, position_mode="mrope")

    diff = float(np.abs(run_jax() - run_torch().numpy()).max())
    res = {
        "config": "hidden 512, 8 layers, vision 4x256, one 280x280 image",
        "seq_len": int(ids.shape[1]), "batch": args.batch, "device": str(jax.devices()[0]),
        "torch_threads": args.threads, "max_abs_logit_diff": diff,
        "jax": timeit(run_jax, args.repeats, warmup=2),
        "torch_sdpa": timeit(run_torch, args.repeats, warmup=2),
    }
    res["speedup_jax_vs_torch"] = res["torch_sdpa"]["median_s"] / res["jax"]["median_s"]
    print(f"{'side':<12}{'median s':>10}{'min s':>10}")
    for side in ("jax", "torch_sdpa"):
        print(f"{side:<12}{res[side]['median_s']:>10.4f}{res[side]['min_s']:>10.4f}")
    print(f"speed-up (torch / jax): {res['speedup_jax_vs_torch']:.2f}x; max |logit diff| {diff:.2e}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

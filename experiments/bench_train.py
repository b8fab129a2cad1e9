"""Train-step throughput: tokens/s, step time, MFU (model FLOPs, see train.step.model_flops) and peak memory.

Random weights drawn on the mesh from the spec's initializers (no checkpoint needed), one batch of the
IVT-LR layout (one 280x280 image per row, n latent steps of k+1 vectors, a text suffix) made by the
trainer's own `make_latent_batch`, the real sharded train step of the trainer. Models: `small` (hidden
512, 8 layers, vision 4 x 256), `2b` or `7b` (Qwen2-VL-2B's / -7B's shape). The mesh preset's XLA flags
are set before JAX starts. Writes JSON and prints a table (peak device memory where the device reports it).
Usage: python -m experiments.bench_train [--model small|2b|7b] [--finetune lora|full] [--batch 8]
       [--attention auto|xla|cudnn|pallas|dense] [--remat auto|full|dots_except_mlp|dots|none] [--out FILE]

`--compare REV` times the embedded default's own train step instead, at this checkout and at a git revision:
each round runs `python -m experiments.train --config <the backbone's tiny YAML> --stage 0 --max-steps N` once
in each tree (the revision unpacked with `git archive`, both on one synthetic split written here), alternating
which goes first, and reads the step times the trainer records (metrics.jsonl `step_time_s`, the first
`--skip` updates left out: compilation and warm-up). It prints per-round medians and the ratio HEAD / REV.
  python -m experiments.bench_train --compare 2f84bce [--rounds 3] [--steps 60] [--backbone chameleon]
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

from ivtlr_jax.models import DEFAULT_MODEL_TYPE, embedded_defaults

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
    from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig, VisionConfig

    spec = dict(MODELS[name])
    vision = VisionConfig(**spec.pop("vision"))
    return Qwen2VLConfig(**spec, vision=vision, latent_token_id=spec["vocab_size"] - 1, image_token_id=5)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", metavar="REV", help="time the embedded default's step here and at git revision "
                    "REV, alternating runs, and print the ratio (the options below --rounds apply)")
    ap.add_argument("--rounds", type=int, default=3, help="--compare: runs per tree")
    ap.add_argument("--backbone", default=DEFAULT_MODEL_TYPE, choices=sorted(TINY_CONFIGS),
                    help="--compare: whose embedded default to time")
    ap.add_argument("--skip", type=int, default=5, help="--compare: first updates of a run left out (compilation)")
    ap.add_argument("--model", default="small", choices=list(MODELS))
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=8, help="rows per step (global)")
    ap.add_argument("--prefix", type=int, default=192, help="prompt tokens (the image's tokens among them)")
    ap.add_argument("--tail", type=int, default=128, help="labelled tokens after the latent steps")
    ap.add_argument("--n", type=int, default=3, help="latent steps")
    ap.add_argument("--k", type=int, default=32, help="image embeddings per latent step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after compilation (default 5; --compare: "
                    "optimiser updates per run, default 60)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--mesh", default="auto", help="mesh preset")
    ap.add_argument("--remat", default="auto", choices=["auto", "full", "dots_except_mlp", "dots", "none"],
                    help="layer rematerialisation (auto: by model size)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas", "dense"],
                    help="attention implementation (auto: the platform's fused kernel)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: by kind)")
    ap.add_argument("--out", default="bench_train.json", help="JSON file for the results")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args.compare, rounds=args.rounds, steps=args.steps or 60, skip=args.skip,
                       backbone=args.backbone, out=args.out)
    args.steps = args.steps or 5

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


TINY_CONFIGS = {t: name.removesuffix(".yaml") for t, name in embedded_defaults().items()}  # backbone -> its YAML
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unpack_revision(rev: str, dst: str) -> str:
    """`git archive` of REV unpacked into dst; returns the full commit id (a one-line error for an unknown REV)."""
    import subprocess
    import tarfile

    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise SystemExit(f"--compare {rev!r}: not a git revision of {REPO}") from None
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO, check=True,
                             capture_output=True).stdout
    import io

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dst, filter="data")
    return commit


def _timed_run(tree: str, config: str, data: str, out: str, steps: int, skip: int) -> dict:
    """One `experiments.train` run in `tree` (its own code: cwd and PYTHONPATH); its recorded update times."""
    import shutil
    import subprocess
    import sys

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "experiments.train", "--config", config, "--data-source", data, "--stage", "0",
           "--max-steps", str(steps), "--save-every", str(10 * steps), "--out", out, "--log-every", str(10 * steps)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each tree sets the flags it sets
    env["PYTHONPATH"] = tree
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"--compare: the run in {tree} failed: {' | '.join(tail)}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        times = [r["step_time_s"] for r in map(json.loads, f) if "step_time_s" in r]
    if len(times) <= skip:
        raise SystemExit(f"--compare: the run in {tree} recorded {len(times)} updates; need more than --skip {skip}")
    timed = np.asarray(times[skip:])
    return {"median_s": float(np.median(timed)), "mean_s": float(timed.mean()), "updates": len(timed),
            "wall_s": wall, "first_s": float(times[0])}


def compare(rev: str, rounds: int = 3, steps: int = 60, skip: int = 5, backbone: str = "qwen2_vl",
            out: str = "bench_train.json") -> dict:
    """Time the embedded default's step at this checkout and at `rev`, alternating; ratio HEAD / REV."""
    import subprocess
    import tempfile

    from ivtlr_jax.data.synthetic import write_synthetic

    config = TINY_CONFIGS[backbone]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip() or "working tree"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    head_name = f"HEAD {head}" + (" + changes" if dirty else "")
    with tempfile.TemporaryDirectory(prefix="bench_compare_") as tmp:
        rev_tree = os.path.join(tmp, "rev")
        commit = _unpack_revision(rev, rev_tree)
        data = os.path.join(tmp, "data")
        import yaml

        with open(os.path.join(REPO, "experiments", "configs", config + ".yaml")) as f:
            rows = yaml.safe_load(f)["limit"]
        write_synthetic(data, n=rows, n_eval=8, seed=0, level="warmup")
        trees = {"head": REPO, "rev": rev_tree}
        runs: dict[str, list] = {"head": [], "rev": []}
        print(f"{'round':<7}{'tree':<22}{'median s/update':>16}{'mean':>9}{'updates':>9}{'run wall s':>11}")
        for i in range(rounds):
            for name in (("head", "rev") if i % 2 == 0 else ("rev", "head")):
                r = _timed_run(trees[name], config, data, os.path.join(tmp, f"run_{name}"), steps, skip)
                runs[name].append(r)
                label = head_name if name == "head" else rev
                print(f"{i:<7}{label:<22}{r['median_s']:>16.4f}{r['mean_s']:>9.4f}{r['updates']:>9}"
                      f"{r['wall_s']:>11.1f}", flush=True)
    med = {k: float(np.median([r["median_s"] for r in v])) for k, v in runs.items()}
    per_round = [h["median_s"] / r["median_s"] for h, r in zip(runs["head"], runs["rev"])]
    res = {"compare": rev, "commit": commit, "head": head_name, "backbone": backbone, "config": config,
           "steps": steps, "skip": skip, "rounds": rounds, "runs": runs, "median_s": med,
           "ratio_head_over_rev": med["head"] / med["rev"], "ratio_per_round": per_round}
    print(f"{backbone} embedded default, stage 0, median s/update: {head_name} {med['head']:.4f}, {rev} "
          f"{med['rev']:.4f}; ratio {res['ratio_head_over_rev']:.3f} (per round: "
          f"{', '.join(f'{x:.3f}' for x in per_round)})")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

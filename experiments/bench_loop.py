"""Training-loop overlap: the trainer's tokens/s with everything it does (data pipeline and image decoding,
host layout, device transfer, logging, metrics.jsonl, progress bar, asynchronous checkpoints) against the
bare step rate measured the way `bench_train` does it (the same compiled step on one batch, blocking after
every step, median), on the same model, batch shape, mesh and options. Goal: loop >= 95% of bare.

The model is built with the synthetic set's tokenizer (so the data pipeline is the real one): `small` has
bench_train's small shape (hidden 512, 8 layers, vision 4 x 256), `tiny` the test model (hidden 64,
2 layers), where host work weighs most. Writes JSON and prints a table.
Usage: python -m experiments.bench_loop [--model small|tiny] [--steps 20] [--stage 3] [--out bench_loop.json]
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file: make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np

MODELS = {
    "small": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, mrope_section=(8, 12, 12)),
              dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4.0)),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=(2, 3, 3)),
             dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2)),
}


def build(workdir: str, model: str, rows: int) -> tuple[str, str]:
    """Synthetic data and a random model of the given shape (once per workdir); (data dir, checkpoint dir)."""
    from experiments.tiny_setup import make_tiny_checkpoint
    from ivtlr_jax.data import load_split
    from ivtlr_jax.data.synthetic import write_synthetic

    data = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(data, "data")):
        write_synthetic(data, n=rows, n_eval=8, seed=0)
    ckpt = os.path.join(workdir, model, "init")
    if not os.path.exists(os.path.join(ckpt, "ivtlr_config.json")):
        ds = load_split("synthetic", "train", source=data)
        corpus = [f"{r['question']} {' '.join(r['choices'])} {r['rationale']}" for r in ds]
        dims, vision = MODELS[model]
        make_tiny_checkpoint(os.path.join(workdir, model), corpus=corpus, model=dict(dims), vision=dict(vision))
    return data, ckpt


def bare_step_times(trainer, batch_arrays, warmup: int, steps: int) -> list[float]:
    """bench_train's measurement: the trainer's compiled step on one batch, blocking after every step."""
    import jax

    step = trainer.compiled_step(batch_arrays)
    state = trainer.state
    for _ in range(warmup):
        state, metrics = step(state, trainer.frozen, batch_arrays)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, trainer.frozen, batch_arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    trainer.state = state
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=list(MODELS))
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=8, help="rows per step (global)")
    ap.add_argument("--stage", type=int, default=3, help="curriculum stage (n = min(stage, 3) latent steps)")
    ap.add_argument("--k", type=int, default=32, help="image embeddings per latent step")
    ap.add_argument("--steps", type=int, default=30, help="timed steps, for the loop and for the bare rate")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks of bare and loop steps")
    ap.add_argument("--rows", type=int, default=96, help="synthetic training rows")
    ap.add_argument("--log-every", type=int, default=1, help="the loop's metrics line every N steps")
    ap.add_argument("--save-every", type=int, default=10, help="the loop's checkpoint every N steps")
    ap.add_argument("--num-workers", type=int, default=2, help="image decoding threads")
    ap.add_argument("--prefetch", type=int, default=2, help="batches the loop prepares ahead (0: none)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--mesh", default="cpu", help="mesh preset")
    ap.add_argument("--remat", default="full", help="layer rematerialisation (same for both measurements)")
    ap.add_argument("--workdir", default=None, help="keep data, model and run here (default: a temporary folder)")
    ap.add_argument("--out", default="bench_loop.json", help="JSON file for the results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import jax

    from ivtlr_jax.train import Trainer
    from ivtlr_jax.train.config import TrainConfig

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_loop_")
    data, ckpt = build(workdir, args.model, args.rows)
    run_dir = os.path.join(workdir, args.model, f"run_{int(time.time())}")
    steps_per_epoch = -(-args.rows // args.batch)
    tcfg = TrainConfig(init=ckpt, out=run_dir, data="synthetic", data_source=data, stages=(args.stage,),
                       epochs_per_stage=-(-(args.steps + args.rounds + 2) // steps_per_epoch), k=args.k,
                       finetune=args.finetune, batch_size=args.batch, compute_dtype=args.dtype, remat=args.remat,
                       mesh=args.mesh, log_every=args.log_every, save_every=args.save_every, keep=2, max_steps=None,
                       num_workers=args.num_workers, lr=1e-4)
    trainer = Trainer(tcfg, prefetch=max(1, args.prefetch))

    # the bare rate, on the first batch of the loop's own data (compiling here the step the loop runs)
    it = trainer.iterator(args.stage)
    first = next(it)
    it.close()
    host, arrays = trainer.device_batch(first)
    trainer.compiled_step(arrays)
    bare_step_times(trainer, arrays, warmup=2, steps=0)
    if args.prefetch == 0:  # the loop without prefetching, for comparison: batches made on demand
        from ivtlr_jax.train import loop as loop_module

        class Inline:
            def __init__(self, source, prepare, depth=1, name=None):
                self._it = (prepare(x) for x in source)

            def __iter__(self):
                return self._it

            def close(self):
                pass

        loop_module.Prefetcher = Inline

    # rounds of (bare block, loop block): other work on the machine drifts, both see it alike
    per_round = max(2, args.steps // args.rounds)
    bare, timed, summary, step, recompiled = [], [], None, 0, 0
    for _ in range(args.rounds):
        bare += bare_step_times(trainer, arrays, warmup=0, steps=per_round)
        before = len(trainer._compiled)
        trainer.start_step, trainer.history = step, []
        trainer.tcfg.max_steps = step + per_round + 1  # the first step waits for the first batch: not counted
        summary = trainer.run()
        step = summary["step"]
        records = [r for r in trainer.history if "loss" in r][1:]
        recompiled += len(trainer._compiled) - before
        new_shapes = len(trainer._compiled) - before
        if new_shapes:  # a batch of another shape compiled mid-loop: leave those steps out
            records = sorted(records, key=lambda r: r["step_time_s"])[:len(records) - new_shapes]
        timed += records
    loop_times = [r["step_time_s"] for r in timed]
    tokens_per_step = float(np.mean([r["tokens"] for r in timed]))
    bare_s, loop_s = float(np.median(bare)), float(np.mean(loop_times))
    dev = jax.devices()[0]
    res = {
        "model": args.model, "finetune": args.finetune, "device": dev.device_kind, "devices": trainer.mesh.devices.size,
        "cpu_count": os.cpu_count(), "batch": args.batch, "seq_len": int(host.kv_valid.shape[1]), "n": host.n,
        "k": args.k, "remat": args.remat, "steps": len(loop_times), "log_every": args.log_every,
        "save_every": args.save_every, "prefetch": args.prefetch, "num_workers": args.num_workers,
        "bare_step_s_median": bare_s, "bare_step_s_mean": float(np.mean(bare)),
        "loop_step_s_mean": loop_s, "loop_step_s_median": float(np.median(loop_times)),
        "loop_step_s_max": float(np.max(loop_times)),
        "tokens_per_step_mean": tokens_per_step,
        "bare_tokens_per_s": tokens_per_step / bare_s, "loop_tokens_per_s": tokens_per_step / loop_s,
        "loop_over_bare": bare_s / loop_s, "recompiled_in_loop": recompiled, "rounds": args.rounds,
        "workdir": workdir,
    }
    print(f"{'model':<7}{'batch x len':>12}{'n':>3}{'bare s':>9}{'loop s':>9}{'bare tok/s':>12}{'loop tok/s':>12}"
          f"{'loop/bare':>11}")
    print(f"{args.model:<7}{args.batch}x{res['seq_len']:<9}{host.n:>3}{bare_s:>9.3f}{loop_s:>9.3f}"
          f"{res['bare_tokens_per_s']:>12.0f}{res['loop_tokens_per_s']:>12.0f}{res['loop_over_bare']:>10.1%}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()

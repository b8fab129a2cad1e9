"""The embedded default of `python -m experiments.train` (no arguments): the whole method in minutes on a CPU.

1. the synthetic set at its warm-up level (which colour dominates the picture; options in a fixed
   order, so a tiny model can learn it in minutes), written as hub-layout parquet into RUN_DIR/data;
2. a tiny random Qwen2-VL-architecture model, exported as a Hugging Face folder and converted with
   `--add-latent-tokens` (RUN_DIR/hf -> RUN_DIR/init);
3. the curriculum, stages 0..3 (experiments/configs/tiny.yaml);
4. after each stage, its checkpoint merged and evaluated on the held-out split with the stage's
   latent steps (stage 0 generates its rationale: CoT);
5. a table of loss and accuracy per stage, also written to RUN_DIR/summary.{json,md}.
"""

from __future__ import annotations

import json
import logging
import os
import time

DEFAULT_OUT = os.environ.get("IVTLR_DEFAULT_OUT")  # default: runs/tiny_default (runs/tiny_chameleon_default)
# the embedded default per backbone
CONFIGS = {"qwen2_vl": "tiny.yaml", "chameleon": "tiny_chameleon.yaml", "qwen2_5_vl": "tiny_qwen25vl.yaml",
           "qwen3_vl": "tiny_qwen3vl.yaml"}


def _table(rows: list[dict]) -> str:
    head = "| stage | latent steps | loss (first -> last) | accuracy | mean AR steps | eval s/sample |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['n_latent']} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                     f"{100 * r['accuracy']:.1f}% | {r['mean_ar_steps']:.1f} | {r['seconds_per_sample']:.4f} |")
    return "\n".join(lines)


def run_embedded_default(out: str | None = DEFAULT_OUT, train_rows: int | None = None, eval_rows: int | None = None,
                         backbone: str = "qwen2_vl") -> dict:
    """Run it; train_rows / eval_rows default to the backbone's tiny YAML's `limit` / `eval_limit`."""
    import yaml

    from experiments import evaluate as ev
    from experiments.tiny_setup import CONFIG_DIR, prepare_auto_tiny
    from ivtlr_jax.data.synthetic import write_synthetic
    from ivtlr_jax.train import Trainer
    from ivtlr_jax.train.config import TrainConfig
    from ivtlr_jax.train.export import export_trained_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    if backbone not in CONFIGS:
        raise SystemExit(f"--backbone {backbone!r}: use one of {sorted(CONFIGS)}")
    out = out or ("runs/tiny_default" if backbone == "qwen2_vl" else f"runs/tiny_{backbone}_default")
    with open(os.path.join(CONFIG_DIR, CONFIGS[backbone])) as f:
        values = yaml.safe_load(f)
    model = values.pop("model", None)
    train_rows = train_rows or values["limit"]
    eval_rows = eval_rows or values["eval_limit"]
    data_dir = os.path.join(out, "data")
    if not os.path.exists(os.path.join(data_dir, "data", "test-00000-of-00001.parquet")):
        print(f"[1/4] writing the synthetic set ({train_rows} train, {eval_rows} test rows) to {data_dir}")
        write_synthetic(data_dir, n=train_rows, n_eval=eval_rows, seed=0, level="warmup")
    values.update(out=out, data_source=data_dir, limit=train_rows, eval_limit=eval_rows)
    tcfg = TrainConfig(**values)
    if os.path.exists(os.path.join(out, "stage_ends")) or os.path.exists(os.path.join(out, "checkpoints")):
        raise SystemExit(f"{out} already holds a run; remove it (or set IVTLR_DEFAULT_OUT) to start over")
    print(f"[2/4] building the tiny {backbone} model: {out}/hf (Hugging Face layout) -> {out}/init (converted)")
    prepare_auto_tiny(tcfg, model)
    encoder = "VQ image tokenizer" if backbone == "chameleon" else "vision tower"
    print(f"[3/4] training stages 0..3 (full fine-tuning of the tiny LLM; {encoder} frozen)")
    summary = Trainer(tcfg).run()
    if summary["stopped"]:
        raise SystemExit(f"training stopped: {summary['stopped']}")
    t_train = time.time() - t0
    print("[4/4] evaluating each stage on the held-out split")
    rows = []
    for stage, info in sorted(summary["stages"].items()):
        n = info["n_latent"]
        ckpt = os.path.join(out, "merged", f"stage{stage}")
        export_trained_checkpoint(os.path.join(out, "stage_ends", str(stage)), ckpt, overwrite=True, verbose=False)
        args = ["--ckpt", ckpt, "--data", tcfg.data, "--data-source", data_dir, "--split", tcfg.eval_split,
                "--limit", str(eval_rows), "--batch-size", str(tcfg.eval_batch_size),
                "--out", os.path.join(out, "eval", f"stage{stage}"), "--no-progress"]
        args += ["--k", str(tcfg.k)] if tcfg.k is not None else []  # else the backbone's default, as in training
        new_tokens = tcfg.max_new_tokens if n >= tcfg.max_latent_stage else 4 * tcfg.max_new_tokens  # steps left
        args += ["--method", "cot" if n == 0 else "ivtlr", "--n-latent", str(max(n, 1)),
                 "--max-new-tokens", str(new_tokens)]
        res = ev.main(args)
        rows.append({"stage": stage, "n_latent": n, "first_loss": info["first_loss"], "last_loss": info["last_loss"],
                     "accuracy": res["accuracy"], "mean_ar_steps": res["mean_ar_steps"],
                     "seconds_per_sample": res["seconds_per_sample"]})
    table = _table(rows)
    result = {"rows": rows, "chance": 0.25, "train_seconds": t_train, "total_seconds": time.time() - t0,
              "run_dir": os.path.abspath(out)}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    print(f"\nchance is 25% (4 options); trained in {t_train:.0f} s, {result['total_seconds']:.0f} s in all. "
          f"Run folder: {out} (metrics.jsonl, loss.png, eval/, merged/)")
    return result

"""Evaluate a converted (or trained) checkpoint on M3CoT, ScienceQA or the synthetic set.

  python -m experiments.evaluate --ckpt CKPT --data m3cot --split test [--method ivtlr] [--n-latent 3]
      [--batch-size 16] [--limit N] [--out DIR] [--save-selections DIR] [--mesh auto] [--dtype auto]
  python -m experiments.evaluate --config qwen2vl_7b_m3cot --dry-run --mesh tpu_v5e_8 [--batch-size 16]  # per chip
  python -m experiments.evaluate --ckpt CKPT --dry-run --mesh tpu_v5e_8

The model is read shard by shard onto --mesh (default: every local device) in the training layout; generation
runs there with the batch split over the data axes. --dry-run compiles generation ahead of time on abstract
arrays (no weights: the model's shape from a training --config's model: section, or a checkpoint's config) and
prints the per-chip memory of parameters, KV cache and temporaries, and whether it fits the chip's HBM. For a
TPU --mesh with libtpu installed (pip install -e '.[tpu]') XLA:TPU compiles it for the preset's topology;
otherwise XLA:CPU on the preset's device count, simulated.

Writes to --out: predictions.jsonl (one row per example), summary.json, summary.md and
accuracy_by_domain.png. Accuracy is exact match of the option letter extracted from the generated
text (method page, section 4); mean autoregressive steps count latent steps plus generated tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ivtlr_jax.eval import (
    ANSWER_FORMATS,
    DEFAULT_MAX_NEW_TOKENS,
    METHODS,
    EvalConfig,
    draw_selections,
    extract_answer,
    format_generation_dry_run,
    generation_dry_run,
    max_new_tokens,
    method_settings,
    save_dry_run,
    summary_line,
)
from ivtlr_jax.eval import evaluate as evaluate_config

__all__ = ["ANSWER_FORMATS", "DEFAULT_MAX_NEW_TOKENS", "METHODS", "build_parser", "draw_selections", "evaluate",
           "extract_answer", "format_generation_dry_run", "generation_dry_run", "main", "method_settings", "run_dry"]


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from ivtlr_jax.sharding import COMPILERS, TPU_EXTRA

    p = argparse.ArgumentParser(
        prog="python -m experiments.evaluate",
        description="Accuracy, autoregressive steps and latency of IVT-LR (and its baselines/ablations) on a "
                    "multiple-choice visual-reasoning split, with KV-cached batched generation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {k:<15} {v}" for k, v in METHODS.items()) + "\n\nexamples:\n"
               "  python -m experiments.evaluate --ckpt ckpt/ivtlr --data m3cot --split test\n"
               "  python -m experiments.evaluate --ckpt ckpt/nocot --data scienceqa --method no-cot "
               "--answer-format index\n"
               "  python -m experiments.evaluate --ckpt ckpt/ivtlr --data synthetic --limit 32 "
               "--save-selections out/sel",
    )
    p.add_argument("--ckpt", help="checkpoint folder (tools/convert_weights.py or the trainer); required unless "
                                  "--dry-run --config")
    p.add_argument("--data", default=None, choices=["m3cot", "scienceqa", "synthetic"],
                   help="dataset (required unless --dry-run)")
    p.add_argument("--data-source", default=None,
                   help="hub id, hub-layout parquet folder or save_to_disk folder (default: the dataset's hub id; "
                        "synthetic: generated in memory)")
    p.add_argument("--split", default="test", help="split name (default: test)")
    p.add_argument("--method", default="ivtlr", choices=list(METHODS), help="what to run (default: ivtlr)")
    p.add_argument("--n-latent", type=int, default=3,
                   help="latent steps for ivtlr / coconut / no-latent-text (default: 3, the release's last stage)")
    p.add_argument("--k", type=int, default=None,
                   help="image embeddings selected per latent step (default: the backbone's, as in the release: "
                        "Qwen2-VL and Qwen2.5-VL 32, Chameleon 64)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generation batch (default: 16)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of the split")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated tokens at most (default: 512 for cot, else 64)")
    p.add_argument("--max-cache-len", type=int, default=8192,
                   help="rows whose prompt + latent chunks + max_new_tokens exceed this are skipped and counted "
                        "(default: 8192)")
    p.add_argument("--position-mode", default=None, choices=["sequential", "mrope"],
                   help="positions of the final sequence (default: the checkpoint's recorded rule, else sequential, "
                        "the release's)")
    p.add_argument("--selection-order", default="position", choices=["position", "score"],
                   help="order of the selected image embeddings inside a latent chunk (default: position)")
    p.add_argument("--deepstack-latent", default="on", choices=["on", "off"],
                   help="Qwen3-VL: a selected image token re-fed by a latent step carries its DeepStack features, "
                        "added in the same decoder layers as in the prompt (on, default), or is fed as the bare "
                        "merged embedding (off); --ablate deepstack-bare runs off beside an intact run. Other "
                        "backbones have no DeepStack and ignore it")
    p.add_argument("--answer-format", default="auto", choices=list(ANSWER_FORMATS),
                   help="auto: letters, digits read as 0-based indices; letter or index: only that kind")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="parameter dtype (default: auto = bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--mesh", default="auto",
                   help="device mesh preset the model is sharded over (ivtlr_jax.sharding.PRESETS: cpu, gpu_1, gpu_8, "
                        "tpu_v4_8, tpu_v5e_8, tpu_v6e_8, ...; --mesh list prints them all with their TPU topology, "
                        "HBM and peak FLOP/s; default: auto = every local device)")
    dry = p.add_argument_group("dry run: generation memory per chip before renting the --mesh")
    dry.add_argument("--dry-run", action="store_true",
                     help="no evaluation and no weights read: compile generation for --mesh on abstract arrays and "
                          "print the per-chip memory (parameters, KV cache, temporaries) and whether it fits the "
                          "chip's HBM; JSON to --out (default eval/dry_run.json)")
    dry.add_argument("--config", help="with --dry-run: the model's shape from a training YAML (a file, or a name "
                                      "under experiments/configs: qwen2vl_7b_m3cot, tiny, ...): its model: section, "
                                      "or the tiny model of init: auto-tiny; instead of --ckpt's config")
    dry.add_argument("--compiler", choices=COMPILERS, default="auto",
                     help="what compiles the dry run: tpu = XLA:TPU on compile-only devices of the TPU preset's "
                          f"topology (needs libtpu: {TPU_EXTRA}); cpu = XLA:CPU on simulated CPU devices; auto "
                          "(default) = tpu for a TPU --mesh when libtpu is installed, else cpu")
    p.add_argument("--resize-mode", default="reference", choices=["reference", "smart"],
                   help="reference: every image 280x280 (release); smart: the Qwen processors' smart_resize")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="output folder (default: eval/<data>-<split>-<method>)")
    p.add_argument("--save-selections", default=None, metavar="DIR",
                   help="write, for the first --num-selections examples, the image with the patches chosen at "
                        "each latent step outlined (one colour per step) as PNG")
    p.add_argument("--num-selections", type=int, default=8, help="examples drawn by --save-selections (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ablate", default=None, metavar="LIST",
                   help="causal audit: a comma list of latent-zero, latent-noise, latent-shuffle, select-random, "
                        "select-bottom, image-blank, image-shuffle, deepstack-bare (Qwen3-VL: the latent steps "
                        "re-feed image tokens without their DeepStack features); each runs on the same batches as "
                        "the intact run and summary.json gains `ablations` and `mediation`, plus ablations.png")
    return p


def evaluate(args) -> dict:
    """Run the evaluation described by parsed args; returns the summary (also written to --out)."""
    cfg = EvalConfig.from_namespace(args)
    summary = evaluate_config(cfg)
    print(summary_line(summary, cfg.out_dir))
    return summary


def run_dry(args, compiler: str = "cpu") -> dict:
    """--dry-run: the model's config only (--config's model: section or --ckpt's config; no weights), the generation
    program compiled for --mesh (`compiler`: "tpu" or "cpu")."""
    from ivtlr_jax.sharding import compile_target

    cfg = EvalConfig.from_namespace(args)
    cfg.check()
    n, k, latent_text = method_settings(cfg)
    if args.config:
        from experiments.run_config import yaml_model_config

        model = yaml_model_config(args.config)
    else:
        from ivtlr_jax.convert.checkpoint import load_config

        model = load_config(cfg.ckpt)
    result = generation_dry_run(model, compile_target(cfg.mesh, compiler), cfg.dtype, cfg.batch_size,
                                max_new_tokens(cfg), n, k, latent_text)
    print(format_generation_dry_run(result))
    print(f"wrote {save_dry_run(result, cfg.out)}")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ivtlr_jax import sharding as sh

    if args.mesh == "list":
        print(sh.format_presets())
        return {}
    sh.get_preset(args.mesh)  # an unknown --mesh: one line naming the presets
    if args.config and not args.dry_run:
        raise ValueError("--config gives the model's shape to --dry-run only; evaluate a checkpoint with --ckpt")
    if args.dry_run:
        if not (args.config or args.ckpt):
            raise ValueError("--dry-run needs the model's shape: --config NAME (a training YAML's model: section, "
                             "e.g. qwen2vl_7b_m3cot) or --ckpt CKPT (only its config is read)")
        compiler = sh.resolve_compiler(args.compiler, args.mesh)
        if compiler == "cpu":
            sh.simulate_cpu_devices(args.mesh)  # CPU-only host: the preset's device count (before JAX starts)
        return run_dry(args, compiler)
    if not args.ckpt:
        raise ValueError("--ckpt is required: the checkpoint folder to evaluate (tools/convert_weights.py or the "
                         "trainer)")
    sh.apply_xla_flags(args.mesh)  # before JAX starts its backend
    return evaluate(args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")

"""Train IVT-LR: the multi-stage latent curriculum on Qwen2-VL, sharded over a device mesh.

With no arguments at all it runs the embedded default: a tiny random Qwen2-VL-architecture model
(converted through the same converter as a real checkpoint), the synthetic visual-reasoning set,
stages 0..3, evaluation after each stage on a held-out split, and a table of the results. It takes
a few minutes on 2 CPU cores.

Examples:
  python -m experiments.train
  python -m experiments.train --config experiments/configs/qwen2vl_7b_m3cot.yaml --init ckpt/qwen2vl-7b \\
      --out runs/m3cot --mesh tpu_v4_8
  python -m experiments.train --config tiny --data synthetic --stage=2 --mesh=tpu_v4_8
  python -m experiments.train --config qwen2vl_7b_m3cot --dry-run      # memory per chip, no weights
Every flag overrides the YAML key of the same name (dashes become underscores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from experiments.tiny_setup import AUTO_TINY, config_path, prepare_auto_tiny

HELP = {
    "init": "converted checkpoint to start from (tools/convert_weights.py --add-latent-tokens); "
            f"'{AUTO_TINY}' builds a tiny random model into RUN_DIR/init",
    "out": "RUN_DIR: checkpoints/, stage_ends/, metrics.jsonl, loss.png",
    "data": "dataset: m3cot | scienceqa | synthetic",
    "data_source": "hub id or local folder (parquet in the hub's layout or a save_to_disk folder); "
                   "synthetic without a source is generated in memory",
    "train_split": "split to train on", "eval_split": "held-out split for evaluation (embedded default)",
    "limit": "train on the first N rows only",
    "resume": "continue exactly from the latest checkpoint in RUN_DIR (state, data position, RNG)",
    "epochs_per_stage": "epochs per curriculum stage (reference: 4)",
    "max_latent_stage": "stages past this keep this many latent steps and drop all text steps (reference: 3)",
    "pad_latent_to_max": "past max_latent_stage drop every step and keep max_latent_stage latents",
    "latent_markers": "put <|start-latent|>/<|end-latent|> around the latents (Coconut style; off in reference)",
    "k": "image embeddings selected per latent step (reference 32; 0 = Coconut)",
    "latent_text": "feed the hidden state back with the image embeddings (off = 'without latent text')",
    "position_mode": "sequential (reference) or mrope (Qwen2-VL native 3-D positions for the prompt)",
    "selection_order": "order of the selected image embeddings in a step: position or score",
    "latent_grad": "stop (reference: no gradient through latent steps) or full",
    "finetune": "lora (adapters on q,k,v,o,gate,up,down) or full (the whole LLM); the vision tower is frozen",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale = alpha / r)", "lora_dropout": "LoRA dropout",
    "lr": "peak learning rate (AdamW)", "weight_decay": "AdamW weight decay", "beta1": "AdamW beta1",
    "beta2": "AdamW beta2", "clip": "gradient clipping by global norm", "warmup_steps": "linear warmup steps",
    "schedule": "after warmup: constant | cosine | linear", "batch_size": "global batch (rows per step)",
    "grad_accum": "micro-steps accumulated per optimiser update",
    "remat": "layer rematerialisation in the backward pass: full (least memory) | dots | none",
    "compute_dtype": "auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16",
    "max_length": "truncate steps so prompt + steps + answer fit this many tokens",
    "seed": "seed for data order, LoRA init and dropout",
    "max_steps": "stop (with a checkpoint) after this many steps in total",
    "mesh": "device mesh preset: cpu, gpu_1, gpu_8, tpu_v4_8, tpu_v4_32, tpu_v5e_8, auto",
    "log_every": "print a metrics line every N steps", "save_every": "checkpoint every N steps",
    "keep": "periodic checkpoints to keep", "peak_tflops": "peak TFLOP/s per device for MFU (default: by device kind)",
    "eval_limit": "evaluate on the first N held-out rows", "eval_batch_size": "evaluation batch size",
    "max_new_tokens": "generation length at evaluation", "num_workers": "image decoding threads",
    "stages": "stages to train (YAML list); use --stage or --stages on the command line",
}


def build_parser(field_types: dict) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file or a name under experiments/configs (tiny, qwen2vl_7b_m3cot, ...)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--stage", type=int, help="train stage N alone (epochs_per_stage epochs), starting from "
                       "--init or from stage N-1's checkpoint in RUN_DIR")
    group.add_argument("--stages", help="train stages A-B (e.g. 0-3); default: the whole curriculum")
    ap.add_argument("--dry-run", action="store_true", help="compile the train step for the config's model on the "
                    "mesh with abstract arrays (no weights) and print per-device memory, for LoRA and full")
    for name, typ in field_types.items():
        if name in ("stages",):
            continue
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(name))
        else:
            ap.add_argument(flag, type=typ, default=None, help=HELP.get(name))
    return ap


def _field_types() -> dict:
    from ivtlr_jax.config import TrainConfig

    out = {}
    for f in dataclasses.fields(TrainConfig):
        t = str(f.type)
        out[f.name] = bool if "bool" in t else int if t.startswith("int") else float if "float" in t else str
    return out


def load_train_config(args, field_types) -> tuple:
    """TrainConfig from YAML (if any) with every given flag on top; returns (config, yaml dict)."""
    import yaml

    from ivtlr_jax.config import TrainConfig

    values = {}
    if args.config:
        with open(config_path(args.config)) as f:
            values = yaml.safe_load(f) or {}
    unknown = sorted(set(values) - set(field_types) - {"model"})
    if unknown:
        raise SystemExit(f"--config: unknown keys {unknown}; valid keys are the flags of --help")
    yaml_values = dict(values)
    values.pop("model", None)
    for name in field_types:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if args.stage is not None:
        values["stages"] = [args.stage]
    elif args.stages:
        try:
            a, b = (int(x) for x in args.stages.split("-"))
        except ValueError:
            raise SystemExit(f"--stages {args.stages!r}: use A-B, e.g. --stages 0-3") from None
        values["stages"] = list(range(a, b + 1))
    try:
        return TrainConfig(**values), yaml_values
    except (TypeError, ValueError) as e:
        raise SystemExit(f"config error: {e}") from None


def simulate_devices_for_dry_run(preset: str) -> None:
    """On a CPU-only host, simulate the preset's device count (before JAX creates its backend)."""
    from ivtlr_jax.sharding import get_preset

    want = get_preset(preset).num_devices
    flags = os.environ.get("XLA_FLAGS", "")
    if want and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={want}".strip()


def run_dry(tcfg, yaml_values) -> list[dict]:
    from ivtlr_jax.config import model_config_from_dict
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.train.dry_run import dry_run, format_dry_run

    model = dict(yaml_values.get("model") or {}) if tcfg.init != AUTO_TINY else {}
    if not model:
        raise SystemExit("--dry-run needs the model's shape: a `model:` section in the YAML (see "
                         "experiments/configs/qwen2vl_7b_m3cot.yaml), not the auto-tiny default")
    cfg = model_config_from_dict(model)
    if cfg.latent_token_id is None:  # any id inside the vocabulary lays the batch out the same way
        cfg = dataclasses.replace(cfg, latent_token_id=cfg.vocab_size - 1)
    results = []
    for finetune in ("lora", "full"):
        t0 = time.time()
        res = dry_run(backbone_for(cfg), dataclasses.replace(tcfg, finetune=finetune))
        res["compile_s"] = time.time() - t0
        results.append(res)
    print(format_dry_run(results))
    out = os.path.join(tcfg.out, "dry_run.json")
    os.makedirs(tcfg.out, exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"written: {out}")
    return results


def main(argv=None) -> dict | list:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from experiments.embedded_default import run_embedded_default

        return run_embedded_default()
    field_types = _field_types()
    args = build_parser(field_types).parse_args(argv)
    tcfg, yaml_values = load_train_config(args, field_types)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.dry_run:
        simulate_devices_for_dry_run(tcfg.mesh)
        return run_dry(tcfg, yaml_values)
    from ivtlr_jax.train import TrainingStopped, train

    prepare_auto_tiny(tcfg, yaml_values.get("model"))
    try:
        summary = train(tcfg)
    except TrainingStopped as e:
        raise SystemExit(f"training stopped: {e}") from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()

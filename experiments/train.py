"""Train IVT-LR: the multi-stage latent curriculum on Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Chameleon, sharded over a mesh.

With no arguments at all it runs the embedded default: a tiny random Qwen2-VL-architecture model
(converted through the same converter as a real checkpoint), the synthetic visual-reasoning set,
stages 0..3, evaluation after each stage on a held-out split, and a table of the results. It takes
a few minutes on 2 CPU cores. `--backbone chameleon` (or `qwen2_5_vl`, `qwen3_vl`) alone does the same with a
tiny Chameleon (or Qwen2.5-VL, Qwen3-VL).

Examples:
  python -m experiments.train
  python -m experiments.train --backbone chameleon
  python -m experiments.train --backbone qwen2_5_vl
  python -m experiments.train --backbone qwen3_vl
  python -m experiments.train --config chameleon_7b_scienceqa --init ckpt/chameleon-7b --mesh tpu_v4_8
  python -m experiments.train --config experiments/configs/qwen2vl_7b_m3cot.yaml --init ckpt/qwen2vl-7b \\
      --out runs/m3cot --mesh tpu_v4_8
  python -m experiments.train --config tiny --data synthetic --stage=2 --mesh=tpu_v4_8
  python -m experiments.train --config qwen2vl_7b_m3cot --dry-run      # memory per chip, no weights
  python -m experiments.train --config qwen2vl_7b_m3cot --dry-run --mesh tpu_v5e_8 --finetune lora
  python -m experiments.train --mesh list                               # the mesh presets and their TPUs
  python -m experiments.launch_local --processes 2 --devices-per-process 2 -- --config tiny --data synthetic \
      --stage=2 --mesh tpu_v4_8 --out runs/two_hosts          # a 2-host pod layout, simulated on one machine
  python -m experiments.train --config qwen2vl_7b_m3cot --mesh tpu_v4_32 --init ckpt/qwen2vl-7b --out RUN_DIR \
      --coordinator 10.0.0.2:8476 --num-processes 4 --process-id 0      # on each host, with its own id
Every flag overrides the YAML key of the same name (dashes become underscores). After a preemption or a
crash, rerun the same command with --resume. An error is one line (--debug: with its traceback; process 0
also keeps it in RUN_DIR/train.log). Set JAX_COMPILATION_CACHE_DIR to skip compilation when restarting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading

from experiments.embedded_default import CONFIGS as EMBEDDED_CONFIGS
from experiments.run_config import dry_run_model_config
from experiments.tiny_setup import AUTO_TINY, build_auto_tiny_in_subprocess, config_path, prepare_auto_tiny
from ivtlr_jax.models import DEFAULT_MODEL_TYPE, with_small_models

HELP = {
    "init": "converted checkpoint to start from (tools/convert_weights.py --add-latent-tokens); "
            f"'{AUTO_TINY}' builds a tiny random model into RUN_DIR/init",
    "out": "RUN_DIR: checkpoints/, stage_ends/, metrics.jsonl, loss.png",
    "data": "dataset: m3cot | scienceqa | synthetic",
    "data_source": "hub id or local folder (parquet in the hub's layout or a save_to_disk folder); "
                   "synthetic without a source is generated in memory",
    "train_split": "split to train on", "eval_split": "held-out split for evaluation (embedded default)",
    "limit": "train on the first N rows only",
    "resume": "continue exactly from the latest readable checkpoint in RUN_DIR (state, data position, RNG); a "
              "damaged newer one is named and moved to RUN_DIR/unreadable/; a checkpoint of another stage or config "
              "is refused",
    "epochs_per_stage": "epochs per curriculum stage (reference: 4)",
    "max_latent_stage": "stages past this keep this many latent steps and drop all text steps (reference: 3)",
    "pad_latent_to_max": "past max_latent_stage drop every step and keep max_latent_stage latents",
    "latent_markers": "put <|start-latent|>/<|end-latent|> around the latents (Coconut style; off in reference)",
    "k": "image embeddings selected per latent step (default: the backbone's, as in the release: Qwen2-VL, "
         "Qwen2.5-VL and Qwen3-VL 32, Chameleon 64; 0 = Coconut)",
    "latent_text": "feed the hidden state back with the image embeddings (off = 'without latent text')",
    "position_mode": "sequential (reference) or mrope (the Qwen models' native 3-D positions for the prompt)",
    "selection_order": "order of the selected image embeddings in a step: position or score",
    "deepstack_latent": "Qwen3-VL: a re-fed image token carries its DeepStack features, added in the same decoder "
                        "layers as in the prompt (default); --no-deepstack-latent feeds the bare merged embedding",
    "latent_grad": "stop (reference: no gradient through latent steps) or full",
    "finetune": "lora (adapters on q,k,v,o,gate,up,down) or full (the whole LLM); the vision tower is frozen",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale = alpha / r)", "lora_dropout": "LoRA dropout",
    "lr": "peak learning rate (AdamW)", "weight_decay": "AdamW weight decay", "beta1": "AdamW beta1",
    "beta2": "AdamW beta2", "clip": "gradient clipping by global norm", "warmup_steps": "linear warmup steps",
    "schedule": "after warmup: constant | cosine | linear",
    "batch_size": "rows per optimiser update, over all processes and devices (the release: 64); each micro-step "
                  "feeds batch_size/grad_accum of them",
    "grad_accum": "micro-steps per optimiser update; the update is the mean token loss over all its rows, as one "
                  "step over batch_size rows would be",
    "remat": "layer rematerialisation in the backward pass: auto (by model size: dots up to 4B decoder "
             "parameters, dots_except_mlp above) | full (least memory) | dots_except_mlp (keep the q/k/v/o "
             "projections and the attention output, recompute the MLP) | dots (keep every projection) | none; "
             "--dry-run --compare-remat shows its memory against full",
    "attention": "attention kernel: auto (cudnn on CUDA GPUs in bfloat16, pallas on one TPU chip, xla elsewhere) "
                 "| xla | cudnn | pallas | dense (plain einsum, the reference); chunks after cached tokens "
                 "(latent steps, suffix, decoding) run dense over the valid cache slots",
    "compute_dtype": "auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16",
    "max_length": "truncate steps so prompt + steps + answer fit this many tokens",
    "seed": "seed for data order, LoRA init and dropout",
    "max_steps": "stop (with a checkpoint) after this many optimiser updates in total, counted from the start of "
                 "the curriculum",
    "mesh": "device mesh preset: cpu, gpu_1, gpu_8, tpu_v4_8, tpu_v4_32, tpu_v4_64, tpu_v5e_8, tpu_v5e_32, tpu_v5p_8, "
            "tpu_v6e_8, auto; --mesh list prints each with its devices, hosts, mesh axes and, for a TPU slice, its "
            "topology, HBM and peak FLOP/s per chip. GPU presets (and auto) add XLA flags unless XLA_FLAGS "
            "already names them: --xla_gpu_enable_latency_hiding_scheduler=true, "
            "--xla_gpu_enable_triton_gemm=false (cuBLAS GEMMs); gpu_8 also "
            "--xla_gpu_enable_highest_priority_async_stream=true and 128 MiB all-gather/reduce-scatter "
            "combine thresholds (ivtlr_jax.sharding.apply_xla_flags)",
    "log_every": "print a metrics line every N optimiser updates",
    "save_every": "checkpoint every N optimiser updates",
    "keep": "periodic checkpoints to keep", "peak_tflops": "peak TFLOP/s per device for MFU (default: by device kind)",
    "eval_limit": "evaluate on the first N held-out rows", "eval_batch_size": "evaluation batch size",
    "max_new_tokens": "generation length at evaluation", "num_workers": "image decoding threads",
    "stages": "stages to train (YAML list); use --stage or --stages on the command line",
}


def build_parser(field_types: dict) -> argparse.ArgumentParser:
    from ivtlr_jax.sharding import COMPILERS, TPU_EXTRA

    ap = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file or a name under experiments/configs (tiny, qwen2vl_7b_m3cot, ...)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--stage", type=int, help="train stage N alone (epochs_per_stage epochs), starting from "
                       "--init or from stage N-1's checkpoint in RUN_DIR")
    group.add_argument("--stages", help="train stages A-B (e.g. 0-3); default: the whole curriculum")
    ap.add_argument("--backbone", choices=with_small_models(),
                    help="alone: run that backbone's embedded default (a tiny random model trained on the synthetic "
                         "set through every stage, then evaluated); with a config whose init is auto-tiny: build "
                         "that backbone's tiny model")
    dry = ap.add_argument_group("dry run: memory and time per chip before renting the --mesh")
    dry.add_argument("--dry-run", action="store_true", help="compile the trainer's own micro-step (batch_size/"
                     "grad_accum rows) for the --mesh with abstract arrays (no weights) and print per-chip memory, "
                     "whether it fits the chip's HBM, and the model FLOPs and time per update, for LoRA and full (only "
                     "the one named by --finetune when it is given) "
                     "(JSON: RUN_DIR/dry_run.json); the model's shape comes from --init CKPT (its config), the "
                     "auto-tiny default, or the YAML's model: section")
    dry.add_argument("--compiler", choices=COMPILERS, default="auto",
                     help="what compiles the dry run: tpu = XLA:TPU on compile-only devices of the TPU preset's "
                          f"topology (the whole pod, from this one process; needs libtpu: {TPU_EXTRA}); cpu = "
                          "XLA:CPU on simulated CPU devices (other fusions and buffers, no Pallas kernels); auto "
                          "(default) = tpu for a TPU --mesh when libtpu is installed, else cpu")
    dry.add_argument("--compare-remat", action="store_true",
                     help="compile the step once more with remat full and report the extra temporary memory the "
                          "chosen --remat policy's saved activations take (doubles the compile time)")
    dry.add_argument("--cost-model", action="store_true",
                     help="also ask XLA:TPU's cost model for the update's time: it compiles a loop-free 2-layer slice "
                          "of the step (scans unrolled; minutes at 7B widths) and reports its estimate scaled to the "
                          "model's layers where the estimate is usable, else why not")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an error (otherwise one line; "
                    "process 0 also writes it to RUN_DIR/train.log), show library logs, and have every process "
                    "record the data rows of each micro-step in RUN_DIR/debug/rows.process_<i>.jsonl")
    multi = ap.add_argument_group(
        "multi-process runs (one process per host; try a pod layout on one machine with experiments.launch_local)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address for JAX's coordination "
                       "service; with --num-processes and --process-id this process joins a multi-process run. "
                       "Without the three, TPU pods and SLURM jobs are detected when the --mesh preset spans "
                       "several hosts")
    multi.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (one per host)")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1 (0 writes the "
                       "logs, metrics, plots and the summary; every process reads only its share of the rows)")
    multi.add_argument("--peer-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="a process whose peer sent no heartbeat for this long (killed, hung) exits with a "
                            "clear message instead of waiting on a collective forever (default 60)")
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
    from ivtlr_jax.train.config import TrainConfig

    out = {}
    for f in dataclasses.fields(TrainConfig):
        t = str(f.type)
        out[f.name] = bool if "bool" in t else int if t.startswith("int") else float if "float" in t else str
    return out


def load_train_config(args, field_types) -> tuple:
    """TrainConfig from YAML (if any) with every given flag on top; returns (config, yaml dict)."""
    import yaml

    from ivtlr_jax.train.config import TrainConfig

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
    try:  # every value coerced to its field's type (PyYAML reads `lr: 1e-3` as a string)
        return TrainConfig.from_dict(values), yaml_values
    except (TypeError, ValueError) as e:
        raise SystemExit(f"config error: {e}") from None


def run_dry(tcfg, yaml_values, backbone: str | None = None, compiler: str = "cpu", compare_remat: bool = False,
            cost_model: bool = False, finetunes: tuple[str, ...] = ("lora", "full")) -> list[dict]:
    """--dry-run: the train step compiled for the mesh (`compiler`: "tpu" or "cpu") for each of `finetunes`; the
    table and RUN_DIR/dry_run.json."""
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.sharding import compile_target
    from ivtlr_jax.train.dry_run import dry_run, format_dry_run

    cfg = dry_run_model_config(tcfg, yaml_values, backbone)
    if cfg.latent_token_id is None:  # any id inside the vocabulary lays the batch out the same way
        cfg = dataclasses.replace(cfg, latent_token_id=cfg.vocab_size - 1)
    if getattr(cfg, "image_vocab", None) == ():  # Chameleon without its vocabulary map: any ids size the gathers
        cfg = dataclasses.replace(cfg, image_vocab=tuple(range(4, 4 + cfg.vq.num_embeddings)))
    target = compile_target(tcfg.mesh, compiler)
    results = [dry_run(backbone_for(cfg), dataclasses.replace(tcfg, finetune=finetune), target,
                       compare_remat=compare_remat, cost_model=cost_model) for finetune in finetunes]
    print(format_dry_run(results))
    out = os.path.join(tcfg.out, "dry_run.json")
    os.makedirs(tcfg.out, exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"written: {out}")
    return results


EMBEDDED_DEFAULT_BACKBONES = tuple(EMBEDDED_CONFIGS)  # the registry's backbones with an embedded default


def embedded_default_backbone(argv: list[str]) -> str | None:
    """The backbone of the embedded default when argv asks for it (nothing, or only --backbone NAME)."""
    if not argv:
        return DEFAULT_MODEL_TYPE
    if len(argv) == 1 and argv[0].startswith("--backbone="):
        argv = ["--backbone", argv[0].split("=", 1)[1]]
    if len(argv) == 2 and argv[0] == "--backbone":
        if argv[1] not in EMBEDDED_DEFAULT_BACKBONES:
            raise SystemExit(f"error: --backbone {argv[1]!r} is not valid; use one of "
                             f"{', '.join(EMBEDDED_DEFAULT_BACKBONES)}")
        return argv[1]
    return None


def main(argv=None) -> dict | list:
    argv = sys.argv[1:] if argv is None else argv
    backbone = embedded_default_backbone(argv)
    if backbone is not None:
        from experiments.embedded_default import run_embedded_default

        return run_embedded_default(backbone=backbone)
    field_types = _field_types()
    args = build_parser(field_types).parse_args(argv)
    if args.mesh == "list":
        from ivtlr_jax.sharding import format_presets

        print(format_presets())
        return {}
    tcfg, yaml_values = load_train_config(args, field_types)
    setup_logging(args.debug)
    if not args.debug:  # errors raised in library threads (e.g. after a failed checkpoint write) go to the log file
        sys.excepthook = lambda *exc: BACKGROUND.error("uncaught error in a background thread", exc_info=exc)
        threading.excepthook = lambda a: BACKGROUND.error(
            "uncaught error in thread %s", a.thread.name if a.thread else "?",
            exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
        sys.unraisablehook = lambda u: BACKGROUND.error(
            "ignored error%s", f" in {u.object!r}" if u.object is not None else "",
            exc_info=(u.exc_type, u.exc_value, u.exc_traceback))
    try:
        if args.dry_run:
            from ivtlr_jax import sharding as sh

            compiler = sh.resolve_compiler(args.compiler, tcfg.mesh)
            if compiler == "cpu":
                sh.simulate_cpu_devices(tcfg.mesh)  # CPU-only host: the preset's device count (before JAX starts)
            finetunes = (args.finetune,) if args.finetune else ("lora", "full")  # a 7B compile: minutes each
            return run_dry(tcfg, yaml_values, args.backbone, compiler, args.compare_remat, args.cost_model, finetunes)
        return run_training(args, tcfg, yaml_values)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        if args.debug:
            raise
        logging.getLogger("ivtlr_jax.train").debug("traceback", exc_info=True)  # into RUN_DIR/train.log
        message = one_line_error(e, tcfg.out)
        if _in_multi_process_run():  # JAX's exit would wait for the other processes at its shutdown barrier
            print(message, file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        raise SystemExit(message) from None


def _in_multi_process_run() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


BACKGROUND = logging.getLogger("background_threads")


class _ConsoleFilter(logging.Filter):
    """The console shows this project's logs; other libraries' warnings only as their first line, absl's none
    (everything goes to RUN_DIR/train.log in full)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("ivtlr_jax") or record.name == "__main__":
            return True
        if record.name.startswith("absl") or record.name == BACKGROUND.name or record.levelno < logging.WARNING:
            return False
        record.msg, record.args = record.getMessage().splitlines()[0] if record.getMessage() else "", None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def setup_logging(debug: bool = False) -> None:
    """Console logging (quiet libraries unless --debug); `log_to_file` adds RUN_DIR/train.log."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if any(getattr(h, "_ivtlr_console", False) for h in root.handlers):
        return
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not debug:
        console.addFilter(_ConsoleFilter())
    console._ivtlr_console = True
    root.addHandler(console)


def log_to_file(out: str) -> str:
    """Every log record (libraries included, tracebacks of errors) also into RUN_DIR/train.log."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "train.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return path


def one_line_error(e: BaseException, out: str | None = None) -> str:
    """An error as one clear line (the exception's own message; its type only when it is not one of ours)."""
    from ivtlr_jax.train import CheckpointWriteError, TrainingStopped

    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, TrainingStopped):
        return f"training stopped: {text}"
    if isinstance(e, (ValueError, CheckpointWriteError, FileNotFoundError)):
        return f"error: {text}"
    log = os.path.join(out, "train.log") if out and os.path.exists(os.path.join(out, "train.log")) else None
    where = f"; the traceback is in {log}" if log else ""
    return f"error: {type(e).__name__}: {text} (rerun with --debug for the traceback{where})"


def run_training(args, tcfg, yaml_values) -> dict:
    """Plan the start, join the processes of a multi-process run, build the model if asked, train."""
    import jax

    from ivtlr_jax import sharding as sh
    from ivtlr_jax.train import Trainer, plan_start
    from ivtlr_jax.train.peers import PeerWatchdog, barrier
    from ivtlr_jax.train.planning import resume_hint

    plan = plan_start(tcfg)  # from RUN_DIR alone: a refusal is the first and only line
    if plan.notice and not args.process_id:
        print(plan.notice, file=sys.stderr, flush=True)
    if plan.meta is not None and tcfg.init == AUTO_TINY:
        tcfg.init = None  # continue with the model the run recorded
    model = dict(yaml_values.get("model") or {})
    if args.backbone:
        model["backbone"] = args.backbone
    build_error, built_before_join = None, False
    if tcfg.init == AUTO_TINY and sh.joins_several_processes(tcfg.mesh, args.num_processes):
        # Built before joining, in a child process (JAX here must stay unstarted until the join): the peers
        # wait in jax.distributed.initialize for process 0, never on a collective. Without a process id (an
        # auto-detected cluster) every process builds; the folder is renamed into place, so one wins.
        if not args.process_id:
            try:
                build_auto_tiny_in_subprocess(tcfg, model)
            except Exception as e:  # raised after joining, so that the peers hear of it and stop
                build_error = e
        tcfg.init, built_before_join = os.path.join(tcfg.out, "init"), True
    sh.apply_xla_flags(tcfg.mesh)  # before JAX starts its backend
    sh.maybe_initialize_distributed(tcfg.mesh, coordinator_address=args.coordinator,
                                    num_processes=args.num_processes, process_id=args.process_id,
                                    heartbeat_timeout_s=max(100, int(2 * args.peer_timeout)))
    pid, nproc = jax.process_index(), jax.process_count()
    if pid == 0:
        log_to_file(tcfg.out)
    watchdog = None
    if nproc > 1:
        watchdog = PeerWatchdog(args.peer_timeout, resume_hint=lambda: resume_hint(tcfg.out)).start()
    try:
        if build_error is not None:
            raise build_error
        prepare_auto_tiny(tcfg, model)  # one process: built here, after the (skipped) join
        if nproc > 1:
            barrier("ivtlr_jax/prepare_init")  # every process is past its start (the model is built)
            if built_before_join and not os.path.isdir(tcfg.init):
                raise FileNotFoundError(f"process {pid}: --init {tcfg.init} not found (process 0 built it there; "
                                        "RUN_DIR must be on a filesystem every process sees)")
        summary = Trainer(tcfg, plan=plan, watchdog=watchdog, peer_timeout_s=args.peer_timeout,
                          trace_rows=args.debug).run()
    except BaseException as e:
        if watchdog is not None:
            watchdog.stop(failed=" ".join(str(e).split())[:300] or type(e).__name__)
        raise
    if pid == 0:
        print(json.dumps(summary, indent=2, default=str), flush=True)
    return summary


if __name__ == "__main__":
    main()

"""Run-folder planning: where a run starts (resume, a finished stage, or --init), decided from RUN_DIR alone.

Only the checkpoint folders' names and JSON metas are read (no JAX, no orbax), so a refusal is one clear line
before the run starts JAX.
"""

from __future__ import annotations

import dataclasses
import os

from ivtlr_jax.convert.layout import PERIODIC_DIR, STAGE_DIR, complete_steps
from ivtlr_jax.train.checkpoints import UnreadableCheckpoint, read_meta
from ivtlr_jax.train.config import TrainConfig

# Config fields that decide the training trajectory: a resumed run must have the values of the run it continues.
TRAJECTORY_FIELDS = ("data", "train_split", "limit", "epochs_per_stage", "max_latent_stage", "pad_latent_to_max",
                     "latent_markers", "k", "latent_text", "position_mode", "selection_order", "latent_grad",
                     "deepstack_latent",
                     "finetune", "lora_r", "lora_alpha", "lora_dropout", "lr", "weight_decay", "beta1", "beta2",
                     "clip", "warmup_steps", "schedule", "batch_size", "grad_accum", "compute_dtype", "max_length",
                     "seed")


@dataclasses.dataclass
class StartPlan:
    """Where a run starts, decided from RUN_DIR alone (no JAX, no orbax)."""

    kind: str  # "resume" | "stage_end" | "init"
    at: int | None = None  # resume: the checkpoint's step; stage_end: the finished stage
    meta: dict | None = None  # resume / stage_end: that checkpoint's meta
    step: int = 0  # the train step the run starts from
    candidates: list = dataclasses.field(default_factory=list)  # resume: (step, meta), newest first
    unreadable: list = dataclasses.field(default_factory=list)  # resume: (step, reason) of skipped ones
    notice: str | None = None  # a line to say before anything else


def requested_stages(tcfg: TrainConfig) -> list[int]:
    return list(tcfg.stages) if tcfg.stages is not None else list(range(tcfg.max_latent_stage + 1))


def _stage_where(meta: dict) -> str:
    return f"at the start of stage {meta['stage']}" if meta.get("iterator") is None else f"in stage {meta['stage']}"


def check_resumable(tcfg: TrainConfig, step: int, meta: dict) -> None:
    """Refuse (ValueError) a checkpoint whose stage or config differs from the run that would continue it."""
    stages = requested_stages(tcfg)
    where = os.path.join(tcfg.out, PERIODIC_DIR, str(step))
    stage = int(meta["stage"])
    if stage not in stages:
        span = f"stage {stages[0]}" if len(stages) == 1 else f"stages {stages[0]}-{stages[-1]}"
        if stage > stages[-1]:
            raise ValueError(f"--resume: the latest checkpoint ({where}) is {_stage_where(meta)}, past the {span} "
                             f"this run trains; nothing is left to do (continue with --stage={stage} --resume)")
        raise ValueError(f"--resume: the latest checkpoint ({where}) is {_stage_where(meta)}, but this run trains "
                         f"{span}; finish stage {stage} first (--stages {stage}-{stages[-1]} --resume), or start "
                         f"stage {stages[0]} in a new --out")
    recorded = meta.get("train_config") or {}
    now = tcfg.to_dict()
    diffs = [f"{k} {recorded[k]!r} (checkpoint) vs {now[k]!r} (now)" for k in TRAJECTORY_FIELDS
             if k in recorded and k in now and recorded[k] != now[k]]
    init = tcfg.init
    if init and os.path.isdir(init) and meta.get("init") and os.path.abspath(init) != meta["init"]:
        diffs.append(f"init {meta['init']!r} (checkpoint) vs {os.path.abspath(init)!r} (now)")
    if diffs:
        raise ValueError(f"--resume: {where} was written by a run with another config: {'; '.join(diffs)}; "
                         "pass the same values to continue it, or use a new --out")


def plan_start(tcfg: TrainConfig) -> StartPlan:
    """Decide where the run starts from what RUN_DIR holds; ValueError (one clear line) when it cannot.

    --resume: the newest checkpoint whose meta reads (unreadable ones are listed and skipped), checked
    against this run's stages and config. Otherwise stage N > 0 starts from RUN_DIR's finished stage
    N-1, or from --init with a notice. A fresh start never writes into a RUN_DIR holding later
    checkpoints of another run, so checkpoint steps stay monotonic within a RUN_DIR.
    """
    out = tcfg.out
    stages = requested_stages(tcfg)
    first = stages[0]
    periodic = complete_steps(out, PERIODIC_DIR)
    latest = periodic[-1] if periodic else None
    if tcfg.resume:
        if not periodic:
            raise ValueError(f"--resume: no checkpoint in {os.path.join(out, PERIODIC_DIR)}; run without --resume")
        plan = StartPlan("resume")
        for step in reversed(periodic):
            try:
                plan.candidates.append((step, read_meta(os.path.join(out, PERIODIC_DIR, str(step)))))
            except UnreadableCheckpoint as e:
                plan.unreadable.append((step, str(e)))
        if not plan.candidates:
            raise ValueError(f"--resume: no readable checkpoint in {os.path.join(out, PERIODIC_DIR)}: "
                             + "; ".join(r for _, r in plan.unreadable))
        plan.at, plan.meta = plan.candidates[0]
        plan.step = int(plan.meta.get("step", plan.at))
        check_resumable(tcfg, plan.at, plan.meta)
    elif first > 0 and (first - 1) in complete_steps(out, STAGE_DIR):
        folder = os.path.join(out, STAGE_DIR, str(first - 1))
        try:
            meta = read_meta(folder)
        except UnreadableCheckpoint as e:
            raise ValueError(f"--stage={first} starts from the finished stage {first - 1}, which is unreadable "
                             f"({e}); give --init CKPT_DIR with a new --out") from None
        plan = StartPlan("stage_end", first - 1, meta, step=int(meta.get("step", 0)))
        if latest is not None and "step" in meta and latest > plan.step:
            raise ValueError(
                f"{os.path.join(out, PERIODIC_DIR)} already holds step {latest}, past the end of stage {first - 1} "
                f"(step {plan.step}): starting stage {first} again would write checkpoints out of order; continue "
                "that run with --resume, or use a new --out")
    else:
        if tcfg.init is None:
            if first > 0:
                raise ValueError(f"--stage={first} needs a starting point: --init CKPT_DIR, or a finished stage "
                                 f"{first - 1} in {os.path.join(out, STAGE_DIR)} (none found)")
            raise ValueError("no --init CKPT_DIR given: convert a model with tools/convert_weights.py "
                             "--add-latent-tokens")
        plan = StartPlan("init")
        if latest is not None:
            try:
                held = f" ({_stage_where(read_meta(os.path.join(out, PERIODIC_DIR, str(latest))))})"
            except UnreadableCheckpoint:
                held = ""
            unfinished = f" and no finished stage {first - 1}" if first > 0 else ""
            raise ValueError(
                f"{os.path.join(out, PERIODIC_DIR)} already holds checkpoints up to step {latest}{held}{unfinished}; "
                "this run would start again from --init at step 0 and number its checkpoints from 0. Continue "
                "that run with --resume, or use a new --out")
        if first > 0:
            plan.notice = (f"note: {out} has no finished stage {first - 1} ({STAGE_DIR}/{first - 1}); stage {first} "
                           f"starts from --init {tcfg.init} at step 0, without the training of stages 0-{first - 1}")
    if tcfg.max_steps is not None and plan.step >= tcfg.max_steps:
        src = {"resume": f"checkpoint step {plan.at}", "stage_end": f"the end of stage {plan.at}"}.get(plan.kind)
        raise ValueError(f"--max-steps {tcfg.max_steps}: this run starts at step {plan.step} ({src}), so nothing is "
                         f"left to train; --max-steps counts steps from the start of the curriculum, e.g. "
                         f"--max-steps {plan.step + tcfg.max_steps} for {tcfg.max_steps} more")
    return plan


def resume_hint(out: str) -> str:
    steps = complete_steps(out, PERIODIC_DIR)
    if not steps:
        return f"no checkpoint is complete yet in {os.path.join(out, PERIODIC_DIR)}"
    return (f"restart every process with --resume: it continues from the last complete checkpoint, step {steps[-1]} "
            f"in {os.path.join(out, PERIODIC_DIR)}")

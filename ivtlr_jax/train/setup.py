"""A run is set up, then looped: `setup_run` joins the processes, builds the mesh, reads the base checkpoint's config,
encodes the data, builds the optimiser and the checkpoints, and makes the state on the mesh (restored, or from
--init); `loop.Trainer` only loops over what it returns."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.convert.checkpoint import load_config
from ivtlr_jax.convert.layout import PERIODIC_DIR
from ivtlr_jax.latent import LatentConfig
from ivtlr_jax.models import backbone_for
from ivtlr_jax.models.base import Backbone
from ivtlr_jax.train import peers
from ivtlr_jax.train.checkpoints import RunCheckpoints, UnreadableCheckpoint
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.planning import StartPlan, check_resumable, plan_start, requested_stages
from ivtlr_jax.train.state import StateLayout, create_train_state
from ivtlr_jax.train.step import TrainState, compute_dtype, make_optimizer, micro_batch_size

logger = logging.getLogger("ivtlr_jax.train")


@dataclasses.dataclass
class RunData:
    """The training rows, encoded once, and how this process draws its rows of every micro-step from them."""

    tcfg: TrainConfig
    model_config: Any  # the base checkpoint's (its latent token ids)
    split: Any  # the encoded rows
    tokenizer: Any
    image_options: Any
    curriculum: Any  # data.CurriculumOptions
    rows_per_process: int  # of one micro-step

    def iterator(self, stage: int):
        """This process's BatchIterator over the epochs of `stage` (its rows of every global micro-batch)."""
        from ivtlr_jax.data import BatchIterator

        tcfg, cfg = self.tcfg, self.model_config
        return BatchIterator(self.split, batch_size=self.rows_per_process, steps_multiple=tcfg.grad_accum,
                             latent_id=cfg.latent_token_id if cfg.latent_token_id is not None else -1,
                             pad_id=self.tokenizer.pad_token_id, curriculum=self.curriculum, seed=tcfg.seed,
                             num_epochs=(stage + 1) * tcfg.epochs_per_stage,
                             start_epoch=stage * tcfg.epochs_per_stage, process_index=jax.process_index(),
                             process_count=jax.process_count(), num_workers=tcfg.num_workers,
                             start_latent_id=cfg.start_latent_token_id, end_latent_id=cfg.end_latent_token_id,
                             image_options=self.image_options)


@dataclasses.dataclass
class RunStart:
    """Where the state came from: --init, a finished stage or a resumed checkpoint (the one actually read)."""

    kind: str  # "init" | "stage_end" | "resume"
    at: int | None  # the stage or the checkpoint's step
    meta: dict | None = None  # that checkpoint's meta


@dataclasses.dataclass
class RunSetup:
    """Everything a run needs before its first step."""

    tcfg: TrainConfig
    mesh: jax.sharding.Mesh
    stages: list[int]
    init: str  # the base checkpoint folder
    bb: Backbone
    lcfg: LatentConfig
    data: RunData
    tx: Any
    schedule: Any
    dtype: Any
    unroll: bool  # unrolled loops in the step (see `unrolled_loops`)
    micro_batch: int  # rows of one micro-step over all processes
    steps_per_epoch: int  # optimiser updates
    checkpoints: RunCheckpoints
    start: RunStart
    state: TrainState
    frozen: Any
    layout: StateLayout
    state_report: dict


def unrolled_loops(mesh) -> bool:
    """Whether a step on `mesh` needs every loop unrolled: XLA:CPU with several processes, whose gloo collectives
    inside a rolled loop can interleave across processes (see `layers.loop_scan`)."""
    return jax.process_count() > 1 and mesh.devices.flat[0].platform == "cpu"


def base_checkpoint(tcfg: TrainConfig, plan: StartPlan) -> str:
    """The checkpoint folder the run's frozen params come from: --init, or the one a checkpoint recorded."""
    init = tcfg.init
    if plan.meta is not None and (init is None or not os.path.isdir(init)):
        init = plan.meta.get("init") or init
    if init is None or not os.path.isdir(init):
        raise ValueError(f"--init {init!r} is not a checkpoint folder")
    return init


def load_data(tcfg: TrainConfig, init: str, bb: Backbone, micro_batch: int) -> RunData:
    """The training split encoded with the base checkpoint's tokenizer and the backbone's prompt and images."""
    from transformers import AutoTokenizer

    from ivtlr_jax.data import CurriculumOptions, encode_split, load_split

    dataset = load_split(tcfg.data, tcfg.train_split, source=tcfg.data_source)
    if tcfg.limit:
        dataset = dataset.select(range(min(tcfg.limit, len(dataset))))
    tokenizer = AutoTokenizer.from_pretrained(init)
    image_options = bb.image_options()
    split = encode_split(dataset, tokenizer, image_options, prompt=bb.prompt, max_length=tcfg.max_length)
    curriculum = CurriculumOptions(max_latent_stage=tcfg.max_latent_stage, epochs_per_stage=tcfg.epochs_per_stage,
                                   pad_latent_to_max=tcfg.pad_latent_to_max, latent_markers=tcfg.latent_markers)
    return RunData(tcfg, bb.config, split, tokenizer, image_options, curriculum,
                   micro_batch // jax.process_count())


def restore_newest_readable(plan: StartPlan, ckpts: RunCheckpoints, tcfg: TrainConfig, start: RunStart, like):
    """The newest checkpoint of `plan` that reads on every process (recorded in `start`); damaged newer ones are
    named and set aside."""
    skipped = list(plan.unreadable)
    for i, (step, meta) in enumerate(plan.candidates):
        if i:
            check_resumable(tcfg, step, meta)
        error, state = None, None
        try:
            state, meta = ckpts.restore(step, like)
        except UnreadableCheckpoint as e:
            error = str(e)
        if not peers.all_agree(f"restore/{step}", error is None):
            skipped.append((step, error or "unreadable on another process"))
            continue
        for bad, why in sorted(skipped, reverse=True):
            if bad > step:
                dst = ckpts.set_aside(bad)
                logger.warning("checkpoint step %d is unreadable (%s); moved it to %s; resuming from step %d",
                               bad, why, dst, step)
        start.at, start.meta = step, meta
        return state
    raise ValueError(f"--resume: no readable checkpoint in {os.path.join(tcfg.out, PERIODIC_DIR)}: "
                     + "; ".join(f"step {s}: {why}" for s, why in skipped))


def state_source(plan: StartPlan, ckpts: RunCheckpoints, tcfg: TrainConfig):
    """(RunStart, restore_state or None): how `create_train_state` gets the state of this start."""
    start = RunStart(plan.kind, plan.at)
    if plan.kind == "resume":
        return start, lambda like: restore_newest_readable(plan, ckpts, tcfg, start, like)
    if plan.kind == "stage_end":
        def restore(like):
            state, start.meta = ckpts.restore(plan.at, like, stage=True)
            return state

        return start, restore
    return start, None


def setup_run(tcfg: TrainConfig, plan: StartPlan | None = None) -> RunSetup:
    """Set a run up: processes, mesh, start plan (`plan_start` when not given), model, data, optimiser, checkpoints
    and the state on the mesh. Refusals (a micro-step that does not split, no starting point, no latent token)
    come before the data is read."""
    sh.maybe_initialize_distributed(tcfg.mesh)
    mesh = sh.make_mesh(tcfg.mesh)
    data_parallel = int(np.prod([mesh.shape[a] for a in sh.BATCH_AXES if a in mesh.shape]))
    micro_batch = micro_batch_size(tcfg, jax.process_count(), data_parallel)
    stages = requested_stages(tcfg)
    if plan is None:
        plan = plan_start(tcfg)
        if plan.notice:
            logger.warning(plan.notice)
    init = base_checkpoint(tcfg, plan)
    bb = backbone_for(load_config(init))
    if bb.config.latent_token_id is None and max(stages) > 0:
        raise ValueError(f"--init {init!r} has no <|latent|> token; convert it with --add-latent-tokens")
    data = load_data(tcfg, init, bb, micro_batch)
    steps_per_epoch = math.ceil(len(data.split) / tcfg.batch_size)
    tx, schedule = make_optimizer(tcfg, len(stages) * tcfg.epochs_per_stage * steps_per_epoch)
    os.makedirs(tcfg.out, exist_ok=True)
    ckpts = RunCheckpoints(tcfg.out, keep=tcfg.keep)
    start, restore = state_source(plan, ckpts, tcfg)
    dtype = compute_dtype(tcfg)
    state, frozen, report, layout = create_train_state(bb, tcfg, mesh, tx, dtype, init, restore_state=restore)
    return RunSetup(tcfg, mesh, stages, init, bb, tcfg.latent(bb.default_k), data, tx, schedule, dtype,
                    unrolled_loops(mesh), micro_batch, steps_per_epoch, ckpts, start, state, frozen, layout, report)

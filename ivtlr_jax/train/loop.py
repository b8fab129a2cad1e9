"""The multi-stage curriculum trainer: data, sharded steps, logging, checkpoints, signals, resume."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.config import TrainConfig
from ivtlr_jax.latent import LatentBatch, make_latent_batch
from ivtlr_jax.models import backbone_for
from ivtlr_jax.train.checkpoints import RunCheckpoints
from ivtlr_jax.train.state import create_train_state
from ivtlr_jax.train.step import compute_dtype, make_optimizer, make_train_step, model_flops

logger = logging.getLogger("ivtlr_jax.train")

PEAK_TFLOPS = {"tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6": 918.0,
               "h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0}


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def peak_flops(tcfg: TrainConfig) -> float | None:
    if tcfg.peak_tflops:
        return tcfg.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


def resolve_start(tcfg: TrainConfig, ckpts: RunCheckpoints, first_stage: int) -> tuple[str, int | None]:
    """Where the first stage starts: ('resume', step) | ('stage_end', stage) | ('init', None)."""
    if tcfg.resume:
        step = ckpts.latest_step()
        if step is None:
            where = os.path.join(tcfg.out, "checkpoints")
            raise ValueError(f"--resume: no checkpoint in {where}; run without --resume")
        return "resume", step
    if first_stage > 0 and (first_stage - 1) in ckpts.finished_stages():
        return "stage_end", first_stage - 1
    if tcfg.init is None:
        if first_stage > 0:
            raise ValueError(
                f"--stage={first_stage} needs a starting point: --init CKPT_DIR, or a finished stage "
                f"{first_stage - 1} in {os.path.join(tcfg.out, 'stage_ends')} (none found)"
            )
        raise ValueError("no --init CKPT_DIR given: convert a model with tools/convert_weights.py --add-latent-tokens")
    return "init", None


class Trainer:
    """Holds the mesh, params, optimiser and data of one run; `run()` trains the requested stages."""

    def __init__(self, tcfg: TrainConfig):
        from transformers import AutoTokenizer

        from ivtlr_jax.convert.checkpoint import load_config
        from ivtlr_jax.data import CurriculumOptions, ImageOptions, encode_split, load_split

        self.tcfg = tcfg
        sh.maybe_initialize_distributed(tcfg.mesh)
        self.mesh = sh.make_mesh(tcfg.mesh)
        self.nproc, self.pid = jax.process_count(), jax.process_index()
        if tcfg.batch_size % self.nproc:
            raise ValueError(f"batch_size={tcfg.batch_size} must divide over {self.nproc} hosts")
        os.makedirs(tcfg.out, exist_ok=True)
        self.ckpts = RunCheckpoints(tcfg.out, keep=tcfg.keep)
        self.stages = list(tcfg.stages) if tcfg.stages is not None else list(range(tcfg.max_latent_stage + 1))
        self.start_kind, self.start_at = resolve_start(tcfg, self.ckpts, self.stages[0])
        init = tcfg.init
        if self.start_kind != "init" and init is None:
            init = self._recorded_init()
        if init is None or not os.path.isdir(init):
            raise ValueError(f"--init {init!r} is not a checkpoint folder")
        self.init = init
        self.cfg = load_config(init)
        self.bb = backbone_for(self.cfg)
        if self.cfg.latent_token_id is None and max(self.stages) > 0:
            raise ValueError(f"--init {init!r} has no <|latent|> token; convert it with --add-latent-tokens")
        self.lcfg = tcfg.latent()
        self.tokenizer = AutoTokenizer.from_pretrained(init)
        dataset = load_split(tcfg.data, tcfg.train_split, source=tcfg.data_source)
        if tcfg.limit:
            dataset = dataset.select(range(min(tcfg.limit, len(dataset))))
        self.image_options = ImageOptions(**self.bb.image_options())
        self.split = encode_split(dataset, self.tokenizer, self.image_options, prompt=self.bb.prompt,
                                  max_length=tcfg.max_length)
        self.curriculum = CurriculumOptions(max_latent_stage=tcfg.max_latent_stage,
                                            epochs_per_stage=tcfg.epochs_per_stage,
                                            pad_latent_to_max=tcfg.pad_latent_to_max,
                                            latent_markers=tcfg.latent_markers)
        self.dtype = compute_dtype(tcfg)
        self.steps_per_epoch = math.ceil(len(self.split) / tcfg.batch_size)
        total = len(self.stages) * tcfg.epochs_per_stage * self.steps_per_epoch // tcfg.grad_accum
        self.tx, self.schedule = make_optimizer(tcfg, total)
        self.resume_meta = None
        restore = None
        if self.start_kind in ("resume", "stage_end"):
            def restore(like):
                state, self.resume_meta = self.ckpts.restore(self.start_at, like, stage=self.start_kind == "stage_end")
                return state
        self.state, self.frozen, self.state_report, self.layout = create_train_state(
            self.bb, tcfg, self.mesh, self.tx, self.dtype, init, restore_state=restore)
        self.state_sh, self.frozen_sh = self.layout.state_shardings, self.layout.frozen_shardings
        self._step = None
        self._stop_signal = None
        self.history: list[dict] = []
        self.metrics_path = os.path.join(tcfg.out, "metrics.jsonl")

    # ------------------------------------------------------------------ setup
    def _recorded_init(self) -> str | None:
        meta_src = None
        if self.start_kind == "resume":
            meta_src = os.path.join(self.tcfg.out, "checkpoints", str(self.start_at), "meta", "metadata")
        elif self.start_kind == "stage_end":
            meta_src = os.path.join(self.tcfg.out, "stage_ends", str(self.start_at), "meta", "metadata")
        if meta_src and os.path.exists(meta_src):
            with open(meta_src) as f:
                return json.load(f).get("init")
        return None

    def step_fn(self):
        """The jitted train step (one compilation per batch shape and n)."""
        if self._step is None:
            fn = make_train_step(self.bb, self.lcfg, self.tcfg, self.tx, self.schedule, self.dtype)
            self._step = jax.jit(fn, in_shardings=(self.state_sh, self.frozen_sh, None),
                                 out_shardings=(self.state_sh, sh.replicated(self.mesh)), donate_argnums=(0,))
        return self._step

    def host_batch(self, collated: dict) -> LatentBatch:
        """A collated numpy batch -> the checked LatentBatch (this host's rows)."""
        return make_latent_batch(self.bb, self.lcfg, collated["input_ids"], collated["attention_mask"],
                                 collated["labels"], collated["pixel_values"], collated.get("image_grid_thw"))

    def device_batch(self, collated: dict):
        hb = self.host_batch(collated)
        return hb, sh.host_batch_to_global(self.mesh, hb)

    # ------------------------------------------------------------------ signals
    def _install_signals(self):
        def handler(signum, _frame):
            self._stop_signal = signum
            logger.warning("signal %d: saving a checkpoint after this step, then exiting", signum)

        self._old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _restore_signals(self):
        for s, h in getattr(self, "_old", {}).items():
            signal.signal(s, h)

    # ------------------------------------------------------------------ run
    def _meta(self, stage: int, iterator) -> dict:
        return {"stage": stage, "iterator": iterator.state_dict() if iterator is not None else None,
                "init": os.path.abspath(self.init), "finetune": self.tcfg.finetune,
                "lora_r": self.tcfg.lora_r, "lora_alpha": self.tcfg.lora_alpha,
                "train_config": self.tcfg.to_dict()}

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.pid == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if getattr(self, "_tb", None) is not None:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    if record.get(k) is not None:
                        self._tb.add_scalar(f"train/{k}", record[k], record["step"])

    def _open_tensorboard(self):
        self._tb = None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
        try:
            self._tb = SummaryWriter(os.path.join(self.tcfg.out, "tensorboard"))
        except Exception:
            self._tb = None

    def run(self) -> dict:
        """Train the stages; returns {"stages": {s: {...}}, "stopped": reason or None, "step": n}."""
        from tqdm.auto import tqdm

        from ivtlr_jax.data import BatchIterator

        tcfg = self.tcfg
        resume_meta = self.resume_meta
        if resume_meta is not None:
            logger.info("restored %s %s (step %d)", self.start_kind, self.start_at, int(self.state.step))
        self._log({"event": "state", "step": int(self.state.step), "finetune": tcfg.finetune,
                   "mesh": sh.describe(self.mesh), **self.state_report})
        stages = self.stages
        if self.start_kind == "resume":
            stages = [s for s in stages if s >= resume_meta["stage"]]
        self._open_tensorboard()
        self._install_signals()
        peak = peak_flops(tcfg)
        ndev = self.mesh.devices.size
        summary = {"stages": {}, "stopped": None}
        last_saved = int(self.state.step)
        try:
            for stage in stages:
                it = BatchIterator(self.split, batch_size=tcfg.batch_size // self.nproc,
                                   latent_id=self.cfg.latent_token_id if self.cfg.latent_token_id is not None else -1,
                                   pad_id=self.tokenizer.pad_token_id, curriculum=self.curriculum, seed=tcfg.seed,
                                   num_epochs=(stage + 1) * tcfg.epochs_per_stage,
                                   start_epoch=stage * tcfg.epochs_per_stage, process_index=self.pid,
                                   process_count=self.nproc, num_workers=tcfg.num_workers,
                                   start_latent_id=self.cfg.start_latent_token_id,
                                   end_latent_id=self.cfg.end_latent_token_id, image_options=self.image_options)
                if resume_meta is not None and self.start_kind == "resume" and resume_meta["stage"] == stage \
                        and resume_meta.get("iterator"):
                    it.load_state_dict(resume_meta["iterator"])
                stage_losses = []
                bar, bar_epoch = None, None
                for batch in it:
                    epoch = it.epoch if it.step else it.epoch - 1  # epoch of the batch just returned
                    if bar_epoch != epoch:
                        if bar is not None:
                            bar.close()
                        done = it.step - 1 if it.step else self.steps_per_epoch - 1
                        bar = tqdm(total=it.steps_per_epoch, initial=done, desc=f"stage {stage} epoch {epoch}",
                                   disable=self.pid != 0, leave=False)
                        bar_epoch = epoch
                    t0 = time.perf_counter()
                    hb, arrays = self.device_batch(batch)
                    flops = model_flops(self.bb, tcfg, arrays)
                    self.state, metrics = self.step_fn()(self.state, self.frozen, arrays)
                    loss = float(metrics["loss"])
                    dt = time.perf_counter() - t0
                    step = int(self.state.step)
                    tokens = hb.num_tokens()
                    bar.update(1)
                    if not math.isfinite(loss):
                        summary["stopped"] = f"non-finite loss {loss} at step {step} (stage {stage})"
                        logger.error("%s; stopping. The last good checkpoint (step %d) is kept in %s",
                                     summary["stopped"], last_saved, os.path.join(tcfg.out, "checkpoints"))
                        raise TrainingStopped(summary["stopped"])
                    stage_losses.append(loss)
                    record = {"step": step, "stage": stage, "epoch": epoch, "loss": loss,
                              "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
                              "n_latent": hb.n, "tokens": tokens * self.nproc,
                              "tokens_per_s": tokens * self.nproc / dt, "step_time_s": dt,
                              "mfu": (flops / dt / (peak * ndev)) if (flops and peak) else None}
                    self._log(record)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if step % tcfg.log_every == 0 and self.pid == 0:
                        mfu = f" mfu {record['mfu']:.3f}" if record["mfu"] is not None else ""
                        tqdm.write(f"step {step} stage {stage} loss {loss:.4f} lr {record['lr']:.2e} "
                                   f"grad_norm {record['grad_norm']:.3f} tokens/s {record['tokens_per_s']:.0f} "
                                   f"step {dt:.3f}s{mfu}")
                    at_max = tcfg.max_steps is not None and step >= tcfg.max_steps
                    if step % tcfg.save_every == 0 or at_max or self._stop_signal is not None:
                        self.ckpts.save(step, self.state, self._meta(stage, it))
                        last_saved = step
                    if at_max or self._stop_signal is not None:
                        summary["stopped"] = "max_steps" if at_max else f"signal {self._stop_signal}"
                        break
                if bar is not None:
                    bar.close()
                it.close()
                summary["stages"][stage] = {"first_loss": stage_losses[0] if stage_losses else None,
                                            "last_loss": float(np.mean(stage_losses[-max(1, len(stage_losses) // 10):]))
                                            if stage_losses else None, "steps": len(stage_losses),
                                            "n_latent": min(stage, tcfg.max_latent_stage)}
                if summary["stopped"]:
                    break
                self.ckpts.save_stage_end(stage, self.state, self._meta(stage, None))
                step = int(self.state.step)
                if step != last_saved:
                    self.ckpts.save(step, self.state, self._meta(stage + 1, None))
                    last_saved = step
        finally:
            self.ckpts.wait()
            self._restore_signals()
            if getattr(self, "_tb", None) is not None:
                self._tb.close()
        summary["step"] = int(self.state.step)
        self.plot_losses()
        return summary

    def plot_losses(self) -> str | None:
        """RUN_DIR/loss.png from the run's metrics (skipped without matplotlib)."""
        history = [r for r in self.history if "loss" in r]
        if self.pid != 0 or not history:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.info("matplotlib not installed: no loss plot")
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in history]
        ax.plot(steps, [r["loss"] for r in history], lw=1)
        for stage in sorted({r["stage"] for r in history}):
            first = min(r["step"] for r in history if r["stage"] == stage)
            ax.axvline(first, color="grey", lw=0.5, ls="--")
            ax.text(first, ax.get_ylim()[1], f" stage {stage}", va="top", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("IVT-LR training loss")
        path = os.path.join(self.tcfg.out, "loss.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def train(tcfg: TrainConfig) -> dict:
    """Build a Trainer and run it."""
    return Trainer(tcfg).run()

"""The multi-stage curriculum trainer's loop over a run set up by `setup.setup_run`: sharded steps, checkpoints,
signals.

The hot loop never waits on the host: batches are collated, laid out and put on the devices by a
background thread two steps ahead (`prefetch.Prefetcher`); a step's metrics are read after the next
step is dispatched (one step late), so the device is busy while the host logs; checkpoints are written
asynchronously by orbax. In a multi-process run every process trains the same steps on its own rows,
only process 0 writes metrics and plots, SIGTERM to any process stops all of them at the same step
(JAX's preemption sync), and a process whose peer is gone exits with a clear line (`peers.PeerWatchdog`).
Where a run starts is `planning`; what it is given, `setup`; what it records and shows, `metrics`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.convert.layout import PERIODIC_DIR
from ivtlr_jax.latent import LatentBatch, make_latent_batch
from ivtlr_jax.train import peers
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.metrics import RunMetrics, peak_flops, stage_summary, update_record
from ivtlr_jax.train.planning import StartPlan, plan_start, resume_hint
from ivtlr_jax.train.prefetch import Prefetcher
from ivtlr_jax.train.setup import RunSetup, setup_run
from ivtlr_jax.train.step import build_train_step, model_flops

logger = logging.getLogger("ivtlr_jax.train")

__all__ = ["StartPlan", "Trainer", "TrainingStopped", "plan_start", "resume_hint", "train"]


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------- batches
@dataclasses.dataclass
class _Batch:
    """One prepared step: this host's rows, the global device arrays and where the iterator stands after it."""

    host: LatentBatch
    arrays: LatentBatch
    epoch: int
    index: int  # step within the epoch
    position: dict  # iterator state after this batch (what a checkpoint saved after it resumes from)
    last: bool  # the stage's last batch
    tokens: int  # real tokens of this host's rows
    flops: float
    rows: np.ndarray  # example indices of this host's rows (-1: filler)


@dataclasses.dataclass
class _Pending:
    step: int  # the optimiser update these metrics close
    stage: int
    batch: _Batch  # its last micro-batch
    metrics: Any  # device values, read one update later
    tokens: int  # real tokens of this host's rows over the update's micro-steps
    flops: float  # model FLOPs of the update's micro-steps


class Trainer:
    """Loops over a run set up by `setup.setup_run`: `run()` trains the requested stages.

    `plan` (from `plan_start`) is made by the setup when not given; `watchdog` (a started `peers.PeerWatchdog`)
    is started here in a multi-process run when not given; `trace_rows` makes every process record the data rows
    of each step in RUN_DIR/debug/rows.process_<i>.jsonl; `prefetch` is how many batches are made ahead.
    """

    def __init__(self, tcfg: TrainConfig, *, plan: StartPlan | None = None, watchdog=None,
                 peer_timeout_s: float = 60.0, trace_rows: bool = False, prefetch: int = 2):
        self.tcfg = tcfg
        sh.maybe_initialize_distributed(tcfg.mesh)  # the processes first: the watchdog watches the setup too
        self.nproc, self.pid = jax.process_count(), jax.process_index()
        self.watchdog = watchdog
        if self.watchdog is None and self.nproc > 1:
            self.watchdog = peers.PeerWatchdog(peer_timeout_s, resume_hint=lambda: resume_hint(tcfg.out)).start()
        try:
            self.setup: RunSetup = setup_run(tcfg, plan)
        except BaseException as e:
            if watchdog is None and self.watchdog is not None:  # ours: the peers hear of the failure
                self.watchdog.stop(failed=" ".join(str(e).split())[:300] or type(e).__name__)
            raise
        s = self.setup
        self.mesh, self.bb, self.lcfg, self.layout, self.ckpts = s.mesh, s.bb, s.lcfg, s.layout, s.checkpoints
        self.state, self.frozen = s.state, s.frozen  # the loop replaces the state after every step
        self.prefetch_depth = prefetch
        self.metrics = RunMetrics(tcfg.out, self.pid, trace_rows)
        self.start_step = int(self.state.step)  # optimiser updates; read once, the loop counts on the host
        self._step = None
        self._compiled: dict = {}
        self._stop_signal = None

    @property
    def start_at(self) -> int | None:
        return self.setup.start.at

    @property
    def history(self) -> list[dict]:
        """The run's records so far (every process; process 0 also writes them, see `metrics.RunMetrics`)."""
        return self.metrics.history

    @history.setter
    def history(self, records: list[dict]) -> None:
        self.metrics.history = records

    # ------------------------------------------------------------------ steps and batches
    def step_fn(self):
        """The jitted micro-step (`build_train_step`, as the dry run compiles it; one compilation per shape and n)."""
        if self._step is None:
            s = self.setup
            self._step = build_train_step(s.bb, s.lcfg, s.tcfg, s.tx, s.schedule, s.dtype, s.layout, s.mesh,
                                          unroll=s.unroll)
        return self._step

    def compiled_step(self, arrays: LatentBatch):
        """The step compiled for this batch's shapes (and n), once. In a multi-process run every process finishes
        compiling before any of them runs it: a peer that compiles for long (another process may have found
        the program in the compilation cache) would otherwise miss the collectives' 30 s rendezvous."""
        key = (jax.tree_util.tree_structure(arrays),
               tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(arrays)))
        fn = self._compiled.get(key)
        if fn is None:
            fn = self.step_fn().lower(self.state, self.frozen, arrays).compile()
            if self.nproc > 1:
                peers.barrier(f"ivtlr_jax/compiled/{len(self._compiled)}")
            self._compiled[key] = fn
        return fn

    def host_batch(self, collated: dict) -> LatentBatch:
        """A collated numpy batch -> the checked LatentBatch (this host's rows)."""
        return make_latent_batch(self.bb, self.lcfg, collated["input_ids"], collated["attention_mask"],
                                 collated["labels"], collated["pixel_values"], collated.get("image_grid_thw"))

    def device_batch(self, collated: dict):
        hb = self.host_batch(collated)
        return hb, sh.host_batch_to_global(self.mesh, hb)

    def iterator(self, stage: int):
        """This process's BatchIterator over the epochs of `stage` (its rows of every global batch)."""
        return self.setup.data.iterator(stage)

    @staticmethod
    def _position_for(saved: dict, it) -> dict:
        """A saved iterator position for this iterator: the position is global, so a run with another process
        count but the same global batch continues from it."""
        saved = dict(saved)
        if saved.get("batch_size", it.batch_size) * saved.get("process_count", it.process_count) \
                == it.global_batch_size:
            saved["batch_size"], saved["process_count"] = it.batch_size, it.process_count
        return saved

    def _positions(self, it):
        """(collated, epoch, index, position after, last of stage) for each batch (runs in the prefetch thread)."""
        while True:
            epoch, index = it.epoch, it.step
            try:
                collated = next(it)
            except StopIteration:
                return
            after = it.state_dict()
            yield collated, epoch, index, after, it.num_epochs is not None and after["epoch"] >= it.num_epochs

    def _prepare(self, item) -> _Batch:
        collated, epoch, index, after, last = item
        hb, arrays = self.device_batch(collated)
        rows = np.asarray(collated.get("example_index", np.full(hb.batch_size, -1)))
        return _Batch(hb, arrays, epoch, index, after, last, hb.num_tokens(), model_flops(self.bb, self.tcfg, arrays),
                      rows)

    # ------------------------------------------------------------------ signals
    def _install_signals(self):
        """SIGTERM/SIGINT: checkpoint at the current step and exit. Several processes: SIGTERM is left to JAX's
        preemption notifier (every process stops at the same step); SIGINT is turned into SIGTERM."""
        if self.nproc > 1:
            def to_sigterm(signum, _frame):
                logger.warning("signal %d: passing it on as SIGTERM (all processes stop at the same step)", signum)
                os.kill(os.getpid(), signal.SIGTERM)

            self._old = {signal.SIGINT: signal.signal(signal.SIGINT, to_sigterm)}
            return

        def handler(signum, _frame):
            self._stop_signal = signum
            logger.warning("signal %d: saving a checkpoint after this step, then exiting", signum)

        self._old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _restore_signals(self):
        for s, h in getattr(self, "_old", {}).items():
            signal.signal(s, h)

    def _stop_requested(self, step: int) -> str | None:
        if self.nproc > 1 and self._stop_signal is None and peers.reached_preemption_point(step):
            self._stop_signal = int(signal.SIGTERM)
        return None if self._stop_signal is None else f"signal {self._stop_signal}"

    # ------------------------------------------------------------------ records
    def _meta(self, stage: int, position: dict | None, step: int) -> dict:
        return {"stage": stage, "iterator": position, "step": int(step), "init": os.path.abspath(self.setup.init),
                "finetune": self.tcfg.finetune, "lora": self.tcfg.lora.meta.to_dict() if self.tcfg.finetune == "lora"
                else None,
                "process_count": self.nproc, "train_config": self.tcfg.to_dict()}

    def _finish_step(self, p: _Pending, bar, losses: list) -> None:
        """Read a dispatched step's metrics (the device is already busy with the next one) and record them."""
        values = jax.device_get(p.metrics)
        now = time.perf_counter()
        dt, self._t_done = now - self._t_done, now
        loss = float(values["loss"])
        if not math.isfinite(loss):
            where = os.path.join(self.tcfg.out, PERIODIC_DIR)
            last = f"step {self._last_saved}" if self._last_saved is not None else "none yet"
            msg = f"non-finite loss {loss} at step {p.step} (stage {p.stage})"
            logger.error("%s; stopping. The last good checkpoint (%s) is kept in %s", msg, last, where)
            raise TrainingStopped(f"{msg}; the last good checkpoint ({last}) is kept in {where}")
        losses.append(loss)
        record = update_record(p.step, p.stage, p.batch.epoch, values, n_latent=p.batch.host.n,
                               rows=self.tcfg.batch_size, micro_steps=self.tcfg.grad_accum,
                               tokens=p.tokens * self.nproc, seconds=dt, flops=p.flops,
                               peak_flops_total=self._peak * self._ndev if self._peak else None)
        self.metrics.log(record)
        bar.update(1)
        if p.step % self.tcfg.log_every == 0:
            self.ckpts.poll()  # a failed asynchronous checkpoint write surfaces here, not much later
            self.metrics.show(bar, record)

    # ------------------------------------------------------------------ run
    def _run_stage(self, stage: int, position: dict | None, step: int) -> tuple[int, list, bool, str | None]:
        """Train one stage from `position` (None: its start); (step, losses, stage finished, stop reason).

        Every micro-batch is one call of the step; every `grad_accum`-th closes an optimiser update, and only
        there are steps counted, metrics read, checkpoints written and stops taken (an epoch is a whole number
        of updates, so a stage ends on one).
        """
        tcfg = self.tcfg
        it = self.iterator(stage)
        if position:
            it.load_state_dict(self._position_for(position, it))
        done = ((it.epoch - stage * tcfg.epochs_per_stage) * it.steps_per_epoch + it.step) // tcfg.grad_accum
        bar = self.metrics.progress(tcfg.epochs_per_stage * it.steps_per_epoch // tcfg.grad_accum, done,
                                    f"stage {stage}")
        feed = Prefetcher(self._positions(it), self._prepare, depth=self.prefetch_depth)
        losses: list[float] = []
        pending, finished, stop = None, False, None
        micro, tokens, flops = 0, 0, 0.0
        self._t_done = time.perf_counter()
        try:
            for b in feed:
                self.state, metrics = self.compiled_step(b.arrays)(self.state, self.frozen, b.arrays)
                self.metrics.trace(step + 1, micro, b.epoch, b.rows)
                micro, tokens, flops = micro + 1, tokens + b.tokens, flops + b.flops
                if micro < tcfg.grad_accum:
                    continue
                step += 1
                if pending is not None:
                    self._finish_step(pending, bar, losses)
                pending = _Pending(step, stage, b, metrics, tokens, flops)
                micro, tokens, flops = 0, 0, 0.0
                finished = b.last
                at_max = tcfg.max_steps is not None and step >= tcfg.max_steps
                stop = "max_steps" if at_max else self._stop_requested(step)
                if b.last:  # the stage's end saves (after the loop)
                    if stop:
                        break
                    continue
                if stop or step % tcfg.save_every == 0:
                    self._finish_step(pending, bar, losses)  # never checkpoint a state whose loss was not seen
                    pending = None
                    self.ckpts.save(step, self.state, self._meta(stage, b.position, step))
                    self._last_saved = step
                if stop:
                    break
            if pending is not None:
                self._finish_step(pending, bar, losses)
        finally:
            feed.close()
            it.close()
            bar.close()
        return step, losses, finished, stop

    def run(self) -> dict:
        """Train the stages; returns {"stages": {s: {...}}, "stopped": reason or None, "step": n}."""
        tcfg, start = self.tcfg, self.setup.start
        step = self.start_step
        if start.meta is not None:
            logger.info("restored %s %s (step %d)", start.kind, start.at, step)
        self.metrics.log({"event": "state", "step": step, "finetune": tcfg.finetune, "mesh": sh.describe(self.mesh),
                          "processes": self.nproc, "start": start.kind, "start_at": start.at,
                          **self.setup.state_report})
        stages = self.setup.stages
        if start.kind == "resume":
            stages = [s for s in stages if s >= start.meta["stage"]]
        self.metrics.open_tensorboard()
        self._install_signals()
        self._peak, self._ndev = peak_flops(tcfg), self.mesh.devices.size
        summary: dict = {"stages": {}, "stopped": None}
        self._last_saved = step if start.kind != "init" else None
        failure = None
        try:
            for stage in stages:
                position = None
                if start.kind == "resume" and start.meta["stage"] == stage:
                    position = start.meta.get("iterator")
                step, losses, finished, stop = self._run_stage(stage, position, step)
                summary["stages"][stage] = stage_summary(losses, min(stage, tcfg.max_latent_stage))
                if finished:
                    self.ckpts.save_stage_end(stage, self.state, self._meta(stage, None, step))
                    if step != self._last_saved:
                        self.ckpts.save(step, self.state, self._meta(stage + 1, None, step))
                        self._last_saved = step
                if stop:
                    summary["stopped"] = stop
                    break
            self.ckpts.wait()  # a failed asynchronous write raises here at the latest
        except BaseException as e:
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            try:
                self.ckpts.wait()
            except Exception:
                pass  # already failing: the first error is the one to report
            raise
        finally:
            self._restore_signals()
            self.metrics.close()
            if self.watchdog is not None:
                self.watchdog.stop(failed=failure)
        summary["step"] = step
        self.plot_losses()
        return summary

    def plot_losses(self) -> str | None:
        """RUN_DIR/loss.png from the run's metrics (skipped without matplotlib)."""
        return self.metrics.plot_losses()


def train(tcfg: TrainConfig, **kwargs) -> dict:
    """Build a Trainer and run it (keyword arguments go to Trainer)."""
    return Trainer(tcfg, **kwargs).run()

"""A run's metrics and logs: the JSONL records, TensorBoard scalars, the console line, the progress bar, the
--debug row trace and the loss plot. Every process keeps its records in memory; only process 0 writes them."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.train.config import TrainConfig

logger = logging.getLogger("ivtlr_jax.train")

PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0}  # GPUs, dense bf16; TPUs: sh.TPU_CHIPS
TENSORBOARD_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")  # written as train/<name>


def peak_flops(tcfg: TrainConfig) -> float | None:
    """Peak FLOP/s of one device (the MFU denominator): the config's peak_tflops, else by device kind (a TPU's
    from `sharding.TPU_CHIPS`, whose kinds are exact: "TPU v5" is a v5p, "TPU v5 lite" a v5e)."""
    if tcfg.peak_tflops:
        return tcfg.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for chip in sh.TPU_CHIPS.values():
        if kind == chip.device_kind:
            return chip.peak_flops
    kind = kind.lower()
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


def update_record(step: int, stage: int, epoch: int, values: dict, *, n_latent: int, rows: int, micro_steps: int,
                  tokens: int, seconds: float, flops: float, peak_flops_total: float | None) -> dict:
    """The record of one optimiser update from its metrics read back from the device (`values`)."""
    return {"step": step, "stage": stage, "epoch": epoch, "loss": float(values["loss"]), "lr": float(values["lr"]),
            "grad_norm": float(values["grad_norm"]), "n_latent": n_latent, "rows": rows, "micro_steps": micro_steps,
            "tokens": tokens, "tokens_per_s": tokens / seconds, "step_time_s": seconds,
            "mfu": (flops / seconds / peak_flops_total) if (flops and peak_flops_total) else None}


def console_line(record: dict) -> str:
    """The line printed every log_every updates."""
    mfu = f" mfu {record['mfu']:.3f}" if record["mfu"] is not None else ""
    return (f"step {record['step']} stage {record['stage']} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"grad_norm {record['grad_norm']:.3f} tokens/s {record['tokens_per_s']:.0f} "
            f"step {record['step_time_s']:.3f}s{mfu}")


def stage_summary(losses: list, n_latent: int) -> dict:
    """A finished (or stopped) stage in the run's summary: first loss, mean of its last tenth, updates."""
    return {"first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None,
            "steps": len(losses), "n_latent": n_latent}


class RunMetrics:
    """The records of one run: every process keeps them in `history`; process 0 also appends each to
    RUN_DIR/metrics.jsonl and TensorBoard (when installed), shows the progress and draws RUN_DIR/loss.png.
    With `trace_rows` every process records the data rows of each micro-step in RUN_DIR/debug/."""

    def __init__(self, out: str, pid: int, trace_rows: bool = False):
        self.out, self.pid, self.trace_rows = out, pid, trace_rows
        self.history: list[dict] = []
        self.path = os.path.join(out, "metrics.jsonl")
        self._file = None
        self._tb = None

    @property
    def writes(self) -> bool:
        return self.pid == 0

    def open_tensorboard(self) -> None:
        """A TensorBoard writer in RUN_DIR/tensorboard (tensorboardX or torch's), or none without either."""
        self._tb = None
        if not self.writes:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
        try:
            self._tb = SummaryWriter(os.path.join(self.out, "tensorboard"))
        except Exception:
            self._tb = None

    def log(self, record: dict) -> None:
        self.history.append(record)
        if not self.writes:
            return
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k in TENSORBOARD_SCALARS:
                if record.get(k) is not None:
                    self._tb.add_scalar(f"train/{k}", record[k], record["step"])

    def trace(self, step: int, micro: int, epoch: int, rows) -> None:
        """--debug: one line per micro-step (the update it belongs to, its index in it, this process's rows)."""
        if not self.trace_rows:
            return
        folder = os.path.join(self.out, "debug")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rows.process_{self.pid}.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "micro": micro, "process": self.pid, "epoch": epoch,
                                "rows": [int(r) for r in rows]}) + "\n")

    def progress(self, total: int, initial: int, desc: str):
        """A progress bar over a stage's updates (shown by process 0 only)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not self.writes, leave=False)

    def show(self, bar, record: dict) -> None:
        """The console line and the bar's postfix for `record` (process 0)."""
        if not self.writes:
            return
        from tqdm.auto import tqdm

        bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=record["epoch"])
        tqdm.write(console_line(record))

    def close(self) -> None:
        """Close the JSONL file and TensorBoard (a later record reopens the file)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def plot_losses(self) -> str | None:
        """RUN_DIR/loss.png from the run's records (skipped without matplotlib)."""
        history = [r for r in self.history if "loss" in r]
        if not self.writes or not history:
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
        path = os.path.join(self.out, "loss.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

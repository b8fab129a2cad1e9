"""Training: LoRA/full fine-tuning on the IVT-LR curriculum with sharded steps and orbax checkpoints."""

from ivtlr_jax.train.checkpoints import CheckpointWriteError, UnreadableCheckpoint
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.loop import Trainer, TrainingStopped, train
from ivtlr_jax.train.planning import StartPlan, plan_start
from ivtlr_jax.train.setup import RunSetup, setup_run

__all__ = ["CheckpointWriteError", "RunSetup", "StartPlan", "TrainConfig", "Trainer", "TrainingStopped",
           "UnreadableCheckpoint", "plan_start", "setup_run", "train"]

"""Training: LoRA/full fine-tuning on the IVT-LR curriculum with sharded steps and orbax checkpoints."""

from ivtlr_jax.train.checkpoints import CheckpointWriteError, UnreadableCheckpoint
from ivtlr_jax.train.loop import StartPlan, Trainer, TrainingStopped, plan_start, train

__all__ = ["CheckpointWriteError", "StartPlan", "Trainer", "TrainingStopped", "UnreadableCheckpoint", "plan_start",
           "train"]

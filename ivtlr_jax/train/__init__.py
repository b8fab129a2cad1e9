"""Training: LoRA/full fine-tuning on the IVT-LR curriculum with sharded steps and orbax checkpoints."""

from ivtlr_jax.train.loop import Trainer, TrainingStopped, train

__all__ = ["Trainer", "TrainingStopped", "train"]

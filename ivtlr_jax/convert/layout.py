"""The folders this project writes, named once: a model checkpoint (CKPT_DIR) and a run's checkpoints (RUN_DIR).

CKPT_DIR/
  params/             orbax tree of the parameters (names from the backbone's spec)
  ivtlr_config.json   the backbone config; hf_config.json the source config.json
  lora/, lora_config.json   optional: LoRA adapters kept unmerged over params/ (LoRAMeta's r, alpha; targets)
RUN_DIR/
  checkpoints/<step>/     periodic (the last k kept); stage_ends/<stage>/ one per finished stage;
                          unreadable/ damaged ones a resume set aside
  each: state/ (orbax: step, trainable, opt_state, rng, accum) and meta/metadata (JSON: stage, iterator,
        init, finetune, lora, train_config)
"""

from __future__ import annotations

import os

PARAMS_DIR = "params"
CONFIG_NAME = "ivtlr_config.json"
HF_CONFIG_NAME = "hf_config.json"
LORA_DIR = "lora"
LORA_CONFIG_NAME = "lora_config.json"

PERIODIC_DIR = "checkpoints"
STAGE_DIR = "stage_ends"
UNREADABLE_DIR = "unreadable"
STATE_ITEM = "state"  # the orbax item names of a run checkpoint
META_ITEM = "meta"
META_FILE = os.path.join(META_ITEM, "metadata")


def run_checkpoint_dir(run_dir: str, step: int, stage: bool = False) -> str:
    """RUN_DIR/checkpoints/<step>, or RUN_DIR/stage_ends/<stage> with stage=True."""
    return os.path.join(run_dir, STAGE_DIR if stage else PERIODIC_DIR, str(step))


def complete_steps(run_dir: str, sub: str = PERIODIC_DIR) -> list[int]:
    """Steps of the complete (committed) checkpoints under RUN_DIR/`sub`, oldest first; no orbax needed."""
    root = os.path.join(run_dir, sub)
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d)))


def is_run_checkpoint(path: str) -> bool:
    """Whether `path` is one run checkpoint folder (it holds the state item)."""
    return os.path.isdir(os.path.join(path, STATE_ITEM))

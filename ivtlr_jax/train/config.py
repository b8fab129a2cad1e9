"""The training run's options: one flat dataclass whose fields are the YAML keys and the CLI flags
(`lr`, `lora_r`, `--lora-r`, ...), as run checkpoints record them, with typed views of its sections
(`lora`, `optimizer`, `latent(...)`) for the code that uses them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ivtlr_jax.config import SUPPORTED_DTYPES, coerce_fields, config_from_dict
from ivtlr_jax.latent import LatentConfig
from ivtlr_jax.models.adapters import LoRAMeta
from ivtlr_jax.models.layers import ATTENTION_CHOICES
from ivtlr_jax.train.remat import REMAT_CHOICES

FINETUNE_CHOICES = ("lora", "full")
SCHEDULE_CHOICES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class LoRAOptions:
    """The LoRA adapters: rank, alpha (their record and scale: `meta`) and the dropout on their input."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05

    def __post_init__(self):
        coerce_fields(self)

    @property
    def meta(self) -> LoRAMeta:
        return LoRAMeta(self.r, self.alpha)


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """AdamW with global-norm clipping and its learning-rate schedule (warmup, then constant/cosine/linear)."""

    lr: float = 4e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 0.7
    warmup_steps: int = 0
    schedule: str = "constant"

    def __post_init__(self):
        coerce_fields(self)


@dataclasses.dataclass
class TrainConfig:
    """Everything `experiments.train` reads from YAML and flags; defaults are the method's reference setup.

    The fields stay flat (they are the YAML keys, the flags and the `train_config` a checkpoint records);
    `lora`, `optimizer` and `latent()` give the typed sections.
    """

    # what to train
    init: str | None = None  # converted checkpoint (with latent tokens) to start from
    out: str = "runs/ivtlr"  # RUN_DIR: checkpoints, metrics.jsonl, plots
    data: str = "m3cot"  # m3cot | scienceqa | synthetic
    data_source: str | None = None  # hub id or local folder
    train_split: str = "train"
    eval_split: str = "test"
    limit: int | None = None  # use only the first N training rows
    stages: tuple[int, ...] | None = None  # None: the whole curriculum 0..max_latent_stage
    resume: bool = False  # continue from the latest checkpoint in `out`
    # curriculum
    epochs_per_stage: int = 4
    max_latent_stage: int = 3
    pad_latent_to_max: bool = True
    latent_markers: bool = False
    # latent options (LatentConfig, whose defaults these are)
    k: int | None = None  # None: the backbone's default (the release's K for it)
    latent_text: bool = LatentConfig.latent_text
    position_mode: str = LatentConfig.position_mode
    selection_order: str = LatentConfig.selection_order
    latent_grad: str = LatentConfig.latent_grad
    deepstack_latent: bool = LatentConfig.deepstack_latent
    # what is trained: LoRA adapters (section `lora`: LoRAOptions, whose defaults these are) or the whole LLM
    finetune: str = "lora"  # lora | full
    lora_r: int = LoRAOptions.r
    lora_alpha: float = LoRAOptions.alpha
    lora_dropout: float = LoRAOptions.dropout
    # optimiser (section `optimizer`: OptimizerOptions, whose defaults these are)
    lr: float = OptimizerOptions.lr
    weight_decay: float = OptimizerOptions.weight_decay
    beta1: float = OptimizerOptions.beta1
    beta2: float = OptimizerOptions.beta2
    clip: float = OptimizerOptions.clip
    warmup_steps: int = OptimizerOptions.warmup_steps
    schedule: str = OptimizerOptions.schedule  # constant | cosine | linear
    # the step
    batch_size: int = 64  # rows per optimiser update over all processes, devices and micro-steps
    grad_accum: int = 1
    compute_dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    remat: str = "auto"  # layer rematerialisation: auto (by model size) | full | dots_except_mlp | dots | none
    attention: str = "auto"  # attention kernel: auto | xla | cudnn | pallas | dense (see ATTENTION_CHOICES)
    max_length: int | None = 1024
    seed: int = 0
    max_steps: int | None = None
    # infrastructure
    mesh: str = "auto"
    log_every: int = 10
    save_every: int = 200
    keep: int = 3
    peak_tflops: float | None = None  # per device, for MFU; None: looked up from the device kind
    eval_limit: int | None = None
    eval_batch_size: int = 16
    max_new_tokens: int = 64
    num_workers: int = 2

    def __post_init__(self):
        coerce_fields(self)
        if self.finetune not in FINETUNE_CHOICES:
            raise ValueError(f"finetune={self.finetune!r} is not valid; use 'lora' or 'full'")
        if self.schedule not in SCHEDULE_CHOICES:
            raise ValueError(f"schedule={self.schedule!r} is not valid; use constant, cosine or linear")
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat={self.remat!r} is not valid; use one of {', '.join(REMAT_CHOICES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={self.attention!r} is not valid; use one of {', '.join(ATTENTION_CHOICES)}")
        if self.compute_dtype not in ("auto",) + SUPPORTED_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not valid; use auto, float32 or bfloat16")
        for name in ("batch_size", "grad_accum", "epochs_per_stage", "log_every", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.stages is not None:
            if any(s < 0 for s in self.stages):
                raise ValueError(f"stages={list(self.stages)} must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        """From YAML values and flags: unknown keys refused, every value coerced to its field's type."""
        return config_from_dict(cls, d)

    @property
    def lora(self) -> LoRAOptions:
        return LoRAOptions(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)

    @property
    def optimizer(self) -> OptimizerOptions:
        return OptimizerOptions(lr=self.lr, weight_decay=self.weight_decay, beta1=self.beta1, beta2=self.beta2,
                                clip=self.clip, warmup_steps=self.warmup_steps, schedule=self.schedule)

    def latent(self, default_k: int = 32) -> LatentConfig:
        """The latent options; `default_k` (the backbone's) when k is not set."""
        return LatentConfig(k=default_k if self.k is None else self.k, latent_text=self.latent_text,
                            position_mode=self.position_mode, selection_order=self.selection_order,
                            latent_grad=self.latent_grad, deepstack_latent=self.deepstack_latent)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages) if self.stages is not None else None
        return d

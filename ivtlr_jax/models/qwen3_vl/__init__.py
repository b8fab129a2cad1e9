"""Qwen3-VL: config (`config.py`, HF config.json both ways), backbone (`model.py`: DeepStack vision tower, Qwen3
decoder block, spec table) and prompt (`prompt.py`); positions, images per row and the image processor are
Qwen2-VL's (patch 16).

The backbone is imported on first use, so that the config registry can import `config` without model code.
"""

from __future__ import annotations

import importlib

from ivtlr_jax.models.qwen3_vl.config import Qwen3VisionConfig, Qwen3VLConfig
from ivtlr_jax.models.qwen3_vl.prompt import CHAT_TEMPLATE, PROMPT

_LAZY = ("Qwen3VL", "Images", "Params", "DeepStackAdd", "interpolation_taps", "interleaved_sections")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CHAT_TEMPLATE", "PROMPT", "Qwen3VLConfig", "Qwen3VisionConfig", *_LAZY]

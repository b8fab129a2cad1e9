"""Qwen2-VL: config and HF config I/O (`config.py`), the backbone and its spec table (`model.py`: vision tower,
M-RoPE), the image processor (`images.py`) and the prompt with its chat template (`prompt.py`).

The backbone loads on first use, so that configs, images and prompts import no JAX.
"""

from __future__ import annotations

import importlib

from ivtlr_jax.models.qwen2_vl.config import Qwen2VLConfig, VisionConfig
from ivtlr_jax.models.qwen2_vl.images import ImageOptions
from ivtlr_jax.models.qwen2_vl.prompt import CHAT_TEMPLATE, PROMPT

_LAZY = ("Qwen2VL", "Params", "Images", "VisionTower", "VisionBlock", "Merger", "check_image_inputs",
         "patch_rows_cols", "mrope_positions")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CHAT_TEMPLATE", "PROMPT", "ImageOptions", "Qwen2VLConfig", "VisionConfig", *_LAZY]

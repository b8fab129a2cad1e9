"""Qwen2.5-VL: config (`config.py`, HF config.json both ways) and backbone (`model.py`: windowed vision tower,
spec table; the LLM, position rule, image processor and prompt are Qwen2-VL's).

The backbone is imported on first use, so that the config registry can import `config` without model code.
"""

from __future__ import annotations

import importlib

from ivtlr_jax.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig, to_hf_dict

_LAZY = {"Qwen25VL": "model", "Images": "model", "Params": "model", "patch_windows": "model"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Qwen25VL", "Qwen25VLConfig", "Qwen25VisionConfig", "to_hf_dict", *_LAZY]

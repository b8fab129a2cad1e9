"""Chameleon: config and HF config I/O (`config.py`), the backbone and its spec table (`model.py`: VQ-VAE image
tokenizer, decoder with q/k norms), the image processor (`images.py`) and the prompt (`prompt.py`).

The backbone loads on first use, so that configs, images and prompts import no JAX.
"""

from __future__ import annotations

import importlib

from ivtlr_jax.models.chameleon.config import ChameleonConfig, VQConfig, image_code_name, image_vocabulary
from ivtlr_jax.models.chameleon.images import ImageOptions
from ivtlr_jax.models.chameleon.prompt import PROMPT

_LAZY = ("Chameleon", "Params", "Images", "VQModel", "encode", "encode_latents", "vq_spec", "vq_flops")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PROMPT", "ChameleonConfig", "ImageOptions", "VQConfig", "image_code_name", "image_vocabulary", *_LAZY]

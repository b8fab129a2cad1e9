"""Backbones: one module per model, each exporting one backbone class built from its config.

`backbone_for(config)` is the only place that maps a config to its backbone; everything above `models/`
receives a backbone object and never imports a particular model.
"""

from __future__ import annotations

import importlib

from ivtlr_jax.models.base import Backbone, Embedded

# model_type -> (module, class)
BACKBONES = {
    "qwen2_vl": ("ivtlr_jax.models.qwen2_vl", "Qwen2VL"),
    "chameleon": ("ivtlr_jax.models.chameleon", "Chameleon"),
}


def backbone_class(model_type: str) -> type[Backbone]:
    if model_type not in BACKBONES:
        raise ValueError(f"model_type={model_type!r} has no backbone; known: {sorted(BACKBONES)}")
    module, name = BACKBONES[model_type]
    return getattr(importlib.import_module(module), name)


def backbone_for(config) -> Backbone:
    """The backbone object for a model config (dispatch on `config.model_type`)."""
    return backbone_class(config.model_type)(config)


__all__ = ["BACKBONES", "Backbone", "Embedded", "backbone_class", "backbone_for"]

"""Backbones: one package per model, each owning its config, spec table, image processor and prompt.

`BACKBONES` is the only place that names the models: model_type -> its backbone class, its config class ("module:Name",
imported on first use, so that reading a config imports no JAX) and the module of its small random models (the
embedded default's tiny model, the benchmarks' model: `small_models`). Everything above `models/`
receives a backbone object (`backbone_for(config)`) and never imports a particular model.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, NamedTuple


class Entry(NamedTuple):
    backbone: str  # "module:Class" of the Backbone
    config: str  # "module:Class" of its BackboneConfig
    small: str | None = None  # module of its small random models (`ivtlr_jax.models.small`); None: it has none


BACKBONES = {
    "qwen2_vl": Entry("ivtlr_jax.models.qwen2_vl.model:Qwen2VL", "ivtlr_jax.models.qwen2_vl.config:Qwen2VLConfig",
                      "ivtlr_jax.models.qwen2_vl.small"),
    "chameleon": Entry("ivtlr_jax.models.chameleon.model:Chameleon",
                       "ivtlr_jax.models.chameleon.config:ChameleonConfig", "ivtlr_jax.models.chameleon.small"),
    "qwen2_5_vl": Entry("ivtlr_jax.models.qwen2_5_vl.model:Qwen25VL",
                        "ivtlr_jax.models.qwen2_5_vl.config:Qwen25VLConfig", "ivtlr_jax.models.qwen2_5_vl.small"),
    "qwen3_vl": Entry("ivtlr_jax.models.qwen3_vl.model:Qwen3VL", "ivtlr_jax.models.qwen3_vl.config:Qwen3VLConfig",
                      "ivtlr_jax.models.qwen3_vl.small"),
}
DEFAULT_MODEL_TYPE = "qwen2_vl"  # configs written before model_type was recorded

def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _entry(model_type: str, where: str = "") -> Entry:
    if model_type not in BACKBONES:
        raise ValueError(f"{where}model_type={model_type!r} is not supported; known: {sorted(BACKBONES)}")
    return BACKBONES[model_type]


def backbone_class(model_type: str):
    """The Backbone class of a model_type."""
    return _load(_entry(model_type).backbone)


def config_class(model_type: str):
    """The config class (a BackboneConfig) of a model_type; imports no JAX."""
    return _load(_entry(model_type).config)


def small_models(model_type: str, where: str = "--backbone"):
    """The module of a backbone's small random models (its tiny model, embedded default and benchmark model; see
    `ivtlr_jax.models.small`)."""
    entry = _entry(model_type, f"{where}: ")
    if entry.small is None:
        raise ValueError(f"{where} {model_type!r} has no small models; use one of {with_small_models()}")
    return importlib.import_module(entry.small)


def with_small_models() -> list[str]:
    """The model_types that have small random models, in registry order (the benchmarks' --backbone choices)."""
    return [t for t, e in BACKBONES.items() if e.small is not None]


def embedded_defaults() -> dict[str, str]:
    """model_type -> its embedded default's YAML under experiments/configs (the backbones that have one)."""
    return {t: name for t in with_small_models() if (name := small_models(t).EMBEDDED_DEFAULT)}


def backbone_for(config):
    """The backbone object for a model config (dispatch on `config.model_type`)."""
    return backbone_class(config.model_type)(config)


def model_config_from_dict(d: dict[str, Any]):
    """A backbone config from its `to_dict()` form (no model_type: a config of before it was recorded)."""
    return config_class(d.get("model_type", DEFAULT_MODEL_TYPE)).from_dict(d)


def model_config_from_hf_dict(hf: dict[str, Any], where: str = ""):
    """The backbone config of a Hugging Face config.json dict, by its model_type."""
    kind = hf.get("model_type", DEFAULT_MODEL_TYPE)
    return _load(_entry(kind, where).config).from_hf_dict(hf)


def model_config_from_hf_dir(path: str):
    """The backbone config of a Hugging Face model folder, by its config.json's model_type."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"--src {path!r}: no config.json there; point it at a Hugging Face model folder")
    with open(cfg_path) as f:
        hf = json.load(f)
    return model_config_from_hf_dict(hf, where=f"--src {path!r}: config.json: ")


def __getattr__(name: str):
    """`Backbone` and `Embedded` (base.py imports JAX, so they load on first use)."""
    if name in ("Backbone", "Embedded"):
        from ivtlr_jax.models import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKBONES", "DEFAULT_MODEL_TYPE", "Backbone", "Embedded", "Entry", "backbone_class", "backbone_for",
           "config_class", "embedded_defaults", "model_config_from_dict", "model_config_from_hf_dict",
           "model_config_from_hf_dir", "small_models", "with_small_models"]

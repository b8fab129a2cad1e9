"""`BackboneConfig`: what every backbone's config shares (its dict and JSON forms, the decoder shape checks).

Imports no JAX: a config can be read, checked and written without model code. A backbone's config class is a
frozen dataclass over this base, in its package; it adds its own fields, checks and Hugging Face config I/O.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from ivtlr_jax.config import coerce_fields, config_from_dict


class BackboneConfig:
    """Base of every backbone config (subclasses are frozen dataclasses with the decoder fields below).

    Shared fields every subclass declares: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta, tie_word_embeddings, image_token_id,
    eos_token_id, pad_token_id, the three latent ids and position_mode.
    """

    model_type: ClassVar[str]
    # position rules a checkpoint may record as its default (None: the backbone's native rule)
    position_modes: ClassVar[tuple[str, ...]] = ("sequential",)

    def __post_init__(self):
        coerce_fields(self)
        self.check()

    def check(self) -> None:
        """The shape checks every decoder needs; a subclass adds its own after calling this."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.position_mode is not None and self.position_mode not in self.position_modes:
            valid = ", ".join(repr(m) for m in self.position_modes)
            raise ValueError(f"position_mode={self.position_mode!r} is not valid for {self.model_type}; use {valid} "
                             "or None (the native rule)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ our own format
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """From `to_dict()` or a YAML `model:` section; values coerced to the field types."""
        return config_from_dict(cls, {k: v for k, v in d.items() if k != "model_type"})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str):
        """A config from a `save`d file: `BackboneConfig.load` gives the class its model_type names (any backbone);
        a backbone's class gives that class, and refuses another backbone's file."""
        from ivtlr_jax.models import DEFAULT_MODEL_TYPE, model_config_from_dict

        with open(path) as f:
            d = json.load(f)
        if cls is BackboneConfig:
            return model_config_from_dict(d)
        kind = d.get("model_type", DEFAULT_MODEL_TYPE)  # none recorded: a config of before model_type was
        if kind != cls.model_type:
            raise ValueError(f"{path}: model_type={kind!r}, not {cls.model_type!r}; {cls.__name__}.load reads only "
                             f"{cls.model_type!r} configs (BackboneConfig.load reads any backbone's)")
        return cls.from_dict(d)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]):
        """This config from a transformers config.json dict."""
        raise NotImplementedError

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers config.json dict of this config (for checkpoints saved without one)."""
        raise NotImplementedError

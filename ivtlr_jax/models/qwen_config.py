"""The config pieces the Qwen vision-language configs share (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the derived sizes of
their ViTs, the LLM fields read from config.json, and the text half and frame of the config.json written back.

Each backbone's config.py keeps only what differs (its vision fields, defaults and checks). Imports no JAX.
"""

from __future__ import annotations

from typing import Any

REQUIRED = object()  # a `read_llm_fields` default: the key must be in config.json


class QwenVisionSizes:
    """Sizes derived from the fields every Qwen ViT config has (a base of the towers' dataclasses)."""

    depth: int
    embed_dim: int
    num_heads: int
    hidden_act: str
    in_channels: int
    temporal_patch_size: int
    patch_size: int

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one `pixel_values` row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def check_tower(self, activations: tuple[str, ...], **block_lists: tuple[int, ...]) -> None:
        """The checks of a Qwen2.5-VL or Qwen3-VL tower: heads divide the width, each list of block indexes
        (`fullatt_block_indexes`, `deepstack_visual_indexes`) lies within the depth, a supported activation."""
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision_config: hidden_size={self.embed_dim} must be divisible by num_heads="
                             f"{self.num_heads}")
        for name, blocks in block_lists.items():
            bad = [i for i in blocks if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"vision_config: {name} {bad} are outside the {self.depth} blocks "
                                 f"(0..{self.depth - 1})")
        if self.hidden_act not in activations:
            raise ValueError(f"vision_config: hidden_act={self.hidden_act!r} is not supported; use one of "
                             f"{list(activations)}")


def read_llm_fields(hf: dict[str, Any], family: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The LLM and token fields of a Qwen VL config.json, as config-field keyword arguments.

    Text keys are read at the top (the 4.x hub layout) or under text_config (transformers 5); rope_theta and
    mrope_section from rope_parameters or rope_scaling, else a top-level rope_theta. `defaults` gives the value
    of a key the file omits (`REQUIRED`: the file must have it). head_dim is read where `defaults` names it.
    """
    text = dict(hf.get("text_config") or {})
    merged = {**{k: v for k, v in hf.items() if k not in ("text_config", "vision_config")}, **text}
    rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}

    def get(key: str, value=None):
        value = merged.get(key) if value is None else value
        if value is None:
            value = defaults.get(key)
            if value is REQUIRED:
                hint = ("under rope_parameters or rope_scaling, e.g. rope_parameters={'rope_type': 'default', "
                        "'mrope_section': [16, 24, 24]}"
                        if key == "mrope_section" else "the checkpoint's config.json is incomplete")
                raise ValueError(f"config.json: a {family} config needs {key} ({hint})")
        return value

    heads = get("num_attention_heads")
    eos = get("eos_token_id")
    fields = dict(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=merged.get("num_key_value_heads") or heads,
        rms_norm_eps=get("rms_norm_eps"), rope_theta=float(get("rope_theta", rope.get("rope_theta"))),
        mrope_section=tuple(get("mrope_section", rope.get("mrope_section"))),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)),
        image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=hf.get("vision_start_token_id", 151652),
        vision_end_token_id=hf.get("vision_end_token_id", 151653),
        eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,), pad_token_id=merged.get("pad_token_id"),
    )
    if "head_dim" in defaults:
        fields["head_dim"] = merged.get("head_dim") or fields["hidden_size"] // heads
    return fields


def llm_hf_dict(cfg, model_type: str, max_position_embeddings: int, head_dim: bool = False,
                interleaved: bool = False) -> dict[str, Any]:
    """The text_config section of a transformers-5 Qwen VL config.json (Qwen3's adds head_dim, no attention bias
    and the interleaved M-RoPE flag)."""
    rope = {"rope_type": "default", "mrope_section": list(cfg.mrope_section),
            **({"mrope_interleaved": True} if interleaved else {}), "rope_theta": cfg.rope_theta}
    return {
        "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        **({"head_dim": cfg.head_dim} if head_dim else {}),
        "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu", "max_position_embeddings": max_position_embeddings,
        **({"attention_bias": False} if head_dim else {}),
        "rope_parameters": rope,
        **({} if head_dim else {"use_sliding_window": False}),
        "bos_token_id": None,  # Qwen VL models use no BOS; the class default (151643) can lie outside a small vocab
        "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else cfg.eos_token_id[0],
        "pad_token_id": cfg.pad_token_id,
    }


def hf_config_dict(cfg, architecture: str, text: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    """The whole config.json: the model's class and type, its special tokens, and the two sections."""
    return {
        "architectures": [architecture], "model_type": cfg.model_type,
        "tie_word_embeddings": cfg.tie_word_embeddings, "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id, "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id, "text_config": text, "vision_config": vision,
    }

"""Qwen3-VL's config: a Qwen3 LLM (q/k RMSNorm, explicit head_dim, interleaved M-RoPE) and a ViT with learned
position embeddings and DeepStack mergers, read from and written to HF config.json.

This module imports no model code (no JAX), so the config registry can load it early.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ivtlr_jax.config import coerce_fields
from ivtlr_jax.models.config import BackboneConfig
from ivtlr_jax.models.qwen_config import QwenVisionSizes, hf_config_dict, llm_hf_dict, read_llm_fields

VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu", "quick_gelu")
# config.json's LLM keys a file leaves out: Qwen3-VL-8B-Instruct's values
LLM_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                    num_attention_heads=32, head_dim=None, rms_norm_eps=1e-6, rope_theta=5000000.0,
                    mrope_section=(24, 20, 20), eos_token_id=151645)


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig(QwenVisionSizes):
    """The Qwen3-VL vision tower: LayerNorm/GELU blocks, learned position embeddings (a square table bilinearly
    resampled to each image's grid) plus 2-D rotary, a 2x2 merger, and one more merger per DeepStack block."""

    depth: int = 27
    embed_dim: int = 1152  # the ViT width (vision_config.hidden_size in config.json)
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096  # the mergers' output width = the LLM's hidden size
    num_position_embeddings: int = 2304  # a side x side table (48 x 48)
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)  # blocks whose output also feeds decoder layers 0, 1, ..
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self):
        coerce_fields(self)
        side = int(self.num_position_embeddings ** 0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"vision_config: num_position_embeddings={self.num_position_embeddings} must be a square "
                             "(the learned position table is side x side)")
        self.check_tower(VISION_ACTIVATIONS, deepstack_visual_indexes=self.deepstack_visual_indexes)

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def position_side(self) -> int:
        return int(round(self.num_position_embeddings ** 0.5))


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(BackboneConfig):
    """The whole Qwen3-VL (dense): Qwen3 decoder with interleaved M-RoPE plus the DeepStack vision tower.

    The defaults are Qwen3-VL-8B-Instruct's.
    """

    model_type = "qwen3_vl"
    position_modes = ("sequential", "mrope")
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    latent_token_id: int | None = None
    start_latent_token_id: int | None = None
    end_latent_token_id: int | None = None
    position_mode: str | None = None  # the checkpoint's default position rule (None: the native "mrope")
    vision: Qwen3VisionConfig = dataclasses.field(default_factory=Qwen3VisionConfig)

    def check(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.position_mode is not None and self.position_mode not in self.position_modes:
            raise ValueError(f"position_mode={self.position_mode!r} is not valid for qwen3_vl; use one of "
                             f"{list(self.position_modes)} or None (the native rule)")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section={list(self.mrope_section)} must have 3 entries summing to head_dim/2 = "
                             f"{self.head_dim // 2}")
        if self.mrope_section[1] > self.mrope_section[0] or self.mrope_section[2] > self.mrope_section[0]:
            raise ValueError(f"mrope_section={list(self.mrope_section)}: the interleaved layout needs the h and w "
                             "sections no longer than the t section")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size={self.vision.out_hidden_size} must equal the LLM "
                             f"hidden_size={self.hidden_size}")
        if len(self.vision.deepstack_visual_indexes) > self.num_hidden_layers:
            raise ValueError(f"{len(self.vision.deepstack_visual_indexes)} DeepStack blocks feed decoder layers 0.. "
                             f"but the LLM has only {self.num_hidden_layers} layers")

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> Qwen3VLConfig:
        """Read an HF Qwen3-VL config (text_config / vision_config sections; rope_theta or rope_parameters)."""
        rope = {**hf, **(hf.get("text_config") or {})}
        if (rope.get("rope_parameters") or rope.get("rope_scaling") or {}).get("mrope_interleaved") is False:
            raise ValueError("config.json: rope_parameters.mrope_interleaved is false; Qwen3-VL's M-RoPE is "
                             "interleaved")
        llm = read_llm_fields(hf, "Qwen3-VL", LLM_DEFAULTS)
        vis = dict(hf.get("vision_config") or {})
        vision = Qwen3VisionConfig(
            depth=vis.get("depth", 27), embed_dim=vis.get("hidden_size", 1152),
            intermediate_size=vis.get("intermediate_size", 4304), num_heads=vis.get("num_heads", 16),
            in_channels=vis.get("in_channels", 3), patch_size=vis.get("patch_size", 16),
            temporal_patch_size=vis.get("temporal_patch_size", 2), spatial_merge_size=vis.get("spatial_merge_size", 2),
            out_hidden_size=vis.get("out_hidden_size", llm["hidden_size"]),
            num_position_embeddings=vis.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(vis.get("deepstack_visual_indexes", (8, 16, 24))),
            hidden_act=vis.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(**llm, vision=vision)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 Qwen3-VL config.json (`Qwen3VLForConditionalGeneration` loads it)."""
        v = self.vision
        vision = {
            "model_type": "qwen3_vl_vision", "depth": v.depth, "hidden_size": v.embed_dim,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        return hf_config_dict(self, "Qwen3VLForConditionalGeneration",
                              llm_hf_dict(self, "qwen3_vl_text", 262144, head_dim=True, interleaved=True), vision)

"""Qwen2-VL's config: the LLM (Qwen2 decoder with M-RoPE) and the vision tower, read from and written to HF config.json.

Imports no JAX and no model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ivtlr_jax.config import coerce_fields
from ivtlr_jax.models.config import BackboneConfig
from ivtlr_jax.models.qwen_config import REQUIRED, QwenVisionSizes, hf_config_dict, llm_hf_dict, read_llm_fields

# config.json's LLM keys: a Qwen2-VL file must give the model's shape; these may be left out
LLM_DEFAULTS = dict(vocab_size=REQUIRED, hidden_size=REQUIRED, intermediate_size=REQUIRED,
                    num_hidden_layers=REQUIRED, num_attention_heads=REQUIRED, mrope_section=REQUIRED,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, eos_token_id=151645)


@dataclasses.dataclass(frozen=True)
class VisionConfig(QwenVisionSizes):
    """The Qwen2-VL vision tower (a ViT with 2-D rotary and a 2x2 patch merger)."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584  # the merger's output width = the LLM's hidden size
    rope_theta: float = 10000.0

    def __post_init__(self):
        coerce_fields(self)

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig(BackboneConfig):
    """The whole Qwen2-VL: decoder-only LLM with M-RoPE plus the vision tower."""

    model_type = "qwen2_vl"
    position_modes = ("sequential", "mrope")
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
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
    # the checkpoint's default position rule when a caller gives none (None: the backbone's native "mrope");
    # a model imported from the authors' release records "sequential", the positions it was trained with
    position_mode: str | None = None
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)

    def check(self) -> None:
        super().check()
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section={list(self.mrope_section)} must have 3 entries summing to "
                f"head_dim/2 = {self.head_dim // 2} (head_dim = hidden_size / num_attention_heads)"
            )
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size={self.vision.out_hidden_size} must equal the LLM "
                f"hidden_size={self.hidden_size}"
            )

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> Qwen2VLConfig:
        """Read an HF Qwen2-VL config: the flat old hub layout or the nested transformers-5 layout."""
        llm = read_llm_fields(hf, "Qwen2-VL", LLM_DEFAULTS)
        vis = dict(hf.get("vision_config") or {})
        vision = VisionConfig(
            depth=vis.get("depth", 32),
            embed_dim=vis.get("embed_dim", 1280),
            num_heads=vis.get("num_heads", 16),
            mlp_ratio=vis.get("mlp_ratio", 4),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            out_hidden_size=vis.get("hidden_size", llm["hidden_size"]),
            rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        )
        return cls(**llm, vision=vision)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style Qwen2-VL config.json, for checkpoints saved without one."""
        v = self.vision
        vision = {
            "model_type": "qwen2_vl_vision", "depth": v.depth, "embed_dim": v.embed_dim,
            "hidden_size": v.out_hidden_size, "num_heads": v.num_heads,
            "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
            "in_channels": v.in_channels, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "hidden_act": "quick_gelu",
        }
        return hf_config_dict(self, "Qwen2VLForConditionalGeneration",
                              llm_hf_dict(self, "qwen2_vl_text", 32768), vision)

"""Qwen2.5-VL's config: the Qwen2-VL LLM fields plus a windowed vision tower, read from and written to HF config.json.

This module imports no model code (no JAX), so the config registry can load it early.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ivtlr_jax.config import coerce_fields
from ivtlr_jax.models.qwen2_vl.config import Qwen2VLConfig
from ivtlr_jax.models.qwen_config import QwenVisionSizes, hf_config_dict, llm_hf_dict

VISION_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig(QwenVisionSizes):
    """The Qwen2.5-VL vision tower: a ViT with RMSNorm, SwiGLU MLPs, 2-D rotary and window attention.

    Blocks in `fullatt_block_indexes` attend over the whole image; the others within windows of
    `window_size` pixels (112 = 4 x 4 merged units = 8 x 8 patches of 14 px).
    """

    depth: int = 32
    embed_dim: int = 1280  # the ViT width (vision_config.hidden_size in config.json)
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584  # the merger's output width = the LLM's hidden size
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    tokens_per_second: int = 2  # videos only (kept for the round trip; videos are out of scope)
    rope_theta: float = 10000.0

    def __post_init__(self):
        coerce_fields(self)
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size < unit:
            raise ValueError(f"vision_config: window_size={self.window_size} must be at least patch_size * "
                             f"spatial_merge_size = {unit} pixels (one merged unit)")
        self.check_tower(VISION_ACTIVATIONS, fullatt_block_indexes=self.fullatt_block_indexes)

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def window_units(self) -> int:
        """Side of a window in merged units (4 for 112 px windows of 2 x 2 merged 14 px patches)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig(Qwen2VLConfig):
    """The whole Qwen2.5-VL: Qwen2-VL's LLM (Qwen2 decoder with M-RoPE) plus the windowed vision tower.

    The defaults are Qwen2.5-VL-7B-Instruct's (its LLM has Qwen2-VL-7B's shape).
    """

    model_type = "qwen2_5_vl"
    vision: Qwen25VisionConfig = dataclasses.field(default_factory=Qwen25VisionConfig)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> Qwen25VLConfig:
        """Read an HF Qwen2.5-VL config: the flat 4.x hub layout or the nested transformers-5 layout
        (rope_theta or rope_parameters; mrope_section in rope_scaling or rope_parameters)."""
        # The LLM fields are read exactly as Qwen2-VL's (the vision section differs and is read below).
        text = Qwen2VLConfig.from_hf_dict({**hf, "vision_config": {}})
        vis = dict(hf.get("vision_config") or {})
        vrope = vis.get("rope_parameters") or {}
        vision = Qwen25VisionConfig(
            depth=vis.get("depth", 32),
            embed_dim=vis.get("hidden_size", 1280),
            intermediate_size=vis.get("intermediate_size", 3420),
            num_heads=vis.get("num_heads", 16),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            out_hidden_size=vis.get("out_hidden_size", text.hidden_size),
            window_size=vis.get("window_size", 112),
            fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
            hidden_act=vis.get("hidden_act", "silu"),
            tokens_per_second=vis.get("tokens_per_second", 2),
            rope_theta=vrope.get("rope_theta", 10000.0),
        )
        fields = {f.name: getattr(text, f.name) for f in dataclasses.fields(Qwen2VLConfig) if f.name != "vision"}
        return cls(**fields, vision=vision)

    def to_hf_dict(self) -> dict:
        """The config.json `--to-hf` writes (see `to_hf_dict`)."""
        return to_hf_dict(self)


def to_hf_dict(cfg: Qwen25VLConfig) -> dict:
    """A transformers-5 style Qwen2.5-VL config.json (`Qwen2_5_VLForConditionalGeneration` loads it)."""
    v = cfg.vision
    vision = {
        "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.embed_dim,
        "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size, "out_hidden_size": v.out_hidden_size,
        "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "hidden_act": v.hidden_act, "tokens_per_second": v.tokens_per_second,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    return hf_config_dict(cfg, "Qwen2_5_VLForConditionalGeneration",
                          llm_hf_dict(cfg, "qwen2_5_vl_text", 128000), vision)

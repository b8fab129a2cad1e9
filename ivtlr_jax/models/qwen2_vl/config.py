"""Qwen2-VL's config: the LLM (Qwen2 decoder with M-RoPE) and the vision tower, read from and written to HF config.json.

Imports no JAX and no model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ivtlr_jax.config import coerce_fields
from ivtlr_jax.models.config import BackboneConfig


@dataclasses.dataclass(frozen=True)
class VisionConfig:
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
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one `pixel_values` row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


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
        text = dict(hf.get("text_config") or {})
        flat = {k: v for k, v in hf.items() if k not in ("text_config", "vision_config")}
        # Text keys may live at the top (old layout) or under text_config (new layout).
        merged = {**flat, **text}

        def get(key, default=None):
            return merged.get(key, default)

        rope = get("rope_parameters") or get("rope_scaling") or {}
        mrope = rope.get("mrope_section")
        if mrope is None:
            raise ValueError(
                "config.json: no mrope_section found in rope_parameters or rope_scaling; "
                "a Qwen2-VL config needs e.g. rope_scaling={'type': 'mrope', 'mrope_section': [16, 24, 24]}"
            )
        rope_theta = rope.get("rope_theta", get("rope_theta", 1000000.0))
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("config.json: hidden_size and num_attention_heads are required")
        vis = dict(hf.get("vision_config") or {})
        vrope = vis.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=vis.get("depth", 32),
            embed_dim=vis.get("embed_dim", 1280),
            num_heads=vis.get("num_heads", 16),
            mlp_ratio=vis.get("mlp_ratio", 4),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            out_hidden_size=vis.get("hidden_size", hidden),
            rope_theta=vrope.get("rope_theta", 10000.0),
        )
        eos = get("eos_token_id", 151645)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            mrope_section=tuple(mrope),
            tie_word_embeddings=tie,
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            eos_token_id=eos,
            pad_token_id=get("pad_token_id"),
            vision=vision,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style Qwen2-VL config.json, for checkpoints saved without one."""
        cfg, v = self, self.vision
        text = {
            "model_type": "qwen2_vl_text", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu", "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "mrope_section": list(cfg.mrope_section),
                                "rope_theta": cfg.rope_theta},
            "use_sliding_window": False,
            "bos_token_id": None,  # Qwen2-VL uses no BOS; the class default (151643) can lie outside a small vocab
            "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else cfg.eos_token_id[0],
            "pad_token_id": cfg.pad_token_id,
        }
        vision = {
            "model_type": "qwen2_vl_vision", "depth": v.depth, "embed_dim": v.embed_dim,
            "hidden_size": v.out_hidden_size, "num_heads": v.num_heads,
            "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
            "in_channels": v.in_channels, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "hidden_act": "quick_gelu",
        }
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "tie_word_embeddings": cfg.tie_word_embeddings, "image_token_id": cfg.image_token_id,
            "video_token_id": cfg.video_token_id, "vision_start_token_id": cfg.vision_start_token_id,
            "vision_end_token_id": cfg.vision_end_token_id, "text_config": text, "vision_config": vision,
        }



"""Chameleon's config: the decoder, its mixed text and image-code vocabulary and the VQ tokenizer, read from and
written to HF config.json. Imports no JAX and no model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ivtlr_jax.config import coerce_fields
from ivtlr_jax.models.config import BackboneConfig


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Chameleon's VQ-VAE image tokenizer (encoder side): conv levels, mid attention, codebook."""

    embed_dim: int = 256
    num_embeddings: int = 8192
    double_latent: bool = False
    latent_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] | None = None
    attn_type: str = "vanilla"

    def __post_init__(self):
        coerce_fields(self)

    @property
    def latent_size(self) -> int:
        """Side of the code grid: resolution / 2^(levels - 1) (32 for the 7B config)."""
        return self.resolution // 2 ** (len(self.channel_multiplier) - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size**2


def image_code_name(code: int) -> str:
    """Chameleon's vocabulary name of image code `code`: IMGIMG + digits written A..J + a closing Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_vocabulary(vocabulary_map: dict[str, int]) -> tuple[int, ...]:
    """Codebook index -> BPE id from the `IMGIMG...` names (as transformers' ChameleonImageVocabularyMapping).

    A name is IMGIMG + the code written with letters A..J for digits 0..9 + one trailing character.
    Every code from 0 to the largest must have a name.
    """
    digits = {chr(ord("A") + i): str(i) for i in range(10)}
    img2bpe = {}
    for name, bpe in vocabulary_map.items():
        if name.startswith("IMGIMG"):
            img2bpe[int("".join(digits.get(c, c) for c in name[len("IMGIMG") : -1]))] = int(bpe)
    if not img2bpe:
        return ()
    missing = sorted(set(range(max(img2bpe) + 1)) - set(img2bpe))
    if missing:
        raise ValueError(f"config.json: vocabulary_map names image codes up to {max(img2bpe)} but not {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; every code needs its IMGIMG entry")
    return tuple(img2bpe[c] for c in range(len(img2bpe)))


@dataclasses.dataclass(frozen=True)
class ChameleonConfig(BackboneConfig):
    """Chameleon: a Llama-style decoder with per-head q/k LayerNorm over one vocabulary of text and image codes."""

    model_type = "chameleon"
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    swin_norm: bool = False
    image_token_id: int = 8711  # the <image> placeholder the processor repeats per image token
    image_start_token_id: int | None = None  # <racm3:break>
    image_end_token_id: int | None = None  # <eoss>
    image_vocab: tuple[int, ...] = ()  # codebook index -> BPE id; these columns are masked in the logits
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    latent_token_id: int | None = None
    start_latent_token_id: int | None = None
    end_latent_token_id: int | None = None
    position_mode: str | None = None  # the checkpoint's default position rule (None: native, i.e. sequential)
    vq: VQConfig = dataclasses.field(default_factory=VQConfig)

    def check(self) -> None:
        super().check()
        if self.image_vocab and len(self.image_vocab) < self.vq.num_embeddings:
            raise ValueError(f"the vocabulary maps {len(self.image_vocab)} image codes but the VQ codebook has "
                             f"{self.vq.num_embeddings}; config.json's vocabulary_map needs one IMGIMG name per code")

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ChameleonConfig:
        """Read a transformers ChameleonConfig dict (config.json)."""
        vocab_map = hf.get("vocabulary_map") or {}
        if "<image>" not in vocab_map:
            raise ValueError("config.json: vocabulary_map has no '<image>' entry; a Chameleon config maps the image "
                             "placeholder and the IMGIMG image-code tokens to ids")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only default RoPE)")
        vq = dict(hf.get("vq_config") or {})
        vq_fields = {f.name for f in dataclasses.fields(VQConfig)}
        eos = hf.get("eos_token_id", 2)
        heads = hf.get("num_attention_heads", 32)
        return cls(
            vocab_size=hf.get("vocab_size", 65536), hidden_size=hf.get("hidden_size", 4096),
            intermediate_size=hf.get("intermediate_size", 11008), num_hidden_layers=hf.get("num_hidden_layers", 32),
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), swin_norm=bool(hf.get("swin_norm")),
            image_token_id=int(vocab_map["<image>"]), image_start_token_id=vocab_map.get("<racm3:break>"),
            image_end_token_id=vocab_map.get("<eoss>"), image_vocab=image_vocabulary(vocab_map),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(np.atleast_1d(eos).tolist()),
            pad_token_id=hf.get("pad_token_id"),
            vq=VQConfig(**{k: v for k, v in vq.items() if k in vq_fields}),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers ChameleonConfig dict, for checkpoints saved without their config.json."""
        c, v = self, self.vq
        vocab_map = {"<image>": c.image_token_id}
        if c.image_start_token_id is not None:
            vocab_map["<racm3:break>"] = c.image_start_token_id
        if c.image_end_token_id is not None:
            vocab_map["<eoss>"] = c.image_end_token_id
        for code, bpe in enumerate(c.image_vocab):
            vocab_map[image_code_name(code)] = int(bpe)
        return {
            "architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "rms_norm_eps": c.rms_norm_eps, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "attention_bias": False, "mlp_bias": False, "swin_norm": c.swin_norm,
            "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
            "eos_token_id": list(c.eos_token_id) if len(c.eos_token_id) > 1 else c.eos_token_id[0],
            "pad_token_id": c.pad_token_id, "vocabulary_map": vocab_map,
            "vq_config": {"embed_dim": v.embed_dim, "num_embeddings": v.num_embeddings,
                          "double_latent": v.double_latent, "latent_channels": v.latent_channels,
                          "resolution": v.resolution, "in_channels": v.in_channels, "base_channels": v.base_channels,
                          "channel_multiplier": list(v.channel_multiplier), "num_res_blocks": v.num_res_blocks,
                          "attn_resolutions": list(v.attn_resolutions or []), "attn_type": v.attn_type},
        }

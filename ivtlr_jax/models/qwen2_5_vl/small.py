"""Qwen2.5-VL's small random models (see `ivtlr_jax.models.small`): Qwen2-VL's tiny and benchmark LLMs and
tokenizer with a windowed vision tower."""

from __future__ import annotations

from ivtlr_jax.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig
from ivtlr_jax.models.qwen2_vl import small as base
from ivtlr_jax.models.qwen2_vl.small import bench_batch, generation_prompts, hf_reference  # noqa: F401  (Qwen2-VL's)

EMBEDDED_DEFAULT = "tiny_qwen25vl.yaml"

# the tiny Qwen2-VL's widths, 56 px windows (2 x 2 merged units) in block 0, full attention in block 1
TINY_VISION = dict(depth=2, embed_dim=64, intermediate_size=128, num_heads=2, window_size=56,
                   fullatt_block_indexes=(1,))


def tiny_model(corpus, vocab_size, model=None, vision=None):
    """The tiny Qwen2-VL's tokenizer and LLM with a Qwen2.5-VL (windowed) vision tower."""
    tok, llm = base.tiny_model(corpus, vocab_size, model, None)
    v = {**TINY_VISION, **(vision or {})}
    fields = {f: getattr(llm, f) for f in llm.__dataclass_fields__ if f != "vision"}
    return tok, Qwen25VLConfig(**fields, vision=Qwen25VisionConfig(**v, out_hidden_size=llm.hidden_size))


def bench_model(vocab: int = 8192, hidden: int = 512, layers: int = 8):
    """(transformers class, its Qwen2_5_VLConfig, latent token id): the Qwen2-VL benchmark LLM, and a vision tower
    shaped like the 7B's (112 px windows = 8 x 8 patches, so the 280 px image has 3 x 3 windows cut at the edges;
    1 of 4 blocks full)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=hidden,
                  window_size=112, fullatt_block_indexes=[3])
    cfg = Qwen2_5_VLConfig(vision_config=vision, **base.llm_and_ids(vocab, hidden, layers))
    return Qwen2_5_VLForConditionalGeneration, cfg, base.special_ids(vocab)["latent"]

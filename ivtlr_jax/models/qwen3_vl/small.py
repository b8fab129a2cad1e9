"""Qwen3-VL's small random models (see `ivtlr_jax.models.small`): Qwen2-VL's tiny and benchmark LLM widths and
tokenizer as a Qwen3 decoder (q/k norms, explicit head_dim, interleaved M-RoPE), with a patch-16 vision tower that
has a learned position table and DeepStack."""

from __future__ import annotations

from ivtlr_jax.models.qwen2_vl import small as base
from ivtlr_jax.models.qwen3_vl.config import Qwen3VisionConfig, Qwen3VLConfig

EMBEDDED_DEFAULT = "tiny_qwen3vl.yaml"

# the tiny Qwen2-VL's widths, patch 16 (320 px images: 100 tokens), an 8 x 8 learned position table, DeepStack
# after both blocks (into decoder layers 0 and 1); its LLM has head_dim 32 and interleaved M-RoPE (6, 5, 5)
TINY_VISION = dict(depth=2, embed_dim=64, intermediate_size=128, num_heads=2, num_position_embeddings=64,
                   deepstack_visual_indexes=(0, 1))
PATCH_DIM = 3 * 2 * 16 * 16  # one pixel_values row at patch 16


def tiny_model(corpus, vocab_size, model=None, vision=None):
    """The tiny Qwen2-VL's tokenizer and LLM widths as a Qwen3-VL (Qwen3 decoder, DeepStack vision tower)."""
    tok, llm = base.tiny_model(corpus, vocab_size, {"mrope_section": (6, 5, 5), **(model or {})}, None)
    v = {**TINY_VISION, **(vision or {})}
    v["deepstack_visual_indexes"] = tuple(v["deepstack_visual_indexes"])
    fields = {f: getattr(llm, f) for f in llm.__dataclass_fields__ if f != "vision"}
    return tok, Qwen3VLConfig(**fields, head_dim=llm.hidden_size // llm.num_attention_heads,
                              vision=Qwen3VisionConfig(**v, out_hidden_size=llm.hidden_size))


def bench_model(vocab: int = 8192, hidden: int = 512, layers: int = 8):
    """(transformers class, its Qwen3VLConfig, latent token id): the benchmark LLM as Qwen3 (q/k norms, head_dim
    64, interleaved M-RoPE (12, 10, 10)) and a vision tower shaped like the 8B's in miniature (patch 16, a 16 x 16
    position table, DeepStack after blocks 0, 1, 2 of 4)."""
    from transformers import Qwen3VLConfig as HFQwen3VLConfig
    from transformers import Qwen3VLForConditionalGeneration

    llm = base.llm_and_ids(vocab, hidden, layers)
    llm["text_config"].update(head_dim=64, rope_parameters={"rope_type": "default", "mrope_section": [12, 10, 10],
                                                            "mrope_interleaved": True, "rope_theta": 5000000.0})
    vision = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=hidden, patch_size=16,
                  num_position_embeddings=256, deepstack_visual_indexes=[0, 1, 2])
    cfg = HFQwen3VLConfig(vision_config=vision, **llm)
    return Qwen3VLForConditionalGeneration, cfg, base.special_ids(vocab)["latent"]


def bench_batch(batch: int, n_latent: int = 0, text_len: int = 128, tail: int = 0, seed: int = 0,
                vocab: int = 8192):
    """Qwen2-VL's benchmark rows with one 320x320 image at patch 16 (the same 20 x 20 grid, 100 tokens)."""
    return base.bench_batch(batch, n_latent, text_len, tail, seed, vocab, patch_dim=PATCH_DIM)


def generation_prompts(cfg, batch: int, n: int, text_tokens: int, seed: int = 0):
    """Qwen2-VL's generation prompts (the pixel rows sized by cfg.vision.patch_dim)."""
    return base.generation_prompts(cfg, batch, n, text_tokens, seed)


def hf_reference(hf_eager, hf_sdpa):
    """Qwen2-VL's reference pieces, with image_features returning (features, DeepStack features per layer): the
    reference adds those at the prompt's image tokens and at every re-fed one, as transformers does."""
    import torch

    lm_e, lm_s, _, positions, head = base.hf_reference(hf_eager, hf_sdpa)

    def image_features(pv, grid, dtype, dev):
        out = hf_eager.model.get_image_features(torch.as_tensor(pv, device=dev).to(dtype),
                                                torch.as_tensor(grid, device=dev))
        return torch.cat(out.pooler_output), [torch.cat(f) for f in out.deepstack_features]

    return lm_e, lm_s, image_features, positions, head

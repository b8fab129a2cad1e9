"""Qwen2-VL's small random models (see `ivtlr_jax.models.small`): the embedded default's tiny model with its
byte-level BPE tokenizer carrying Qwen2-VL's special tokens and chat template, and the benchmarks' small model
(hidden 512, 8 layers; a vision tower of 4 blocks of width 256) with its prompts."""

from __future__ import annotations

import numpy as np

from ivtlr_jax.models.qwen2_vl.config import Qwen2VLConfig, VisionConfig
from ivtlr_jax.models.qwen2_vl.prompt import CHAT_TEMPLATE
from ivtlr_jax.models.small import train_bpe

EMBEDDED_DEFAULT = "tiny.yaml"

# Order fixes their ids: 0..6 right after training (special tokens come first).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TINY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=(4, 6, 6), rope_theta=10000.0)
TINY_VISION = dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2)


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE trained on `corpus` (default: a built-in one), wrapped like Qwen2-VL's: the same special
    tokens and chat-template structure, so it stands in where no checkpoint is available."""
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS) + 1} "
                         "(256 bytes, the special tokens and '<<')")
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe(corpus, vocab_size, SPECIAL_TOKENS),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  extra_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:], model_max_length=32768)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(corpus, vocab_size, model=None, vision=None):
    """(tokenizer, config) of the tiny model: TINY_MODEL / TINY_VISION sizes, `model` / `vision` overriding them."""
    tok = tiny_tokenizer(corpus, vocab_size=vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    m = {**TINY_MODEL, **(model or {})}
    m["mrope_section"] = tuple(m["mrope_section"])
    v = {**TINY_VISION, **(vision or {})}
    cfg = Qwen2VLConfig(vocab_size=len(tok), **m, image_token_id=ids["<|image_pad|>"],
                      video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                      vision_end_token_id=ids["<|vision_end|>"], eos_token_id=(ids["<|im_end|>"],),
                      pad_token_id=ids["<|endoftext|>"], vision=VisionConfig(**v, out_hidden_size=m["hidden_size"]))
    return tok, cfg


# ----------------------------------------------------------------------------- the benchmarks' small model
IMAGE_GRID = (1, 20, 20)  # one 280x280 image: 400 patches of 14x14, 100 tokens after the 2x2 merge
PATCH_DIM = 3 * 2 * 14 * 14  # C * temporal_patch * patch * patch: one pixel_values row


def special_ids(vocab: int) -> dict:
    """Token ids of the benchmarks' special tokens, at the top of the vocabulary."""
    return {"latent": vocab - 7, "vision_start": vocab - 6, "vision_end": vocab - 5, "image": vocab - 4,
            "video": vocab - 3, "eos": vocab - 1}


def llm_and_ids(vocab: int, hidden: int, layers: int) -> dict:
    """The Qwen-family benchmark LLM (head_dim 64, GQA 4:1) and its special token ids, as config keywords."""
    ids = special_ids(vocab)
    heads = hidden // 64
    return dict(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), rms_norm_eps=1e-6,
            bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
        ),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )


def bench_model(vocab: int = 8192, hidden: int = 512, layers: int = 8):
    """(transformers class, its transformers Qwen2VLConfig, latent token id) of the small benchmark model."""
    from transformers import Qwen2VLConfig as HFQwen2VLConfig
    from transformers import Qwen2VLForConditionalGeneration

    cfg = HFQwen2VLConfig(vision_config=dict(depth=4, embed_dim=256, hidden_size=hidden, num_heads=4, mlp_ratio=4),
                        **llm_and_ids(vocab, hidden, layers))
    return Qwen2VLForConditionalGeneration, cfg, special_ids(vocab)["latent"]


def bench_batch(batch: int, n_latent: int = 0, text_len: int = 128, tail: int = 0, seed: int = 0,
                vocab: int = 8192, patch_dim: int = PATCH_DIM):
    """Rows of [text, one 280x280 image (100 tokens), text] + n latent tokens + tail; HF layout pixels (patch_dim
    values a row: Qwen3-VL's 320x320 image at patch 16 has the same 20 x 20 grid)."""
    ids_ = special_ids(vocab)
    rng = np.random.default_rng(seed)
    grid = np.tile(np.array([IMAGE_GRID]), (batch, 1))
    n_patch = int(np.prod(IMAGE_GRID))
    pixel_values = rng.normal(size=(n_patch * batch, patch_dim)).astype(np.float32)
    half = text_len // 2
    rows = []
    for _ in range(batch):
        text = rng.integers(10, vocab - 16, size=text_len).tolist()
        rows.append(text[:half] + [ids_["vision_start"]] + [ids_["image"]] * (n_patch // 4) + [ids_["vision_end"]]
                    + text[half:] + [ids_["latent"]] * n_latent + rng.integers(10, vocab - 16, size=tail).tolist())
    ids = np.array(rows, np.int64)
    return ids, np.ones_like(ids), pixel_values, grid


def generation_prompts(cfg, batch: int, n: int, text_tokens: int, seed: int = 0):
    """Same-length prompts for `cfg` (a converted config that knows its latent token): random text, one 280x280
    image, n latent tokens; (ids, mask, pixel values, grid)."""
    rng = np.random.default_rng(seed)
    t, h, w = IMAGE_GRID
    n_img = t * h * w // cfg.vision.spatial_merge_size**2
    before = text_tokens // 3
    rows = []
    for _ in range(batch):
        text = rng.integers(1, cfg.vocab_size - 16, size=text_tokens).tolist()
        rows.append(text[:before] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
                    + [cfg.vision_end_token_id] + text[before:] + [cfg.latent_token_id] * n)
    ids = np.asarray(rows, np.int32)
    pv = rng.normal(size=(batch * t * h * w, cfg.vision.patch_dim)).astype(np.float32)
    grid = np.tile(np.asarray([IMAGE_GRID], np.int64), (batch, 1))
    return ids, np.ones_like(ids), pv, grid


def hf_reference(hf_eager, hf_sdpa):
    """What the benchmarks' PyTorch reference generation needs of the transformers model: (eager language model,
    sdpa language model, image_features(pixel values, grid, dtype, device) -> (N, H), positions(pos (1, 1, L))
    -> position_ids, head(hidden) -> logits)."""
    import torch

    def image_features(pv, grid, dtype, dev):
        feats = hf_eager.model.get_image_features(torch.as_tensor(pv, device=dev).to(dtype),
                                                  torch.as_tensor(grid, device=dev))
        return torch.cat(getattr(feats, "pooler_output", feats))

    return (hf_eager.model.language_model, hf_sdpa.model.language_model, image_features,
            lambda pos: pos.expand(3, 1, -1), hf_sdpa.lm_head)

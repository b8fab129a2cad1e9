"""Tiny seeded Qwen2-VL models for tests: built with transformers, saved, converted by our converter."""

from __future__ import annotations

import numpy as np

IMAGE, VIDEO, VSTART, VEND = 290, 291, 292, 293


def tiny_hf_config(tie: bool = False, vocab: int = 300):
    from transformers import Qwen2VLConfig

    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=vocab - 1, pad_token_id=0,
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie,
    )
    return cfg


def tiny_hf_model(seed: int = 0, tie: bool = False, scale: float = 0.2):
    """A random Qwen2VLForConditionalGeneration in float32 with eager attention (attention maps)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    cfg = tiny_hf_config(tie=tie)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so differences show up
            p.normal_(0.0, scale)
    model.config._attn_implementation = "eager"
    return model


def image_batch(grid, seed: int = 0):
    """Random HF-layout pixel_values for the given (n, 3) grid."""
    grid = np.asarray(grid)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(int(grid.prod(-1).sum()), 1176)).astype(np.float32), grid


def image_run(grid_row) -> list[int]:
    t, h, w = grid_row
    return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]


def left_pad(rows, pad_id: int = 0):
    """Stack id lists with left padding; returns (ids, mask) int64."""
    n = max(len(r) for r in rows)
    ids = np.full((len(rows), n), pad_id, np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    return ids, mask

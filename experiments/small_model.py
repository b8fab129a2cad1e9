"""The benchmarks' small Qwen2-VL (hidden 512, 8 layers; vision 4 blocks of width 256), random weights.

Built with transformers, saved as a Hugging Face folder and converted with the project's converter,
so the JAX and PyTorch sides hold the same weights.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE, VSTART, VEND, LATENT = 8000, 8001, 8002, 8003


def small_hf_config(vocab: int = 8192):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None,
            eos_token_id=vocab - 1, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
        ),
        vision_config=dict(depth=4, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4),
        image_token_id=IMAGE, video_token_id=8004, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )


def small_models(workdir: str, attn: str = "eager", seed: int = 0):
    """(torch model, IVTLRModel) with the same random weights; the JAX side has <|latent|> = LATENT."""
    import dataclasses

    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.convert import convert_hf_to_checkpoint

    cfg = small_hf_config()
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    hf = Qwen2VLForConditionalGeneration(cfg).eval()
    hf_dir, ckpt = os.path.join(workdir, "hf"), os.path.join(workdir, "ckpt")
    hf.save_pretrained(hf_dir)
    convert_hf_to_checkpoint(hf_dir, ckpt, dtype="float32")
    m = IVTLRModel.from_pretrained(ckpt)
    m.config = dataclasses.replace(m.config, latent_token_id=LATENT)
    return hf, m


def prompt_batch(batch: int, n_latent: int = 0, text_len: int = 128, tail: int = 0, seed: int = 0):
    """Rows of [text, one 280x280 image (100 tokens), text] + n latent tokens + tail; HF layout pixels."""
    rng = np.random.default_rng(seed)
    grid = np.tile(np.array([[1, 20, 20]]), (batch, 1))
    pixel_values = rng.normal(size=(400 * batch, 1176)).astype(np.float32)
    half = text_len // 2
    rows = []
    for _ in range(batch):
        text = rng.integers(10, 7000, size=text_len).tolist()
        rows.append(text[:half] + [VSTART] + [IMAGE] * 100 + [VEND] + text[half:] + [LATENT] * n_latent
                    + rng.integers(10, 7000, size=tail).tolist())
    ids = np.array(rows, np.int64)
    return ids, np.ones_like(ids), pixel_values, grid


def timeit(fn, repeats: int, warmup: int = 1) -> dict:
    """Median/min wall seconds of fn() after warmup calls (compilation happens in warmup)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "repeats": repeats}

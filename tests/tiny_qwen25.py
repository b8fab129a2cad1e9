"""A tiny seeded Qwen2.5-VL for tests: built with transformers on the tiny tokenizer, saved, converted by our CLI.

Vision: 3 blocks (block 1 full attention, blocks 0 and 2 windowed), 84 px windows = 3 x 3 merged units, so a
280 px image (10 x 10 units) has 4 x 4 windows cut at the right and bottom edges. LLM: GQA (4 heads, 2 kv).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, window_size=84,
              fullatt_block_indexes=[1])
SPECIAL = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")


def tiny_tokenizer():
    sys.path.insert(0, ROOT)
    from ivtlr_jax.models.qwen2_vl.small import tiny_tokenizer as build_tiny_tokenizer

    return build_tiny_tokenizer()


def special_ids(tok) -> dict:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}


def tiny_hf_config(tok, vocab: int | None = None, tie: bool = False):
    from transformers import Qwen2_5_VLConfig

    ids = special_ids(tok)
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab or len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(VISION),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie)


def tiny_hf_model(tok, seed: int = 0, scale: float = 0.2, vocab: int | None = None):
    """A random Qwen2_5_VLForConditionalGeneration in float32 with eager attention (attention maps)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_hf_config(tok, vocab)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init so differences show up; norms stay near 1
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.normal_(1.0, 0.1)
            elif "merger.mlp.2" in name:  # image features of order 1, as the LLM's embeddings
                p.normal_(0.0, scale / 4)
            else:
                p.normal_(0.0, scale)
    model.config._attn_implementation = "eager"
    return model


def convert(hf_dir: str, dst: str, *extra) -> str:
    """`tools/convert_weights.py --src hf_dir --dst dst` in a subprocess; returns dst."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--src", hf_dir,
                           "--dst", dst, "--quiet", *extra], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dst


def grow_like_converter(hf, tok_with_latents, n_new: int = 3) -> None:
    """The torch side of `--add-latent-tokens`: n_new rows appended, copied from "<<" (embedding and head)."""
    import torch

    v = hf.config.get_text_config().vocab_size
    src = tok_with_latents.convert_tokens_to_ids("<<")
    hf.resize_token_embeddings(v + n_new)
    with torch.no_grad():
        for w in (hf.get_input_embeddings().weight, hf.lm_head.weight):
            w[v:] = w[src]


def image_batch(grid, seed: int = 0):
    """Random HF-layout pixel_values for the given (n, 3) grid."""
    grid = np.asarray(grid)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(int(grid.prod(-1).sum()), 1176)).astype(np.float32), grid


def image_run(ids: dict, grid_row) -> list[int]:
    t, h, w = grid_row
    return [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * (t * h * w // 4) + [ids["<|vision_end|>"]]

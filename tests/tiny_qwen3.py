"""A tiny seeded Qwen3-VL for tests: built with transformers on the tiny tokenizer, saved, converted by our CLI.

Vision: 3 blocks of width 32, patch 16, a 4 x 4 learned position table (every test grid differs from it, so the
bilinear resampling is exercised), DeepStack after blocks 0 and 2 (or one block, `deepstack=(1,)`). LLM: 3 layers,
GQA (4 heads, 2 kv) with head_dim 24 != hidden / heads, interleaved M-RoPE sections (6, 3, 3).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from tiny_qwen25 import ROOT, grow_like_converter, image_run, special_ids, tiny_tokenizer  # noqa: F401

PATCH_DIM = 3 * 2 * 16 * 16


def tiny_hf_config(tok, deepstack=(0, 2), vocab: int | None = None):
    from transformers import Qwen3VLConfig

    ids = special_ids(tok)
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=16,
                  num_position_embeddings=16, deepstack_visual_indexes=list(deepstack))
    text = dict(vocab_size=vocab or len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [6, 3, 3], "mrope_interleaved": True,
                                 "rope_theta": 1e4},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def tiny_hf_model(tok, seed: int = 0, scale: float = 0.2, deepstack=(0, 2), vocab: int | None = None):
    """A random Qwen3VLForConditionalGeneration in float32 with eager attention (attention maps)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    cfg = tiny_hf_config(tok, deepstack, vocab)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init so differences show up; norms stay near 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif "linear_fc2" in name and "merger" in name:  # image features of order 1, as the embeddings
                p.normal_(0.0, scale / 4)
            else:
                p.normal_(0.0, scale)
    model.config._attn_implementation = "eager"
    return model


def convert(hf_dir: str, dst: str, *extra) -> str:
    """`tools/convert_weights.py --src hf_dir --dst dst` in a subprocess of this checkout's code; returns dst."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--src", hf_dir,
                           "--dst", dst, "--quiet", *extra], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dst


def image_batch(grid, seed: int = 0):
    """Random HF-layout pixel_values for the given (n, 3) grid."""
    grid = np.asarray(grid)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(int(grid.prod(-1).sum()), PATCH_DIM)).astype(np.float32), grid

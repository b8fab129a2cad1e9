"""Tiny seeded Chameleon models for tests: built with transformers, saved with their tokenizer, converted by our CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CODES = 64
RESOLUTION = 64  # 2 VQ levels: a 32 x 32 grid, 1024 codes per image as in the 7B model
VQ = dict(embed_dim=8, num_embeddings=NUM_CODES, latent_channels=8, resolution=RESOLUTION, base_channels=32,
          channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[32])


def tiny_tokenizer():
    sys.path.insert(0, ROOT)
    from ivtlr_jax.models.chameleon.small import tiny_tokenizer as build_tiny_chameleon_tokenizer

    return build_tiny_chameleon_tokenizer(NUM_CODES)


def vocabulary_map(tok) -> dict:
    vocab = tok.get_vocab()
    return {name: i for name, i in vocab.items() if name.startswith("IMGIMG") or name in
            ("<image>", "<racm3:break>", "<eoss>", "<s>", "</s>", "<pad>")}


def tiny_hf_chameleon(tok, swin_norm=False, kv_heads=2, seed=0, scale=0.2):
    """A random ChameleonForConditionalGeneration (float32, eager attention) on the tokenizer's vocabulary."""
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    cfg = ChameleonConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv_heads, vocabulary_map=vocabulary_map(tok),
                          vq_config=VQ, swin_norm=swin_norm, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init so differences show up (the VQ keeps its own init)
        for name, p in model.named_parameters():
            if "vqmodel" not in name:
                p.normal_(0.0, scale)
            elif "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    model.config._attn_implementation = "eager"
    return model


def save_and_convert(hf, tok, folder, *extra) -> str:
    """save_pretrained + the tokenizer into folder/hf, then `tools/convert_weights.py` into folder/ckpt."""
    hf_dir, ckpt = os.path.join(folder, "hf"), os.path.join(folder, "ckpt")
    hf.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--src", hf_dir,
                           "--dst", ckpt, "--quiet", *extra], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt


def image_run(tok) -> list[int]:
    """<racm3:break> <image> x 1024 <eoss>."""
    ids = tok.convert_tokens_to_ids(["<racm3:break>", "<image>", "<eoss>"])
    return [ids[0]] + [ids[1]] * (RESOLUTION // 2) ** 2 + [ids[2]]


def pixels(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, RESOLUTION, RESOLUTION)).astype(np.float32)

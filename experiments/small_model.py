"""The benchmarks' small models, random weights: Qwen2-VL (hidden 512, 8 layers; vision 4 blocks of width 256),
Qwen2.5-VL (the same LLM; a windowed vision tower of 4 blocks, 112 px windows, the last block full attention) and
Chameleon (the same LLM shape; a small VQ tokenizer giving 1024 codes per 64x64 image).

Built with transformers, saved as a Hugging Face folder and converted with the project's converter,
so the JAX and PyTorch sides hold the same weights.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ivtlr_jax.models.chameleon.config import image_code_name

IMAGE_GRID = (1, 20, 20)  # one 280x280 image: 400 patches of 14x14, 100 tokens after the 2x2 merge
PATCH_DIM = 3 * 2 * 14 * 14  # C * temporal_patch * patch * patch: one pixel_values row


def special_ids(vocab: int) -> dict:
    """Token ids of the benchmarks' special tokens, at the top of the vocabulary."""
    return {"latent": vocab - 7, "vision_start": vocab - 6, "vision_end": vocab - 5, "image": vocab - 4,
            "video": vocab - 3, "eos": vocab - 1}


def _llm_and_ids(vocab: int, hidden: int, layers: int) -> dict:
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


def small_hf_config(vocab: int = 8192, hidden: int = 512, layers: int = 8):
    """transformers' Qwen2VLConfig of the small benchmark model (head_dim 64, GQA 4:1)."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(vision_config=dict(depth=4, embed_dim=256, hidden_size=hidden, num_heads=4, mlp_ratio=4),
                         **_llm_and_ids(vocab, hidden, layers))


def small_qwen25_config(vocab: int = 8192, hidden: int = 512, layers: int = 8):
    """transformers' Qwen2_5_VLConfig: the Qwen2-VL benchmark LLM, and a vision tower shaped like the 7B's
    (112 px windows = 8 x 8 patches, so the 280 px image has 3 x 3 windows cut at the edges; 1 of 4 blocks full)."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=hidden,
                  window_size=112, fullatt_block_indexes=[3])
    return Qwen2_5_VLConfig(vision_config=vision, **_llm_and_ids(vocab, hidden, layers))


def small_qwen3_config(vocab: int = 8192, hidden: int = 512, layers: int = 8):
    """transformers' Qwen3VLConfig: the benchmark LLM as Qwen3 (q/k norms, head_dim 64, interleaved M-RoPE (12, 10,
    10)) and a vision tower shaped like the 8B's in miniature (patch 16, a 16 x 16 position table, DeepStack after
    blocks 0, 1, 2 of 4)."""
    from transformers import Qwen3VLConfig

    base = _llm_and_ids(vocab, hidden, layers)
    base["text_config"].update(head_dim=64, rope_parameters={"rope_type": "default", "mrope_section": [12, 10, 10],
                                                             "mrope_interleaved": True, "rope_theta": 5000000.0})
    vision = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=hidden, patch_size=16,
                  num_position_embeddings=256, deepstack_visual_indexes=[0, 1, 2])
    return Qwen3VLConfig(vision_config=vision, **base)


def _paired_models(model_class, cfg, latent_id: int, workdir: str, attn: str, seed: int, dtype: str):
    """(torch model, IVTLRModel) with the same random weights (built, saved, converted); JAX knows <|latent|>."""
    import dataclasses

    import torch

    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.convert import convert_hf_to_checkpoint

    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    hf = model_class(cfg).eval()
    hf_dir, ckpt = os.path.join(workdir, "hf"), os.path.join(workdir, "ckpt")
    hf.save_pretrained(hf_dir)
    convert_hf_to_checkpoint(hf_dir, ckpt, dtype=dtype, verbose=False)
    m = IVTLRModel.from_pretrained(ckpt, dtype=dtype)
    m.config = dataclasses.replace(m.config, latent_token_id=latent_id)
    return hf, m


def small_models(workdir: str, attn: str = "eager", seed: int = 0, vocab: int = 8192, hidden: int = 512,
                 layers: int = 8, dtype: str = "float32"):
    """(torch Qwen2-VL in float32, IVTLRModel) with the same random weights; the JAX side knows <|latent|>."""
    from transformers import Qwen2VLForConditionalGeneration

    return _paired_models(Qwen2VLForConditionalGeneration, small_hf_config(vocab, hidden, layers),
                          special_ids(vocab)["latent"], workdir, attn, seed, dtype)


def small_qwen25_models(workdir: str, attn: str = "eager", seed: int = 0, vocab: int = 8192, hidden: int = 512,
                        layers: int = 8, dtype: str = "float32"):
    """(torch Qwen2.5-VL in float32, IVTLRModel) with the same random weights; the JAX side knows <|latent|>."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _paired_models(Qwen2_5_VLForConditionalGeneration, small_qwen25_config(vocab, hidden, layers),
                          special_ids(vocab)["latent"], workdir, attn, seed, dtype)


def small_qwen3_models(workdir: str, attn: str = "eager", seed: int = 0, vocab: int = 8192, hidden: int = 512,
                       layers: int = 8, dtype: str = "float32"):
    """(torch Qwen3-VL in float32, IVTLRModel) with the same random weights; the JAX side knows <|latent|>."""
    from transformers import Qwen3VLForConditionalGeneration

    return _paired_models(Qwen3VLForConditionalGeneration, small_qwen3_config(vocab, hidden, layers),
                          special_ids(vocab)["latent"], workdir, attn, seed, dtype)


def prompt_batch(batch: int, n_latent: int = 0, text_len: int = 128, tail: int = 0, seed: int = 0,
                 vocab: int = 8192, patch_dim: int = PATCH_DIM):
    """Rows of [text, one 280x280 image (100 tokens), text] + n latent tokens + tail; HF layout pixels (patch_dim
    values a row: 3 * 2 * 16 * 16 for Qwen3-VL's 320x320 image, the same 20 x 20 grid)."""
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


def timeit_interleaved(fns: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """Time several calls in rounds that call each once in turn, so the slow drift of a shared machine hits them
    alike. Returns ({name: first_s (first call, compilation included), median_s, min_s, repeats}, {name: last
    result})."""
    import time

    first, times, last = {}, {name: [] for name in fns}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        last[name] = fn()
        first[name] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    stats = {name: {"first_s": first[name], "median_s": float(np.median(t)), "min_s": float(np.min(t)),
                    "repeats": repeats} for name, t in times.items()}
    return stats, last


# ----------------------------------------------------------------------------- Chameleon
CHAMELEON_VQ = dict(embed_dim=32, num_embeddings=1024, latent_channels=32, resolution=64, base_channels=64,
                    channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])  # 1024 codes per 64x64 image


def chameleon_ids(vocab: int) -> dict:
    """Token ids of the Chameleon benchmark model: the image codes sit in the middle of the vocabulary."""
    return {"latent": vocab - 5, "image_end": vocab - 4, "image_start": vocab - 3, "image": vocab - 2,
            "eos": vocab - 1, "first_code": vocab // 2}


def small_chameleon_config(vocab: int = 8192, hidden: int = 512, layers: int = 8):
    """transformers' ChameleonConfig of the small benchmark model (head_dim 64, GQA 4:1, 1024 codes per image)."""
    from transformers import ChameleonConfig

    ids = chameleon_ids(vocab)
    vmap = {"<image>": ids["image"], "<racm3:break>": ids["image_start"], "<eoss>": ids["image_end"]}
    for c in range(CHAMELEON_VQ["num_embeddings"]):
        vmap[image_code_name(c)] = ids["first_code"] + c
    heads = hidden // 64
    return ChameleonConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocabulary_map=vmap,
                           vq_config=CHAMELEON_VQ, eos_token_id=ids["eos"], bos_token_id=None, pad_token_id=0)


def small_chameleon_models(workdir: str, attn: str = "eager", seed: int = 0, vocab: int = 8192, hidden: int = 512,
                           layers: int = 8, dtype: str = "float32"):
    """(torch Chameleon in float32, IVTLRModel) with the same random weights; the JAX side knows <|latent|>."""
    from transformers import ChameleonForConditionalGeneration

    return _paired_models(ChameleonForConditionalGeneration, small_chameleon_config(vocab, hidden, layers),
                          chameleon_ids(vocab)["latent"], workdir, attn, seed, dtype)


def chameleon_prompt_batch(batch: int, n_latent: int = 0, text_len: int = 128, tail: int = 0, seed: int = 0,
                           vocab: int = 8192):
    """Rows of [text, one 64x64 image (1024 tokens with its markers), text] + n latents + tail;
    pixels (B, 3, 64, 64)."""
    ids_ = chameleon_ids(vocab)
    rng = np.random.default_rng(seed)
    res = CHAMELEON_VQ["resolution"]
    pixel_values = rng.uniform(-1, 1, size=(batch, 3, res, res)).astype(np.float32)
    half, codes = text_len // 2, (res // 2) ** 2
    rows = []
    for _ in range(batch):
        text = rng.integers(10, ids_["first_code"] - 1, size=text_len).tolist()
        rows.append(text[:half] + [ids_["image_start"]] + [ids_["image"]] * codes + [ids_["image_end"]]
                    + text[half:] + [ids_["latent"]] * n_latent
                    + rng.integers(10, ids_["first_code"] - 1, size=tail).tolist())
    ids = np.array(rows, np.int64)
    return ids, np.ones_like(ids), pixel_values, None


# backbone -> (paired builder, prompt batch, the release's K); the benchmarks' --backbone choices
BENCH_BACKBONES = {
    "qwen2_vl": (small_models, prompt_batch, 32),
    "qwen2_5_vl": (small_qwen25_models, prompt_batch, 32),
    "chameleon": (small_chameleon_models, chameleon_prompt_batch, 64),
    "qwen3_vl": (small_qwen3_models, functools.partial(prompt_batch, patch_dim=3 * 2 * 16 * 16), 32),
}

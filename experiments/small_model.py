"""The benchmarks' small models, random weights, for any backbone with small models in the registry (Qwen2-VL:
hidden 512, 8 layers, vision 4 blocks of width 256; Qwen2.5-VL: the same LLM, a windowed vision tower; Chameleon:
the same LLM shape, a small VQ tokenizer giving 1024 codes per 64x64 image): each backbone's `bench_model` and
`bench_batch` (`ivtlr_jax.models.small_models`).

Built with transformers, saved as a Hugging Face folder and converted with the project's converter,
so the JAX and PyTorch sides hold the same weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ivtlr_jax.models import DEFAULT_MODEL_TYPE, backbone_class, small_models, with_small_models


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


def paired_models(workdir: str, backbone: str = DEFAULT_MODEL_TYPE, attn: str = "eager", seed: int = 0,
                  vocab: int = 8192, hidden: int = 512, layers: int = 8, dtype: str = "float32"):
    """(torch model in float32, IVTLRModel) of the backbone's small benchmark model, with the same random weights;
    the JAX side knows <|latent|>."""
    model_class, cfg, latent_id = small_models(backbone).bench_model(vocab, hidden, layers)
    return _paired_models(model_class, cfg, latent_id, workdir, attn, seed, dtype)


class Bench(NamedTuple):
    """A backbone's benchmark pieces: its paired models (workdir, attn=, seed=, vocab=, hidden=, layers=, dtype=),
    its prompt batches and the release's K (`Backbone.default_k`)."""

    models: Callable
    batch: Callable
    default_k: int


def bench_backbone(backbone: str) -> Bench:
    """The benchmark pieces of a registered backbone (`--backbone` of the benchmarks: `BENCH_CHOICES`)."""
    small = small_models(backbone)

    def models(workdir, **kw):
        return paired_models(workdir, backbone, **kw)

    return Bench(models, small.bench_batch, backbone_class(backbone).default_k)


BENCH_CHOICES = with_small_models()


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

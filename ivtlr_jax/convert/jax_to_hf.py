"""ivtlr_jax checkpoint folder -> Hugging Face folder that transformers' `from_pretrained` loads (any backbone).

Names and transforms come from the backbone's spec table, the inverse of the conversion in hf_to_jax.
"""

from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from ivtlr_jax.convert.checkpoint import copy_tokenizer_files, hf_config_for, sync_hf_config
from ivtlr_jax.convert.layout import HF_CONFIG_NAME
from ivtlr_jax.convert.load import load_params
from ivtlr_jax.convert.safetensors_io import INDEX_NAME, TensorSpec, write_sharded
from ivtlr_jax.models import backbone_for
from ivtlr_jax.models import spec as sp

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def export_checkpoint_to_hf(
    ckpt_dir: str,
    dst: str,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Write old-hub-layout safetensors, config.json and the tokenizer files of `ckpt_dir` into `dst`."""
    start = time.time()
    ckpt_dir, dst = os.path.abspath(ckpt_dir), os.path.abspath(dst)
    loaded = load_params(ckpt_dir)  # on the host, as stored, unmerged adapters folded in
    cfg, params = loaded.config, loaded.params
    existing = glob.glob(os.path.join(dst, "*.safetensors")) + glob.glob(os.path.join(dst, INDEX_NAME))
    if existing and not overwrite:
        raise ValueError(
            f"--dst {dst!r} already holds model weights ({os.path.basename(existing[0])}); "
            "choose a new folder or pass overwrite=True (--overwrite)"
        )
    os.makedirs(dst, exist_ok=True)
    for path in existing:
        os.remove(path)

    flat = sp.flatten(params)
    entries = {e.hf_name: e for e in sp.hf_entries(backbone_for(cfg).param_spec())}

    def row(name: str) -> np.ndarray:
        e = entries[name]
        arr = flat[e.path]
        return e.to_hf(arr[e.row] if e.row is not None else arr)

    specs = [TensorSpec(e.hf_name, flat[e.path].dtype, e.hf_shape) for e in entries.values()]
    bar = tqdm(total=len(specs), desc="exporting", unit="tensor", disable=not verbose)
    files = write_sharded(dst, specs, row, max_shard_bytes, on_tensor=lambda _: bar.update(1))
    bar.close()

    dtype = str(np.dtype(params.llm.embed.dtype))
    hf_path = os.path.join(ckpt_dir, HF_CONFIG_NAME)
    if os.path.exists(hf_path):
        with open(hf_path) as f:
            hf_config = json.load(f)
    else:
        hf_config = hf_config_for(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(sync_hf_config(hf_config, cfg, dtype), f, indent=2)
    copied = copy_tokenizer_files(ckpt_dir, dst)

    summary = {
        "src": ckpt_dir,
        "dst": dst,
        "dtype": dtype,
        "tensors": len(specs),
        "parameters": int(sum(int(np.prod(s.shape)) for s in specs)),
        "bytes": int(sum(s.nbytes for s in specs)),
        "files": [os.path.basename(p) for p in files],
        "copied_files": copied,
        "seconds": round(time.time() - start, 2),
    }
    if verbose:
        print(
            f"wrote {dst}\n  tensors    {summary['tensors']}\n  parameters {summary['parameters']:,}\n"
            f"  dtype      {dtype}\n  bytes      {summary['bytes']:,}\n  files      {summary['files']}"
        )
    return summary

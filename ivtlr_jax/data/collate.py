"""Batch collation: rows aligned on their first <|latent|>, lengths bucketed for bounded jit shapes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ivtlr_jax.data.curriculum import IGNORE_INDEX

logger = logging.getLogger(__name__)


def make_buckets(max_len: int = 4096, min_len: int = 32, growth: float = 1.25, multiple: int = 32) -> tuple[int, ...]:
    """A small geometric set of lengths (multiples of `multiple`, ratio ~growth), ending at max_len."""
    if not 0 < min_len <= max_len or growth <= 1.0 or multiple < 1:
        raise ValueError(
            f"need 0 < min_len <= max_len, growth > 1, multiple >= 1; got min_len={min_len}, "
            f"max_len={max_len}, growth={growth}, multiple={multiple}"
        )
    out, cur = [], float(min_len)
    while True:
        b = min(max_len, -(-int(round(cur)) // multiple) * multiple)
        if not out or b > out[-1]:
            out.append(b)
        if b >= max_len:
            return tuple(out)
        cur = max(cur * growth, b + 1)


DEFAULT_BUCKETS = make_buckets()


def bucket_length(length: int, buckets: Sequence[int] | None, what: str = "length") -> int:
    """Smallest bucket >= length (length itself when buckets is None)."""
    if buckets is None:
        return int(length)
    for b in buckets:
        if b >= length:
            return int(b)
    raise ValueError(f"{what} {length} exceeds the largest bucket {max(buckets)}; buckets are {tuple(buckets)}")


def collate(examples: Sequence[dict], pad_id: int, *, prefix_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
            tail_buckets: Sequence[int] | None = DEFAULT_BUCKETS, min_prefix: int = 0,
            min_tail: int = 0) -> dict[str, np.ndarray]:
    """Stage examples -> numpy batch.

    Each example: input_ids, labels (L_i,), anchor (int), pixel_values (the image processor's output:
    Qwen2-VL patch rows, or (C, H, W) images), optional image_grid_thw (3,) or (images_i, 3), optional
    example_index (int, -1 = filler row).
    Row i is left-padded by P - anchor_i so every anchor (first <|latent|>, or prompt end at
    stage 0) lands at P = bucket(max anchor); the tail is right-padded to T = bucket(max
    L_i - anchor_i). Pads: pad_id, attention 0, label -100.

    min_prefix / min_tail widen P and T (every host of a multi-host run passes the global batch's
    widest row, so all hosts collate to the same shape without talking to each other).

    Returns input_ids, attention_mask, labels (B, P + T) int32; pixel_values (sum rows, row size)
    float32 in row order; image_grid_thw (num_images, 3) int32; prefix_len () int32 = P;
    num_latent () int32; example_index (B,) int32.
    """
    if not examples:
        raise ValueError("collate needs at least one example, got 0")
    anchors = [int(e["anchor"]) for e in examples]
    lengths = [len(e["input_ids"]) for e in examples]
    n_latent = {int(e.get("num_latent", 0)) for e in examples}
    if len(n_latent) > 1:
        raise ValueError(f"rows of one batch must share num_latent, got {sorted(n_latent)}")
    prefix = bucket_length(max(max(anchors), min_prefix), prefix_buckets, "prefix length")
    tail = bucket_length(max(max(n - a for n, a in zip(lengths, anchors, strict=True)), min_tail), tail_buckets,
                         "tail length")
    batch, width = len(examples), prefix + tail
    input_ids = np.full((batch, width), pad_id, dtype=np.int32)  # (B, P + T)
    labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int32)  # (B, P + T)
    mask = np.zeros((batch, width), dtype=np.int32)  # (B, P + T)
    for i, e in enumerate(examples):
        start = prefix - anchors[i]
        input_ids[i, start:start + lengths[i]] = e["input_ids"]
        labels[i, start:start + lengths[i]] = e["labels"]
        mask[i, start:start + lengths[i]] = 1
    pixel_values = np.concatenate([np.asarray(e["pixel_values"], dtype=np.float32) for e in examples])
    grids = None
    if examples[0].get("image_grid_thw") is not None:
        grids = np.concatenate([np.asarray(e["image_grid_thw"], dtype=np.int32).reshape(-1, 3) for e in examples])
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixel_values,  # (sum rows, row size), or (images, C, H, W)
        "image_grid_thw": grids,  # (num_images, 3) or None
        "prefix_len": np.asarray(prefix, dtype=np.int32),
        "num_latent": np.asarray(n_latent.pop(), dtype=np.int32),
        "example_index": np.asarray([int(e.get("example_index", i)) for i, e in enumerate(examples)], np.int32),
    }


def repad(batch: dict, prefix_len: int, tail_len: int, pad_id: int) -> dict:
    """Widen a collated batch to prefix P' >= P (left pads) and tail T' >= T (right pads).

    Used so that every host of a multi-host run feeds the same shapes; pads are masked and carry
    no labels, so the computation is unchanged.
    """
    prefix = int(batch["prefix_len"])
    tail = batch["input_ids"].shape[1] - prefix
    if prefix_len < prefix or tail_len < tail:
        raise ValueError(f"repad to prefix {prefix_len}, tail {tail_len} would cut a batch of prefix {prefix}, "
                         f"tail {tail}")
    widths = ((0, 0), (prefix_len - prefix, tail_len - tail))
    out = dict(batch)
    out["input_ids"] = np.pad(batch["input_ids"], widths, constant_values=pad_id)
    out["attention_mask"] = np.pad(batch["attention_mask"], widths, constant_values=0)
    out["labels"] = np.pad(batch["labels"], widths, constant_values=IGNORE_INDEX)
    out["prefix_len"] = np.asarray(prefix_len, dtype=np.int32)
    return out

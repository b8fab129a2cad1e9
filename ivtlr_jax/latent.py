"""The IVT-LR latent loop: prefix pass, `lax.scan` over latent steps, suffix pass, loss.

Final sequence per row: prefix, V_0, h_0, ..., V_{n-1}, h_{n-1}, suffix, where V_t are the K image
embeddings the last query attended to most (not used before) and h_t the final-norm hidden state of
the previous chunk's last position. The KV cache makes the total decoder work one pass over it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ivtlr_jax.config import LatentConfig, ModelConfig
from ivtlr_jax.models import qwen2_vl as q

IGNORE = -100


class LatentLayout(NamedTuple):
    """Host-made arrays describing one batch's final sequence (prefix + n chunks + suffix)."""

    prefix_ids: np.ndarray  # (B, P) int32
    suffix_ids: np.ndarray  # (B, S - P - n) int32
    kv_valid: np.ndarray  # (B, L_final) bool: real tokens of the final sequence
    positions: np.ndarray  # (3, B, L_final) int32
    labels: np.ndarray  # (B, L_final) int32, IGNORE on prefix pads, chunks and unlabelled tokens
    image_pos: np.ndarray  # (B, I_max) int32: prefix index of each image token, 0 where padded
    image_valid: np.ndarray  # (B, I_max) bool


class LatentOutput(NamedTuple):
    loss: float | jax.Array  # mean cross-entropy over labelled tokens
    logits: np.ndarray | jax.Array  # (B, L_final, V) float32
    selected: np.ndarray | jax.Array  # (n, B, k) int32: index among the row's image tokens


def latent_token_layout(cfg: ModelConfig, input_ids, attention_mask) -> tuple[int, int]:
    """Return (n, P): latent tokens per row and the aligned index of the first one; validate rows."""
    if cfg.latent_token_id is None:
        raise ValueError(
            "this checkpoint has no <|latent|> token; convert it with "
            "`python tools/convert_weights.py --add-latent-tokens`"
        )
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    is_lat = (ids == cfg.latent_token_id) & mask
    counts = is_lat.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(
            f"rows hold different numbers of <|latent|> tokens {counts.tolist()}; every row of a batch "
            "needs the same n (the curriculum stage gives it)"
        )
    n = int(counts[0])
    if n == 0:
        return 0, ids.shape[1]
    firsts = is_lat.argmax(1)
    if (firsts != firsts[0]).any():
        raise ValueError(
            f"the first <|latent|> sits at indices {firsts.tolist()}; left-pad the rows so it is at the "
            "same index in every row (the collator does this)"
        )
    p = int(firsts[0])
    if not is_lat[:, p : p + n].all():
        bad = int(np.nonzero(~is_lat[:, p : p + n].all(1))[0][0])
        raise ValueError(f"row {bad}: the <|latent|> tokens are not contiguous; put all n of them in one run")
    if p == 0:
        raise ValueError("a <|latent|> token at index 0 has no prompt before it; the prompt must come first")
    return n, p


def build_layout(cfg: ModelConfig, lcfg: LatentConfig, input_ids, attention_mask, labels, image_grid_thw,
                 n: int, p: int) -> LatentLayout:
    """Validate and lay out the final sequence on the host (positions, labels, image positions)."""
    ids = np.asarray(input_ids).astype(np.int32)
    mask = np.asarray(attention_mask).astype(bool)
    b, s = ids.shape
    if labels is None:
        labels = np.full_like(ids, IGNORE)
    labels = np.asarray(labels).astype(np.int32)
    if labels.shape != ids.shape:
        raise ValueError(f"labels has shape {labels.shape}; it must equal input_ids' {ids.shape} (use -100 to ignore)")
    c = lcfg.chunk_len if n else 0
    prefix_ids, suffix_ids = ids[:, :p], ids[:, p + n :]
    valid = np.concatenate([mask[:, :p], np.ones((b, n * c), bool), mask[:, p + n :]], 1)
    lab = np.concatenate([labels[:, :p], np.full((b, n * c), IGNORE, np.int32), labels[:, p + n :]], 1)
    lab = np.where(valid, lab, IGNORE)
    if lcfg.position_mode == "sequential":
        pos = q.sequential_positions(valid)
    else:
        pre = q.mrope_positions(cfg, prefix_ids, mask[:, :p], image_grid_thw)  # (3, B, P)
        start = pre.max((0, 2)) + 1  # (B,) text after the prompt continues from max + 1
        rest = np.clip(np.cumsum(valid[:, p:], 1) - 1, 0, None) + start[:, None]
        pos = np.concatenate([pre, np.broadcast_to(rest[None], (3,) + rest.shape)], 2).astype(np.int32)
    is_img = (prefix_ids == cfg.image_token_id) & mask[:, :p]
    n_img = is_img.sum(1)
    if n and (n * lcfg.k > n_img).any():
        bad = int(np.nonzero(n * lcfg.k > n_img)[0][0])
        raise ValueError(
            f"row {bad}: n*k = {n}*{lcfg.k} = {n * lcfg.k} image embeddings requested but the row has only "
            f"{int(n_img[bad])} image tokens before its first <|latent|>; lower k or the number of latent steps"
        )
    i_max = max(int(n_img.max()), 1)
    image_pos = np.zeros((b, i_max), np.int32)
    image_valid = np.zeros((b, i_max), bool)
    for r in range(b):
        where = np.nonzero(is_img[r])[0]
        image_pos[r, : len(where)] = where
        image_valid[r, : len(where)] = True
    return LatentLayout(prefix_ids, suffix_ids, valid, pos, lab, image_pos, image_valid)


def cross_entropy(logits, labels):
    """Mean next-token cross-entropy over labelled positions: logits[:, i] predicts labels[:, i + 1]."""
    logits, target = logits[:, :-1], labels[:, 1:]
    keep = target != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, target, 0)[..., None], -1)[..., 0]
    return jnp.sum(nll * keep) / jnp.maximum(keep.sum(), 1)


def select_image_positions(attn_row, image_pos, image_valid, used, k: int):
    """Top-k image positions by attention, not used before (ties: lower position first).

    attn_row (B, L) over cache slots; returns (indices into the image list (B, k), new used mask).
    """
    scores = jnp.take_along_axis(attn_row, image_pos, axis=1)  # (B, I)
    scores = jnp.where(image_valid & ~used, scores, -jnp.inf)
    _, idx = jax.lax.top_k(scores, k)  # (B, k) by descending score; equal scores keep index order
    used = used | jax.nn.one_hot(idx, used.shape[1], dtype=bool).any(1)
    return idx, used


def latent_prefill(params, cfg: ModelConfig, lcfg: LatentConfig, n: int, layout: LatentLayout, image_features,
                   h_offset=None, cache_len: int | None = None):
    """Prefix pass then the scan over n latent steps, filling the KV cache.

    Returns (hidden (B, P + n*C, H) after the final norm, cache, selected (n, B, k)). The cache has
    `cache_len` slots (default: the final sequence length); slots past the final sequence count as
    valid, for tokens decoded later.
    """
    llm = params["llm"]
    prefix_ids = layout.prefix_ids
    b, p = prefix_ids.shape
    c, k = lcfg.chunk_len, lcfg.k
    total = layout.kv_valid.shape[1]
    cache_len = total if cache_len is None else cache_len
    kv_valid = jnp.pad(layout.kv_valid, ((0, 0), (0, cache_len - total)), constant_values=True)
    emb_prefix = q.embed_tokens(params, cfg, prefix_ids, image_features)  # (B, P, H)
    cache = q.init_cache(cfg, b, cache_len, emb_prefix.dtype)
    pos = layout.positions
    hidden, cache, attn = q.decoder(llm, cfg, emb_prefix, pos[:, :, :p], cache, 0, kv_valid,
                                    return_attn_row=True)
    if not n:
        return hidden, cache, jnp.zeros((0, b, k), jnp.int32)
    h = hidden[:, -1] + (0 if h_offset is None else h_offset.astype(hidden.dtype))  # (B, H)
    chunk_pos = pos[:, :, p : p + n * c].reshape(3, b, n, c).transpose(2, 0, 1, 3)  # (n, 3, B, C)
    used = jnp.zeros(layout.image_valid.shape, bool)

    def step(carry, xs):
        cache, h, attn, used = carry
        t, cpos = xs
        if lcfg.latent_grad == "stop":
            h = jax.lax.stop_gradient(h)
        parts = []
        idx = jnp.zeros((b, 0), jnp.int32)
        if k:
            idx, used = select_image_positions(attn, layout.image_pos, layout.image_valid, used, k)
            if lcfg.selection_order == "position":
                idx = jnp.sort(idx, axis=1)
            slots = jnp.take_along_axis(layout.image_pos, idx, axis=1)  # (B, k) prefix indices
            parts.append(jnp.take_along_axis(emb_prefix, slots[..., None], axis=1))  # (B, k, H)
        if lcfg.latent_text:
            parts.append(h[:, None])
        chunk = jnp.concatenate(parts, 1)  # (B, C, H)
        out, cache, attn = q.decoder(llm, cfg, chunk, cpos, cache, p + t * c, kv_valid, return_attn_row=True)
        return (cache, out[:, -1], attn, used), (out, idx.astype(jnp.int32))

    (cache, _, _, _), (chunks, selected) = jax.lax.scan(step, (cache, h, attn, used), (jnp.arange(n), chunk_pos))
    hidden = jnp.concatenate([hidden, chunks.transpose(1, 0, 2, 3).reshape(b, n * c, -1)], 1)
    return hidden, cache, selected


def latent_hidden(params, cfg: ModelConfig, lcfg: LatentConfig, n: int, layout: LatentLayout, image_features,
                  h_offset=None):
    """Final-norm hidden states over the whole final sequence (B, L_final, H), and the selections."""
    hidden, cache, selected = latent_prefill(params, cfg, lcfg, n, layout, image_features, h_offset)
    start = hidden.shape[1]
    if layout.suffix_ids.shape[1]:
        emb_suffix = params["llm"]["embed"][layout.suffix_ids]
        suffix, _, _ = q.decoder(params["llm"], cfg, emb_suffix, layout.positions[:, :, start:], cache, start,
                                 layout.kv_valid)
        hidden = jnp.concatenate([hidden, suffix], 1)
    return hidden, selected


def _latent_forward(params, cfg: ModelConfig, lcfg: LatentConfig, n: int, layout: LatentLayout,
                    image_features, h_offset):
    """Traced body: returns (loss, logits (B, L_final, V), selected (n, B, k))."""
    hidden, selected = latent_hidden(params, cfg, lcfg, n, layout, image_features, h_offset)
    logits = q.lm_head(params, cfg, hidden)  # (B, L_final, V)
    return cross_entropy(logits, layout.labels), logits, selected


def chunked_cross_entropy(params, cfg: ModelConfig, hidden, labels, chunk: int = 128):
    """cross_entropy(lm_head(hidden), labels) without materialising (B, L, V) logits.

    Positions are processed `chunk` at a time under remat, so the backward pass recomputes each
    chunk's logits instead of keeping them all; memory is O(B * chunk * V).
    """
    b, length, h = hidden.shape
    target = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE, labels.dtype)], 1)  # next token per position
    pad = (-length) % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    target = jnp.pad(target, ((0, 0), (0, pad)), constant_values=IGNORE)
    n_chunks = (length + pad) // chunk
    hidden = hidden.reshape(b, n_chunks, chunk, h).transpose(1, 0, 2, 3)  # (n_chunks, B, chunk, H)
    target = target.reshape(b, n_chunks, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def one(carry, xs):
        hid, tgt = xs
        logp = jax.nn.log_softmax(q.lm_head(params, cfg, hid), -1)  # (B, chunk, V) float32
        keep = tgt != IGNORE
        nll = -jnp.take_along_axis(logp, jnp.where(keep, tgt, 0)[..., None], -1)[..., 0]
        return (carry[0] + jnp.sum(nll * keep), carry[1] + keep.sum()), None

    (total, count), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (hidden, target))
    return total / jnp.maximum(count, 1)


def latent_loss(params, cfg: ModelConfig, lcfg: LatentConfig, n: int, layout: LatentLayout, image_features,
                h_offset=None):
    """The training loss: latent forward + chunked cross-entropy (same value as `_latent_forward`'s loss)."""
    hidden, _ = latent_hidden(params, cfg, lcfg, n, layout, image_features, h_offset)
    return chunked_cross_entropy(params, cfg, hidden, layout.labels)


latent_forward_jit = jax.jit(_latent_forward, static_argnames=("cfg", "lcfg", "n"))


def prepare(cfg: ModelConfig, lcfg: LatentConfig, input_ids, attention_mask, labels, pixel_values,
            image_grid_thw):
    """Host-side checks and layout; returns (n, layout, grid) before any device compute."""
    q.check_text_inputs(cfg, input_ids, attention_mask,
                        None if image_grid_thw is None else
                        int(np.asarray(image_grid_thw).prod(-1).sum()) // cfg.vision.spatial_merge_size**2)
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw go together: pass both or neither")
    grid = None
    if image_grid_thw is not None:
        grid = q.check_image_inputs(cfg.vision, pixel_values, image_grid_thw)
    n, p = latent_token_layout(cfg, input_ids, attention_mask)
    layout = build_layout(cfg, lcfg, input_ids, attention_mask, labels, grid, n, p)
    return n, layout, grid


def latent_forward(params, cfg: ModelConfig, lcfg: LatentConfig, input_ids, attention_mask, labels,
                   pixel_values=None, image_grid_thw=None, h_offset=None) -> LatentOutput:
    """The IVT-LR forward with latent steps on host inputs (HF processor/tokenizer layout)."""
    n, layout, grid = prepare(cfg, lcfg, input_ids, attention_mask, labels, pixel_values, image_grid_thw)
    feats = None
    if grid is not None:
        feats = q.encode_images(params, cfg, pixel_values, grid)
    layout = LatentLayout(*map(jnp.asarray, layout))
    loss, logits, selected = latent_forward_jit(params, cfg, lcfg, n, layout, feats, h_offset)
    return LatentOutput(loss, logits, selected)

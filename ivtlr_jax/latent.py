"""The IVT-LR latent loop for any backbone: prefix pass, `lax.scan` over latent steps, suffix pass, loss.

Final sequence per row: prefix, V_0, h_0, ..., V_{n-1}, h_{n-1}, suffix, where V_t are the K image
embeddings the last query attended to most (not used before) and h_t the final-norm hidden state of
the previous chunk's last position. The KV cache makes the total decoder work one pass over it.
The batch is a `LatentBatch`, made once on the host and used unchanged by `latent_forward`, the
train step and `generate`. Decoder calls are numbered (prefix 0, chunk t 1 + t, suffix 1 + n) and the
params are passed through `for_call` with that number: per-call state such as dropout keys is fresh
for every call, whatever the trainer wrapped the layers with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ivtlr_jax.config import coerce_fields
from ivtlr_jax.models.base import Backbone, Embedded, image_inputs, param_dtype
from ivtlr_jax.models.layers import (
    AttentionSpec,
    LayerWrapper,
    acc_dtype,
    attention_spec,
    for_call,
    identity,
    loop_scan,
)

IGNORE = -100
LOSS_CHUNK = 128  # positions per block of the chunked training loss (memory O(B * LOSS_CHUNK * V))
# interventions of the latent loop: what is fed back as h, or which image tokens are selected
LATENT_ABLATIONS = ("latent-zero", "latent-noise", "latent-shuffle", "select-random", "select-bottom")


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """IVT-LR latent-step options; the defaults are the release's behaviour (reference mode)."""

    k: int = 32  # image embeddings selected per step; 0 = "without latent vision" (Coconut)
    latent_text: bool = True  # False = "without latent text": the chunk is V_t alone
    position_mode: str = "sequential"  # or "mrope": native 3-D positions for the prompt
    selection_order: str = "position"  # or "score": order of V_t inside the chunk
    latent_grad: str = "stop"  # or "full": back-propagate through every latent step
    ablate: str = "none"  # causal-audit intervention inside the loop (LATENT_ABLATIONS); "none" = intact
    ablate_seed: int = 0  # seed of the random interventions (latent-noise, latent-shuffle, select-random)
    # a re-fed image token carries its per-layer extras (Qwen3-VL: its DeepStack features, added in the same layers
    # as in the prompt); False feeds the bare merged embedding. Backbones without extras ignore it.
    deepstack_latent: bool = True

    def __post_init__(self):
        coerce_fields(self)
        if self.k < 0:
            raise ValueError(f"k={self.k!r} must be an integer >= 0 (image embeddings per latent step)")
        if not isinstance(self.position_mode, str) or not self.position_mode:
            raise ValueError(f"position_mode={self.position_mode!r} must be a name of the backbone's position rule "
                             "(its position_modes, e.g. 'sequential')")
        choices = {
            "selection_order": ("position", "score"),
            "latent_grad": ("stop", "full"),
            "ablate": ("none",) + LATENT_ABLATIONS,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; use one of {list(valid)}")
        if self.chunk_len == 0:
            raise ValueError("k=0 with latent_text=False leaves nothing to feed back; use n=0 latent tokens instead")

    @property
    def chunk_len(self) -> int:
        """Vectors per latent step: K image embeddings plus the hidden state when latent_text."""
        return self.k + int(self.latent_text)


@struct.dataclass
class LatentBatch:
    """One batch of the final sequence (prefix + n chunks + suffix), batch-leading; n and P are static."""

    prefix_ids: Any  # (B, P) int32
    suffix_ids: Any  # (B, S - P - n) int32
    kv_valid: Any  # (B, L_final) bool: real tokens of the final sequence
    positions: Any  # (B, R, L_final) int32
    labels: Any  # (B, L_final) int32, IGNORE on prefix pads, chunks and unlabelled tokens
    images: Any  # the backbone's per-row image pytree, or None
    n: int = struct.field(pytree_node=False, default=0)  # latent steps
    prefix_len: int = struct.field(pytree_node=False, default=0)  # P: index of the first <|latent|>

    @property
    def batch_size(self) -> int:
        return self.prefix_ids.shape[0]

    def num_tokens(self) -> int:
        """Real tokens of the final sequences (host arrays)."""
        return int(np.asarray(self.kv_valid).sum())


class LatentOutput(NamedTuple):
    loss: float | jax.Array  # mean cross-entropy over labelled tokens
    logits: np.ndarray | jax.Array  # (B, L_final, V) float32
    selected: np.ndarray | jax.Array  # (n, B, k) int32: index among the row's image tokens


@struct.dataclass
class LatentCarry:
    """What one latent step hands the next: the cache, h, the attention row and the used image tokens."""

    cache: Any
    h: Any  # (B, H) final-norm hidden state of the last position
    attn: Any  # (B, max_len) attention row of that query (layers and heads averaged)
    used: Any  # (B, I) bool


# ----------------------------------------------------------------------------- host side
def latent_token_layout(latent_token_id, input_ids, attention_mask) -> tuple[int, int]:
    """Return (n, P): latent tokens per row and the aligned index of the first one; validate rows."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    if latent_token_id is None:
        return 0, ids.shape[1]
    is_lat = (ids == latent_token_id) & mask
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


def make_latent_batch(bb: Backbone, lcfg: LatentConfig, input_ids, attention_mask, labels=None, pixel_values=None,
                      image_grid_thw=None, *, allow_no_latent_token: bool = False) -> LatentBatch:
    """Check host inputs (HF tokenizer/processor layout) and lay out the final sequence: a numpy LatentBatch."""
    cfg = bb.config
    bb.count_check(input_ids, attention_mask)
    ids = np.asarray(input_ids).astype(np.int32)
    mask = np.asarray(attention_mask).astype(bool)
    b, s = ids.shape
    if labels is None:
        labels = np.full_like(ids, IGNORE)
    labels = np.asarray(labels).astype(np.int32)
    if labels.shape != ids.shape:
        raise ValueError(f"labels has shape {labels.shape}; it must equal input_ids' {ids.shape} (use -100 to ignore)")
    latent_id = cfg.latent_token_id
    if latent_id is None and not allow_no_latent_token:
        raise ValueError(
            "this checkpoint has no <|latent|> token; convert it with "
            "`python tools/convert_weights.py --add-latent-tokens`"
        )
    n, p = latent_token_layout(latent_id, ids, mask)
    late = ((ids[:, p:] == cfg.image_token_id) & mask[:, p:]).any(1)  # only the prefix is embedded with images
    if late.any():
        bad = int(np.nonzero(late)[0][0])
        raise ValueError(
            f"row {bad}: image tokens (id {cfg.image_token_id}) come after the first <|latent|> (index {p}); they "
            "would be read as the placeholder token, not the image: put every image in the prompt, before the "
            "latent tokens"
        )
    image_dict = image_inputs(pixel_values, image_grid_thw)  # the processor's dict (or the older two arrays)
    images = bb.prepare_images(ids, mask, image_dict)
    c = lcfg.chunk_len if n else 0
    prefix_ids, suffix_ids = ids[:, :p], ids[:, p + n :]
    valid = np.concatenate([mask[:, :p], np.ones((b, n * c), bool), mask[:, p + n :]], 1)
    lab = np.concatenate([labels[:, :p], np.full((b, n * c), IGNORE, np.int32), labels[:, p + n :]], 1)
    lab = np.where(valid, lab, IGNORE)
    bb.check_position_mode(lcfg.position_mode)
    rows = bb.position_rows
    if lcfg.position_mode == "sequential":
        pos = np.clip(np.cumsum(valid, 1) - 1, 0, None)
        pos = np.broadcast_to(pos[:, None], (b, rows, pos.shape[1]))
    else:
        pre = bb.positions(prefix_ids, mask[:, :p], image_dict, lcfg.position_mode)  # (B, R, P)
        start = pre.max((1, 2)) + 1  # (B,) text after the prompt continues from max + 1
        rest = np.clip(np.cumsum(valid[:, p:], 1) - 1, 0, None) + start[:, None]
        pos = np.concatenate([pre, np.broadcast_to(rest[:, None], (b, rows, rest.shape[1]))], 2)
    n_img = ((prefix_ids == cfg.image_token_id) & mask[:, :p]).sum(1)
    if n and (n * lcfg.k > n_img).any():
        bad = int(np.nonzero(n * lcfg.k > n_img)[0][0])
        raise ValueError(
            f"row {bad}: n*k = {n}*{lcfg.k} = {n * lcfg.k} image embeddings requested but the row has only "
            f"{int(n_img[bad])} image tokens before its first <|latent|>; lower k or the number of latent steps"
            + (" (its image is missing)" if n_img[bad] == 0 else "")
        )
    return LatentBatch(prefix_ids, suffix_ids, valid, np.ascontiguousarray(pos, dtype=np.int32), lab, images,
                       n=n, prefix_len=p)


def to_device(batch: LatentBatch) -> LatentBatch:
    return jax.tree.map(jnp.asarray, batch)


# ----------------------------------------------------------------------------- device side
def cross_entropy(logits, labels):
    """Mean next-token cross-entropy over labelled positions: logits[:, i] predicts labels[:, i + 1]."""
    logits, target = logits[:, :-1], labels[:, 1:]
    keep = target != IGNORE
    logp = jax.nn.log_softmax(logits.astype(acc_dtype(logits.dtype)), -1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, target, 0)[..., None], -1)[..., 0]
    return jnp.sum(nll * keep) / jnp.maximum(keep.sum(), 1)


def select_image_positions(attn_row, image_pos, image_valid, used, k: int):
    """Top-k image tokens by attention, not used before (ties: lower position first).

    attn_row (B, L) over cache slots; returns (indices into the row's image tokens (B, k), new used mask).
    """
    scores = jnp.take_along_axis(attn_row, image_pos, axis=1)  # (B, I)
    scores = jnp.where(image_valid & ~used, scores, -jnp.inf)
    _, idx = jax.lax.top_k(scores, k)  # (B, k) by descending score; equal scores keep index order
    used = used | jax.nn.one_hot(idx, used.shape[1], dtype=bool).any(1)
    return idx, used


def ablation_key(lcfg: LatentConfig, t, stream: int):
    """The PRNG key of latent step t for one random intervention (stream numbers keep them independent)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(lcfg.ablate_seed), stream), t)


def derangement(b: int, key):
    """A permutation of b rows with no fixed point for b >= 2: a single cycle through a seeded order."""
    order = jax.random.permutation(key, b)  # (B,)
    return jnp.zeros((b,), jnp.int32).at[order].set(jnp.roll(order, -1).astype(jnp.int32))


def ablate_h(lcfg: LatentConfig, h, t):
    """The hidden state fed back into chunk t under `lcfg.ablate` (unchanged unless a latent-* ablation)."""
    if lcfg.ablate == "latent-zero":
        return jnp.zeros_like(h)
    if lcfg.ablate == "latent-noise":
        noise = jax.random.normal(ablation_key(lcfg, t, 0), h.shape, jnp.float32)  # (B, H)
        hf = h.astype(jnp.float32)
        scale = jnp.linalg.norm(hf, axis=-1, keepdims=True) / jnp.maximum(jnp.linalg.norm(noise, axis=-1,
                                                                                          keepdims=True), 1e-12)
        return (noise * scale).astype(h.dtype)
    if lcfg.ablate == "latent-shuffle":
        return h[derangement(h.shape[0], ablation_key(lcfg, t, 1))]
    return h


def selection_scores(lcfg: LatentConfig, attn_row, t):
    """The scores whose top-K is selected: the attention row, or seeded uniform scores, or its negation."""
    if lcfg.ablate == "select-random":
        return jax.random.uniform(ablation_key(lcfg, t, 2), attn_row.shape, jnp.float32)
    if lcfg.ablate == "select-bottom":
        return -attn_row
    return attn_row


def _kv_valid(batch: LatentBatch, cache_len: int):
    total = batch.kv_valid.shape[1]
    return jnp.pad(batch.kv_valid, ((0, 0), (0, cache_len - total)), constant_values=True)


def latent_start(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, cache_len: int | None = None,
                 layer_wrapper: LayerWrapper = identity, attention: str = "auto",
                 vision_wrapper: LayerWrapper = identity):
    """Embed and run the prefix; returns (prefix hidden (B, P, H), Embedded, first carry, kv_valid).

    The cache has `cache_len` slots (default: the final sequence length); slots past the final sequence
    count as valid, for tokens decoded later. The carry's attention row is None when there are no latent steps.
    `layer_wrapper` wraps each decoder layer and `vision_wrapper` each image encoder block (the trainer's remat;
    the identity for inference); `layer_wrapper.unroll` unrolls the latent loop and the loss's chunks too.
    """
    b, p = batch.prefix_ids.shape
    cache_len = batch.kv_valid.shape[1] if cache_len is None else cache_len
    kv_valid = _kv_valid(batch, cache_len)
    emb = bb.embed(params, batch.prefix_ids, batch.images, vision_wrapper)
    cache = bb.init_cache(b, cache_len, emb.embeds.dtype)
    hidden, cache, attn = bb.decode(for_call(params, 0), emb.embeds, batch.positions[:, :, :p], cache, 0, kv_valid,
                                    attn_row=batch.n > 0, layer_wrapper=layer_wrapper, attention=attention,
                                    extras=emb.extras)
    carry = LatentCarry(cache, hidden[:, -1], attn, jnp.zeros(emb.image_valid.shape, bool))
    return hidden, emb, carry, kv_valid


def latent_step(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, emb: Embedded, kv_valid,
                carry: LatentCarry, t, layer_wrapper: LayerWrapper = identity, attention: str = "auto"):
    """One latent step t: select K image tokens, run the chunk [V_t ; h]; returns (carry, (chunk hidden, idx))."""
    b, p, c, k = batch.batch_size, batch.prefix_len, lcfg.chunk_len, lcfg.k
    h, used = carry.h, carry.used
    if lcfg.latent_grad == "stop":
        h = jax.lax.stop_gradient(h)
    h = ablate_h(lcfg, h, t)
    parts, extras = [], None
    idx = jnp.zeros((b, 0), jnp.int32)
    if k:
        scores = selection_scores(lcfg, carry.attn, t)  # (B, max_len): the attention row unless select-*
        idx, used = select_image_positions(scores, emb.image_pos, emb.image_valid, used, k)
        if lcfg.selection_order == "position":
            idx = jnp.sort(idx, axis=1)
        parts.append(jnp.take_along_axis(emb.image_embeds, idx[..., None], axis=1))  # (B, k, H)
        if lcfg.deepstack_latent:  # the re-fed tokens' per-layer extras, as in the prompt
            extras = bb.refeed_extras(emb, idx, c)
    if lcfg.latent_text:
        parts.append(h[:, None].astype(emb.embeds.dtype))
    chunk = jnp.concatenate(parts, 1)  # (B, C, H)
    start = p + t * c
    cpos = jax.lax.dynamic_slice_in_dim(batch.positions, start, c, axis=2)
    out, cache, attn = bb.decode(for_call(params, 1 + t), chunk, cpos, carry.cache, start, kv_valid, attn_row=True,
                                 layer_wrapper=layer_wrapper, attention=attention,
                                 kv_len=p + batch.n * c, extras=extras)  # slots before the suffix
    return LatentCarry(cache, out[:, -1], attn, used), (out, idx.astype(jnp.int32))


def latent_prefill(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, cache_len: int | None = None,
                   layer_wrapper: LayerWrapper = identity, attention: str = "auto",
                   vision_wrapper: LayerWrapper = identity):
    """Prefix pass then the scan over n latent steps, filling the KV cache.

    Returns (hidden (B, P + n*C, H) after the final norm, cache, selected (n, B, k)).
    """
    hidden, emb, carry, kv_valid = latent_start(bb, params, lcfg, batch, cache_len, layer_wrapper, attention,
                                                vision_wrapper)
    n, b = batch.n, batch.batch_size
    if not n:
        return hidden, carry.cache, jnp.zeros((0, b, lcfg.k), jnp.int32)
    step = functools.partial(latent_step, bb, params, lcfg, batch, emb, kv_valid, layer_wrapper=layer_wrapper,
                             attention=attention)
    carry, (chunks, selected) = loop_scan(lambda cr, t: step(cr, t), carry, jnp.arange(n),
                                          unroll=layer_wrapper.unroll)
    hidden = jnp.concatenate([hidden, chunks.transpose(1, 0, 2, 3).reshape(b, n * lcfg.chunk_len, -1)], 1)
    return hidden, carry.cache, selected


def suffix_hidden(bb: Backbone, params, batch: LatentBatch, hidden, cache, layer_wrapper: LayerWrapper = identity,
                  attention: str = "auto"):
    """Run the suffix (remaining steps, answer) through the cache after `hidden` (B, P + n*C, H)."""
    start = hidden.shape[1]
    if not batch.suffix_ids.shape[1]:
        return hidden
    emb = bb.token_embed(params, batch.suffix_ids)
    out, _, _ = bb.decode(for_call(params, 1 + batch.n), emb, batch.positions[:, :, start:], cache, start,
                          batch.kv_valid, layer_wrapper=layer_wrapper, attention=attention)
    return jnp.concatenate([hidden, out], 1)


def latent_hidden(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, layer_wrapper: LayerWrapper = identity,
                  attention: str = "auto", vision_wrapper: LayerWrapper = identity):
    """Final-norm hidden states over the whole final sequence (B, L_final, H), and the selections."""
    hidden, cache, selected = latent_prefill(bb, params, lcfg, batch, layer_wrapper=layer_wrapper, attention=attention,
                                             vision_wrapper=vision_wrapper)
    return suffix_hidden(bb, params, batch, hidden, cache, layer_wrapper, attention), selected


def _latent_forward(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch,
                    attention: str | AttentionSpec = "auto", mesh=None):
    """Traced body: returns (loss, logits (B, L_final, V), selected (n, B, k)); attention resolved for `mesh`'s
    devices (None: one device)."""
    attention = attention_spec(attention, param_dtype(params), bb.dims.head_dim, mesh)
    hidden, selected = latent_hidden(bb, params, lcfg, batch, attention=attention)
    logits = bb.lm_head(params, hidden)  # (B, L_final, V)
    return cross_entropy(logits, batch.labels), logits, selected


def chunked_cross_entropy(bb: Backbone, params, hidden, labels, chunk: int = LOSS_CHUNK, unroll: bool = False):
    """cross_entropy(lm_head(hidden), labels) without materialising (B, L, V) logits.

    Positions are processed `chunk` at a time under remat, so the backward pass recomputes each
    chunk's logits instead of keeping them all; memory is O(B * chunk * V). `unroll`: see `loop_scan`.
    """
    b, length, h = hidden.shape
    target = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE, labels.dtype)], 1)  # next token per position
    pad = (-length) % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    target = jnp.pad(target, ((0, 0), (0, pad)), constant_values=IGNORE)
    n_chunks = (length + pad) // chunk
    hidden = hidden.reshape(b, n_chunks, chunk, h).transpose(1, 0, 2, 3)  # (n_chunks, B, chunk, H)
    target = target.reshape(b, n_chunks, chunk).transpose(1, 0, 2)
    f = acc_dtype(hidden.dtype)

    @jax.checkpoint
    def one(carry, xs):
        hid, tgt = xs
        logp = jax.nn.log_softmax(bb.lm_head(params, hid), -1)  # (B, chunk, V) float32
        keep = tgt != IGNORE
        nll = -jnp.take_along_axis(logp, jnp.where(keep, tgt, 0)[..., None], -1)[..., 0]
        return (carry[0] + jnp.sum(nll * keep), carry[1] + keep.sum(dtype=jnp.int32)), None

    (total, count), _ = loop_scan(one, (jnp.zeros((), f), jnp.zeros((), jnp.int32)), (hidden, target), unroll=unroll)
    return total / jnp.maximum(count, 1)


def latent_loss(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, layer_wrapper: LayerWrapper = identity,
                attention: str = "auto", vision_wrapper: LayerWrapper = identity):
    """The training loss: latent forward + chunked cross-entropy (same value as `_latent_forward`'s loss).
    The wrappers are the trainer's remat of the decoder layers and of the image encoder blocks."""
    hidden, _ = latent_hidden(bb, params, lcfg, batch, layer_wrapper, attention, vision_wrapper)
    return chunked_cross_entropy(bb, params, hidden, batch.labels, unroll=layer_wrapper.unroll)


latent_forward_jit = jax.jit(_latent_forward, static_argnames=("bb", "lcfg", "attention", "mesh"))


def latent_forward(bb: Backbone, params, lcfg: LatentConfig, input_ids, attention_mask, labels, pixel_values=None,
                   image_grid_thw=None, attention: str = "auto") -> LatentOutput:
    """The IVT-LR forward with latent steps on host inputs (HF processor/tokenizer layout)."""
    batch = make_latent_batch(bb, lcfg, input_ids, attention_mask, labels, pixel_values, image_grid_thw)
    loss, logits, selected = latent_forward_jit(bb, params, lcfg, to_device(batch), attention=attention)
    return LatentOutput(loss, logits, selected)

"""Decoding after the latent steps: KV-cached greedy (or seeded temperature / top-p) generation, batched.

The prompt (everything up to and including the n `<|latent|>` tokens) goes through `latent_prefill`
with a cache of `L_final + max_new_tokens` slots; then `lax.while_loop`s (one per phase of DECODE_BLOCK
steps, each reading only the cache prefix it can need) feed one token per row at a time until every row
has emitted EOS or `max_new_tokens` tokens exist, all in the same program as the prefill. One compilation
per shape bucket (batch, prompt length, image tokens, max_new_tokens, options).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.latent import LatentBatch, LatentConfig, latent_prefill, make_latent_batch, to_device
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models.base import Backbone, param_dtype

DECODE_BLOCK = 256  # decode steps per phase: a phase reads a static cache prefix at most this much past the valid one


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # (B, max_new_tokens) int32, pad id after EOS
    lengths: np.ndarray  # (B,) int32: generated tokens per row, EOS included
    selected: np.ndarray  # (n, B, k) int32: index among the row's image tokens, per latent step
    steps: int  # decoding steps actually run (<= max_new_tokens; fewer when every row stopped early)
    latent_h: np.ndarray | None = None  # (n, B, H) float32: the h fed into each latent chunk, when asked for


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (the default); otherwise softmax(logits / T) restricted to the top-p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def pick_tokens(logits, key, temperature, top_p, greedy: bool):
    """Next token per row from float32 logits (B, V): argmax, or a seeded nucleus sample."""
    if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)  # (B, V) most likely first
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    before = jnp.cumsum(probs, -1) - probs  # mass of strictly more likely tokens
    keep = before < top_p  # the smallest set reaching top_p (the most likely token always stays)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)  # (B,)
    return jnp.take_along_axis(order, choice[:, None], -1)[:, 0].astype(jnp.int32)


def decode_phase_ends(max_new_tokens: int, block: int = DECODE_BLOCK) -> list[int]:
    """Decode steps 1..max_new_tokens-1 split into phases of `block` steps: the exclusive end of each."""
    if block < 1:
        raise ValueError(f"decode_block={block} must be >= 1")
    return list(range(1 + block, max_new_tokens, block)) + ([max_new_tokens] if max_new_tokens > 1 else [])


def latent_states(lcfg: LatentConfig, batch: LatentBatch, hidden):
    """The h fed into each latent chunk (before any ablation of it), from latent_prefill's hidden: (n, B, H)."""
    p, c = batch.prefix_len, lcfg.chunk_len
    idx = np.arange(batch.n) * c + p - 1  # the prefix's last position, then each chunk's last
    return hidden[:, idx].transpose(1, 0, 2).astype(jnp.float32)


def mesh_attention(bb: Backbone, params, attention: str | ly.AttentionSpec, mesh) -> ly.AttentionSpec:
    """The AttentionSpec of a program on `mesh` (None: one device): auto resolved for the mesh's devices."""
    return ly.attention_spec(attention, param_dtype(params), bb.dims.head_dim, mesh)


def _prefill(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, key, temperature, top_p, *,
             max_new_tokens: int, greedy: bool, attention: str | ly.AttentionSpec = "auto", mesh=None,
             with_states: bool = False):
    """Prefix + latent steps into a cache of L_final + max_new_tokens slots; (cache, first tokens (B,), selected).

    mesh: the cache is constrained to `sharding.cache_sharding` (batch over the data axes), None: no constraint;
    the attention implementation is resolved for it (on TPU the splash kernel runs under shard_map there)."""
    attention = mesh_attention(bb, params, attention, mesh)
    total = batch.kv_valid.shape[1]  # L_final: prompt with its latent chunks
    hidden, cache, selected = latent_prefill(bb, params, lcfg, batch, cache_len=total + max_new_tokens,
                                             attention=attention)
    cache = sh.constrain_cache(cache, mesh)
    first = pick_tokens(bb.lm_head(params, hidden[:, -1:])[:, 0], jax.random.fold_in(key, 0),
                        temperature, top_p, greedy)  # (B,)
    if with_states:
        return cache, first, selected, latent_states(lcfg, batch, hidden)
    return cache, first, selected


def _decode(bb: Backbone, params, kv_valid, positions, cache, first, key, temperature, top_p, *,
            max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, greedy: bool,
            attention: str | ly.AttentionSpec = "auto", decode_block: int = DECODE_BLOCK, mesh=None):
    """The decode loop after `_prefill`: one token per row per step until every row is done.

    kv_valid (B, L_final) and positions (B, R, L_final) are the prompt's (the LatentBatch's). The loop runs
    in phases (`decode_phase_ends`); a phase reads only the cache slots it can need, a static prefix. One
    token per step runs dense attention over the cache whatever `attention` is (see layers.decoder).
    Returns (tokens (B, max_new_tokens), lengths (B,), steps, the cache after the last step).
    """
    attention = mesh_attention(bb, params, attention, mesh)
    total = kv_valid.shape[1]
    kv_valid = jnp.pad(kv_valid, ((0, 0), (0, max_new_tokens)), constant_values=True)  # (B, cache_len)
    b, rows = first.shape[0], positions.shape[1]
    next_pos = positions.max(axis=(1, 2)) + 1  # (B,) the row's last position + 1
    eos = jnp.asarray(eos_ids, jnp.int32)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    state = (jnp.int32(1), cache, tokens, jnp.isin(first, eos), jnp.ones((b,), jnp.int32), first)

    def phase(end: int):
        kv_len = total + end - 2  # step i writes slot total + i - 1 and reads the slots before it

        def cond(state):
            i, _, _, done, _, _ = state
            return (i < end) & ~jnp.all(done)

        def body(state):
            i, cache, tokens, done, lengths, last = state
            emb = bb.token_embed(params, last[:, None])  # (B, 1, H)
            pos = jnp.broadcast_to((next_pos + i - 1)[:, None, None], (b, rows, 1))
            out, cache, _ = bb.decode(params, emb, pos, cache, total + i - 1, kv_valid, attention=attention,
                                      kv_len=kv_len)
            cache = sh.constrain_cache(cache, mesh)  # the loop carry keeps the prefill's layout
            tok = pick_tokens(bb.lm_head(params, out)[:, 0], jax.random.fold_in(key, i), temperature, top_p, greedy)
            tok = jnp.where(done, pad_id, tok)
            tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | jnp.isin(tok, eos)
            return i + 1, cache, tokens, done, lengths, tok

        return cond, body

    for end in decode_phase_ends(max_new_tokens, decode_block):
        state = jax.lax.while_loop(*phase(end), state)
    steps, cache, tokens, _, lengths, _ = state
    return tokens, lengths, steps, cache


_GEN_STATIC = ("bb", "lcfg", "max_new_tokens", "eos_ids", "pad_id", "greedy", "attention", "mesh", "with_states")


@functools.partial(jax.jit, static_argnames=_GEN_STATIC)
def generate_jit(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, key, temperature, top_p, *,
                 max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, greedy: bool, attention: str = "auto",
                 mesh=None, with_states: bool = False):
    """Prefix + latent steps, then the whole decode loop, in one program (the cache never leaves the device
    program; the while loop updates it in place). Returns (tokens, lengths, selected, steps), plus the latent
    states (n, B, H) when with_states.

    mesh: params and batch live on it (`sharding.param_shardings`, `sharding.put_batch`); the KV cache is
    constrained to `sharding.cache_sharding` there, and `attention` resolved for its devices."""
    cache, first, selected, *states = _prefill(bb, params, lcfg, batch, key, temperature, top_p,
                                               max_new_tokens=max_new_tokens, greedy=greedy, attention=attention,
                                               mesh=mesh, with_states=with_states)
    tokens, lengths, steps, _ = _decode(bb, params, batch.kv_valid, batch.positions, cache, first, key, temperature,
                                     top_p, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                                     greedy=greedy, attention=attention, mesh=mesh)
    return (tokens, lengths, selected, steps, *states)


# The two halves as separate programs (the decode benchmark times decoding alone): the cache the prefill
# returns is donated to the decode loop, which updates it in place and returns it.
prefill_jit = jax.jit(_prefill, static_argnames=("bb", "lcfg", "max_new_tokens", "greedy", "attention", "mesh",
                                                  "with_states"))
decode_jit = jax.jit(_decode, static_argnames=("bb", "max_new_tokens", "eos_ids", "pad_id", "greedy", "attention",
                                              "decode_block", "mesh"), donate_argnames=("cache",))


def trim_prompt(input_ids, attention_mask):
    """Drop trailing columns that are padding in every row; then every row must end on a real token."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {ids.shape}; expected (batch, prompt_len) with prompt_len >= 1")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}; it must equal input_ids' {ids.shape}")
    real_cols = np.nonzero(mask.astype(bool).any(0))[0]
    if len(real_cols) == 0:
        raise ValueError("attention_mask is all zeros: every row is padding")
    end = int(real_cols[-1]) + 1
    ids, mask = ids[:, :end], mask[:, :end]
    if not mask[:, -1].all():
        bad = np.nonzero(mask[:, -1] == 0)[0].tolist()
        raise ValueError(
            f"rows {bad} end in padding; left-pad prompts for generation so each row's last token is real "
            "(the collator does this)"
        )
    return ids, mask


def latent_prompt(cfg, prompt_ids, n: int) -> list[int]:
    """prompt_ids followed by n `<|latent|>` tokens; a clear error for n > 0 without the token."""
    if n < 0:
        raise ValueError(f"n={n} latent steps must be >= 0")
    if n and cfg.latent_token_id is None:
        raise ValueError(
            f"{n} latent step(s) asked for, but this checkpoint has no <|latent|> token; convert it with "
            "`python tools/convert_weights.py --add-latent-tokens` (or use n=0)"
        )
    return [int(t) for t in prompt_ids] + [int(cfg.latent_token_id)] * n if n else [int(t) for t in prompt_ids]


def generate_batch(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, *, max_new_tokens: int = 64,
                   sampling: SamplingConfig | None = None, eos_token_ids=None, pad_token_id: int | None = None,
                   max_cache_len: int | None = None, attention: str = "auto", mesh=None,
                   with_states: bool = False) -> GenerateOutput:
    """Generate after the latent steps of a prompt-only LatentBatch (no suffix: the prompt ends with its latents).

    mesh: run on this mesh (params already on it), the batch split over its data axes (replicated where the batch
    size does not divide them)."""
    cfg = bb.config
    sampling = sampling or SamplingConfig()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    eos = cfg.eos_token_id if eos_token_ids is None else eos_token_ids
    eos = tuple(int(e) for e in np.atleast_1d(np.asarray(eos, dtype=np.int64)))
    if not eos:
        raise ValueError("no EOS token id: set eos_token_id in the checkpoint config or pass eos_token_ids")
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    pad = eos[0] if pad is None else int(pad)
    if batch.suffix_ids.shape[1]:
        raise ValueError(
            f"the prompt continues for {batch.suffix_ids.shape[1]} tokens after its <|latent|> tokens; for "
            "generation the prompt must end with the latent tokens"
        )
    final_len = batch.kv_valid.shape[1]
    if max_cache_len is not None and final_len + max_new_tokens > max_cache_len:
        raise ValueError(
            f"prompt of {batch.prefix_len + batch.n} tokens ({final_len} with the latent chunks of {batch.n} "
            f"step(s)) plus max_new_tokens={max_new_tokens} needs a cache of {final_len + max_new_tokens} slots, "
            f"more than max_cache_len={max_cache_len}; shorten the prompt or lower max_new_tokens"
        )
    key = jax.random.PRNGKey(sampling.seed)
    temperature = jnp.float32(max(sampling.temperature, 1e-6))
    tokens, lengths, selected, steps, *states = generate_jit(
        bb, params, lcfg, to_device(batch) if mesh is None else sh.put_batch(mesh, batch), key, temperature,
        jnp.float32(sampling.top_p), max_new_tokens=int(max_new_tokens), eos_ids=eos, pad_id=pad,
        greedy=sampling.greedy, attention=attention, mesh=mesh, with_states=with_states)
    return GenerateOutput(np.asarray(tokens), np.asarray(lengths), np.asarray(selected), int(steps),
                          np.asarray(states[0]) if states else None)


def generate(bb: Backbone, params, lcfg: LatentConfig, input_ids, attention_mask, pixel_values=None,
             image_grid_thw=None, *, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
             eos_token_ids=None, pad_token_id: int | None = None, max_cache_len: int | None = None,
             attention: str = "auto", mesh=None, with_states: bool = False) -> GenerateOutput:
    """Generate after the prompt's latent steps (n = `<|latent|>` tokens ending the prompt; 0 = plain decoding).

    input_ids/attention_mask (B, S) are left-padded prompts ending with the n latent tokens (no suffix).
    eos_token_ids default to the config's eos_token_id; pad_token_id to its pad_token_id, else the first EOS.
    max_cache_len: reject a request whose final prompt length + max_new_tokens exceeds it.
    attention: the attention implementation (models.layers.ATTENTION_CHOICES; auto picks the platform's kernel).
    mesh: the mesh params live on (None: one device); see generate_batch.
    with_states: also return the h fed into each latent chunk (GenerateOutput.latent_h, (n, B, H)).
    """
    ids, mask = trim_prompt(input_ids, attention_mask)
    batch = make_latent_batch(bb, lcfg, ids, mask, None, pixel_values, image_grid_thw, allow_no_latent_token=True)
    return generate_batch(bb, params, lcfg, batch, max_new_tokens=max_new_tokens, sampling=sampling,
                          eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, max_cache_len=max_cache_len,
                          attention=attention, mesh=mesh, with_states=with_states)

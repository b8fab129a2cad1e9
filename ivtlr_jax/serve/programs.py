"""The serving engine's two device programs: a request's prefill inserted into a decode slot, and one decode step
that advances every slot.

The slots' KV cache is one `KVCache` of (layers, S, max_len, kv_heads, head_dim): slot s owns row s. A prefill is
`generate`'s (`latent_prefill` over the request's prompt, left-padded to a length bucket: prefix, latent chunks,
the first answer token), run on a fixed group of G rows (requests of one layout, filled up with copies), so a
request's prefill has the same shape whoever its group mates are; each row's cache goes into its slot's row. A
decode step is `generate`'s decode body vmapped over the slots, so each slot writes its own cache slot at its own
index and reads only its own row: a slot's tokens do not depend on what the other slots hold (the same tokens as
`generate` running the request alone). Sampling keys follow `generate`: PRNGKey(seed) folded with 0 for the first
token and with i for decode step i.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ivtlr_jax import sharding as sh
from ivtlr_jax.generate import mesh_attention, pick_tokens
from ivtlr_jax.latent import LatentBatch, LatentConfig, latent_prefill
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models.base import Backbone


def choose_token(logits, key, temperature, top_p):
    """One row's next token (logits (1, V)): argmax when temperature is 0, else `generate`'s seeded nucleus sample
    (the same draw as `generate` on a batch of one with that key)."""
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    sampled = pick_tokens(logits, key, jnp.maximum(temperature, 1e-6), top_p, greedy=False)
    return jnp.where(temperature > 0, sampled, greedy)


def init_slots(bb: Backbone, slots: int, max_len: int, dtype, mesh=None):
    """(cache, kv_valid): an empty KV cache of `slots` rows of max_len slots (sharded as `generate`'s on a mesh:
    rows over the data axes), and each row's valid mask."""
    cache = bb.init_cache(slots, max_len, dtype)
    valid = jnp.zeros((slots, max_len), bool)
    if mesh is not None:
        cache = jax.tree.map(lambda x: jax.device_put(x, sh.cache_sharding(mesh, x.shape)), cache)
    return cache, valid


@functools.partial(jax.jit, static_argnames=("bb", "lcfg", "mesh"), donate_argnames=("cache", "kv_valid"))
def prefill_insert(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, keys, temperature, top_p, cache,
                   kv_valid, slots, *, mesh=None):
    """Prefix + latent steps of G requests laid out alike (a batch of G rows; rows never see each other), each
    row's first answer token, and row r's cache written into row slots[r] of the slots' cache (donated, updated in
    place). A filler row repeats a real row and its slot (the same values written twice).

    Returns (cache, kv_valid, first tokens (G,), selected (n, G, k), next positions (G,))."""
    attention = mesh_attention(bb, params, "auto", mesh)
    g, total = batch.kv_valid.shape  # the prompts with their latent chunks (left-padded to one bucket)
    hidden, own, selected = latent_prefill(bb, params, lcfg, batch, cache_len=total, attention=attention)
    logits = bb.lm_head(params, hidden[:, -1:])  # (G, 1, V)
    first = jax.vmap(lambda lg, key, t, p: choose_token(lg, jax.random.fold_in(key, 0), t, p)[0])(
        logits, keys, temperature, top_p)
    rows = jnp.pad(batch.kv_valid, ((0, 0), (0, kv_valid.shape[1] - total)), constant_values=True)  # decode: valid
    k, v = cache.k, cache.v
    for r in range(g):
        at = (0, slots[r], 0, 0, 0)
        k = jax.lax.dynamic_update_slice(k, own.k[:, r:r + 1].astype(k.dtype), at)
        v = jax.lax.dynamic_update_slice(v, own.v[:, r:r + 1].astype(v.dtype), at)
        kv_valid = jax.lax.dynamic_update_slice(kv_valid, rows[r:r + 1], (slots[r], 0))
    cache = sh.constrain_cache(ly.KVCache(k, v), mesh)
    next_pos = batch.positions.max(axis=(1, 2)) + 1
    return cache, kv_valid, first, selected, next_pos


@functools.partial(jax.jit, static_argnames=("bb", "mesh", "sample", "steps_per_call"), donate_argnames=("cache",))
def decode_step(bb: Backbone, params, cache, kv_valid, last, index, pos, keys, steps, temperature, top_p, *,
                mesh=None, sample: bool = False, steps_per_call: int = 1):
    """`steps_per_call` tokens for every slot: at step i slot s feeds its last token at cache slot index[s] + i with
    position pos[s] + i and picks its next token with key fold_in(keys[s], steps[s] + i). Free slots compute too
    (their row is overwritten when a request takes the slot), and so do slots past their last token within the
    call (their surplus tokens are dropped). sample=False: every slot is greedy (no sampling is compiled in).

    Returns (cache, tokens (steps_per_call, S))."""
    attention = mesh_attention(bb, params, "auto", mesh)
    rows, max_len = bb.position_rows, cache.max_len

    def one(ck, cv, valid, tok, idx, p, key, step, temp, tp):
        emb = bb.token_embed(params, tok[None, None])  # (1, 1, H)
        positions = jnp.broadcast_to(p, (1, rows, 1)).astype(jnp.int32)
        out, own, _ = bb.decode(params, emb, positions, ly.KVCache(ck[:, None], cv[:, None]), idx, valid[None],
                                attention=attention, kv_len=max_len)
        logits = bb.lm_head(params, out)[:, 0]  # (1, V)
        if sample:
            nxt = choose_token(logits, jax.random.fold_in(key, step), temp, tp)
        else:
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        return own.k[:, 0], own.v[:, 0], nxt[0]

    step_all = jax.vmap(one, in_axes=(1, 1, 0, 0, 0, 0, 0, 0, 0, 0), out_axes=(1, 1, 0))

    def body(i, carry):
        k, v, tok, out = carry
        k, v, tok = step_all(k, v, kv_valid, tok, index + i, pos + i, keys, steps + i, temperature, top_p)
        return k, v, tok, out.at[i].set(tok)

    out = jnp.zeros((steps_per_call,) + last.shape, jnp.int32)
    k, v, _, out = jax.lax.fori_loop(0, steps_per_call, body, (cache.k, cache.v, last, out))
    return sh.constrain_cache(ly.KVCache(k, v), mesh), out


def compiled_programs() -> int:
    """Programs compiled so far by the engine's jitted functions (each distinct shape/static-argument set is one)."""
    return int(prefill_insert._cache_size() + decode_step._cache_size())

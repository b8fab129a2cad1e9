"""The Pallas TPU splash-attention kernel for the shared decoder: one chip, or every chip of a mesh under shard_map.

XLA cannot partition a Mosaic call, so on a mesh the kernel runs inside `jax.shard_map`: rows over the batch axes
(the longest prefix of them that divides the batch, else replicated), kv heads over `tensor` (q heads follow their
kv group; replicated when kv_heads does not divide), each device building the kernel for its local shapes. The
keys of a chunk are [the cache slots it may read; its own keys]: a static mask, all-ones over the cache part and
causal over the chunk (`CausalMask` with offset = the cache part's length), and-ed with segment ids (real tokens 1,
pads and unreadable slots 0). Every query sees its own key (a pad query its own pad), so no row is fully masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ivtlr_jax.sharding import logical_to_spec

PALLAS_BLOCK = 128  # the kernel's sequence block and lane width: lengths and head_dim are padded to a multiple of it


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _local_splash(qg, k, v, q_seg, kv_seg, past: int, interpret: bool):
    """The kernel on one device's shard: qg (B, T, KV, G, hd), k/v (B, past + T, KV, hd), segment ids (B, T),
    (B, past + T); returns (B, T, KV, G, hd). Built here, for the local shapes (no head or sequence shards)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, nkv, groups, hd = qg.shape
    tq = _round_up(t, PALLAS_BLOCK)
    skv = _round_up(past + tq, PALLAS_BLOCK)  # pad query i (>= t) meets its own pad key at past + i
    hdp = _round_up(hd, PALLAS_BLOCK)  # zero columns add nothing to q.k; v's extra columns are dropped
    qg = jnp.pad(qg, ((0, 0), (0, tq - t), (0, 0), (0, 0), (0, hdp - hd))).transpose(0, 2, 3, 1, 4)  # (B,KV,G,Tq,hdp)
    k, v = (jnp.pad(x, ((0, 0), (0, skv - x.shape[1]), (0, 0), (0, hdp - hd))).transpose(0, 2, 1, 3)
            for x in (k, v))  # (B, KV, Skv, hdp)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tq - t)))
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, skv - kv_seg.shape[1])))
    mask = sm.MultiHeadMask([sm.CausalMask((tq, skv), offset=past)] * groups)
    kernel = sk.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, interpret=interpret)

    def one_row(q, k, v, q_seg, kv_seg):  # q (KV, G, Tq, hdp), k/v (KV, Skv, hdp): the MQA kernel per kv head
        seg = sk.SegmentIds(q_seg, kv_seg)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=seg))(q, k, v)

    o = jax.vmap(one_row)(qg, k, v, q_seg, kv_seg)  # (B, KV, G, Tq, hdp)
    return o.transpose(0, 3, 1, 2, 4)[:, :t, :, :, :hd]


def head_batch_spec(mesh, batch: int, kv_heads: int) -> tuple:
    """(batch entry, kv-heads entry) of the kernel's shard_map specs on `mesh`: the layout rules of `sharding`
    (batch over the longest prefix of the data axes dividing it, kv heads over tensor when they divide)."""
    spec = tuple(logical_to_spec(("batch", "kv_heads"), mesh, (batch, kv_heads)))
    spec = spec + (None,) * (2 - len(spec))
    return spec[0], spec[1]


def splash_attention(q, k, v, q_valid, kv_valid, past: int, *, mesh=None, interpret: bool = False):
    """Causal attention of a chunk over [past keys; its own keys] with the splash kernel; one softmax over both.

    q (B, T, N, hd); k/v (B, past + T, KV, hd) in the compute dtype (past static; 0 for a prefill); q_valid (B, T) the
    chunk's real tokens; kv_valid (B, past + T) the keys a real query may see (cache slots holding earlier real
    tokens, then the chunk's real tokens). Query t sees key j when kv_valid[j] and j <= past + t. mesh: run under
    shard_map on it (None: one device). Pad queries return 0.
    """
    b, t, n, hd = q.shape
    nkv = k.shape[2]
    if k.shape[1] != past + t:
        raise ValueError(f"keys have length {k.shape[1]}; expected past + T = {past} + {t}")
    scale = np.float32(hd ** -0.5)  # the kernel does not scale q
    qg = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(b, t, nkv, n // nkv, hd)
    q_seg, kv_seg = q_valid.astype(jnp.int32), kv_valid.astype(jnp.int32)

    def body(qg, k, v, q_seg, kv_seg):
        return _local_splash(qg, k, v, q_seg, kv_seg, past, interpret)

    if mesh is not None:
        rows, heads = head_batch_spec(mesh, b, nkv)
        body = jax.shard_map(body, mesh=mesh, in_specs=(P(rows, None, heads), P(rows, None, heads),
                                                        P(rows, None, heads), P(rows), P(rows)),
                             out_specs=P(rows, None, heads), check_vma=False)
    o = body(qg, k, v, q_seg, kv_seg).reshape(b, t, n, hd)
    return jnp.where(q_valid[:, :, None, None], o, jnp.zeros((), o.dtype))

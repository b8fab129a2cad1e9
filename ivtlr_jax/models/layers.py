"""Shared layers and the one decoder every backbone uses: typed weights, KV cache, attention row.

Weights are typed pytrees (flax.struct dataclasses). A linear layer is called, never unpacked, so the
trainer may hand the model a wrapped layer (LoRA) without the model knowing. Layers are stacked on a
leading axis and run with `lax.scan`, each layer wrapped by the caller's `layer_wrapper` (the trainer's
remat policy; the identity by default); the attention implementation is a static argument (`attention`: a
fused kernel where the platform has one, see `decoder`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from ivtlr_jax.models.spec import HFKey, ParamInfo
from ivtlr_jax.models.tpu_attention import PALLAS_BLOCK, splash_attention  # noqa: F401  (PALLAS_BLOCK re-exported)

# attention implementation: auto = cudnn on CUDA GPUs (bf16/fp16), pallas (the TPU splash kernel) on TPU, xla
# elsewhere; dense = the plain einsum over the cache (the reference every implementation is tested against)
ATTENTION_CHOICES = ("auto", "xla", "cudnn", "pallas", "dense")
MASK_VALUE = -1e30  # added to masked attention scores; finite so fully masked (pad) rows stay NaN-free
# Names of the layer's attention-side matmul outputs (checkpoint_name): what a remat policy may keep.
ATTENTION_DOTS = ("q_proj", "k_proj", "v_proj", "context", "o_proj")


# XLA:CPU with several processes (gloo collectives): a loop whose body holds collectives finishes
# asynchronously, so the next collective can start while the loop's are in flight; gloo tags every
# all-gather alike, and two processes that interleave them differently receive each other's data
# ("Received data size doesn't match expected size"). Unrolled loops keep every collective in program
# order. A trainer asks for them for exactly that case (`LayerWrapper.unroll`, a static argument of what it
# traces); everywhere else loops stay rolled.
def loop_scan(f, init, xs, length=None, unroll: bool = False):
    """`jax.lax.scan`, unrolled when the caller asks (`LayerWrapper.unroll`: multi-process CPU runs)."""
    return jax.lax.scan(f, init, xs, length=length, unroll=True if unroll else 1)


@dataclasses.dataclass(frozen=True)
class LayerWrapper:
    """How a caller runs scanned layers: each layer function as it is (a trainer's remat overrides `__call__`) and
    the loops unrolled or not (`unroll`). Hashable: a static argument, so part of a jit's cache key."""

    unroll: bool = dataclasses.field(default=False, kw_only=True)

    def __call__(self, fn: Callable) -> Callable:
        return fn


identity = LayerWrapper()  # the default: layers as they are, loops rolled (inference)


def check_attention(name: str) -> str:
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"attention={name!r} is not valid; use one of {list(ATTENTION_CHOICES)}")
    return name


def _is_cuda() -> bool:
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and "cuda" in str(getattr(dev.client, "platform_version", "")).lower()
    except RuntimeError:
        return False


def resolve_attention(name: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The implementation "auto" stands for on `platform` (default: the default backend).

    cudnn (cuDNN flash attention) on CUDA GPUs for bfloat16/float16 with a head_dim cuDNN takes (a multiple
    of 8, <= 128); pallas (the TPU splash kernel, under shard_map on a mesh) on TPU, any number of chips; xla
    (jax.nn.dot_product_attention's XLA path, same masks) everywhere else, CPU included.
    """
    if check_attention(name) != "auto":
        return name
    platform = platform or jax.default_backend()
    if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= 128 and (platform == "cuda" or _is_cuda())):
        return "cudnn"
    if platform == "tpu":
        return "pallas"
    return "xla"


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """A resolved attention implementation and where it runs; hashable, so a jitted call takes it as static."""

    impl: str  # xla | cudnn | pallas | dense (never auto)
    mesh: jax.sharding.Mesh | None = None  # the mesh the TPU kernel runs on under shard_map; None: one device
    interpret: bool = False  # run the TPU kernel in Pallas interpret mode (CPU tests)

    def __post_init__(self):
        if self.impl == "auto" or check_attention(self.impl) != self.impl:
            raise ValueError(f"AttentionSpec(impl={self.impl!r}) must be resolved; use one of "
                             f"{[c for c in ATTENTION_CHOICES if c != 'auto']} (attention_spec resolves 'auto')")


def attention_spec(attention: str | AttentionSpec, dtype, head_dim: int, mesh: jax.sharding.Mesh | None = None,
                   interpret: bool = False) -> AttentionSpec:
    """The AttentionSpec of a name for the program compiled on `mesh` (auto resolved for the mesh's platform, not
    the default backend: a TPU program may be compiled from a CPU host); an AttentionSpec passes through."""
    if isinstance(attention, AttentionSpec):
        return attention
    platform = None if mesh is None else mesh.devices.flat[0].platform
    return AttentionSpec(resolve_attention(attention, dtype, head_dim, platform), mesh, interpret)


# ----------------------------------------------------------------------------- typed weights
@struct.dataclass
class Linear:
    """y = x @ kernel (+ bias); kernel (..., in, out)."""

    kernel: Any
    bias: Any = None

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x, self.kernel.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y


def _per_call(x) -> bool:
    return callable(getattr(type(x), "fold_in", None))


def for_call(params, i):
    """params for decoder call `i` (an int or a traced index): every node with a `fold_in(i)` method (a
    trainer's layer wrapper holding dropout keys) is replaced by what it returns, so every call (prefix,
    each latent chunk, suffix) draws fresh dropout masks, as PEFT does per forward call. A plain params
    tree comes back unchanged."""
    return jax.tree.map(lambda x: x.fold_in(i) if _per_call(x) else x, params, is_leaf=_per_call)


@struct.dataclass
class LayerNorm:
    scale: Any
    bias: Any


@struct.dataclass
class DecoderLayer:
    """One decoder layer's weights; every leaf stacked over layers (the backbone's block function uses them)."""

    input_norm: Any  # (L, H) RMSNorm weight
    post_attn_norm: Any  # (L, H)
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    q_norm: Any = None  # the backbone's q/k norm weights (Chameleon: per-head LayerNorm; Qwen3: RMSNorm), or None
    k_norm: Any = None


@struct.dataclass
class Decoder:
    """The language model: token embedding, stacked layers, final norm, head ((H, V); None when tied)."""

    embed: Any  # (V, H)
    layers: DecoderLayer
    norm: Any  # (H,)
    lm_head: Any = None  # (H, V) or None


@struct.dataclass
class KVCache:
    """Preallocated keys and values: (layers, batch, max_len, kv_heads, head_dim) each."""

    k: Any
    v: Any

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@dataclasses.dataclass(frozen=True)
class DecoderDims:
    """The static facts the shared decoder needs (a backbone config gives them)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    rope_sections: tuple[int, ...]  # per rotary frequency: which position row drives it
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    explicit_head_dim: int | None = None  # a config's own head_dim (Qwen3); None: hidden_size / num_heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        """Decoder parameters (embedding and head included, norms and biases left out)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_layers * per_layer + heads * self.vocab_size * h


# ----------------------------------------------------------------------------- spec helpers
def linear_spec(din, dout, axes, hf_name=None, *, bias=False, layers=None, lora=False, trainable=True,
                dtype=None, hf_bias=None) -> Linear:
    """A Linear of ParamInfo leaves; `layers` stacks it (HF names then carry "{i}")."""
    lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
    kernel = ParamInfo(lead + (din, dout), lead_axes + tuple(axes), hf=HFKey(hf_name + ".weight", "linear")
                       if hf_name else None, stacked=bool(layers), lora=lora, trainable=trainable, dtype=dtype)
    b = None
    if bias:
        b = ParamInfo(lead + (dout,), lead_axes + (axes[1],), init="zeros",
                      hf=HFKey(hf_bias or hf_name + ".bias") if hf_name else None, stacked=bool(layers),
                      trainable=trainable, dtype=dtype)
    return Linear(kernel, b)


def norm_spec(shape, hf_name, *, layers=None, axes=None, trainable=True, dtype=None, init="ones") -> ParamInfo:
    lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
    axes = axes or ("norm",) * len(shape)
    return ParamInfo(lead + tuple(shape), lead_axes + tuple(axes), init=init, hf=HFKey(hf_name) if hf_name else None,
                     stacked=bool(layers), trainable=trainable, dtype=dtype)


def layer_norm_spec(shape, hf_prefix, *, layers=None, axes=None, trainable=True, dtype=None,
                    scale_name="weight") -> LayerNorm:
    return LayerNorm(norm_spec(shape, f"{hf_prefix}.{scale_name}", layers=layers, axes=axes, trainable=trainable,
                               dtype=dtype),
                     norm_spec(shape, f"{hf_prefix}.bias", layers=layers, axes=axes, trainable=trainable,
                               dtype=dtype, init="zeros"))


def decoder_spec(d: DecoderDims, prefix: str = "model", head_norm: Callable | None = None) -> Decoder:
    """The spec of the shared decoder with Llama/Qwen2 Hugging Face names under `prefix`; `head_norm(heads, name)`
    gives a backbone's q/k norm spec (None: no q/k norms) for `heads` heads under the HF module `name`."""
    L, h, i = d.num_layers, d.hidden_size, d.intermediate_size
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    lay = f"{prefix}.layers.{{i}}"
    attn, mlp = f"{lay}.self_attn", f"{lay}.mlp"
    lin = dict(layers=L, lora=True)
    layer = DecoderLayer(
        input_norm=norm_spec((h,), f"{lay}.input_layernorm.weight", layers=L),
        post_attn_norm=norm_spec((h,), f"{lay}.post_attention_layernorm.weight", layers=L),
        q=linear_spec(h, q, ("embed", "heads"), f"{attn}.q_proj", bias=d.qkv_bias, **lin),
        k=linear_spec(h, kv, ("embed", "kv_heads"), f"{attn}.k_proj", bias=d.qkv_bias, **lin),
        v=linear_spec(h, kv, ("embed", "kv_heads"), f"{attn}.v_proj", bias=d.qkv_bias, **lin),
        o=linear_spec(q, h, ("heads", "embed"), f"{attn}.o_proj", **lin),
        gate=linear_spec(h, i, ("embed", "mlp"), f"{mlp}.gate_proj", **lin),
        up=linear_spec(h, i, ("embed", "mlp"), f"{mlp}.up_proj", **lin),
        down=linear_spec(i, h, ("mlp", "embed"), f"{mlp}.down_proj", **lin),
        q_norm=head_norm(d.num_heads, f"{attn}.q_norm") if head_norm else None,
        k_norm=head_norm(d.num_kv_heads, f"{attn}.k_norm") if head_norm else None,
    )
    head = None
    if not d.tie_word_embeddings:
        head = ParamInfo((h, d.vocab_size), ("embed", "vocab"), hf=HFKey("lm_head.weight", "linear"))
    return Decoder(embed=ParamInfo((d.vocab_size, h), ("vocab", "embed"), hf=HFKey(f"{prefix}.embed_tokens.weight")),
                   layers=layer, norm=norm_spec((h,), f"{prefix}.norm.weight"), lm_head=head)


# ----------------------------------------------------------------------------- shared functions
def acc_dtype(dtype):
    """Accumulation dtype: float32 for bf16/f32 inputs, float64 when a test runs the model in float64."""
    return jnp.promote_types(dtype, jnp.float32)


def layer_norm(x, scale, bias, eps: float = 1e-6):
    """LayerNorm computed in float32, returned in x's dtype."""
    f = acc_dtype(x.dtype)
    x32 = x.astype(f)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(f) + bias.astype(f)
    return y.astype(x.dtype)


def rms_norm(x, weight, eps: float):
    """RMSNorm as transformers' Qwen2/Llama/Chameleon: normalise in float32, cast back, then scale."""
    x32 = x.astype(acc_dtype(x.dtype))
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotary embedding in float32; cos/sin broadcast against x's (..., heads, head_dim)."""
    x32 = x.astype(acc_dtype(x.dtype))
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def rope_cos_sin(d: DecoderDims, positions):
    """cos/sin (B, T, head_dim) float32 from positions (B, R, T); frequency j is driven by row rope_sections[j].

    R = 3 with Qwen2-VL's section split is M-RoPE; R = 1 (every frequency on row 0) is plain RoPE.
    """
    hd = d.head_dim
    inv_freq = 1.0 / (d.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))  # (hd/2,)
    pos = jnp.take(positions, jnp.asarray(np.asarray(d.rope_sections, np.int32)), axis=1)  # (B, hd/2, T)
    ang = jnp.swapaxes(pos.astype(jnp.float32), 1, 2) * jnp.asarray(inv_freq)  # (B, T, hd/2)
    ang = jnp.concatenate([ang, ang], -1)
    return jnp.cos(ang), jnp.sin(ang)


def init_cache(d: DecoderDims, batch: int, max_len: int, dtype) -> KVCache:
    shape = (d.num_layers, batch, max_len, d.num_kv_heads, d.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


# ----------------------------------------------------------------------------- attention
def _gather_rows(x, idx):
    """x (B, T, ...) with each row reordered: out[b, j] = x[b, idx[b, j]]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def compact_order(valid):
    """Each row's real slots first, in order, then its pads: (src, dest, length), (B, T), (B, T), (B,) int32.

    src[b, j] is the slot moved to place j, dest its inverse; length the real slots (at least 1). Any mask
    works (left or right padding, or holes), so a fused kernel that takes sequence lengths sees every row's
    real tokens as one run starting at 0, in their causal order.
    """
    t = valid.shape[1]
    length = valid.sum(1, dtype=jnp.int32)
    dest = jnp.where(valid, jnp.cumsum(valid, 1) - 1, length[:, None] + jnp.cumsum(~valid, 1) - 1).astype(jnp.int32)
    src = jnp.zeros_like(dest).at[jnp.arange(valid.shape[0])[:, None], dest].set(jnp.arange(t, dtype=jnp.int32))
    return src, dest, jnp.maximum(length, 1)


def last_real_index(valid):
    """(B,) int32 index of each row's last real slot (the last slot when a row has none)."""
    t = valid.shape[1]
    return (t - 1 - jnp.argmax(valid[:, ::-1], axis=1)).astype(jnp.int32)


def causal_self_attention(q, k, v, valid, spec: str | AttentionSpec, order=None):
    """Causal attention of a chunk over itself (nothing cached before it) with a fused kernel.

    q (B, T, N, hd), k/v (B, T, KV, hd) in the compute dtype; valid (B, T) any mask of real tokens (left
    and/or right padding, holes): query t sees the real keys <= t. The mask each kernel takes: xla/cudnn
    move every row's real tokens to the front in order (`compact_order`, or `order` if given), then
    `is_causal` plus query/key sequence lengths (cuDNN's PADDING_CAUSAL), and put the output back; pallas
    (the splash kernel, `splash_attention`) gives real tokens segment id 1 and pads 0. Pad queries return 0.
    """
    spec = spec if isinstance(spec, AttentionSpec) else AttentionSpec(spec)
    if spec.impl in ("xla", "cudnn"):
        src, dest, length = compact_order(valid) if order is None else order
        o = jax.nn.dot_product_attention(_gather_rows(q, src), _gather_rows(k, src), _gather_rows(v, src),
                                         is_causal=True, query_seq_lengths=length, key_value_seq_lengths=length,
                                         implementation=spec.impl)
        o = _gather_rows(o, dest)
    elif spec.impl == "pallas":
        return splash_attention(q, k, v, valid, valid, 0, mesh=spec.mesh, interpret=spec.interpret)
    else:
        raise ValueError(f"attention={spec.impl!r} has no fused kernel; use one of xla, cudnn, pallas")
    return jnp.where(valid[:, :, None, None], o, jnp.zeros((), o.dtype))


def last_query_row(q_last, k, allowed):
    """softmax(q_last . K^T / sqrt(d)) in float32 averaged over query heads, without gradient: (B, S).

    q_last (B, N, hd), k (B, S, KV, hd), allowed (B, S): the keys the query sees. Beside a fused kernel
    this is the only attention row computed (the latent loop selects image tokens by it).
    """
    q_last, k = jax.lax.stop_gradient(q_last), jax.lax.stop_gradient(k)
    b, n, hd = q_last.shape
    nkv = k.shape[2]
    s = jnp.einsum("bkgd,bskd->bkgs", q_last.reshape(b, nkv, n // nkv, hd), k,
                   preferred_element_type=acc_dtype(q_last.dtype))
    s = jnp.where(allowed[:, None, None, :], s * hd**-0.5, MASK_VALUE)
    return jax.nn.softmax(s, axis=-1).mean((1, 2))


def cached_attention(q, k, v, ck, cv, past_valid, valid, attn_row: bool):
    """Dense attention of a chunk over the past cache slots and over itself; one softmax over both.

    q (B, T, N, hd), k/v (B, T, KV, hd): the chunk; ck/cv (B, S, KV, hd): the cache slots before it that
    may be read (S static, only those are read; None: nothing cached), past_valid (B, S) the ones holding
    earlier real tokens; valid (B, T) the chunk's real tokens (query t sees chunk keys <= t). Scores and
    softmax in float32.
    Returns (o (B, T, N, hd), the last real query's probabilities over [past; chunk] averaged over heads or None).
    """
    b, t, n, hd = q.shape
    nkv, s_len = k.shape[2], 0 if ck is None else ck.shape[1]
    dtype, f = q.dtype, acc_dtype(q.dtype)
    qg = q.reshape(b, t, nkv, n // nkv, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=f)
    own = valid[:, None, None, None, :] & jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(own, s * hd**-0.5, MASK_VALUE)
    if s_len:
        sp = jnp.einsum("btkgd,bskd->bkgts", qg, ck.astype(dtype), preferred_element_type=f)
        sp = jnp.where(past_valid[:, None, None, None, :], sp * hd**-0.5, MASK_VALUE)
        s = jnp.concatenate([sp, s], -1)
    a = jax.nn.softmax(s, axis=-1)  # (B, KV, G, T, S + T) float32
    o = jnp.einsum("bkgts,bskd->btkgd", a[..., s_len:].astype(dtype), v, preferred_element_type=f)
    if s_len:
        o = o + jnp.einsum("bkgts,bskd->btkgd", a[..., :s_len].astype(dtype), cv.astype(dtype),
                           preferred_element_type=f)
    row = None
    if attn_row:  # the row of each row's last real query (a pad on right-padded input is not one)
        at = last_real_index(valid)[:, None, None, None, None]
        row = jax.lax.stop_gradient(jnp.take_along_axis(a, at, axis=3)[:, :, :, 0].mean((1, 2)))  # (B, S + T)
    return o.astype(dtype).reshape(b, t, n, hd), row


# ----------------------------------------------------------------------------- decoder blocks
# A block is a backbone's own layer function: block(d, p, x, extra, attend) -> (x, kv) with p the layer's
# DecoderLayer, extra its slice of the per-layer `extras` (None when the backbone has none) and attend(q, k, v)
# the shared attention (rotary, cache, kernel): q (B, T, N, hd), k/v (B, T, KV, hd) -> (o (B, T, N * hd), kv),
# kv being what the block returns beside x. The scan over layers and the cache stay in `decoder`.
def project_qkv(d: DecoderDims, p: DecoderLayer, h):
    """q (B, T, N, hd), k and v (B, T, KV, hd) of the normed input h."""
    b, t, _ = h.shape
    q = checkpoint_name(p.q(h), "q_proj").reshape(b, t, d.num_heads, d.head_dim)
    k = checkpoint_name(p.k(h), "k_proj").reshape(b, t, d.num_kv_heads, d.head_dim)
    return q, k, checkpoint_name(p.v(h), "v_proj").reshape(b, t, d.num_kv_heads, d.head_dim)


def swiglu(p: DecoderLayer, z):
    return p.down(jax.nn.silu(p.gate(z)) * p.up(z))


def pre_norm_block(d: DecoderDims, p: DecoderLayer, x, extra, attend):
    """The Llama/Qwen2 layer: x + attn(norm(x)), then x + mlp(norm(x)) (extras unused)."""
    del extra
    o, kv = attend(*project_qkv(d, p, rms_norm(x, p.input_norm, d.rms_norm_eps)))
    x = x + checkpoint_name(p.o(o), "o_proj")
    return x + swiglu(p, rms_norm(x, p.post_attn_norm, d.rms_norm_eps)), kv


def decoder(llm: Decoder, d: DecoderDims, embeds, positions, cache: KVCache, cache_index, kv_valid, *,
            attn_row: bool = False, layer_wrapper: Callable = identity, attention: str | AttentionSpec = "auto",
            kv_len: int | None = None, block: Callable = pre_norm_block, extras=None):
    """The one decoder entry point: prefill, latent chunks, suffix and one-token decoding.

    embeds (B, T, H) go to cache slots [cache_index, cache_index + T); positions (B, R, T); kv_valid
    (B, max_len) marks slots holding real tokens. Query t sees valid slots <= cache_index + t; a chunk reads
    only the cache slots before it: [0, cache_index) when cache_index is a Python int, else [0, kv_len) (a
    static bound >= cache_index; default the whole cache).
    Attention (static `attention`: a name or an AttentionSpec, see attention_spec): a chunk with nothing cached
    before it (cache_index the Python int 0: prefill, a full pass) runs the fused kernel (any mask of real
    tokens: left/right padding or holes). After cached slots, the TPU kernel (pallas) runs every chunk of
    more than one token (latent chunks, the suffix) over [readable cache slots; the chunk]; one-token chunks
    (decoding) and the other implementations run dense attention there.
    `block` is the backbone's layer function (see pre_norm_block) and `extras` a pytree of per-layer inputs
    (leading axis: layers), scanned with the layer params and handed to the block (None: none).
    `layer_wrapper` wraps the scanned layer function (the trainer's remat, see train.remat; hashable when a
    jitted call takes it as a static argument).
    Returns (hidden after the final norm (B, T, H), new cache, attention row or None), where the
    attention row (B, max_len) float32 is the probabilities of each row's last real query of the chunk,
    averaged over layers and heads (computed without gradient).
    """
    b, t, _ = embeds.shape
    past = _readable_slots(cache, cache_index, t, kv_len)
    attend = _attention_fn(d, embeds.dtype, positions, cache, cache_index, kv_valid, past, attn_row, attention)

    def layer(x, xs):
        p, extra, ck, cv = xs
        return block(d, p, x, extra, functools.partial(attend, ck=ck, cv=cv))

    past_kv = (None, None) if past == 0 else (cache.k, cache.v)
    x, (ks, vs, rows) = loop_scan(layer_wrapper(layer), embeds, (llm.layers, extras, *past_kv),
                                  unroll=layer_wrapper.unroll)
    x = rms_norm(x, llm.norm, d.rms_norm_eps)
    at = (0, 0, cache_index, 0, 0)
    new_cache = KVCache(jax.lax.dynamic_update_slice(cache.k, ks.astype(cache.k.dtype), at),
                        jax.lax.dynamic_update_slice(cache.v, vs.astype(cache.v.dtype), at))
    if not attn_row:
        return x, new_cache, None
    r = rows.mean(0)  # (B, past + T) layers averaged
    max_len = cache.max_len
    full = jnp.zeros((b, max_len), r.dtype).at[:, :past].set(r[:, :past])
    return x, new_cache, jax.lax.dynamic_update_slice(full, r[:, past:], (0, cache_index))


def _readable_slots(cache: KVCache, cache_index, t: int, kv_len: int | None) -> int:
    """The static number of cache slots a chunk of t tokens at cache_index reads (see decoder)."""
    max_len = cache.max_len
    if isinstance(cache_index, (int, np.integer)):
        if not 0 <= int(cache_index) <= max_len - t:
            raise ValueError(f"cache_index={cache_index} with {t} new tokens does not fit a cache of {max_len} slots")
        return int(cache_index)
    past = max_len if kv_len is None else int(kv_len)
    if not 0 < past <= max_len:
        raise ValueError(f"kv_len={kv_len} must be in [1, {max_len}] (the cache slots a chunk may read)")
    return past


def _attention_fn(d: DecoderDims, dtype, positions, cache: KVCache, cache_index, kv_valid, past: int,
                  attn_row: bool, attention):
    """The shared attention a block calls: attend(q, k, v, ck=, cv=) -> (o (B, T, N * hd), (k, v, row))."""
    b, t = positions.shape[0], positions.shape[2]
    spec = attention_spec(attention, dtype, d.head_dim)
    cache_index = int(cache_index) if isinstance(cache_index, (int, np.integer)) else cache_index
    # a one-query kernel call is not worth it (T padded to a 128-row block): one-token decoding stays dense
    splash = spec.impl == "pallas" and (past == 0 or t > 1)
    fused = splash or (spec.impl in ("xla", "cudnn") and past == 0)
    cos, sin = rope_cos_sin(d, positions)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    valid = jax.lax.dynamic_slice_in_dim(kv_valid, cache_index, t, axis=1)  # (B, T)
    past_valid = kv_valid[:, :past] & (jnp.arange(past) < cache_index)[None]  # (B, past)
    seen = jnp.concatenate([past_valid, valid], 1)  # (B, past + T): the keys a real query of the chunk may see
    order = compact_order(valid) if fused and not splash else None  # once for every layer
    last = last_real_index(valid) if fused else None  # (B,) the query whose attention row is returned

    def attend(q, k, v, ck=None, cv=None):
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin).astype(cache.k.dtype).astype(dtype)  # as stored in the cache
        v = v.astype(cache.v.dtype).astype(dtype)
        if fused:
            if past:  # [the readable cache slots; the chunk] (B, past + T, KV, hd): the kernel's keys
                k = jnp.concatenate([ck[:, :past].astype(dtype), k], 1)
                v = jnp.concatenate([cv[:, :past].astype(dtype), v], 1)
            if splash:
                o = splash_attention(q, k, v, valid, seen, past, mesh=spec.mesh, interpret=spec.interpret)
            else:
                o = causal_self_attention(q, k, v, valid, spec, order)
            q_last = jnp.take_along_axis(q, last[:, None, None, None], axis=1)[:, 0]  # (B, N, hd)
            row = last_query_row(q_last, k, seen) if attn_row else None  # (B, past + T)
            k, v = k[:, past:], v[:, past:]
        else:
            if past:  # only the slots before the chunk are read
                ck, cv = ck[:, :past], cv[:, :past]
            o, row = cached_attention(q, k, v, ck, cv, past_valid, valid, attn_row)  # row (B, past + T)
        return checkpoint_name(o.reshape(b, t, -1), "context"), (k, v, row)

    return attend


def lm_logits(llm: Decoder, d: DecoderDims, hidden):
    """Logits in float32 (B, T, V)."""
    w = llm.embed.T if d.tie_word_embeddings else llm.lm_head
    return jnp.einsum("bth,hv->btv", hidden, w.astype(hidden.dtype), preferred_element_type=acc_dtype(hidden.dtype))

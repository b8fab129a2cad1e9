"""Shared layers and the one decoder every backbone uses: typed weights, KV cache, attention row.

Weights are typed pytrees (flax.struct dataclasses). A linear layer is called, never unpacked, so the
trainer may hand the model a wrapped layer (LoRA) without the model knowing. Layers are stacked on a
leading axis and run with `lax.scan` under a remat policy given as a static argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ivtlr_jax.models.spec import HFKey, ParamInfo

MASK_VALUE = -1e30  # added to masked attention scores; finite so fully masked (pad) rows stay NaN-free
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # least memory: recompute each layer in backward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection outputs
    "none": jax.checkpoint_policies.everything_saveable,
}


def check_remat(name: str) -> str:
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} is not valid; use one of {list(REMAT_POLICIES)}")
    return name


def remat(fn, policy: str):
    """fn under jax.checkpoint with the named policy ("none" saves everything: no recomputation)."""
    return jax.checkpoint(fn, policy=REMAT_POLICIES[check_remat(policy)])


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


@struct.dataclass
class LayerNorm:
    scale: Any
    bias: Any


@struct.dataclass
class DecoderLayer:
    """One pre-norm (or, with post_norm, swin-norm) decoder layer; every leaf stacked over layers."""

    input_norm: Any  # (L, H) RMSNorm weight
    post_attn_norm: Any  # (L, H)
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    q_norm: LayerNorm | None = None  # (L, heads, head_dim): per-head LayerNorm on q (Chameleon)
    k_norm: LayerNorm | None = None  # (L, kv_heads, head_dim)


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
    qk_norm: bool = False
    post_norm: bool = False  # swin_norm: norms after attention and MLP
    qk_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


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


def decoder_spec(d: DecoderDims, prefix: str = "model") -> Decoder:
    """The spec of the shared decoder with Llama/Qwen2 Hugging Face names under `prefix`."""
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
        q_norm=layer_norm_spec((d.num_heads, d.head_dim), f"{attn}.q_norm", layers=L) if d.qk_norm else None,
        k_norm=layer_norm_spec((d.num_kv_heads, d.head_dim), f"{attn}.k_norm", layers=L) if d.qk_norm else None,
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


def _head_norm(x, p: LayerNorm | None, eps: float):
    """Per-head LayerNorm over head_dim with (heads, head_dim) weight and bias (Chameleon's q/k norm)."""
    if p is None:
        return x
    y = layer_norm(x, None, None, eps)
    return (y * p.scale.astype(x.dtype) + p.bias.astype(x.dtype)).astype(x.dtype)


def decoder(llm: Decoder, d: DecoderDims, embeds, positions, cache: KVCache, cache_index, kv_valid, *,
            attn_row: bool = False, remat_policy: str = "none"):
    """The one decoder entry point: prefill, latent chunks, suffix and one-token decoding.

    embeds (B, T, H) go to cache slots [cache_index, cache_index + T); positions (B, R, T); kv_valid
    (B, max_len) marks slots holding real tokens. Query t sees valid slots <= cache_index + t.
    Returns (hidden after the final norm (B, T, H), new cache, attention row or None), where the
    attention row (B, max_len) float32 is the last query's probabilities averaged over layers and heads.
    """
    b, t, _ = embeds.shape
    max_len = cache.k.shape[2]
    nkv, hd = d.num_kv_heads, d.head_dim
    groups = d.num_heads // nkv
    dtype = embeds.dtype
    cos, sin = rope_cos_sin(d, positions)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    q_slot = cache_index + jnp.arange(t)  # (T,)
    allowed = kv_valid[:, None, :] & (jnp.arange(max_len)[None, None, :] <= q_slot[None, :, None])
    allowed = allowed[:, None, None]  # (B, 1, 1, T, max_len)
    eps = d.rms_norm_eps

    def attention(h, p: DecoderLayer, ck, cv):
        q = _head_norm(p.q(h).reshape(b, t, d.num_heads, hd), p.q_norm, d.qk_norm_eps)
        k = _head_norm(p.k(h).reshape(b, t, nkv, hd), p.k_norm, d.qk_norm_eps)
        v = p.v(h).reshape(b, t, nkv, hd)
        q = apply_rotary(q, cos, sin).reshape(b, t, nkv, groups, hd)
        k = apply_rotary(k, cos, sin)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
        s = jnp.einsum("btkgd,bskd->bkgts", q, ck.astype(dtype), preferred_element_type=acc_dtype(dtype))
        s = jnp.where(allowed, s * hd**-0.5, MASK_VALUE)
        a = jax.nn.softmax(s, axis=-1)  # (B, kv, G, T, max_len) float32
        o = jnp.einsum("bkgts,bskd->btkgd", a.astype(dtype), cv.astype(dtype)).reshape(b, t, -1)
        row = a[:, :, :, -1, :].mean((1, 2)) if attn_row else None  # (B, max_len)
        return p.o(o), ck, cv, row

    def layer(x, xs):
        p, ck, cv = xs
        mlp = lambda z: p.down(jax.nn.silu(p.gate(z)) * p.up(z))
        if d.post_norm:  # swin_norm: x + norm(attn(x)), then x + norm(mlp(x))
            a, ck, cv, row = attention(x, p, ck, cv)
            x = x + rms_norm(a, p.input_norm, eps)
            x = x + rms_norm(mlp(x), p.post_attn_norm, eps)
        else:
            a, ck, cv, row = attention(rms_norm(x, p.input_norm, eps), p, ck, cv)
            x = x + a
            x = x + mlp(rms_norm(x, p.post_attn_norm, eps))
        return x, (ck, cv, row)

    x, (ks, vs, rows) = jax.lax.scan(remat(layer, remat_policy), embeds, (llm.layers, cache.k, cache.v))
    x = rms_norm(x, llm.norm, eps)
    return x, KVCache(ks, vs), (rows.mean(0) if attn_row else None)


def lm_logits(llm: Decoder, d: DecoderDims, hidden):
    """Logits in float32 (B, T, V)."""
    w = llm.embed.T if d.tie_word_embeddings else llm.lm_head
    return jnp.einsum("bth,hv->btv", hidden, w.astype(hidden.dtype), preferred_element_type=acc_dtype(hidden.dtype))

"""Functional Flax/JAX port of Qwen2-VL: the vision tower and the Qwen2 decoder with an explicit KV cache.

Everything here is a pure function of (params, inputs[, cache]). Parameters follow `layout.param_shapes`.
Host-side helpers (numpy) prepare what depends on image grids and masks, so jitted code sees static
shapes only.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ivtlr_jax.config import ModelConfig, VisionConfig

MASK_VALUE = -1e30  # added to masked attention scores; finite so fully masked (pad) rows stay NaN-free
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # least memory: recompute each layer in backward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection outputs
    "none": jax.checkpoint_policies.everything_saveable,
}
_REMAT = {"policy": "full"}


@contextlib.contextmanager
def remat_policy(name: str):
    """Rematerialisation policy of the layer scans for code traced inside the block."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} is not valid; use one of {list(REMAT_POLICIES)}")
    old = _REMAT["policy"]
    _REMAT["policy"] = name
    try:
        yield
    finally:
        _REMAT["policy"] = old


def _remat(fn):
    return jax.checkpoint(fn, policy=REMAT_POLICIES[_REMAT["policy"]])


# ----------------------------------------------------------------------------- shared layers
def layer_norm(x, scale, bias, eps: float = 1e-6):
    """LayerNorm computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x, weight, eps: float):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (as transformers does)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotary embedding in float32; cos/sin broadcast against x's (..., heads, head_dim)."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def dense(x, p):
    """x @ kernel (+ bias) (+ a LoRA update when the trainer put `lora_a`/`lora_b` beside the kernel)."""
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    if "lora_a" in p:  # lora_b arrives pre-scaled by alpha / r
        xa = x
        if "lora_key" in p:  # LoRA dropout on the adapter's input
            keep = jax.random.bernoulli(p["lora_key"], 1.0 - p["lora_rate"], x.shape)
            xa = jnp.where(keep, x / (1.0 - p["lora_rate"]), 0).astype(x.dtype)
        y = y + (xa @ p["lora_a"].astype(x.dtype)) @ p["lora_b"].astype(x.dtype)
    return y


# ----------------------------------------------------------------------------- vision tower
class VisionInputs(NamedTuple):
    """Host-made arrays that group patch rows by image so attention stays inside each image."""

    patch_index: np.ndarray  # (n_images, max_patches) int32: row of pixel_values, 0 where padded
    patch_valid: np.ndarray  # (n_images, max_patches) bool
    unpad_index: np.ndarray  # (total_patches,) int32: flat index into (n_images * max_patches)
    cos: np.ndarray  # (n_images, max_patches, head_dim) float32
    sin: np.ndarray  # (n_images, max_patches, head_dim) float32


def check_image_inputs(vcfg: VisionConfig, pixel_values, image_grid_thw) -> np.ndarray:
    """Validate pixel_values against image_grid_thw; return the grid as an int64 (n, 3) array."""
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(
            f"image_grid_thw has shape {grid.shape}; expected (num_images, 3) rows of (t, h, w) "
            "as the Qwen2-VL image processor returns"
        )
    grid = grid.astype(np.int64)
    m = vcfg.spatial_merge_size
    if (grid[:, 1] % m).any() or (grid[:, 2] % m).any() or (grid <= 0).any():
        raise ValueError(
            f"image_grid_thw={grid.tolist()}: h and w must be positive multiples of spatial_merge_size={m}"
        )
    shape = tuple(np.shape(pixel_values))
    expected = (int(grid.prod(-1).sum()), vcfg.patch_dim)
    if shape != expected:
        raise ValueError(
            f"pixel_values has shape {shape} but image_grid_thw={grid.tolist()} needs {expected} "
            f"(sum of t*h*w rows of C*T*P*P = {vcfg.in_channels}*{vcfg.temporal_patch_size}*"
            f"{vcfg.patch_size}*{vcfg.patch_size} values)"
        )
    return grid


def vision_position_ids(vcfg: VisionConfig, grid: np.ndarray) -> np.ndarray:
    """(total_patches, 2) (row, col) of each patch, in the processor's merge-block order."""
    m = vcfg.spatial_merge_size
    out = []
    for t, h, w in grid.tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
    return np.concatenate(out, 0)


def prepare_vision_inputs(vcfg: VisionConfig, grid: np.ndarray) -> VisionInputs:
    """Group patches per image (padded to the largest image) with their 2-D rotary tables."""
    sizes = grid.prod(-1)
    n, max_len = len(sizes), int(sizes.max())
    dim = vcfg.head_dim // 2
    inv_freq = 1.0 / (vcfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    pos = vision_position_ids(vcfg, grid).astype(np.float32)
    ang = np.concatenate([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], -1)  # (N, head_dim/2)
    ang = np.concatenate([ang, ang], -1).astype(np.float32)  # (N, head_dim)
    patch_index = np.zeros((n, max_len), np.int32)
    patch_valid = np.zeros((n, max_len), bool)
    unpad = np.zeros(int(sizes.sum()), np.int32)
    angles = np.zeros((n, max_len, ang.shape[-1]), np.float32)
    start = 0
    for i, size in enumerate(sizes.tolist()):
        patch_index[i, :size] = np.arange(start, start + size)
        patch_valid[i, :size] = True
        unpad[start : start + size] = i * max_len + np.arange(size)
        angles[i, :size] = ang[start : start + size]
        start += size
    return VisionInputs(patch_index, patch_valid, unpad, np.cos(angles), np.sin(angles))


def vision_blocks(vparams, vcfg: VisionConfig, x, key_ok, cos, sin):
    """ViT blocks over patches grouped per image: x (n_img, L, E); key_ok (n_img, L) marks real patches."""
    n_img, lmax, e = x.shape
    nh, hd = vcfg.num_heads, vcfg.head_dim
    dtype = x.dtype
    key_ok = key_ok[:, None, None, :]  # (n_img, 1, 1, L)
    cos, sin = cos[..., None, :], sin[..., None, :]

    def block(x, p):
        h = layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"])
        qkv = dense(h, p["qkv"]).reshape(n_img, lmax, 3, nh, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * hd**-0.5
        s = jnp.where(key_ok, s, MASK_VALUE)
        a = jax.nn.softmax(s, axis=-1).astype(dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(n_img, lmax, e)
        x = x + dense(o, p["proj"])
        h = layer_norm(x, p["norm2"]["scale"], p["norm2"]["bias"])
        h = dense(h, p["fc1"])
        h = h * jax.nn.sigmoid(1.702 * h)  # quick_gelu
        return x + dense(h, p["fc2"]), None

    x, _ = jax.lax.scan(_remat(block), x, vparams["blocks"])
    return x


def patch_merger(vparams, vcfg: VisionConfig, x):
    """(N, E) patches in merge-block order -> (N / merge^2, hidden)."""
    mp = vparams["merger"]
    x = layer_norm(x, mp["ln_q"]["scale"], mp["ln_q"]["bias"])
    x = x.reshape(-1, x.shape[-1] * vcfg.spatial_merge_size**2)
    x = jax.nn.gelu(dense(x, mp["fc1"]), approximate=False)
    return dense(x, mp["fc2"])


@functools.partial(jax.jit, static_argnames=("vcfg",))
def vision_forward(vparams, vcfg: VisionConfig, pixel_values, vin: VisionInputs):
    """Vision tower: (total_patches, C*T*P*P) pixels -> (total_patches / merge^2, hidden) features."""
    dtype = vparams["patch_embed"]["kernel"].dtype
    x = pixel_values.astype(dtype) @ vparams["patch_embed"]["kernel"]  # (N, E)
    x = vision_blocks(vparams, vcfg, x[vin.patch_index], vin.patch_valid, vin.cos, vin.sin)
    x = x.reshape(-1, x.shape[-1])[vin.unpad_index]  # (N, E) back in pixel_values order
    return patch_merger(vparams, vcfg, x)


def vision_forward_uniform(vparams, vcfg: VisionConfig, pixel_values, cos, sin, dtype=None):
    """Vision tower for one image per row, all of one grid: (B, Np, C*T*P*P) -> (B * Np / merge^2, hidden).

    Every array is batch-leading and row-local, so the batch can be sharded across devices and hosts.
    cos/sin (Np, head_dim) come from `prepare_vision_inputs` of that single grid.
    """
    dtype = dtype or vparams["patch_embed"]["kernel"].dtype
    b, npatch, _ = pixel_values.shape
    x = pixel_values.astype(dtype) @ vparams["patch_embed"]["kernel"].astype(dtype)  # (B, Np, E)
    key_ok = jnp.ones((b, npatch), bool)
    x = vision_blocks(vparams, vcfg, x, key_ok, cos[None], sin[None])
    return patch_merger(vparams, vcfg, x.reshape(b * npatch, -1))


def encode_images(params, cfg: ModelConfig, pixel_values, image_grid_thw):
    """Checked host entry to the vision tower; returns (num_image_tokens, hidden) features."""
    grid = check_image_inputs(cfg.vision, pixel_values, image_grid_thw)
    vin = prepare_vision_inputs(cfg.vision, grid)
    return vision_forward(params["vision"], cfg.vision, jnp.asarray(pixel_values), vin)


# ----------------------------------------------------------------------------- positions (host)
def sequential_positions(attention_mask: np.ndarray) -> np.ndarray:
    """(3, B, S) positions counting real tokens only, the same on all three M-RoPE sections."""
    mask = np.asarray(attention_mask).astype(np.int64)
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return np.broadcast_to(pos[None], (3,) + pos.shape).astype(np.int32)


def mrope_positions(cfg: ModelConfig, input_ids, attention_mask, image_grid_thw=None) -> np.ndarray:
    """Qwen2-VL native 3-D positions, as `get_rope_index` computes them (pads get 0)."""
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    m = cfg.vision.spatial_merge_size
    grids = iter(np.asarray(image_grid_thw).tolist()) if image_grid_thw is not None else iter(())
    out = np.zeros((3,) + ids.shape, np.int64)
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        is_img = row == cfg.image_token_id
        pieces, cur, i = [], 0, 0
        while i < len(row):
            j = i
            while j < len(row) and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                pieces.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
                i = j
                continue
            # one run of image tokens may hold several consecutive images: consume grid by grid
            while i < j:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError(
                        "input_ids hold more image tokens than image_grid_thw describes; pass one "
                        "(t, h, w) row per image"
                    ) from None
                gh, gw = h // m, w // m
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                n_tok = t * gh * gw
                pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
                cur += max(gh, gw)
                i += n_tok
            if i != j:
                raise ValueError(
                    f"row {b}: a run of {j} image tokens does not match image_grid_thw (t*h*w/4 per image)"
                )
        if pieces:
            out[:, b, mask[b]] = np.concatenate(pieces, 1)
    return out.astype(np.int32)


def make_positions(cfg: ModelConfig, input_ids, attention_mask, image_grid_thw, position_mode: str):
    if position_mode == "sequential":
        return sequential_positions(attention_mask)
    if position_mode == "mrope":
        return mrope_positions(cfg, input_ids, attention_mask, image_grid_thw)
    raise ValueError(f"position_mode={position_mode!r} is not valid; use 'sequential' or 'mrope'")


# ----------------------------------------------------------------------------- LLM
def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    """Preallocated KV cache: k and v of (layers, batch, max_len, kv_heads, head_dim)."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def mrope_cos_sin(cfg: ModelConfig, positions):
    """cos/sin (B, T, head_dim) float32 from (3, B, T) positions with HF's section split."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))  # (hd/2,)
    section = np.repeat(np.arange(3), cfg.mrope_section)  # (hd/2,) which of t/h/w drives frequency j
    pos = jnp.take(positions, jnp.asarray(section), axis=0).astype(jnp.float32)  # (hd/2, B, T)
    ang = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq)  # (B, T, hd/2)
    ang = jnp.concatenate([ang, ang], -1)
    return jnp.cos(ang), jnp.sin(ang)


def embed_tokens(params, cfg: ModelConfig, input_ids, image_features=None):
    """Token embeddings with the image-pad positions replaced, in order, by the vision features."""
    x = params["llm"]["embed"][input_ids]  # (B, S, H)
    if image_features is None:
        return x
    is_img = input_ids == cfg.image_token_id
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, None).reshape(is_img.shape)
    feats = image_features.astype(x.dtype)[idx]  # (B, S, H)
    return jnp.where(is_img[..., None], feats, x)


def decoder(
    lparams,
    cfg: ModelConfig,
    embeds,
    positions,
    cache,
    cache_index,
    kv_valid,
    *,
    return_attn_row: bool = False,
):
    """The one decoder entry point: prefill, latent chunks, suffix and one-token decoding.

    embeds (B, T, H) are written to cache slots [cache_index, cache_index + T); kv_valid (B, max_len)
    marks slots that hold real tokens (pads False). Query t sees slots <= cache_index + t that are valid.
    Returns (hidden after the final norm (B, T, H), new cache, attention row or None), where the
    attention row (B, max_len) float32 is the last query's probabilities averaged over layers and heads.
    """
    b, t, _ = embeds.shape
    max_len = cache["k"].shape[2]
    nkv, hd = cfg.num_key_value_heads, cfg.head_dim
    groups = cfg.num_attention_heads // nkv
    dtype = embeds.dtype
    cos, sin = mrope_cos_sin(cfg, positions)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    q_slot = cache_index + jnp.arange(t)  # (T,)
    allowed = kv_valid[:, None, :] & (jnp.arange(max_len)[None, None, :] <= q_slot[None, :, None])
    allowed = allowed[:, None, None]  # (B, 1, 1, T, max_len)
    eps = cfg.rms_norm_eps

    def layer(x, xs):
        p, ck, cv = xs
        h = rms_norm(x, p["input_norm"], eps)
        q = dense(h, p["q"]).reshape(b, t, nkv, groups, hd)
        k = dense(h, p["k"]).reshape(b, t, nkv, hd)
        v = dense(h, p["v"]).reshape(b, t, nkv, hd)
        q = apply_rotary(q, cos[:, :, :, None], sin[:, :, :, None])
        k = apply_rotary(k, cos, sin)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
        s = jnp.einsum("btkgd,bskd->bkgts", q, ck.astype(dtype), preferred_element_type=jnp.float32)
        s = jnp.where(allowed, s * hd**-0.5, MASK_VALUE)
        a = jax.nn.softmax(s, axis=-1)  # (B, kv, G, T, max_len) float32
        o = jnp.einsum("bkgts,bskd->btkgd", a.astype(dtype), cv.astype(dtype)).reshape(b, t, -1)
        x = x + dense(o, p["o"])
        h = rms_norm(x, p["post_attn_norm"], eps)
        x = x + dense(jax.nn.silu(dense(h, p["gate"])) * dense(h, p["up"]), p["down"])
        row = a[:, :, :, -1, :].mean((1, 2)) if return_attn_row else None  # (B, max_len)
        return x, (ck, cv, row)

    layer = _remat(layer)
    x, (ks, vs, rows) = jax.lax.scan(layer, embeds, (lparams["layers"], cache["k"], cache["v"]))
    x = rms_norm(x, lparams["norm"], eps)
    row = rows.mean(0) if return_attn_row else None
    return x, {"k": ks, "v": vs}, row


def lm_head(params, cfg: ModelConfig, hidden):
    """Logits in float32 (B, T, V)."""
    llm = params["llm"]
    w = llm["embed"].T if cfg.tie_word_embeddings else llm["lm_head"]
    return jnp.einsum("bth,hv->btv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_logits(params, cfg: ModelConfig, input_ids, attention_mask, positions, image_features):
    """One full pass: token ids (+ image features) -> float32 logits (B, S, V)."""
    embeds = embed_tokens(params, cfg, input_ids, image_features)
    b, s = input_ids.shape
    cache = init_cache(cfg, b, s, embeds.dtype)
    hidden, _, _ = decoder(params["llm"], cfg, embeds, positions, cache, 0, attention_mask.astype(bool))
    return lm_head(params, cfg, hidden)


def check_text_inputs(cfg: ModelConfig, input_ids, attention_mask, n_image_tokens: int | None):
    """Validate ids/mask shapes and the image-token count against the features."""
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    if ids.ndim != 2:
        raise ValueError(f"input_ids has shape {ids.shape}; expected (batch, seq_len)")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}; it must equal input_ids' {ids.shape}")
    if (ids < 0).any() or (ids >= cfg.vocab_size).any():
        raise ValueError(f"input_ids hold ids outside [0, vocab_size={cfg.vocab_size})")
    count = int(((ids == cfg.image_token_id) & (mask > 0)).sum())
    expected = n_image_tokens or 0
    if count != expected:
        raise ValueError(
            f"input_ids hold {count} image tokens (id {cfg.image_token_id}) but the images give "
            f"{expected} features (sum of t*h*w/{cfg.vision.spatial_merge_size ** 2} over image_grid_thw); "
            "expand <|image_pad|> to the right count per image"
        )
    return ids.astype(np.int32), mask.astype(np.int32)

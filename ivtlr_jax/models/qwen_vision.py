"""The ViT pieces the Qwen vision towers share (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Host side: the image inputs' checks and each patch's (row, col) in the processor's merge-block order. Device side:
the patch embedding, the 2-D rotary, attention within a mask of allowed keys (one image, or one window of it), the
merge of merge x merge neighbouring patches and the merger MLP, and the FLOPs of a tower. A tower keeps only what
differs: its norms and MLP, windows (Qwen2.5-VL), learned position embeddings and DeepStack (Qwen3-VL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ivtlr_jax.models import layers as ly


# ----------------------------------------------------------------------------- host side
def check_image_inputs(vcfg, pixel_values, image_grid_thw) -> np.ndarray:
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


def patch_rows_cols(vcfg, grid_row) -> np.ndarray:
    """(t*h*w, 2) (row, col) of each patch of one image, in the processor's merge-block order."""
    m = vcfg.spatial_merge_size
    t, h, w = (int(v) for v in grid_row)
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // m, m, w // m, m)
    hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hh, ww], -1), (t, 1)).astype(np.int32)


# ----------------------------------------------------------------------------- device side
def activation(name: str):
    """A vision MLP's activation by its transformers name."""
    return {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
            "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
            "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}[name]


def patch_embed(linear: ly.Linear, pixel_values):
    """(B, M, P, C*T*P*P) pixels -> (B * M, P, E) patch embeddings in the linear's dtype."""
    b, m, p, _ = pixel_values.shape
    return linear(pixel_values.astype(linear.kernel.dtype)).reshape(b * m, p, -1)


def rotary(vcfg, patch_rc):
    """cos/sin (N, P, 1, head_dim) of the 2-D rotary from each patch's (row, col) (..., P, 2): the first half of
    the frequencies driven by the row, the second by the column."""
    dim = vcfg.head_dim // 2
    inv_freq = 1.0 / (vcfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    p = patch_rc.shape[-2]
    rc = patch_rc.reshape(-1, p, 2).astype(jnp.float32)
    ang = jnp.concatenate([rc[..., :1] * inv_freq, rc[..., 1:] * inv_freq], -1)  # (N, P, head_dim/2)
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    return jnp.cos(ang), jnp.sin(ang)


def attention(qkv: ly.Linear, proj: ly.Linear, h, cos, sin, allowed, num_heads: int):
    """Self-attention of each image's patches h (N, P, E) over the keys `allowed` (broadcast to (N, heads, P, P)):
    the image's real patches, or those of the query's window; scores and softmax in float32."""
    n, p, e = h.shape
    hd = e // num_heads
    x = qkv(h).reshape(n, p, 3, num_heads, hd)
    q, k, val = ly.apply_rotary(x[:, :, 0], cos, sin), ly.apply_rotary(x[:, :, 1], cos, sin), x[:, :, 2]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * hd**-0.5
    a = jax.nn.softmax(jnp.where(allowed, s, ly.MASK_VALUE), axis=-1).astype(h.dtype)
    return proj(jnp.einsum("bhqk,bkhd->bqhd", a, val).reshape(n, p, e))


def merge(vcfg, x, batch: int):
    """(B * M, P, E) -> (B, M * P / merge^2, merge^2 * E): each group of merge^2 consecutive patches (one merged
    unit, in the processor's order) side by side."""
    n, p, _ = x.shape
    return x.reshape(batch, n // batch * p // vcfg.spatial_merge_size**2, -1)


def merger_mlp(fc1: ly.Linear, fc2: ly.Linear, h):
    """The merger's MLP on merged units: fc2(GELU(fc1(h)))."""
    return fc2(jax.nn.gelu(fc1(h), approximate=False))


def tower_flops(vcfg, images, hidden: int, mlp_matmuls: int, mergers: int = 1) -> float:
    """Forward FLOPs of a tower over a batch's image slots (padding and masked scores included: they are computed):
    patch embedding, blocks (4 E^2 attention projections, `mlp_matmuls` E x mlp matmuls, scores), `mergers`
    mergers."""
    b, m, p, _ = images.pixel_values.shape
    e, mm = vcfg.embed_dim, vcfg.spatial_merge_size**2
    blocks = vcfg.depth * (2 * p * (4 * e * e + mlp_matmuls * e * vcfg.mlp_dim) + 4 * p * p * e)
    merger = 2 * (p // mm) * ((e * mm) ** 2 + e * mm * hidden)
    return float(b * m * (2 * p * vcfg.patch_dim * e + blocks + mergers * merger))

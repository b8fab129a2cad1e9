"""Qwen2.5-VL as a backbone: Qwen2-VL's LLM and position rule with a windowed RMSNorm/SwiGLU vision tower.

What differs from Qwen2-VL is all in the vision tower: RMSNorm instead of LayerNorm, a SiLU-gated MLP
with biases, window attention in every block not listed in `fullatt_block_indexes`, and an RMSNorm before
the merger. transformers reorders the patches window by window (`get_vision_window_index`), attends inside
each window and undoes the order after the merger; attention is blind to the order of its keys, so here
the patches keep the processor's order and a host-computed window id per patch masks the scores instead
(static shapes; the same numbers up to summation order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import qwen_vision as qv
from ivtlr_jax.models.base import rows_of_images
from ivtlr_jax.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig
from ivtlr_jax.models.qwen2_vl import Qwen2VL
from ivtlr_jax.models.qwen_vision import check_image_inputs, patch_rows_cols
from ivtlr_jax.models.spec import HFKey, ParamInfo

RMS_EPS = 1e-6  # the vision blocks' and the merger's RMSNorm epsilon (fixed in transformers)


# ----------------------------------------------------------------------------- typed weights
@struct.dataclass
class VisionBlock:
    norm1: Any  # (depth, E) RMSNorm weight
    norm2: Any
    qkv: ly.Linear
    proj: ly.Linear
    gate: ly.Linear
    up: ly.Linear
    down: ly.Linear


@struct.dataclass
class Merger:
    ln_q: Any  # (E,) RMSNorm weight
    fc1: ly.Linear
    fc2: ly.Linear


@struct.dataclass
class VisionTower:
    patch_embed: ly.Linear  # (C*T*P*P, E), no bias
    blocks: VisionBlock  # stacked over depth
    merger: Merger


@struct.dataclass
class Params:
    vision: VisionTower
    llm: ly.Decoder


@struct.dataclass
class Images:
    """Each row's images, padded to M images of P patches; all batch-leading."""

    pixel_values: Any  # (B, M, P, C*T*P*P) float32, HF patch layout
    patch_valid: Any  # (B, M, P) bool
    patch_rc: Any  # (B, M, P, 2) int32: (row, col) of each patch for the 2-D rotary
    patch_window: Any  # (B, M, P) int32: the attention window of each patch within its image (-1: padding)
    feat_index: Any  # (B, I) int32: slot in (M * P / merge^2) of the row's j-th image token


# ----------------------------------------------------------------------------- host helpers
def patch_windows(vcfg: Qwen25VisionConfig, grid_row) -> np.ndarray:
    """(t*h*w,) window id of each patch of one image, in the processor's merge-block order.

    As `get_vision_window_index`: windows of `window_units` x `window_units` merged units tile each frame
    from the top-left corner (the last row and column of windows are cut short by the image's edge).
    """
    t, h, w = (int(v) for v in grid_row)
    side = vcfg.window_units * vcfg.spatial_merge_size  # window side in patches
    across = -(-w // side)  # windows per row of windows
    per_frame = across * -(-h // side)
    rc = patch_rows_cols(vcfg, grid_row).astype(np.int64)  # (t*h*w, 2)
    frame = np.arange(t * h * w) // (h * w)
    return (frame * per_frame + (rc[:, 0] // side) * across + rc[:, 1] // side).astype(np.int32)




# ----------------------------------------------------------------------------- the backbone
@dataclasses.dataclass(frozen=True)
class Qwen25VL(Qwen2VL):
    """Qwen2.5-VL (windowed vision tower + Qwen2 decoder with M-RoPE); images only (no video)."""

    config: Qwen25VLConfig
    model_type = "qwen2_5_vl"

    def param_spec(self) -> Params:
        v = self.config.vision
        d, e, m = v.depth, v.embed_dim, v.mlp_dim
        merged = e * v.spatial_merge_size**2
        frozen = dict(trainable=False)
        blk = "visual.blocks.{i}"

        def vlin(din, dout, axes, name, layers=d):
            return ly.linear_spec(din, dout, axes, name, bias=True, layers=layers, **frozen)

        patch = ParamInfo((v.patch_dim, e), ("patch", "vision_embed"), trainable=False,
                          hf=HFKey("visual.patch_embed.proj.weight", "flatten_linear",
                                   (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)))
        vision = VisionTower(
            patch_embed=ly.Linear(patch),
            blocks=VisionBlock(
                norm1=ly.norm_spec((e,), f"{blk}.norm1.weight", layers=d, **frozen),
                norm2=ly.norm_spec((e,), f"{blk}.norm2.weight", layers=d, **frozen),
                qkv=vlin(e, 3 * e, ("vision_embed", "vision_heads"), f"{blk}.attn.qkv"),
                proj=vlin(e, e, ("vision_heads", "vision_embed"), f"{blk}.attn.proj"),
                gate=vlin(e, m, ("vision_embed", "vision_mlp"), f"{blk}.mlp.gate_proj"),
                up=vlin(e, m, ("vision_embed", "vision_mlp"), f"{blk}.mlp.up_proj"),
                down=vlin(m, e, ("vision_mlp", "vision_embed"), f"{blk}.mlp.down_proj")),
            merger=Merger(
                ln_q=ly.norm_spec((e,), "visual.merger.ln_q.weight", **frozen),
                fc1=vlin(merged, merged, ("vision_embed", "vision_mlp"), "visual.merger.mlp.0", layers=None),
                fc2=vlin(merged, self.config.hidden_size, ("vision_mlp", "embed"), "visual.merger.mlp.2",
                         layers=None)),
        )
        return Params(vision=vision, llm=ly.decoder_spec(self.dims))

    # ------------------------------------------------------------------ host side
    def check_no_video(self, input_ids, attention_mask) -> None:
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
        if ((ids == self.config.video_token_id) & mask).any():
            raise ValueError(f"input_ids hold video tokens (id {self.config.video_token_id}): videos are out of scope "
                             "for this Qwen2.5-VL port (images only); pass images with image_grid_thw")

    def prepare_images(self, input_ids, attention_mask, images, image_grid_thw=None) -> Images | None:
        self.check_no_video(input_ids, attention_mask)
        return super().prepare_images(input_ids, attention_mask, images, image_grid_thw)

    def layout_images(self, input_ids, attention_mask, images: dict) -> Images:
        """Qwen2-VL's per-row layout plus the attention window of every patch."""
        base = super().layout_images(input_ids, attention_mask, images)
        v = self.config.vision
        grid = check_image_inputs(v, images["pixel_values"], images["image_grid_thw"])
        tokens = (grid.prod(-1) // v.spatial_merge_size**2).tolist()
        rows = rows_of_images(input_ids, attention_mask, self.config.image_token_id, tokens)
        window = np.full(base.patch_valid.shape, -1, np.int32)
        for r, imgs in enumerate(rows):
            for slot, i in enumerate(imgs):
                ids = patch_windows(v, grid[i])
                window[r, slot, : len(ids)] = ids
        return Images(base.pixel_values, base.patch_valid, base.patch_rc, window, base.feat_index)

    def positions(self, input_ids, attention_mask, images, mode: str) -> np.ndarray:
        self.check_no_video(input_ids, attention_mask)
        return super().positions(input_ids, attention_mask, images, mode)

    # ------------------------------------------------------------------ device side
    def vision_tower(self, vparams: VisionTower, images: Images, layer_wrapper=ly.identity):
        """(B, M, P, C*T*P*P) pixels -> (B, M * P / merge^2, hidden) merged features.

        Each image is its own sequence; blocks in fullatt_block_indexes attend over the whole image, the others
        only among patches of the same window. `layer_wrapper` wraps the scanned blocks (the caller's remat).
        """
        v = self.config.vision
        b, m, p, _ = images.pixel_values.shape
        n = b * m
        x = qv.patch_embed(vparams.patch_embed, images.pixel_values)  # (N, P, E)
        window = images.patch_window.reshape(n, p)
        image_ok = images.patch_valid.reshape(n, p)[:, None, None, :]  # (N, 1, 1, P): keys of the same image
        window_ok = (window[:, None, :, None] == window[:, None, None, :]) & image_ok  # (N, 1, P, P)
        cos, sin = qv.rotary(v, images.patch_rc)
        act = qv.activation(v.hidden_act)
        full = jnp.asarray(np.isin(np.arange(v.depth), v.fullatt_block_indexes))  # (depth,) bool

        def block(x, xs):
            blk, is_full = xs
            h = ly.rms_norm(x, blk.norm1, RMS_EPS)
            x = x + qv.attention(blk.qkv, blk.proj, h, cos, sin, jnp.where(is_full, image_ok, window_ok), v.num_heads)
            h = ly.rms_norm(x, blk.norm2, RMS_EPS)
            return x + blk.down(act(blk.gate(h)) * blk.up(h)), None

        x, _ = ly.loop_scan(layer_wrapper(block), x, (vparams.blocks, full), unroll=layer_wrapper.unroll)
        mp = vparams.merger
        return qv.merger_mlp(mp.fc1, mp.fc2, qv.merge(v, ly.rms_norm(x, mp.ln_q, RMS_EPS), b))

    def image_flops(self, images: Images) -> float:
        """Forward FLOPs of the vision tower over a batch's image slots (padding and masked window scores
        included: they are computed)."""
        return qv.tower_flops(self.config.vision, images, self.config.hidden_size, mlp_matmuls=3)

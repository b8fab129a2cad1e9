"""Qwen2-VL as a backbone: the vision tower (ViT with 2-D rotary and a 2x2 patch merger) and M-RoPE positions.

The decoder is the shared one (`layers.decoder`) with q/k/v biases and three position rows. Images are
laid out per row on the host (`prepare_images`: batch-leading, any mix of grids), so training and
inference encode them with the same function and the batch axis can be sharded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ivtlr_jax.config import PromptFormat
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import qwen_vision as qv
from ivtlr_jax.models.base import Backbone, feature_index, rows_of_images, sequential_positions
from ivtlr_jax.models.qwen2_vl.config import Qwen2VLConfig
from ivtlr_jax.models.qwen2_vl.images import ImageOptions
from ivtlr_jax.models.qwen2_vl.prompt import PROMPT
from ivtlr_jax.models.qwen_vision import check_image_inputs, patch_rows_cols  # noqa: F401  (re-exported)
from ivtlr_jax.models.spec import HFKey, ParamInfo


# ----------------------------------------------------------------------------- typed weights
@struct.dataclass
class VisionBlock:
    norm1: ly.LayerNorm
    norm2: ly.LayerNorm
    qkv: ly.Linear
    proj: ly.Linear
    fc1: ly.Linear
    fc2: ly.Linear


@struct.dataclass
class Merger:
    ln_q: ly.LayerNorm
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
    feat_index: Any  # (B, I) int32: slot in (M * P / merge^2) of the row's j-th image token


# ----------------------------------------------------------------------------- host helpers
def mrope_positions(cfg: Qwen2VLConfig, input_ids, attention_mask, image_grid_thw=None) -> np.ndarray:
    """Qwen2-VL native 3-D positions (B, 3, S), as `get_rope_index` computes them (pads get 0)."""
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    m = cfg.vision.spatial_merge_size
    grids = iter(np.asarray(image_grid_thw).tolist()) if image_grid_thw is not None else iter(())
    out = np.zeros((ids.shape[0], 3, ids.shape[1]), np.int64)
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
            while i < j:  # one run of image tokens may hold several consecutive images
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError(
                        "input_ids hold more image tokens than image_grid_thw describes; pass one "
                        "(t, h, w) row per image"
                    ) from None
                gh, gw = h // m, w // m
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
                cur += max(gh, gw)
                i += t * gh * gw
            if i != j:
                raise ValueError(
                    f"row {b}: a run of {j} image tokens does not match image_grid_thw (t*h*w/4 per image)"
                )
        if pieces:
            out[b][:, mask[b]] = np.concatenate(pieces, 1)
    return out.astype(np.int32)


# ----------------------------------------------------------------------------- the backbone
@dataclasses.dataclass(frozen=True)
class Qwen2VL(Backbone):
    """Qwen2-VL (vision tower + Qwen2 decoder with M-RoPE)."""

    config: Qwen2VLConfig
    model_type = "qwen2_vl"
    position_modes = ("sequential", "mrope")
    native_position_mode = "mrope"
    position_rows = 3

    @property
    def dims(self) -> ly.DecoderDims:
        sections = tuple(int(s) for s in np.repeat(np.arange(3), self.config.mrope_section))
        return self.decoder_dims(sections, qkv_bias=True)

    @property
    def prompt(self) -> PromptFormat:
        return PROMPT

    def param_spec(self) -> Params:
        v = self.config.vision
        d, e, m = v.depth, v.embed_dim, v.mlp_dim
        merged = e * v.spatial_merge_size**2
        frozen = dict(trainable=False)
        blk = "visual.blocks.{i}"

        def vlin(din, dout, axes, name, layers=d):
            return ly.linear_spec(din, dout, axes, name, bias=True, layers=layers, **frozen)

        def vnorm(name, layers=d):
            return ly.layer_norm_spec((e,), name, layers=layers, **frozen)

        patch = ParamInfo((v.patch_dim, e), ("patch", "vision_embed"), trainable=False,
                          hf=HFKey("visual.patch_embed.proj.weight", "flatten_linear",
                                   (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)))
        vision = VisionTower(
            patch_embed=ly.Linear(patch),
            blocks=VisionBlock(
                norm1=vnorm(f"{blk}.norm1"), norm2=vnorm(f"{blk}.norm2"),
                qkv=vlin(e, 3 * e, ("vision_embed", "vision_heads"), f"{blk}.attn.qkv"),
                proj=vlin(e, e, ("vision_heads", "vision_embed"), f"{blk}.attn.proj"),
                fc1=vlin(e, m, ("vision_embed", "vision_mlp"), f"{blk}.mlp.fc1"),
                fc2=vlin(m, e, ("vision_mlp", "vision_embed"), f"{blk}.mlp.fc2")),
            merger=Merger(
                ln_q=ly.layer_norm_spec((e,), "visual.merger.ln_q", **frozen),
                fc1=vlin(merged, merged, ("vision_embed", "vision_mlp"), "visual.merger.mlp.0", layers=None),
                fc2=vlin(merged, self.config.hidden_size, ("vision_mlp", "embed"), "visual.merger.mlp.2",
                         layers=None)),
        )
        return Params(vision=vision, llm=ly.decoder_spec(self.dims))

    def hf_name(self, stored: str) -> str:
        """transformers-5 names (`model.language_model.*`, `model.visual.*`) -> the old hub layout."""
        for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
            if stored.startswith(new):
                return old + stored[len(new):]
        return stored

    # ------------------------------------------------------------------ host side
    def image_options(self, resize_mode: str = "reference") -> ImageOptions:
        """This model's image processor for the data layer (reference: the release's fixed 280x280 images)."""
        v = self.config.vision
        return ImageOptions(resize_mode=resize_mode, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                            temporal_patch_size=v.temporal_patch_size)

    def image_token_layout(self, image_grid_thw=None) -> tuple[tuple[int, int, int], int, int]:
        """The image's (t, h, w) patch grid, merge x merge patches per LLM image token, patch_size pixels each."""
        v = self.config.vision
        return tuple(int(x) for x in image_grid_thw), v.spatial_merge_size, v.patch_size

    def example_image(self, height: int = 280, width: int = 280):
        """(pixel_values, image_grid_thw, image tokens) of one blank reference-size image (dry runs, benches)."""
        v = self.config.vision
        grid = np.array([[1, height // v.patch_size, width // v.patch_size]], np.int64)
        return np.zeros((int(grid.prod()), v.patch_dim), np.float32), grid, int(grid.prod()) // v.spatial_merge_size**2

    def tokens_per_image(self, images: dict) -> list[int]:
        grid = check_image_inputs(self.config.vision, images.get("pixel_values"), images.get("image_grid_thw"))
        return (grid.prod(-1) // self.config.vision.spatial_merge_size**2).tolist()

    def layout_images(self, input_ids, attention_mask, images: dict) -> Images:
        """The processor's dict: HF-layout pixel_values (sum t*h*w, C*T*P*P) + image_grid_thw (n, 3) -> per-row
        Images."""
        pixel_values, image_grid_thw = images.get("pixel_values"), images.get("image_grid_thw")
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("pixel_values and image_grid_thw go together: pass both or neither")
        v = self.config.vision
        grid = check_image_inputs(v, pixel_values, image_grid_thw)
        merge = v.spatial_merge_size**2
        sizes = grid.prod(-1)
        rows = rows_of_images(input_ids, attention_mask, self.config.image_token_id, (sizes // merge).tolist())
        m = max(1, max(len(r) for r in rows))
        p = int(sizes.max())
        b = len(rows)
        pixels = np.asarray(pixel_values, np.float32)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        out = np.zeros((b, m, p, v.patch_dim), np.float32)
        valid = np.zeros((b, m, p), bool)
        rc = np.zeros((b, m, p, 2), np.int32)
        for r, imgs in enumerate(rows):
            for slot, i in enumerate(imgs):
                n = int(sizes[i])
                out[r, slot, :n] = pixels[starts[i] : starts[i] + n]
                valid[r, slot, :n] = True
                rc[r, slot, :n] = patch_rows_cols(v, grid[i])
        fidx = feature_index(rows, (sizes // merge).tolist(), p // merge)
        return Images(out, valid, rc, fidx)

    def mode_positions(self, input_ids, attention_mask, images: dict | None, mode: str) -> np.ndarray:
        if mode == "sequential":
            return sequential_positions(attention_mask, 3)
        return mrope_positions(self.config, input_ids, attention_mask, (images or {}).get("image_grid_thw"))

    # ------------------------------------------------------------------ device side
    def vision_tower(self, vparams: VisionTower, images: Images, layer_wrapper=ly.identity):
        """(B, M, P, C*T*P*P) pixels -> (B, M * P / merge^2, hidden) merged features (attention within each image);
        `layer_wrapper` wraps the scanned blocks (the caller's remat)."""
        v = self.config.vision
        b, m, p, _ = images.pixel_values.shape
        x = qv.patch_embed(vparams.patch_embed, images.pixel_values)  # (N, P, E)
        key_ok = images.patch_valid.reshape(b * m, 1, 1, p)
        cos, sin = qv.rotary(v, images.patch_rc)

        def block(x, blk: VisionBlock):
            h = ly.layer_norm(x, blk.norm1.scale, blk.norm1.bias)
            x = x + qv.attention(blk.qkv, blk.proj, h, cos, sin, key_ok, v.num_heads)
            h = blk.fc1(ly.layer_norm(x, blk.norm2.scale, blk.norm2.bias))
            return x + blk.fc2(h * jax.nn.sigmoid(1.702 * h)), None  # quick_gelu

        x, _ = ly.loop_scan(layer_wrapper(block), x, vparams.blocks, unroll=layer_wrapper.unroll)
        mp = vparams.merger
        return qv.merger_mlp(mp.fc1, mp.fc2, qv.merge(v, ly.layer_norm(x, mp.ln_q.scale, mp.ln_q.bias), b))

    def image_flops(self, images: Images) -> float:
        """Forward FLOPs of the vision tower over a batch's image slots (padding included: it is computed)."""
        return qv.tower_flops(self.config.vision, images, self.config.hidden_size, mlp_matmuls=2)

    def image_features(self, params: Params, images: Images, layer_wrapper=ly.identity):
        feats = self.vision_tower(params.vision, images, layer_wrapper)  # (B, M * T, H)
        return jnp.take_along_axis(feats, images.feat_index[..., None], axis=1)  # (B, I, H)

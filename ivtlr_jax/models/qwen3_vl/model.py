"""Qwen3-VL as a backbone: a LayerNorm/GELU ViT with learned, resampled position embeddings and DeepStack mergers,
and a Qwen3 decoder (q/k RMSNorm per head, explicit head_dim, interleaved M-RoPE) whose block adds the DeepStack
features at the image positions after layers 0, 1, ... (transformers' `_deepstack_process`).

DeepStack travels as the decoder's per-layer extras (`DeepStackAdd`, one slice per layer, zero past the DeepStack
layers): the prompt's come with `embed` (Embedded.extras), a latent chunk's with `refeed_extras` (the selected
image tokens' own features, added in the same layers as in the prompt). Positions, images per row and the
processor are Qwen2-VL's (patch 16, mean/std 0.5); videos are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from ivtlr_jax.config import PromptFormat
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import qwen_vision as qv
from ivtlr_jax.models.base import Embedded, rows_of_images
from ivtlr_jax.models.qwen2_vl import Qwen2VL
from ivtlr_jax.models.qwen2_vl.images import ImageOptions
from ivtlr_jax.models.qwen3_vl.config import Qwen3VisionConfig, Qwen3VLConfig
from ivtlr_jax.models.qwen3_vl.prompt import PROMPT
from ivtlr_jax.models.qwen_vision import check_image_inputs, patch_rows_cols
from ivtlr_jax.models.spec import HFKey, ParamInfo

LN_EPS = 1e-6  # the vision blocks' and mergers' LayerNorm epsilon (fixed in transformers)
VISUAL, TEXT = "model.visual", "model.language_model"


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
    norm: ly.LayerNorm  # over the patch width (main merger) or the merged width (DeepStack mergers)
    fc1: ly.Linear
    fc2: ly.Linear


@struct.dataclass
class VisionTower:
    patch_embed: ly.Linear  # (C*T*P*P, E) with bias
    pos_embed: Any  # (side * side, E) learned position table
    blocks: VisionBlock  # stacked over depth
    merger: Merger
    deepstack: Merger | None  # stacked over the DeepStack blocks (None: none)


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
    pos_index: Any  # (B, M, P, 4) int32: the position-table rows bilinearly mixed for each patch
    pos_weight: Any  # (B, M, P, 4) float32: their weights
    feat_index: Any  # (B, I) int32: slot in (M * P / merge^2) of the row's j-th image token


@struct.dataclass
class DeepStackAdd:
    """Per-layer decoder extras: add values[j] to the hidden state at chunk index[j] after the layer (valid only);
    every leaf has a leading layer axis (zeros past the DeepStack layers)."""

    values: Any  # (L, B, J, H)
    index: Any  # (L, B, J) int32
    valid: Any  # (L, B, J) bool


# ----------------------------------------------------------------------------- host helpers
def interpolation_taps(vcfg: Qwen3VisionConfig, grid_row) -> tuple[np.ndarray, np.ndarray]:
    """(t*h*w, 4) table rows and weights that resample the side x side position table to one image's (h, w)
    grid (bilinear, align_corners=True, as transformers), in the processor's merge-block patch order."""
    side = vcfg.position_side
    t, h, w = (int(v) for v in grid_row)
    rc = patch_rows_cols(vcfg, grid_row).astype(np.float32)  # (t*h*w, 2)

    def axis(index, size):
        src = index * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        taps = np.clip(floor[:, None].astype(np.int64) + np.arange(2), 0, side - 1)
        weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0, None)
        return taps, weights.astype(np.float32)

    (ht, hw), (wt, ww) = axis(rc[:, 0], h), axis(rc[:, 1], w)
    index = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)


def interleaved_sections(mrope_section) -> tuple[int, ...]:
    """Position row of each rotary frequency under interleaved M-RoPE: t, h, w, t, h, w, ... while the h and w
    sections last, then t (transformers' `recomposition_frequencies`)."""
    t, h, w = (int(s) for s in mrope_section)
    out = []
    for j in range(t + h + w):
        out.append(1 if j % 3 == 1 and j < 3 * h else 2 if j % 3 == 2 and j < 3 * w else 0)
    return tuple(out)


def add_at(x, extra: DeepStackAdd):
    """x (B, T, H) with extra.values added at extra.index (one layer's slice)."""
    values = jnp.where(extra.valid[..., None], extra.values.astype(x.dtype), jnp.zeros((), x.dtype))
    return x.at[jnp.arange(x.shape[0])[:, None], extra.index].add(values)


# ----------------------------------------------------------------------------- the backbone
@dataclasses.dataclass(frozen=True)
class Qwen3VL(Qwen2VL):
    """Qwen3-VL (DeepStack vision tower + Qwen3 decoder with interleaved M-RoPE); images only (no video)."""

    config: Qwen3VLConfig
    model_type = "qwen3_vl"
    latent_extras = True  # a re-fed image token carries its DeepStack features (LatentConfig.deepstack_latent)

    @property
    def dims(self) -> ly.DecoderDims:
        sections = interleaved_sections(self.config.mrope_section)
        return self.decoder_dims(sections, explicit_head_dim=self.config.head_dim)

    @property
    def prompt(self) -> PromptFormat:
        return PROMPT

    def param_spec(self) -> Params:
        v, d = self.config.vision, self.dims
        e, merged = v.embed_dim, v.embed_dim * v.spatial_merge_size**2
        frozen = dict(trainable=False)
        blk = f"{VISUAL}.blocks.{{i}}"

        def vlin(din, dout, axes, name, layers=v.depth):
            return ly.linear_spec(din, dout, axes, name, bias=True, layers=layers, **frozen)

        def merger(name, width, layers=None):
            return Merger(norm=ly.layer_norm_spec((width,), f"{name}.norm", layers=layers, **frozen),
                          fc1=vlin(merged, merged, ("vision_embed", "vision_mlp"), f"{name}.linear_fc1", layers),
                          fc2=vlin(merged, self.config.hidden_size, ("vision_mlp", "embed"), f"{name}.linear_fc2",
                                   layers))

        patch = ly.Linear(
            ParamInfo((v.patch_dim, e), ("patch", "vision_embed"), trainable=False,
                      hf=HFKey(f"{VISUAL}.patch_embed.proj.weight", "flatten_linear",
                               (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))),
            ParamInfo((e,), ("vision_embed",), init="zeros", trainable=False,
                      hf=HFKey(f"{VISUAL}.patch_embed.proj.bias")))
        n_deep = len(v.deepstack_visual_indexes)
        vision = VisionTower(
            patch_embed=patch,
            pos_embed=ParamInfo((v.num_position_embeddings, e), ("patch", "vision_embed"), trainable=False,
                                hf=HFKey(f"{VISUAL}.pos_embed.weight")),
            blocks=VisionBlock(
                norm1=ly.layer_norm_spec((e,), f"{blk}.norm1", layers=v.depth, **frozen),
                norm2=ly.layer_norm_spec((e,), f"{blk}.norm2", layers=v.depth, **frozen),
                qkv=vlin(e, 3 * e, ("vision_embed", "vision_heads"), f"{blk}.attn.qkv"),
                proj=vlin(e, e, ("vision_heads", "vision_embed"), f"{blk}.attn.proj"),
                fc1=vlin(e, v.mlp_dim, ("vision_embed", "vision_mlp"), f"{blk}.mlp.linear_fc1"),
                fc2=vlin(v.mlp_dim, e, ("vision_mlp", "vision_embed"), f"{blk}.mlp.linear_fc2")),
            merger=merger(f"{VISUAL}.merger", e),
            deepstack=merger(f"{VISUAL}.deepstack_merger_list.{{i}}", merged, n_deep) if n_deep else None)

        def head_norm(heads, name):  # one RMSNorm weight over head_dim, shared by the heads
            return ly.norm_spec((d.head_dim,), f"{name}.weight", layers=d.num_layers)

        return Params(vision=vision, llm=ly.decoder_spec(d, TEXT, head_norm=head_norm))

    def hf_name(self, stored: str) -> str:
        return stored  # Qwen3-VL checkpoints only exist in the model.language_model.* / model.visual.* layout

    def decoder_block(self, d: ly.DecoderDims, p: ly.DecoderLayer, x, extra, attend):
        """The Qwen3 layer (RMSNorm on q and k per head), then the DeepStack add of this layer (extra: its
        `DeepStackAdd` slice, or None)."""
        eps = d.rms_norm_eps
        q, k, v = ly.project_qkv(d, p, ly.rms_norm(x, p.input_norm, eps))
        o, kv = attend(ly.rms_norm(q, p.q_norm, eps), ly.rms_norm(k, p.k_norm, eps), v)
        x = x + checkpoint_name(p.o(o), "o_proj")
        x = x + ly.swiglu(p, ly.rms_norm(x, p.post_attn_norm, eps))
        return (x if extra is None else add_at(x, extra)), kv

    # ------------------------------------------------------------------ host side
    def image_options(self, resize_mode: str = "reference") -> ImageOptions:
        """Qwen2VLImageProcessor at patch 16 with mean/std 0.5 (reference: 320x320 images, grid 20 x 20, 100 tokens
        as the release's 280 px at patch 14)."""
        v = self.config.vision
        return ImageOptions(resize_mode=resize_mode, reference_size=(320, 320), min_pixels=65536,
                            max_pixels=16777216, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                            temporal_patch_size=v.temporal_patch_size, image_mean=(0.5, 0.5, 0.5),
                            image_std=(0.5, 0.5, 0.5))

    def example_image(self, height: int = 320, width: int = 320):
        return super().example_image(height, width)

    def check_no_video(self, input_ids, attention_mask) -> None:
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
        if ((ids == self.config.video_token_id) & mask).any():
            raise ValueError(f"input_ids hold video tokens (id {self.config.video_token_id}): videos are out of scope "
                             "for this Qwen3-VL port (images only); pass images with image_grid_thw")

    def prepare_images(self, input_ids, attention_mask, images, image_grid_thw=None) -> Images | None:
        self.check_no_video(input_ids, attention_mask)
        if isinstance(images, dict) and images.get("pixel_values_videos") is not None:
            raise ValueError("pixel_values_videos given: videos are out of scope for this Qwen3-VL port (images only)")
        return super().prepare_images(input_ids, attention_mask, images, image_grid_thw)

    def layout_images(self, input_ids, attention_mask, images: dict) -> Images:
        """Qwen2-VL's per-row layout plus each patch's position-table taps."""
        base = super().layout_images(input_ids, attention_mask, images)
        v = self.config.vision
        grid = check_image_inputs(v, images["pixel_values"], images["image_grid_thw"])
        rows = rows_of_images(input_ids, attention_mask, self.config.image_token_id,
                              (grid.prod(-1) // v.spatial_merge_size**2).tolist())
        index = np.zeros(base.patch_valid.shape + (4,), np.int32)
        weight = np.zeros(base.patch_valid.shape + (4,), np.float32)
        for r, imgs in enumerate(rows):
            for slot, i in enumerate(imgs):
                idx, w = interpolation_taps(v, grid[i])
                index[r, slot, : len(idx)], weight[r, slot, : len(idx)] = idx, w
        return Images(base.pixel_values, base.patch_valid, base.patch_rc, index, weight, base.feat_index)

    def positions(self, input_ids, attention_mask, images, mode: str) -> np.ndarray:
        self.check_no_video(input_ids, attention_mask)
        return super().positions(input_ids, attention_mask, images, mode)

    # ------------------------------------------------------------------ device side
    def vision_tower(self, vparams: VisionTower, images: Images, layer_wrapper=ly.identity):
        """(B, M, P, C*T*P*P) pixels -> ((B, M * P / merge^2, hidden) merged features, (D, B, M * P / merge^2,
        hidden) DeepStack features or None); `layer_wrapper` wraps the scanned blocks (the caller's remat)."""
        v = self.config.vision
        b, m, p, _ = images.pixel_values.shape
        x = qv.patch_embed(vparams.patch_embed, images.pixel_values)  # (N, P, E)
        table = vparams.pos_embed[images.pos_index.reshape(b * m, p, 4)]  # (N, P, 4, E): bilinear taps
        x = x + (table * images.pos_weight.reshape(b * m, p, 4, 1).astype(table.dtype)).sum(2).astype(x.dtype)
        block = self.vision_block(images.patch_valid.reshape(b * m, 1, 1, p), *qv.rotary(v, images.patch_rc))
        deep, start = [], 0
        for j, stop in enumerate(v.deepstack_visual_indexes):  # scan up to each DeepStack block, merge its output
            segment = jax.tree.map(lambda a, s=start, z=stop: a[s : z + 1], vparams.blocks)
            x, _ = ly.loop_scan(layer_wrapper(block), x, segment, unroll=layer_wrapper.unroll)
            mp = jax.tree.map(lambda a, j=j: a[j], vparams.deepstack)
            h = ly.layer_norm(qv.merge(v, x, b), mp.norm.scale, mp.norm.bias, LN_EPS)  # norm after the merge
            deep.append(qv.merger_mlp(mp.fc1, mp.fc2, h))
            start = stop + 1
        if start < v.depth:
            rest = jax.tree.map(lambda a: a[start:], vparams.blocks)
            x, _ = ly.loop_scan(layer_wrapper(block), x, rest, unroll=layer_wrapper.unroll)
        mp = vparams.merger
        merged = qv.merger_mlp(mp.fc1, mp.fc2, qv.merge(v, ly.layer_norm(x, mp.norm.scale, mp.norm.bias, LN_EPS), b))
        return merged, (jnp.stack(deep) if deep else None)

    def vision_block(self, key_ok, cos, sin):
        """The scanned ViT block: LayerNorm, attention within each image (2-D rotary), LayerNorm, GELU MLP."""
        v = self.config.vision
        act = qv.activation(v.hidden_act)

        def block(x, blk: VisionBlock):
            h = ly.layer_norm(x, blk.norm1.scale, blk.norm1.bias, LN_EPS)
            x = x + qv.attention(blk.qkv, blk.proj, h, cos, sin, key_ok, v.num_heads)
            h = ly.layer_norm(x, blk.norm2.scale, blk.norm2.bias, LN_EPS)
            return x + blk.fc2(act(blk.fc1(h))), None

        return block

    def image_flops(self, images: Images) -> float:
        """Forward FLOPs of the vision tower, its merger and DeepStack mergers over a batch's image slots."""
        v = self.config.vision
        return qv.tower_flops(v, images, self.config.hidden_size, mlp_matmuls=2,
                              mergers=1 + len(v.deepstack_visual_indexes))

    def image_outputs(self, params: Params, images: Images, layer_wrapper=ly.identity):
        """((B, I, H) embeddings of each row's image tokens, (D, B, I, H) their DeepStack features or None)."""
        feats, deep = self.vision_tower(params.vision, images, layer_wrapper)
        idx = images.feat_index[..., None]
        take = lambda f: jnp.take_along_axis(f, idx, axis=1)  # noqa: E731
        return take(feats), (None if deep is None else jax.vmap(take)(deep))

    def image_features(self, params: Params, images: Images, layer_wrapper=ly.identity):
        return self.image_outputs(params, images, layer_wrapper)[0]

    def embed(self, params, input_ids, images, vision_wrapper=ly.identity) -> Embedded:
        """Qwen2-VL's embedding, plus the prompt's DeepStack extras (the features at the image positions)."""
        if images is None:
            return self.embed_features(params, input_ids, None)
        feats, deep = self.image_outputs(params, images, vision_wrapper)
        emb = self.embed_features(params, input_ids, feats)
        if deep is None:
            return emb
        n = emb.image_pos.shape[1]
        return emb.replace(extras=self.layer_extras(deep[:, :, :n], emb.image_pos, emb.image_valid))

    def layer_extras(self, deep, index, valid) -> DeepStackAdd:
        """DeepStackAdd over all layers from (D, B, J, H) features at chunk indices (B, J) (zeros after layer D)."""
        layers, d = self.config.num_hidden_layers, deep.shape[0]
        values = jnp.pad(deep, ((0, layers - d),) + ((0, 0),) * 3)
        lead = lambda a: jnp.broadcast_to(a[None], (layers,) + a.shape)  # noqa: E731
        in_deepstack = (jnp.arange(layers) < d)[:, None, None]
        return DeepStackAdd(values, lead(index.astype(jnp.int32)), lead(valid) & in_deepstack)

    def refeed_extras(self, emb: Embedded, idx, chunk_len: int) -> DeepStackAdd | None:
        """A latent chunk re-feeding image tokens idx (B, k) at its first k places: their DeepStack features."""
        if emb.extras is None:
            return None
        ex: DeepStackAdd = emb.extras
        values = jnp.take_along_axis(ex.values, idx[None, :, :, None], axis=2)  # (L, B, k, H)
        index = jnp.broadcast_to(jnp.arange(idx.shape[1], dtype=jnp.int32), ex.index.shape[:2] + idx.shape[1:])
        return DeepStackAdd(values, index, jnp.take_along_axis(ex.valid, idx[None], axis=2))

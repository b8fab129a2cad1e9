"""Chameleon as a backbone: the VQ-VAE image tokenizer (encoder side) and the shared decoder with q/k norms.

Images become discrete codes (nearest codebook entry of the VQ encoder's output, raster order), the
codes become BPE ids of the `IMGIMG...` vocabulary entries, and the image embeddings latent vision
selects from are the LLM's token embeddings of those ids. The VQ encoder runs in float32 at the
highest matmul precision whatever the LLM's dtype: a codebook argmin in bf16 flips codes.
The decoder is the shared one (no biases, per-head LayerNorm on q and k, optional swin post-norms,
1-D RoPE); every image-token logit column is set to the dtype's minimum, as transformers does.
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
from ivtlr_jax.models.base import Backbone, feature_index, rows_of_images
from ivtlr_jax.models.chameleon.config import ChameleonConfig, VQConfig
from ivtlr_jax.models.chameleon.images import ImageOptions
from ivtlr_jax.models.chameleon.prompt import PROMPT
from ivtlr_jax.models.spec import HFKey, ParamInfo

VQ_PREFIX = "model.vqmodel"
HIGHEST = jax.lax.Precision.HIGHEST
GROUPS = 32  # GroupNorm groups in every VQ block
GROUP_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- typed weights
@struct.dataclass
class Conv:
    kernel: Any  # (kh, kw, in, out)
    bias: Any


@struct.dataclass
class ResBlock:
    norm1: ly.LayerNorm  # GroupNorm scale/bias (C,)
    conv1: Conv
    norm2: ly.LayerNorm
    conv2: Conv
    nin_shortcut: Conv | None = None  # 1x1 when the channel count changes


@struct.dataclass
class AttnBlock:
    norm: ly.LayerNorm
    q: Conv
    k: Conv
    v: Conv
    proj_out: Conv


@struct.dataclass
class Level:
    blocks: tuple
    attn: tuple
    downsample: Conv | None = None


@struct.dataclass
class VQEncoder:
    conv_in: Conv
    down: tuple
    mid_block_1: ResBlock
    mid_attn: AttnBlock | None
    mid_block_2: ResBlock
    norm_out: ly.LayerNorm
    conv_out: Conv


@struct.dataclass
class VQModel:
    encoder: VQEncoder
    quant_conv: Conv
    post_quant_conv: Conv  # decoder side: kept so a converted checkpoint exports back whole; unused here
    codebook: Any  # (num_embeddings, embed_dim)


@struct.dataclass
class Params:
    vq: VQModel
    llm: ly.Decoder


@struct.dataclass
class Images:
    """Each row's images, padded to M images; all batch-leading."""

    pixel_values: Any  # (B, M, 3, R, R) float32, the processor's output
    feat_index: Any  # (B, I) int32: slot in (M * tokens per image) of the row's j-th image token


# ----------------------------------------------------------------------------- VQ encoder (functions)
def conv(p: Conv, x, stride: int = 1, padding="SAME"):
    """NHWC conv in float32 at the highest precision (the VQ encoder never runs in bf16)."""
    y = jax.lax.conv_general_dilated(x, p.kernel.astype(jnp.float32), (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return y + p.bias.astype(jnp.float32)


def group_norm(p: ly.LayerNorm, x):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, GROUPS, c // GROUPS)
    mean = g.mean((1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean((1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)
    return g.reshape(n, h, w, c) * p.scale.astype(jnp.float32) + p.bias.astype(jnp.float32)


def swish(x):
    return x * jax.nn.sigmoid(x)


def res_block(p: ResBlock, x):
    h = conv(p.conv1, swish(group_norm(p.norm1, x)))
    h = conv(p.conv2, swish(group_norm(p.norm2, h)))
    if p.nin_shortcut is not None:
        x = conv(p.nin_shortcut, x)
    return x + h


def attn_block(p: AttnBlock, x):
    """Single-head attention over all spatial positions (1x1 q/k/v/proj convs)."""
    n, h, w, c = x.shape
    y = group_norm(p.norm, x)
    q, k, v = (conv(t, y).reshape(n, h * w, c) for t in (p.q, p.k, p.v))
    a = jax.nn.softmax(jnp.einsum("nic,njc->nij", q, k, precision=HIGHEST) * c**-0.5, axis=-1)
    o = jnp.einsum("nij,njc->nic", a, v, precision=HIGHEST).reshape(n, h, w, c)
    return x + conv(p.proj_out, o)


def encode_latents(p: VQModel, pixel_values):
    """(N, 3, R, R) pixels -> (N, latent^2, embed_dim) encoder outputs before quantisation, raster order."""
    x = jnp.transpose(pixel_values.astype(jnp.float32), (0, 2, 3, 1))  # NHWC
    e = p.encoder
    x = conv(e.conv_in, x)
    for level in e.down:
        for i, blk in enumerate(level.blocks):
            x = res_block(blk, x)
            if level.attn:
                x = attn_block(level.attn[i], x)
        if level.downsample is not None:  # pad right/bottom by one, then a 3x3 stride-2 conv
            x = conv(level.downsample, jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), stride=2, padding="VALID")
    x = res_block(e.mid_block_1, x)
    if e.mid_attn is not None:
        x = attn_block(e.mid_attn, x)
    x = res_block(e.mid_block_2, x)
    x = conv(e.conv_out, swish(group_norm(e.norm_out, x)))
    z = conv(p.quant_conv, x)
    n, h, w, d = z.shape
    return z.reshape(n, h * w, d)


def encode(p: VQModel, pixel_values):
    """(N, 3, R, R) pixels -> (N, latent^2) codebook indices in raster order."""
    z = encode_latents(p, pixel_values)
    n, t, d = z.shape
    z = z.reshape(n * t, d)
    book = p.codebook.astype(jnp.float32)
    # squared distance as transformers computes it: |z|^2 + |e|^2 - 2 z.e (ties: the lower index)
    dist = (jnp.sum(z**2, 1, keepdims=True) + jnp.sum(book**2, 1)
            - 2 * jnp.einsum("bd,nd->bn", z, book, precision=HIGHEST))
    return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(n, t)


def vq_spec(v: VQConfig) -> VQModel:
    """The VQ model's spec: frozen, float32, replicated (it is small)."""

    def conv_spec(cin, cout, name, size=3):
        fan_in = size * size * cin
        return Conv(ParamInfo((size, size, cin, cout), (None,) * 4, hf=HFKey(f"{name}.weight", "conv2d"),
                              trainable=False, dtype="float32", std=fan_in**-0.5),
                    ParamInfo((cout,), (None,), init="zeros", hf=HFKey(f"{name}.bias"), trainable=False,
                              dtype="float32"))

    def norm(c, name):
        return ly.layer_norm_spec((c,), name, axes=(None,), trainable=False, dtype="float32")

    def res(cin, cout, name):
        return ResBlock(norm(cin, f"{name}.norm1"), conv_spec(cin, cout, f"{name}.conv1"), norm(cout, f"{name}.norm2"),
                        conv_spec(cout, cout, f"{name}.conv2"),
                        conv_spec(cin, cout, f"{name}.nin_shortcut", 1) if cin != cout else None)

    def attn(c, name):
        convs = (conv_spec(c, c, f"{name}.{t}", 1) for t in ("q", "k", "v", "proj_out"))
        return AttnBlock(norm(c, f"{name}.norm"), *convs)

    enc = f"{VQ_PREFIX}.encoder"
    mult = (1,) + tuple(v.channel_multiplier)
    levels, res_now = [], v.resolution
    block_in = v.base_channels
    for i in range(len(v.channel_multiplier)):
        block_in, block_out = v.base_channels * mult[i], v.base_channels * v.channel_multiplier[i]
        blocks, attns = [], []
        for j in range(v.num_res_blocks):
            blocks.append(res(block_in, block_out, f"{enc}.down.{i}.block.{j}"))
            block_in = block_out
            if v.attn_resolutions and res_now in v.attn_resolutions and v.attn_type == "vanilla":
                attns.append(attn(block_in, f"{enc}.down.{i}.attn.{j}"))
        down = None
        if i != len(v.channel_multiplier) - 1:
            down = conv_spec(block_in, block_in, f"{enc}.down.{i}.downsample.conv")
            res_now //= 2
        levels.append(Level(tuple(blocks), tuple(attns), down))
    out_ch = 2 * v.latent_channels if v.double_latent else v.latent_channels
    encoder = VQEncoder(
        conv_in=conv_spec(v.in_channels, v.base_channels, f"{enc}.conv_in"), down=tuple(levels),
        mid_block_1=res(block_in, block_in, f"{enc}.mid.block_1"),
        mid_attn=attn(block_in, f"{enc}.mid.attn_1") if v.attn_type == "vanilla" else None,
        mid_block_2=res(block_in, block_in, f"{enc}.mid.block_2"),
        norm_out=norm(block_in, f"{enc}.norm_out"), conv_out=conv_spec(block_in, out_ch, f"{enc}.conv_out"))
    book = ParamInfo((v.num_embeddings, v.embed_dim), (None, None), hf=HFKey(f"{VQ_PREFIX}.quantize.embedding.weight"),
                     trainable=False, dtype="float32", std=1.0)
    return VQModel(encoder, conv_spec(v.latent_channels, v.embed_dim, f"{VQ_PREFIX}.quant_conv", 1),
                   conv_spec(v.embed_dim, v.latent_channels, f"{VQ_PREFIX}.post_quant_conv", 1), book)


def vq_flops(v: VQConfig) -> float:
    """Forward FLOPs of the VQ encoder for one image (convolutions and attention; norms ignored)."""
    total, res_now = 0.0, v.resolution
    mult = (1,) + tuple(v.channel_multiplier)

    def conv_f(cin, cout, res, size=3):
        return 2.0 * res * res * size * size * cin * cout

    def res_f(cin, cout, res):
        return conv_f(cin, cout, res) + conv_f(cout, cout, res) + (conv_f(cin, cout, res, 1) if cin != cout else 0)

    def attn_f(c, res):
        return 4 * conv_f(c, c, res, 1) + 4.0 * (res * res) ** 2 * c

    total += conv_f(v.in_channels, v.base_channels, res_now)
    block_in = v.base_channels
    for i in range(len(v.channel_multiplier)):
        block_in, block_out = v.base_channels * mult[i], v.base_channels * v.channel_multiplier[i]
        for _ in range(v.num_res_blocks):
            total += res_f(block_in, block_out, res_now)
            block_in = block_out
            if v.attn_resolutions and res_now in v.attn_resolutions:
                total += attn_f(block_in, res_now)
        if i != len(v.channel_multiplier) - 1:
            res_now //= 2
            total += conv_f(block_in, block_in, res_now)
    total += 2 * res_f(block_in, block_in, res_now) + attn_f(block_in, res_now)
    total += conv_f(block_in, v.latent_channels, res_now) + conv_f(v.latent_channels, v.embed_dim, res_now, 1)
    return total + 2.0 * res_now * res_now * v.embed_dim * v.num_embeddings


# ----------------------------------------------------------------------------- the backbone
QK_NORM_EPS = 1e-5  # the q/k LayerNorm epsilon (fixed in transformers)


def head_norm(x, p: ly.LayerNorm):
    """Per-head LayerNorm over head_dim with (heads, head_dim) weight and bias (Chameleon's q/k norm)."""
    y = ly.layer_norm(x, None, None, QK_NORM_EPS)
    return (y * p.scale.astype(x.dtype) + p.bias.astype(x.dtype)).astype(x.dtype)


def decoder_spec(d: ly.DecoderDims) -> ly.Decoder:
    """The decoder's parameter spec with Chameleon's per-head q/k LayerNorm weights, (heads, head_dim) per layer."""
    return ly.decoder_spec(d, head_norm=lambda heads, name: ly.layer_norm_spec((heads, d.head_dim), name,
                                                                            layers=d.num_layers))


@dataclasses.dataclass(frozen=True)
class Chameleon(Backbone):
    """Chameleon (VQ image tokenizer + decoder with per-head q/k LayerNorm over one mixed vocabulary)."""

    config: ChameleonConfig
    model_type = "chameleon"
    default_k = 64  # the release's K for Chameleon (64 of the 1024 image tokens per step)

    @property
    def dims(self) -> ly.DecoderDims:
        return self.decoder_dims((0,) * (self.config.head_dim // 2))

    @property
    def prompt(self) -> PromptFormat:
        return PROMPT

    def param_spec(self) -> Params:
        return Params(vq=vq_spec(self.config.vq), llm=decoder_spec(self.dims))

    def decoder_block(self, d: ly.DecoderDims, p: ly.DecoderLayer, x, extra, attend):
        """The Chameleon layer: per-head LayerNorm on q and k; pre-norm, or with swin_norm the norms after
        attention and MLP (x + norm(attn(x)), then x + norm(mlp(x)))."""
        eps = d.rms_norm_eps
        h = x if self.config.swin_norm else ly.rms_norm(x, p.input_norm, eps)
        q, k, v = ly.project_qkv(d, p, h)
        o, kv = attend(head_norm(q, p.q_norm), head_norm(k, p.k_norm), v)
        a = checkpoint_name(p.o(o), "o_proj")
        if self.config.swin_norm:
            x = x + ly.rms_norm(a, p.input_norm, eps)
            return x + ly.rms_norm(ly.swiglu(p, x), p.post_attn_norm, eps), kv
        x = x + a
        return x + ly.swiglu(p, ly.rms_norm(x, p.post_attn_norm, eps)), kv

    def image_options(self, resize_mode: str = "reference") -> ImageOptions:
        """This model's image processor for the data layer: one square of the VQ resolution (the VQ tokenizer takes
        one size, so `resize_mode` changes nothing)."""
        return ImageOptions(resolution=self.config.vq.resolution, tokens_per_image=self.config.vq.tokens_per_image)

    # ------------------------------------------------------------------ host side
    def example_image(self):
        r = self.config.vq.resolution
        return np.zeros((1, 3, r, r), np.float32), None, self.config.vq.tokens_per_image

    def check_pixels(self, pixel_values) -> np.ndarray:
        """(n, 3, R, R) float32 with clear errors for anything else."""
        r = self.config.vq.resolution
        pv = np.asarray(pixel_values)
        if pv.ndim != 4:
            raise ValueError(f"pixel_values has shape {pv.shape}; expected (num_images, 3, {r}, {r}) as the "
                             "Chameleon image processor returns")
        if pv.shape[1] != 3:
            raise ValueError(f"pixel_values has {pv.shape[1]} channels; Chameleon needs RGB images (3 channels): "
                             "convert the image to RGB first (the image processor does)")
        if pv.shape[2:] != (r, r):
            raise ValueError(f"images are {pv.shape[2]}x{pv.shape[3]} but this VQ tokenizer takes {r}x{r}; "
                             f"resize the shortest edge to {r} and centre-crop (the image processor does)")
        return pv.astype(np.float32)

    def image_token_layout(self, image_grid_thw=None) -> tuple[tuple[int, int, int], int, int]:
        """A side x side grid of codes over the square VQ input, each code one (resolution / side)-pixel cell."""
        side = int(round(self.config.vq.tokens_per_image ** 0.5))
        return (1, side, side), 1, self.config.vq.resolution // side

    def for_compilation(self) -> Chameleon:
        """Without its vocabulary map (image_vocab empty) any ids size the image-code gathers."""
        if self.config.image_vocab == ():
            return self.replace_config(image_vocab=tuple(range(4, 4 + self.config.vq.num_embeddings)))
        return self

    def tokens_per_image(self, images: dict) -> list[int]:
        return [self.config.vq.tokens_per_image] * len(self.check_pixels(images.get("pixel_values")))

    def layout_images(self, input_ids, attention_mask, images: dict) -> Images:
        """The processor's dict: pixel_values (n, 3, R, R) -> per-row Images."""
        pv = self.check_pixels(images.get("pixel_values"))
        t = self.config.vq.tokens_per_image
        rows = rows_of_images(input_ids, attention_mask, self.config.image_token_id, [t] * len(pv))
        m = max(1, max(len(r) for r in rows))
        out = np.zeros((len(rows), m) + pv.shape[1:], np.float32)
        for r, imgs in enumerate(rows):
            for slot, i in enumerate(imgs):
                out[r, slot] = pv[i]
        return Images(out, feature_index(rows, [t] * len(pv), t))

    # ------------------------------------------------------------------ device side
    def image_codes(self, params: Params, pixel_values):
        """(N, 3, R, R) -> (N, tokens per image) VQ codebook indices."""
        return encode(params.vq, pixel_values)

    def image_token_ids(self, params: Params, pixel_values):
        """(N, 3, R, R) -> (N, tokens per image) BPE ids of the image codes."""
        if not self.config.image_vocab:
            raise ValueError("this Chameleon config has no image vocabulary (config.json's vocabulary_map has no "
                             "IMGIMG entries); convert the model from a folder whose config has them")
        table = jnp.asarray(np.asarray(self.config.image_vocab, np.int32))
        return table[self.image_codes(params, pixel_values)]

    def image_features(self, params: Params, images: Images, layer_wrapper=ly.identity):
        """The VQ codes' token embeddings (the encoder has no scanned blocks: `layer_wrapper` is unused)."""
        b, m = images.pixel_values.shape[:2]
        ids = self.image_token_ids(params, images.pixel_values.reshape((b * m,) + images.pixel_values.shape[2:]))
        feats = self.token_embed(params, ids.reshape(b, -1))  # (B, M * T, H)
        return jnp.take_along_axis(feats, images.feat_index[..., None], axis=1)

    def image_flops(self, images: Images) -> float:
        b, m = images.pixel_values.shape[:2]
        return float(b * m * vq_flops(self.config.vq))

    def lm_head(self, params: Params, hidden):
        """Logits (float32) with every image-token column at the dtype's minimum, as transformers does."""
        logits = super().lm_head(params, hidden)
        if not self.config.image_vocab:
            return logits
        mask = np.zeros(self.config.vocab_size, bool)
        mask[np.asarray(self.config.image_vocab)] = True
        return jnp.where(jnp.asarray(mask), jnp.finfo(logits.dtype).min, logits)

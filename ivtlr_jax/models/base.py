"""The backbone interface: what `latent.py`, `generate.py`, `train/`, `convert/` and `sharding.py` may ask of a model.

A backbone is a frozen dataclass holding its config (hashable, so it is a static jit argument). It gives
its spec table, a host step that lays out images per row, an on-device `embed` that also returns the
image tokens latent vision may select from, the shared decoder entry point (prefill, latent chunk,
suffix, decode through the KV cache, attention row on request), the LM head, its position rule and its
prompt conventions. The shared parts live here; a backbone overrides what differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from flax import struct

from ivtlr_jax.config import PromptFormat
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import spec as sp


@struct.dataclass
class Embedded:
    """Input embeddings plus the image tokens latent vision selects from (per row, in sequence order)."""

    embeds: Any  # (B, S, H)
    image_pos: Any  # (B, I) int32: sequence index of the row's j-th image token (0 where invalid)
    image_valid: Any  # (B, I) bool
    image_embeds: Any  # (B, I, H): rows of `embeds` at image_pos
    # the backbone's per-layer decoder inputs for this sequence (leading axis: layers), scanned with the layer
    # params (Qwen3-VL: the DeepStack features to add at the image positions); None when it has none
    extras: Any = None


def image_inputs(images, image_grid_thw=None) -> dict | None:
    """A processor's image dict (`pixel_values`, `image_grid_thw`, ...) or None; the older positional form
    (pixel_values, image_grid_thw) is turned into that dict."""
    if images is None and image_grid_thw is None:
        return None
    if isinstance(images, dict):
        if image_grid_thw is not None:
            raise ValueError("pass image_grid_thw inside the images dict, not beside it")
        return images if any(v is not None for v in images.values()) else None
    return {"pixel_values": images, "image_grid_thw": image_grid_thw}


def grid_inputs(images) -> dict | None:
    """positions()' image argument: the processor's dict, None, or (the older form) image_grid_thw alone."""
    if images is None or isinstance(images, dict):
        return images
    return {"image_grid_thw": images}


def rows_of_images(input_ids, attention_mask, image_token_id: int, tokens_per_image: list[int]) -> list[list[int]]:
    """Which images (in order) fill each row's image tokens; a clear error when counts disagree."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    counts = ((ids == image_token_id) & mask).sum(1).tolist()
    rows, i = [], 0
    for b, count in enumerate(counts):
        mine = []
        while count > 0:
            if i >= len(tokens_per_image):
                raise ValueError(
                    f"row {b}: input_ids hold more image tokens (id {image_token_id}) than the images give "
                    f"({sum(tokens_per_image)} in all for {len(tokens_per_image)} image(s)); expand each image "
                    "placeholder to its token count and pass one image per placeholder"
                )
            if tokens_per_image[i] > count:
                raise ValueError(
                    f"row {b}: its {counts[b]} image tokens end inside image {i} ({tokens_per_image[i]} tokens); "
                    "images cannot span rows: expand each image placeholder to its full token count"
                )
            count -= tokens_per_image[i]
            mine.append(i)
            i += 1
        rows.append(mine)
    if i != len(tokens_per_image):
        raise ValueError(
            f"{len(tokens_per_image)} image(s) given but input_ids hold image tokens for only {i} "
            f"({sum(counts)} image tokens, id {image_token_id}); pass exactly one image per placeholder"
        )
    return rows


def feature_index(rows: list[list[int]], tokens_per_image: list[int], slot_tokens: int) -> np.ndarray:
    """(B, I) index into a row's (M * slot_tokens) feature slots for its j-th image token."""
    width = max(1, max(sum(tokens_per_image[i] for i in r) for r in rows) if rows else 1)
    out = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        parts = [m * slot_tokens + np.arange(tokens_per_image[i]) for m, i in enumerate(r)]
        if parts:
            idx = np.concatenate(parts)
            out[b, : len(idx)] = idx
    return out


def sequential_positions(attention_mask, rows: int = 1) -> np.ndarray:
    """(B, rows, S) positions counting real tokens only (pads get 0), the same on every row."""
    mask = np.asarray(attention_mask).astype(np.int64)
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None).astype(np.int32)
    return np.ascontiguousarray(np.broadcast_to(pos[:, None], (pos.shape[0], rows, pos.shape[1])))


class Backbone:
    """Base class of every backbone; subclasses are frozen dataclasses with a `config` field."""

    model_type: ClassVar[str]
    position_modes: ClassVar[tuple[str, ...]] = ("sequential",)
    native_position_mode: ClassVar[str] = "sequential"  # what `IVTLRModel.logits` uses by default
    position_rows: ClassVar[int] = 1  # rows of the positions array (3: M-RoPE sections)
    default_k: ClassVar[int] = 32  # image embeddings per latent step when none is given (the release's K)
    latent_extras: ClassVar[bool] = False  # re-fed image tokens carry per-layer extras (refeed_extras; DeepStack)
    config: Any

    # ------------------------------------------------------------------ static facts
    @property
    def dims(self) -> ly.DecoderDims:
        raise NotImplementedError

    def decoder_dims(self, rope_sections: tuple[int, ...], **options) -> ly.DecoderDims:
        """The decoder facts every backbone config names alike, plus its own rope sections and options."""
        c = self.config
        return ly.DecoderDims(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_sections=rope_sections,
            tie_word_embeddings=c.tie_word_embeddings, **options)

    @property
    def prompt(self) -> PromptFormat:
        raise NotImplementedError

    def param_spec(self):
        """The typed params tree with ParamInfo leaves: the one spec table."""
        raise NotImplementedError

    def hf_name(self, stored: str) -> str:
        """A stored Hugging Face name in the spec's layout (other transformers layouts are mapped here)."""
        return stored

    def hf_ignored(self, name: str) -> bool:
        """Stored tensors that hold no parameters (rotary buffers, ...)."""
        return name.endswith(("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq"))

    def hf_config(self) -> dict:
        """The transformers config.json dict of this model (for checkpoints saved without one)."""
        return self.config.to_hf_dict()

    # ------------------------------------------------------------------ host side
    def image_options(self, resize_mode: str = "reference"):
        """This model's image processor for the data layer (see `ivtlr_jax.data.images.ImageProcessor`)."""
        raise NotImplementedError

    def example_image(self):
        """(pixel_values, image_grid_thw or None, image tokens) of one blank reference-size image (dry runs)."""
        raise NotImplementedError

    def prepare_images(self, input_ids, attention_mask, images, image_grid_thw=None):
        """The image processor's dict (pixel_values, image_grid_thw, ...; the older positional pixel_values,
        image_grid_thw also work) -> this backbone's batch-leading image pytree (numpy) or None."""
        images = image_inputs(images, image_grid_thw)
        if images is None:
            return None
        return self.layout_images(input_ids, attention_mask, images)

    def layout_images(self, input_ids, attention_mask, images: dict):
        """The processor's image dict -> this backbone's batch-leading image pytree (numpy); see prepare_images."""
        raise NotImplementedError

    def image_token_counts(self, images, image_grid_thw=None) -> list[int]:
        """LLM image tokens of each image given (validating the image inputs): the processor's dict, or the older
        positional pixel_values, image_grid_thw."""
        return self.tokens_per_image(image_inputs(images, image_grid_thw) or {})

    def tokens_per_image(self, images: dict) -> list[int]:
        """LLM image tokens of each image of a processor's dict (validating it)."""
        raise NotImplementedError

    def image_token_layout(self, image_grid_thw=None) -> tuple[tuple[int, int, int], int, int]:
        """((t, h, w) patches, merge, patch pixels) of one image as the model sees it: LLM image token j covers the
        merge x merge patches at row-major place j of the (h / merge, w / merge) grid (pictures of the selections)."""
        raise NotImplementedError

    def count_check(self, input_ids, attention_mask) -> None:
        """Validate ids/mask shapes and vocabulary range."""
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2:
            raise ValueError(f"input_ids has shape {ids.shape}; expected (batch, seq_len)")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; it must equal input_ids' {ids.shape}")
        vocab = self.dims.vocab_size
        if (ids < 0).any() or (ids >= vocab).any():
            raise ValueError(f"input_ids hold ids outside [0, vocab_size={vocab})")

    def positions(self, input_ids, attention_mask, images, mode: str) -> np.ndarray:
        """(B, R, S) int32 positions by the backbone's position rule `mode` (one of its `position_modes`); `images`
        the processor's dict (or, the older form, image_grid_thw), or None."""
        self.check_position_mode(mode)
        return self.mode_positions(input_ids, attention_mask, grid_inputs(images), mode)

    def mode_positions(self, input_ids, attention_mask, images: dict | None, mode: str) -> np.ndarray:
        """positions() for a checked mode and the processor's dict; sequential unless a backbone has others."""
        return sequential_positions(attention_mask, self.position_rows)

    def check_position_mode(self, mode: str) -> str:
        if mode not in self.position_modes:
            raise ValueError(f"position_mode={mode!r} is not valid for {self.model_type}; use one of "
                             f"{list(self.position_modes)}")
        return mode

    # ------------------------------------------------------------------ device side
    def image_features(self, params, images, layer_wrapper=ly.identity):
        """(B, I, H) embeddings of each row's image tokens, in order; `layer_wrapper` wraps the image encoder's
        scanned blocks (the caller's choice: a trainer's remat, the identity for inference)."""
        raise NotImplementedError

    def image_flops(self, images) -> float:
        """Forward FLOPs of the image encoder over a batch's image pytree (padding included: it is computed)."""
        raise NotImplementedError

    def image_token_ids(self, params, pixel_values):
        """(N, tokens per image) discrete image-token ids, for backbones that tokenize images; others refuse."""
        raise ValueError(f"{self.model_type} does not turn images into discrete tokens; use image_features")

    def embed(self, params, input_ids, images, vision_wrapper=ly.identity) -> Embedded:
        """Token embeddings with each row's image tokens replaced, in order, by its image embeddings
        (`vision_wrapper`: the image encoder's layer wrapper, see `image_features`)."""
        feats = None if images is None else self.image_features(params, images, vision_wrapper)
        return self.embed_features(params, input_ids, feats)

    def embed_features(self, params, input_ids, feats) -> Embedded:
        """Token embeddings with each row's image tokens replaced, in order, by feats (B, I, H) (None: no images)."""
        tok = params.llm.embed[input_ids]  # (B, S, H)
        b = input_ids.shape[0]
        if feats is None:
            zero = jnp.zeros((b, 1), jnp.int32)
            return Embedded(tok, zero, zero.astype(bool), jnp.zeros((b, 1, tok.shape[-1]), tok.dtype))
        feats = feats.astype(tok.dtype)  # (B, I, H)
        n_img = feats.shape[1]
        is_img = input_ids == self.config.image_token_id  # (B, S)
        j = jnp.clip(jnp.cumsum(is_img, 1) - 1, 0, n_img - 1)
        embeds = jnp.where(is_img[..., None], jnp.take_along_axis(feats, j[..., None], 1), tok)
        order = jnp.argsort(~is_img, axis=1, stable=True)[:, :n_img].astype(jnp.int32)  # image positions first
        valid = jnp.arange(n_img)[None] < is_img.sum(1, keepdims=True)
        pos = jnp.where(valid, order, 0)
        return Embedded(embeds, pos, valid, feats)

    def init_cache(self, batch: int, max_len: int, dtype) -> ly.KVCache:
        return ly.init_cache(self.dims, batch, max_len, dtype)

    def decoder_block(self, d: ly.DecoderDims, p, x, extra, attend):
        """This backbone's decoder layer (see layers.pre_norm_block for the contract); the Llama/Qwen2 one here."""
        return ly.pre_norm_block(d, p, x, extra, attend)

    def decode(self, params, embeds, positions, cache, cache_index, kv_valid, *, attn_row: bool = False,
               layer_wrapper=ly.identity, attention: str = "auto", kv_len: int | None = None, extras=None):
        """The one decoder entry point (see layers.decoder) with this backbone's block; positions (B, R, T);
        `extras` its per-layer inputs (Embedded.extras, refeed_extras) or None; `layer_wrapper` wraps each layer
        (the caller's remat)."""
        return ly.decoder(params.llm, self.dims, embeds, positions, cache, cache_index, kv_valid,
                          attn_row=attn_row, layer_wrapper=layer_wrapper, attention=attention, kv_len=kv_len,
                          block=self.decoder_block, extras=extras)

    def refeed_extras(self, emb: Embedded, idx, chunk_len: int):
        """The per-layer extras of a latent chunk of `chunk_len` vectors whose first k re-feed the row's image
        tokens idx (B, k) (indices into emb.image_embeds): None for a backbone without extras."""
        return None

    def lm_head(self, params, hidden):
        """Logits in float32 (B, T, V)."""
        return ly.lm_logits(params.llm, self.dims, hidden)

    def token_embed(self, params, ids):
        return params.llm.embed[ids]

    # ------------------------------------------------------------------ derived from the spec
    def abstract_params(self, dtype="float32"):
        return sp.abstract(self.param_spec(), dtype)

    def init_params(self, key, dtype="float32"):
        return sp.init_params(self.param_spec(), key, dtype)

    def random_params(self, seed: int = 0, dtype="float32"):
        """Host (numpy) random params from the spec's initializers."""
        return sp.init_params_numpy(self.param_spec(), seed, dtype)

    def replace_config(self, **changes):
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))

    def for_compilation(self) -> Backbone:
        """This backbone with any config entry that only sizes arrays, and that a config-only checkpoint may leave
        unset, filled with in-range stand-ins: enough to compile its programs on abstract arrays (dry runs)."""
        return self


def param_dtype(params) -> jnp.dtype:
    return params.llm.embed.dtype


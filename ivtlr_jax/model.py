"""`IVTLRModel`: the thin public wrapper over a backbone, its params and the pure model functions."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ivtlr_jax.config import LatentConfig, check_dtype
from ivtlr_jax.models import Backbone, backbone_for


@functools.partial(jax.jit, static_argnames=("bb",))
def forward_logits(bb: Backbone, params, input_ids, attention_mask, positions, images):
    """One full pass: token ids (+ images) -> float32 logits (B, S, V)."""
    emb = bb.embed(params, input_ids, images)
    b, s = input_ids.shape
    cache = bb.init_cache(b, s, emb.embeds.dtype)
    hidden, _, _ = bb.decode(params, emb.embeds, positions, cache, 0, attention_mask.astype(bool))
    return bb.lm_head(params, hidden)


@functools.partial(jax.jit, static_argnames=("bb",))
def _image_features(bb: Backbone, params, images):
    return bb.image_features(params, images)


class IVTLRModel:
    """A converted checkpoint of any backbone: config, params (a typed pytree) and the calls users make."""

    def __init__(self, config, params, path: str | None = None):
        self.config = config
        self.params = params
        self.path = path

    @property
    def backbone(self) -> Backbone:
        return backbone_for(self.config)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype: str = "float32") -> IVTLRModel:
        """Load a CKPT_DIR written by `tools/convert_weights.py` (or the trainer's merged export).

        A folder with unmerged LoRA adapters (`--from-release --keep-lora`) loads with them folded in (float32).
        """
        from ivtlr_jax.convert import load_checkpoint

        check_dtype(dtype)
        if not os.path.isdir(ckpt_dir):
            raise ValueError(f"ckpt_dir={ckpt_dir!r} is not a folder; convert one with tools/convert_weights.py")
        cfg, params = load_checkpoint(ckpt_dir, dtype=dtype)
        params = jax.tree_util.tree_map(jnp.asarray, params)
        return cls(cfg, params, path=ckpt_dir)

    @property
    def dtype(self):
        return self.params.llm.embed.dtype

    def resolve_position_mode(self, mode: str | None = None, native: bool = False) -> str:
        """The position rule to use: `mode` if given, else the checkpoint's recorded default (an imported release:
        "sequential"), else the backbone's native rule (native=True, a plain forward) or "sequential" (latent)."""
        if mode is not None:
            return mode
        recorded = getattr(self.config, "position_mode", None)
        if recorded is not None:
            return recorded
        return self.backbone.native_position_mode if native else "sequential"

    def latent_config(self, k: int | None = None, latent_text: bool = True, position_mode: str | None = None,
                      selection_order: str = "position", latent_grad: str = "stop") -> LatentConfig:
        """The latent options with this model's defaults: K the backbone's (the release's), positions the
        checkpoint's recorded rule (see resolve_position_mode)."""
        return LatentConfig(k=self.backbone.default_k if k is None else k, latent_text=latent_text,
                            position_mode=self.resolve_position_mode(position_mode),
                            selection_order=selection_order, latent_grad=latent_grad)

    def _images(self, input_ids, attention_mask, pixel_values, image_grid_thw):
        images = self.backbone.prepare_images(input_ids, attention_mask, pixel_values, image_grid_thw)
        return None if images is None else jax.tree.map(jnp.asarray, images)

    def image_features(self, pixel_values, image_grid_thw=None):
        """(num_image_tokens, hidden) image embeddings of the images in order (each encoded on its own)."""
        bb = self.backbone
        counts = bb.image_token_counts(pixel_values, image_grid_thw)
        ids = np.zeros((len(counts), max(counts)), np.int32)
        mask = np.zeros_like(ids)
        for r, c in enumerate(counts):
            ids[r, :c], mask[r, :c] = self.config.image_token_id, 1
        feats = np.asarray(_image_features(bb, self.params, self._images(ids, mask, pixel_values, image_grid_thw)))
        return np.concatenate([feats[r, :c] for r, c in enumerate(counts)])

    def image_tokens(self, pixel_values):
        """(n_images, tokens per image) discrete image-token ids, for backbones that tokenize images (Chameleon)."""
        bb = self.backbone
        if not hasattr(bb, "image_token_ids"):
            raise ValueError(f"{bb.model_type} does not turn images into discrete tokens; use image_features")
        return np.asarray(bb.image_token_ids(self.params, jnp.asarray(pixel_values)))

    def logits(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
               position_mode: str | None = None) -> np.ndarray:
        """One full forward pass; returns float32 logits (B, S, V) as a numpy array.

        position_mode defaults to the checkpoint's recorded rule (an imported release: "sequential"), else the
        backbone's native one (Qwen2-VL: "mrope"; Chameleon: "sequential").
        """
        bb = self.backbone
        bb.count_check(input_ids, attention_mask)
        images = self._images(input_ids, attention_mask, pixel_values, image_grid_thw)
        ids, mask = np.asarray(input_ids).astype(np.int32), np.asarray(attention_mask).astype(np.int32)
        pos = bb.positions(ids, mask, image_grid_thw, self.resolve_position_mode(position_mode, native=True))
        out = forward_logits(bb, self.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), images)
        return np.asarray(out)

    def latent_forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                       k: int | None = None, latent_text: bool = True, position_mode: str | None = None,
                       selection_order: str = "position", latent_grad: str = "stop"):
        """IVT-LR forward with the latent steps the `<|latent|>` tokens ask for; loss, logits, selections."""
        from ivtlr_jax.latent import LatentOutput, latent_forward

        lcfg = self.latent_config(k, latent_text, position_mode, selection_order, latent_grad)
        out = latent_forward(self.backbone, self.params, lcfg, input_ids, attention_mask, labels, pixel_values,
                             image_grid_thw)
        return LatentOutput(float(out.loss), np.asarray(out.logits), np.asarray(out.selected))

    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, max_new_tokens: int = 64,
                 k: int | None = None, latent_text: bool = True, position_mode: str | None = None,
                 selection_order: str = "position", temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 eos_token_ids=None, pad_token_id: int | None = None, max_cache_len: int | None = None):
        """KV-cached decoding after the latent steps of the prompt's trailing `<|latent|>` tokens (greedy default).

        Returns GenerateOutput: tokens (B, max_new_tokens) padded after EOS, lengths (B,) with EOS,
        selected (n, B, k), steps (decoding steps run).
        """
        from ivtlr_jax.generate import SamplingConfig, generate

        lcfg = self.latent_config(k, latent_text, position_mode, selection_order)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
        return generate(self.backbone, self.params, lcfg, input_ids, attention_mask, pixel_values, image_grid_thw,
                        max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos_token_ids,
                        pad_token_id=pad_token_id, max_cache_len=max_cache_len)

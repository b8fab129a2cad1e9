"""`IVTLRModel`: the thin public wrapper over the params pytree and the pure model functions."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ivtlr_jax.config import ModelConfig, check_dtype
from ivtlr_jax.models import qwen2_vl as q


class IVTLRModel:
    """A converted Qwen2-VL checkpoint: config, params (a plain pytree) and the calls users make."""

    def __init__(self, config: ModelConfig, params, path: str | None = None):
        self.config = config
        self.params = params
        self.path = path

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype: str = "float32") -> IVTLRModel:
        """Load a CKPT_DIR written by `tools/convert_weights.py` (or the trainer's merged export)."""
        from ivtlr_jax.convert import load_checkpoint

        check_dtype(dtype)
        if not os.path.isdir(ckpt_dir):
            raise ValueError(f"ckpt_dir={ckpt_dir!r} is not a folder; convert one with tools/convert_weights.py")
        cfg, params = load_checkpoint(ckpt_dir, dtype=dtype)
        params = jax.tree_util.tree_map(jnp.asarray, params)
        return cls(cfg, params, path=ckpt_dir)

    @property
    def dtype(self):
        return self.params["llm"]["embed"].dtype

    def image_features(self, pixel_values, image_grid_thw):
        """(num_image_tokens, hidden) merged vision features for HF-layout pixel_values."""
        return q.encode_images(self.params, self.config, pixel_values, image_grid_thw)

    def _features_or_none(self, pixel_values, image_grid_thw):
        if pixel_values is None and image_grid_thw is None:
            return None, 0
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("pixel_values and image_grid_thw go together: pass both or neither")
        feats = self.image_features(pixel_values, image_grid_thw)
        return feats, int(feats.shape[0])

    def logits(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
               position_mode: str = "mrope") -> np.ndarray:
        """One full forward pass; returns float32 logits (B, S, V) as a numpy array."""
        feats, n_img = self._features_or_none(pixel_values, image_grid_thw)
        ids, mask = q.check_text_inputs(self.config, input_ids, attention_mask, n_img)
        pos = q.make_positions(self.config, ids, mask, image_grid_thw, position_mode)
        out = q.forward_logits(self.params, self.config, jnp.asarray(ids), jnp.asarray(mask),
                               jnp.asarray(pos), feats)
        return np.asarray(out)

    def latent_forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                       k: int = 32, latent_text: bool = True, position_mode: str = "sequential",
                       selection_order: str = "position", latent_grad: str = "stop"):
        """IVT-LR forward with the latent steps the `<|latent|>` tokens ask for; loss, logits, selections."""
        from ivtlr_jax.config import LatentConfig
        from ivtlr_jax.latent import LatentOutput, latent_forward

        lcfg = LatentConfig(k=k, latent_text=latent_text, position_mode=position_mode,
                            selection_order=selection_order, latent_grad=latent_grad)
        out = latent_forward(self.params, self.config, lcfg, input_ids, attention_mask, labels,
                             pixel_values, image_grid_thw)
        return LatentOutput(float(out.loss), np.asarray(out.logits), np.asarray(out.selected))

    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, max_new_tokens: int = 64,
                 k: int = 32, latent_text: bool = True, position_mode: str = "sequential",
                 selection_order: str = "position", temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 eos_token_ids=None, pad_token_id: int | None = None, max_cache_len: int | None = None):
        """KV-cached decoding after the latent steps of the prompt's trailing `<|latent|>` tokens (greedy default).

        Returns GenerateOutput: tokens (B, max_new_tokens) padded after EOS, lengths (B,) with EOS,
        selected (n, B, k), steps (decoding steps run).
        """
        from ivtlr_jax.config import LatentConfig
        from ivtlr_jax.generate import SamplingConfig, generate

        lcfg = LatentConfig(k=k, latent_text=latent_text, position_mode=position_mode,
                            selection_order=selection_order)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
        return generate(self.params, self.config, lcfg, input_ids, attention_mask, pixel_values, image_grid_thw,
                        max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos_token_ids,
                        pad_token_id=pad_token_id, max_cache_len=max_cache_len)

"""`IVTLRModel`: the thin public wrapper over a backbone, its params and the pure model functions."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.config import check_dtype
from ivtlr_jax.convert.load import abstract_params  # noqa: F401  (the params of a load on a mesh: eval.dry_run)
from ivtlr_jax.latent import LatentConfig
from ivtlr_jax.models import Backbone, backbone_for
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models.base import image_inputs


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
    """A parameter dtype name; "auto" is bfloat16 on accelerators and float32 on CPU (of `platform`, default:
    the first device's)."""
    if dtype == "auto":
        platform = platform or jax.devices()[0].platform
        return "float32" if platform == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} is not supported; use 'auto', 'float32' or 'bfloat16'")
    return check_dtype(dtype)


def resolve_mesh(mesh) -> jax.sharding.Mesh | None:
    """None (one device), a preset name (`ivtlr_jax.sharding.PRESETS`) or a jax.sharding.Mesh -> a Mesh or None."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    if isinstance(mesh, (str, sh.MeshPreset)):
        return sh.make_mesh(mesh)
    raise ValueError(f"mesh={mesh!r} is not valid; pass None (one device), a preset name ({sorted(sh.PRESETS)}) or a "
                     "jax.sharding.Mesh")


@functools.partial(jax.jit, static_argnames=("bb", "mesh"))
def forward_logits(bb: Backbone, params, input_ids, attention_mask, positions, images, mesh=None):
    """One full pass: token ids (+ images) -> float32 logits (B, S, V); on `mesh`, the cache and activations are
    kept in the inference layout (batch over the data axes) and the attention kernel is the one for its devices."""
    emb = bb.embed(params, input_ids, images)
    b, s = input_ids.shape
    cache = sh.constrain_cache(bb.init_cache(b, s, emb.embeds.dtype), mesh)
    attention = ly.attention_spec("auto", emb.embeds.dtype, bb.dims.head_dim, mesh)
    hidden, _, _ = bb.decode(params, emb.embeds, positions, cache, 0, attention_mask.astype(bool),
                             attention=attention, extras=emb.extras)
    return bb.lm_head(params, hidden)


@functools.partial(jax.jit, static_argnames=("bb",))
def _image_features(bb: Backbone, params, images):
    return bb.image_features(params, images)


def _load(ckpt_dir: str, dtype: str, mesh):
    """(config, params, report): one device, or on the mesh where each device reads only its shards and unmerged
    adapters are folded in on the devices (`convert.load_params`, the trainer's reader)."""
    from ivtlr_jax.convert.load import load_params
    from ivtlr_jax.train.state import DeviceBytes
    from ivtlr_jax.train.step import tree_bytes_per_device

    if mesh is None:
        loaded = load_params(ckpt_dir, dtype=dtype)
        params = jax.tree_util.tree_map(jnp.asarray, loaded.params)
        total = int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))
        return loaded.config, params, {"param_bytes_total": total, "param_peak_bytes_per_device": total}
    monitor = DeviceBytes()
    loaded = load_params(ckpt_dir, mesh=mesh, dtype=dtype, sample=monitor.sample)
    params = loaded.params
    report = {"param_bytes_total": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params))),
              "param_bytes_per_device": tree_bytes_per_device(params, jax.tree.map(lambda x: x.sharding, params)),
              "param_peak_bytes_per_device": int(monitor.peak)}
    return loaded.config, params, report


class IVTLRModel:
    """A converted checkpoint of any backbone: config, params (a typed pytree) and the calls users make."""

    def __init__(self, config, params, path: str | None = None, mesh=None, load_report: dict | None = None):
        self.config = config
        self.params = params
        self.path = path
        self.mesh = mesh  # None: one device; else params live on this mesh and every call runs on it
        self.load_report = load_report or {}

    @property
    def backbone(self) -> Backbone:
        return backbone_for(self.config)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype: str = "float32", mesh=None) -> IVTLRModel:
        """Load a CKPT_DIR written by `tools/convert_weights.py` (or the trainer's merged export).

        dtype: "float32", "bfloat16" or "auto" (bfloat16 on accelerators, float32 on CPU).
        mesh: None keeps the whole model on one device; a preset name (`ivtlr_jax.sharding.PRESETS`, e.g.
        "tpu_v4_8", "auto") or a jax.sharding.Mesh reads the parameters shard by shard onto that mesh in the
        training layout, so no device ever holds the whole model; logits, latent_forward and generate then run
        on it. A folder with unmerged LoRA adapters (`--from-release --keep-lora`) loads with them folded in
        (float32). `load_report` holds param_bytes_total and param_peak_bytes_per_device.
        """
        if not os.path.isdir(ckpt_dir):
            raise ValueError(f"ckpt_dir={ckpt_dir!r} is not a folder; convert one with tools/convert_weights.py")
        mesh = resolve_mesh(mesh)
        dtype = resolve_dtype(dtype, None if mesh is None else mesh.devices.flat[0].platform)
        cfg, params, report = _load(ckpt_dir, dtype, mesh)
        return cls(cfg, params, path=ckpt_dir, mesh=mesh, load_report=report)

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
                      selection_order: str = "position", latent_grad: str = "stop", ablate: str = "none",
                      ablate_seed: int = 0, deepstack_latent: bool = True) -> LatentConfig:
        """The latent options with this model's defaults: K the backbone's (the release's), positions the
        checkpoint's recorded rule (see resolve_position_mode)."""
        return LatentConfig(k=self.backbone.default_k if k is None else k, latent_text=latent_text,
                            position_mode=self.resolve_position_mode(position_mode),
                            selection_order=selection_order, latent_grad=latent_grad, ablate=ablate,
                            ablate_seed=ablate_seed, deepstack_latent=deepstack_latent)

    def _put(self, batch):
        """Host arrays onto this model's devices: one device, or the mesh with the batch over the data axes."""
        if batch is None:
            return None
        return jax.tree.map(jnp.asarray, batch) if self.mesh is None else sh.put_batch(self.mesh, batch)

    def _images(self, input_ids, attention_mask, images, image_grid_thw=None):
        """The processor's image dict (or the older pixel_values, image_grid_thw) laid out and put on the devices."""
        return self._put(self.backbone.prepare_images(input_ids, attention_mask, images, image_grid_thw))

    def image_features(self, pixel_values, image_grid_thw=None):
        """(num_image_tokens, hidden) image embeddings of the images in order (each encoded on its own)."""
        bb = self.backbone
        images = image_inputs(pixel_values, image_grid_thw)
        counts = bb.image_token_counts(images)
        ids = np.zeros((len(counts), max(counts)), np.int32)
        mask = np.zeros_like(ids)
        for r, c in enumerate(counts):
            ids[r, :c], mask[r, :c] = self.config.image_token_id, 1
        feats = np.asarray(_image_features(bb, self.params, self._images(ids, mask, images)))
        return np.concatenate([feats[r, :c] for r, c in enumerate(counts)])

    def image_tokens(self, pixel_values):
        """(n_images, tokens per image) discrete image-token ids, for backbones that tokenize images (a ValueError
        for the others)."""
        return np.asarray(self.backbone.image_token_ids(self.params, jnp.asarray(pixel_values)))

    def logits(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
               position_mode: str | None = None) -> np.ndarray:
        """One full forward pass; returns float32 logits (B, S, V) as a numpy array.

        position_mode defaults to the checkpoint's recorded rule (an imported release: "sequential"), else the
        backbone's native one (Qwen2-VL: "mrope"; Chameleon: "sequential").
        """
        bb = self.backbone
        bb.count_check(input_ids, attention_mask)
        image_dict = image_inputs(pixel_values, image_grid_thw)  # the processor's dict (or the older two arrays)
        images = self._images(input_ids, attention_mask, image_dict)
        ids, mask = np.asarray(input_ids).astype(np.int32), np.asarray(attention_mask).astype(np.int32)
        pos = bb.positions(ids, mask, image_dict, self.resolve_position_mode(position_mode, native=True))
        ids, mask, pos = self._put((ids, mask, np.asarray(pos)))
        return np.asarray(forward_logits(bb, self.params, ids, mask, pos, images, mesh=self.mesh))

    def latent_forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                       k: int | None = None, latent_text: bool = True, position_mode: str | None = None,
                       selection_order: str = "position", latent_grad: str = "stop", deepstack_latent: bool = True):
        """IVT-LR forward with the latent steps the `<|latent|>` tokens ask for; loss, logits, selections.
        deepstack_latent: a re-fed image token carries its DeepStack features (Qwen3-VL; LatentConfig)."""
        from ivtlr_jax.latent import LatentOutput, latent_forward_jit, make_latent_batch

        lcfg = self.latent_config(k, latent_text, position_mode, selection_order, latent_grad,
                                  deepstack_latent=deepstack_latent)
        batch = make_latent_batch(self.backbone, lcfg, input_ids, attention_mask, labels, pixel_values,
                                  image_grid_thw)
        loss, logits, selected = latent_forward_jit(self.backbone, self.params, lcfg, self._put(batch), mesh=self.mesh)
        return LatentOutput(float(loss), np.asarray(logits), np.asarray(selected))

    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, max_new_tokens: int = 64,
                 k: int | None = None, latent_text: bool = True, position_mode: str | None = None,
                 selection_order: str = "position", temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 eos_token_ids=None, pad_token_id: int | None = None, max_cache_len: int | None = None,
                 ablate: str = "none", ablate_seed: int = 0, with_states: bool = False, deepstack_latent: bool = True):
        """KV-cached decoding after the latent steps of the prompt's trailing `<|latent|>` tokens (greedy default).

        Returns GenerateOutput: tokens (B, max_new_tokens) padded after EOS, lengths (B,) with EOS,
        selected (n, B, k), steps (decoding steps run); with_states: latent_h (n, B, H), the h fed into each chunk.
        ablate / ablate_seed: a causal-audit intervention of the latent loop (LatentConfig.ablate).
        deepstack_latent: a re-fed image token carries its DeepStack features (Qwen3-VL; LatentConfig).
        """
        from ivtlr_jax.generate import SamplingConfig, generate

        lcfg = self.latent_config(k, latent_text, position_mode, selection_order, ablate=ablate,
                                  ablate_seed=ablate_seed, deepstack_latent=deepstack_latent)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
        return generate(self.backbone, self.params, lcfg, input_ids, attention_mask, pixel_values, image_grid_thw,
                        max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos_token_ids,
                        pad_token_id=pad_token_id, max_cache_len=max_cache_len, mesh=self.mesh,
                        with_states=with_states)

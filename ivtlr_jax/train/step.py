"""The sharded train step: LoRA or full fine-tuning of the LLM on the IVT-LR latent loss."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ivtlr_jax.config import LatentConfig, ModelConfig, TrainConfig
from ivtlr_jax.latent import LatentLayout, latent_loss, prepare
from ivtlr_jax.models import qwen2_vl as q
from ivtlr_jax.train.lora import apply_lora, init_lora

REPLICATED_KEYS = ("vision_cos", "vision_sin")


def compute_dtype(tcfg: TrainConfig, platform: str | None = None):
    """bfloat16 on accelerators, float32 on CPU, unless the config names one."""
    if tcfg.compute_dtype != "auto":
        return jnp.dtype(tcfg.compute_dtype)
    platform = platform or jax.devices()[0].platform
    return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)


def make_optimizer(tcfg: TrainConfig, total_steps: int):
    """AdamW with global-norm clipping, optional warmup and decay; gradient accumulation via MultiSteps."""
    total = max(int(total_steps), 1)
    warm = min(tcfg.warmup_steps, total)
    if tcfg.schedule == "constant":
        main = optax.constant_schedule(tcfg.lr)
    elif tcfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(tcfg.lr, max(total - warm, 1))
    else:
        main = optax.linear_schedule(tcfg.lr, 0.0, max(total - warm, 1))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, tcfg.lr, warm), main], [warm]) if warm else main
    tx = optax.chain(
        optax.clip_by_global_norm(tcfg.clip),
        optax.adamw(schedule, b1=tcfg.beta1, b2=tcfg.beta2, weight_decay=tcfg.weight_decay),
    )
    if tcfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=tcfg.grad_accum)
    return tx, schedule


def split_params(params, tcfg: TrainConfig, key):
    """(trainable, frozen): LoRA adapters over all weights, or the LLM in float32 beside the frozen vision."""
    if tcfg.finetune == "lora":
        return init_lora(params, tcfg.lora_r, key), params
    trainable = {"llm": jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params["llm"])}
    return trainable, {"vision": params["vision"]}


def assemble_params(trainable, frozen, tcfg: TrainConfig, dtype, key=None):
    """The model's params tree in the compute dtype (LoRA adapters stay float32 until used)."""
    cast = functools.partial(jax.tree_util.tree_map, lambda x: x.astype(dtype))
    if tcfg.finetune == "lora":
        dropout = tcfg.lora_dropout if key is not None else 0.0
        return apply_lora(cast(frozen), trainable, tcfg.lora_alpha / tcfg.lora_r, dropout, key)
    return {"vision": cast(frozen["vision"]), "llm": cast(trainable["llm"])}


class HostBatch(NamedTuple):
    n: int  # latent steps (static)
    arrays: dict  # batch-leading numpy arrays (layout, pixel_values), sharded over the data axes
    replicated: dict  # REPLICATED_KEYS: the same on every host
    tokens: int  # real tokens in the final sequences (for tokens/s)


def host_batch(cfg: ModelConfig, lcfg: LatentConfig, batch: dict) -> HostBatch:
    """Collated numpy batch -> checked, batch-leading arrays for the train step (one image per row)."""
    grid = np.asarray(batch["image_grid_thw"])
    ids = np.asarray(batch["input_ids"])
    if grid.shape[0] != ids.shape[0] or (grid != grid[:1]).any():
        raise ValueError(
            f"training needs one image per row and one image grid per batch; got {grid.shape[0]} images "
            f"for {ids.shape[0]} rows with grids {np.unique(grid, axis=0).tolist()}; use the reference "
            "280x280 resize (ImageOptions(resize_mode='reference'))"
        )
    n, layout, grid = prepare(cfg, lcfg, ids, batch["attention_mask"], batch["labels"], batch["pixel_values"], grid)
    vin = q.prepare_vision_inputs(cfg.vision, grid[:1])
    b = ids.shape[0]
    arrays = {
        "prefix_ids": layout.prefix_ids, "suffix_ids": layout.suffix_ids, "kv_valid": layout.kv_valid,
        "positions": np.ascontiguousarray(layout.positions.transpose(1, 0, 2)), "labels": layout.labels,
        "image_pos": layout.image_pos, "image_valid": layout.image_valid,
        "pixel_values": np.asarray(batch["pixel_values"], np.float32).reshape(b, -1, cfg.vision.patch_dim),
    }
    replicated = {"vision_cos": vin.cos[0], "vision_sin": vin.sin[0]}
    return HostBatch(n, arrays, replicated, int(layout.kv_valid.sum()))


def batch_loss(params, cfg: ModelConfig, lcfg: LatentConfig, n: int, batch: dict):
    """Mean cross-entropy of one device batch (vision features computed in-graph, not differentiated)."""
    dtype = params["llm"]["embed"].dtype
    feats = q.vision_forward_uniform(params["vision"], cfg.vision, batch["pixel_values"], batch["vision_cos"],
                                     batch["vision_sin"], dtype)
    feats = jax.lax.stop_gradient(feats)
    layout = LatentLayout(batch["prefix_ids"], batch["suffix_ids"], batch["kv_valid"],
                          jnp.transpose(batch["positions"], (1, 0, 2)), batch["labels"], batch["image_pos"],
                          batch["image_valid"])
    return latent_loss(params, cfg, lcfg, n, layout, feats)


def make_train_step(cfg: ModelConfig, lcfg: LatentConfig, tcfg: TrainConfig, tx, schedule, n: int, dtype):
    """state, frozen, batch -> new state, metrics. State: step, trainable, opt_state, rng (all arrays)."""

    def loss_fn(trainable, frozen, batch, key):
        params = assemble_params(trainable, frozen, tcfg, dtype, key)
        with q.remat_policy(tcfg.remat):  # read while tracing
            return batch_loss(params, cfg, lcfg, n, batch)

    def step(state, frozen, batch):
        rng, key = jax.random.split(state["rng"])
        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], frozen, batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        micro = state["step"]
        opt_steps = micro // tcfg.grad_accum
        new = {"step": micro + 1, "trainable": trainable, "opt_state": opt_state, "rng": rng}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(opt_steps)}
        return new, metrics

    return step


def init_state(trainable, tx, seed: int):
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
            "rng": jax.random.PRNGKey(seed)}


def path_matched_shardings(tree, reference_tree, reference_shardings, default):
    """Shardings for a tree (e.g. optimiser state) by matching key-path suffixes and shapes to a reference."""
    ref = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(reference_tree)[0]:
        ref[_keys(path)] = leaf
    ref_sh = {_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(reference_shardings)[0]}

    def pick(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in ref and tuple(ref[suffix].shape) == tuple(np.shape(leaf)):
                return ref_sh[suffix]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def _keys(path) -> tuple:
    out = []
    for k in path:
        out.append(getattr(k, "key", getattr(k, "name", getattr(k, "idx", str(k)))))
    return tuple(out)


def model_flops(cfg: ModelConfig, tcfg: TrainConfig, batch: int, seq_len: int, n_images: int,
                patches_per_image: int = 400) -> float:
    """Model FLOPs of one train step (the MFU numerator; remat recomputation not counted).

    LLM: 2 * matmul params per token forward plus causal attention (2 * layers * hidden * seq per token);
    backward doubles it for full fine-tuning (activation and weight gradients) and adds one forward's
    worth for LoRA (activation gradients only). The frozen vision tower runs forward only.
    XLA's own count is not used: it counts a scanned layer once, not once per layer.
    """
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_token = layers * (h * (q + 2 * kv) + q * h + 3 * h * i) + h * cfg.vocab_size
    fwd = batch * seq_len * (2 * per_token + 2 * layers * h * seq_len)
    llm = fwd * (3.0 if tcfg.finetune == "full" else 2.0)
    v = cfg.vision
    vis_params = v.depth * (4 * v.embed_dim**2 + 2 * v.embed_dim * v.mlp_dim) + v.patch_dim * v.embed_dim
    vis_params += (v.embed_dim * 4) ** 2 + v.embed_dim * 4 * cfg.hidden_size
    vis = n_images * patches_per_image * (2 * vis_params + 4 * v.depth * v.embed_dim * patches_per_image)
    return float(llm + vis)

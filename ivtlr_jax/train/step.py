"""The sharded train step: LoRA or full fine-tuning of the LLM on the IVT-LR latent loss, for any backbone."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ivtlr_jax.config import LatentConfig, TrainConfig
from ivtlr_jax.latent import LatentBatch, latent_loss
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.base import Backbone
from ivtlr_jax.train.lora import apply_lora


@struct.dataclass
class TrainState:
    step: Any  # () int32: micro-steps taken
    trainable: Any  # LoRA adapters, or the params tree with only the trainable leaves (None elsewhere), float32
    opt_state: Any
    rng: Any


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


# ----------------------------------------------------------------------------- trainable / frozen
def split_params(spec, params, finetune: str):
    """(trainable, frozen) for full fine-tuning: the spec's trainable leaves vs the rest (None placeholders)."""
    if finetune != "full":
        raise ValueError("split_params is for full fine-tuning; LoRA trains adapters beside the frozen params")
    trainable = jax.tree.map(lambda i, x: x if i.trainable else None, spec, params, is_leaf=sp.is_info)
    frozen = jax.tree.map(lambda i, x: None if i.trainable else x, spec, params, is_leaf=sp.is_info)
    return trainable, frozen


def combine(spec, trainable, frozen):
    """Inverse of `split_params`."""
    return jax.tree.map(lambda i, t, f: t if i.trainable else f, spec, trainable, frozen, is_leaf=sp.is_info)


def cast_params(spec, params, dtype):
    """Params in the compute dtype, except leaves the spec pins (e.g. a float32 image tokenizer)."""
    return jax.tree.map(lambda i, x: None if x is None else x.astype(i.leaf_dtype(dtype)), spec, params,
                        is_leaf=sp.is_info)


def assemble_params(bb: Backbone, trainable, frozen, tcfg: TrainConfig, dtype, key=None):
    """The model's params in the compute dtype (LoRA adapters stay float32 until used)."""
    spec = bb.param_spec()
    if tcfg.finetune == "lora":
        dropout = tcfg.lora_dropout if key is not None else 0.0
        return apply_lora(cast_params(spec, frozen, dtype), trainable, tcfg.lora_alpha / tcfg.lora_r, dropout, key)
    return cast_params(spec, combine(spec, trainable, frozen), dtype)


def batch_loss(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, remat: str = "none",
               attention: str = "auto"):
    """Mean cross-entropy of one (device) batch; the image encoder runs forward only (it is frozen)."""
    return latent_loss(bb, params, lcfg, batch, remat, attention)


def make_train_step(bb: Backbone, lcfg: LatentConfig, tcfg: TrainConfig, tx, schedule, dtype):
    """(state, frozen, batch) -> (new state, metrics). One function for every n (n is static in the batch)."""

    def loss_fn(trainable, frozen, batch, key):
        params = assemble_params(bb, trainable, frozen, tcfg, dtype, key)
        return batch_loss(bb, params, lcfg, batch, tcfg.remat, tcfg.attention)

    def step(state: TrainState, frozen, batch: LatentBatch):
        rng, key = jax.random.split(state.rng)
        loss, grads = jax.value_and_grad(loss_fn)(state.trainable, frozen, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        opt_steps = state.step // tcfg.grad_accum
        new = TrainState(state.step + 1, trainable, opt_state, rng)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(opt_steps)}
        return new, metrics

    step.loss_fn = loss_fn  # (trainable, frozen, batch, key) -> loss: what the step differentiates
    return step


def model_flops(bb: Backbone, tcfg: TrainConfig, batch: LatentBatch) -> float:
    """Model FLOPs of one train step (the MFU numerator; remat recomputation not counted).

    LLM: 2 * matmul params per token forward plus causal attention (2 * layers * hidden * seq per token);
    backward doubles it for full fine-tuning (activation and weight gradients) and adds one forward's
    worth for LoRA (activation gradients only). The frozen image encoder runs forward only.
    XLA's own count is not used: it counts a scanned layer once, not once per layer.
    """
    d = bb.dims
    b, seq_len = batch.kv_valid.shape
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    per_token = d.num_layers * (d.hidden_size * (q + 2 * kv) + q * d.hidden_size
                                + 3 * d.hidden_size * d.intermediate_size) + d.hidden_size * d.vocab_size
    fwd = b * seq_len * (2 * per_token + 2 * d.num_layers * d.hidden_size * seq_len)
    llm = fwd * (3.0 if tcfg.finetune == "full" else 2.0)
    return float(llm + (bb.image_flops(batch.images) if batch.images is not None else 0.0))


def tree_bytes_per_device(tree, shardings) -> int:
    """Bytes the most loaded device holds of a sharded tree (shard shape x itemsize, summed per device)."""
    per_device: dict = {}
    for leaf, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings), strict=True):
        nbytes = int(np.prod(s.shard_shape(tuple(leaf.shape)))) * jnp.dtype(leaf.dtype).itemsize
        for dev in s.device_set:
            per_device[dev.id] = per_device.get(dev.id, 0) + nbytes
    return max(per_device.values(), default=0)

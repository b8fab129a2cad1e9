"""The sharded train step: LoRA or full fine-tuning of the LLM on the IVT-LR latent loss, for any backbone."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ivtlr_jax import sharding as sh
from ivtlr_jax.latent import IGNORE, LatentBatch, LatentConfig, latent_loss
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.base import Backbone
from ivtlr_jax.models.layers import LayerWrapper, identity
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.lora import apply_lora
from ivtlr_jax.train.remat import layer_wrapper, vision_wrapper


@struct.dataclass
class TrainState:
    step: Any  # () int32: optimiser updates taken
    trainable: Any  # LoRA adapters, or the params tree with only the trainable leaves (None elsewhere), float32
    opt_state: Any
    rng: Any
    accum: Any = None  # grad_accum > 1: the update's GradAccum so far (between updates), else None


@struct.dataclass
class GradAccum:
    """The micro-steps of one optimiser update so far: summed token-loss gradients, loss and labelled tokens."""

    grads: Any  # like `trainable`, float32: sum over micro-steps of d(sum of token losses)
    loss: Any  # () float32: sum of token losses
    tokens: Any  # () float32: labelled tokens
    micro: Any  # () int32: micro-steps taken in this update


def compute_dtype(tcfg: TrainConfig, platform: str | None = None):
    """bfloat16 on accelerators, float32 on CPU, unless the config names one."""
    if tcfg.compute_dtype != "auto":
        return jnp.dtype(tcfg.compute_dtype)
    platform = platform or jax.devices()[0].platform
    return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)


def make_optimizer(tcfg: TrainConfig, total_steps: int):
    """AdamW with global-norm clipping, optional warmup and decay, stepped once per optimiser update (the train
    step accumulates `grad_accum` micro-steps itself, see `make_train_step`)."""
    opt = tcfg.optimizer
    total = max(int(total_steps), 1)
    warm = min(opt.warmup_steps, total)
    if opt.schedule == "constant":
        main = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(opt.lr, max(total - warm, 1))
    else:
        main = optax.linear_schedule(opt.lr, 0.0, max(total - warm, 1))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warm), main], [warm]) if warm else main
    tx = optax.chain(
        optax.clip_by_global_norm(opt.clip),
        optax.adamw(schedule, b1=opt.beta1, b2=opt.beta2, weight_decay=opt.weight_decay),
    )
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
        lora = tcfg.lora
        dropout = lora.dropout if key is not None else 0.0
        return apply_lora(cast_params(spec, frozen, dtype), trainable, lora.meta.scale, dropout, key)
    return cast_params(spec, combine(spec, trainable, frozen), dtype)


def batch_loss(bb: Backbone, params, lcfg: LatentConfig, batch: LatentBatch, remat: LayerWrapper = identity,
               attention: str | ly.AttentionSpec = "auto", vision_remat: LayerWrapper = identity):
    """Mean cross-entropy of one (device) batch, the decoder layers under `remat` and the image encoder's blocks
    under `vision_remat` (it runs forward only: it is frozen); `attention` a name or the mesh's AttentionSpec."""
    return latent_loss(bb, params, lcfg, batch, remat, attention, vision_remat)


def micro_batch_size(tcfg: TrainConfig, processes: int = 1, data_parallel: int = 1) -> int:
    """Rows of one micro-step: batch_size (rows per optimiser update) / grad_accum; ValueError (one line) when
    it does not split evenly over the processes and the mesh's data-parallel devices."""
    if tcfg.batch_size % tcfg.grad_accum:
        raise ValueError(f"batch_size={tcfg.batch_size} (rows per optimiser update) does not divide into "
                         f"grad_accum={tcfg.grad_accum} micro-steps; use a batch_size that is a multiple of it")
    micro = tcfg.batch_size // tcfg.grad_accum
    need = np.lcm(processes, data_parallel)
    if micro % need:
        raise ValueError(f"a micro-step of batch_size/grad_accum = {tcfg.batch_size}/{tcfg.grad_accum} = {micro} "
                         f"rows does not divide over {processes} process(es) and {data_parallel} data-parallel "
                         f"device(s); make batch_size/grad_accum a multiple of {need}")
    return micro


def labelled_tokens(labels):
    """Tokens the loss counts: positions whose next token is labelled (as in `cross_entropy`)."""
    return jnp.sum(labels[:, 1:] != IGNORE).astype(jnp.float32)


def make_train_step(bb: Backbone, lcfg: LatentConfig, tcfg: TrainConfig, tx, schedule, dtype, unroll: bool = False,
                    attention: str | ly.AttentionSpec | None = None):
    """(state, frozen, micro-batch) -> (new state, metrics): one micro-step; every `grad_accum`-th applies the update.

    The update is the gradient of the mean token loss over all rows of its micro-steps: each micro-step adds
    the gradient of its summed token losses, and the update divides by the labelled tokens of them all, so
    grad_accum micro-steps equal one step over the same rows. One function for every n (static in the batch).
    `metrics` hold the update's loss (over its micro-steps so far), its gradient norm and learning rate.
    `unroll` (multi-process CPU runs, see `layers.loop_scan`): every loop the step traces is unrolled, and the
    update is selected instead of branched to. `attention`: the AttentionSpec of the mesh the step is compiled
    for (`build_train_step` makes it); None: `tcfg.attention`, resolved for the default backend (one device).
    """
    accumulate = tcfg.grad_accum > 1
    remat = layer_wrapper(tcfg.remat, bb.dims, unroll)  # "auto" resolved by the decoder's size
    vision_remat = vision_wrapper(unroll)
    attention = tcfg.attention if attention is None else attention

    def loss_fn(trainable, frozen, batch, key):
        params = assemble_params(bb, trainable, frozen, tcfg, dtype, key)
        return batch_loss(bb, params, lcfg, batch, remat, attention, vision_remat)

    def summed_loss(trainable, frozen, batch, key):
        tokens = labelled_tokens(batch.labels)
        return loss_fn(trainable, frozen, batch, key) * tokens, tokens

    def apply(state: TrainState, grads, loss, tokens):
        grads = jax.tree.map(lambda g: g / jnp.maximum(tokens, 1.0), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss / jnp.maximum(tokens, 1.0), "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    def step(state: TrainState, frozen, batch: LatentBatch):
        rng, key = jax.random.split(state.rng)
        (loss, tokens), grads = jax.value_and_grad(summed_loss, has_aux=True)(state.trainable, frozen, batch, key)
        state = state.replace(rng=rng)
        if not accumulate:
            return apply(state, grads, loss, tokens)
        acc = state.accum
        acc = GradAccum(jax.tree.map(jnp.add, acc.grads, grads), acc.loss + loss, acc.tokens + tokens, acc.micro + 1)

        def update(_):
            new, metrics = apply(state, acc.grads, acc.loss, acc.tokens)
            return new.replace(accum=empty_accum(state.trainable)), metrics

        def wait(_):
            metrics = {"loss": acc.loss / jnp.maximum(acc.tokens, 1.0), "grad_norm": jnp.zeros((), jnp.float32),
                       "lr": schedule(state.step)}
            return state.replace(accum=acc), metrics

        if unroll:  # no conditional either: both branches, selected
            apply_now = acc.micro == tcfg.grad_accum
            return jax.tree.map(lambda u, w: jnp.where(apply_now, u, w), update(None), wait(None))
        return jax.lax.cond(acc.micro == tcfg.grad_accum, update, wait, None)

    step.loss_fn = loss_fn  # (trainable, frozen, batch, key) -> loss: what the step differentiates
    return step


def empty_accum(trainable) -> GradAccum:
    """A GradAccum with nothing accumulated (zeros like the trainable leaves)."""
    return GradAccum(jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32),
                     jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))


def build_train_step(bb: Backbone, lcfg: LatentConfig, tcfg: TrainConfig, tx, schedule, dtype, layout, mesh,
                     unroll: bool = False):
    """The sharded, jitted train step the trainer runs and the dry run compiles: one builder for both.

    `layout` is the run's `StateLayout` (state and frozen shardings); the state is donated. The attention
    implementation is resolved for `mesh`'s devices (auto on TPU: the splash kernel under shard_map on it).
    `unroll`: see `make_train_step` (the run's setup decides it, `setup.unrolled_loops`).
    """
    attention = ly.attention_spec(tcfg.attention, dtype, bb.dims.head_dim, mesh)
    fn = make_train_step(bb, lcfg, tcfg, tx, schedule, dtype, unroll, attention)
    return jax.jit(fn, in_shardings=(layout.state_shardings, layout.frozen_shardings, None),
                   out_shardings=(layout.state_shardings, sh.replicated(mesh)), donate_argnums=(0,))


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

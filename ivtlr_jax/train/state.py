"""Train state born sharded: frozen params, trainable params or LoRA adapters and optimiser state are made
directly on the mesh (read shard by shard from a checkpoint, or by `jax.jit(..., out_shardings=...)`).

`state_layout` gives the abstract layout (ShapeDtypeStructs with shardings) of a run; the dry run reports
from it and `create_train_state` materialises exactly it, so the dry run's figures are what the run gets.
While the state is created, every new live array is sampled per device (`DeviceBytes`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ivtlr_jax import sharding as sh
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import adapter_spec as make_adapter_spec
from ivtlr_jax.models.base import Backbone
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.lora import init_lora
from ivtlr_jax.train.step import GradAccum, TrainState, empty_accum, tree_bytes_per_device


@dataclasses.dataclass
class StateLayout:
    """Abstract frozen params and TrainState (ShapeDtypeStructs carrying their shardings)."""

    frozen: object
    state: TrainState
    adapter_spec: object | None  # LoRA: the adapters' spec

    @property
    def frozen_shardings(self):
        return jax.tree.map(lambda s: s.sharding, self.frozen)

    @property
    def state_shardings(self):
        return jax.tree.map(lambda s: s.sharding, self.state)

    def report(self) -> dict:
        """Bytes of the train state (trainable params or adapters + optimiser state + step/rng), from shardings."""
        return {
            "state_bytes_total": int(sum(np.prod(s.shape) * jnp.dtype(s.dtype).itemsize
                                         for s in jax.tree_util.tree_leaves(self.state))),
            "state_bytes_per_device": tree_bytes_per_device(self.state, self.state_shardings),
            "trainable_bytes_per_device": tree_bytes_per_device(self.state.trainable,
                                                                self.state_shardings.trainable),
            "optimizer_bytes_per_device": tree_bytes_per_device(self.state.opt_state,
                                                                self.state_shardings.opt_state),
            "frozen_bytes_per_device": tree_bytes_per_device(self.frozen, self.frozen_shardings),
        }


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def state_layout(bb: Backbone, tcfg: TrainConfig, mesh, tx, dtype) -> StateLayout:
    """Where every array of a run lives: frozen params in the compute dtype, trainable ones in float32."""
    spec = bb.param_spec()
    psh = sh.param_shardings(mesh, spec)
    rep = sh.replicated(mesh)
    if tcfg.finetune == "lora":
        frozen = jax.tree.map(lambda i, s: _sds(i.shape, i.leaf_dtype(dtype), s), spec, psh, is_leaf=sp.is_info)
        adapter_spec = make_adapter_spec(spec, tcfg.lora.r)
        ash = sh.param_shardings(mesh, adapter_spec)
        trainable = jax.tree.map(lambda i, s: _sds(i.shape, jnp.float32, s), adapter_spec, ash, is_leaf=sp.is_info)
    else:
        adapter_spec = None
        frozen = jax.tree.map(lambda i, s: None if i.trainable else _sds(i.shape, i.leaf_dtype(dtype), s),
                              spec, psh, is_leaf=sp.is_info)
        trainable = jax.tree.map(lambda i, s: _sds(i.shape, jnp.float32, s) if i.trainable else None,
                                 spec, psh, is_leaf=sp.is_info)
    opt = jax.eval_shape(tx.init, trainable)
    tsh = jax.tree.map(lambda s: s.sharding, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, tsh, transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: x is None)
    opt = jax.tree.map(lambda s, shd: _sds(s.shape, s.dtype, shd), opt, opt_sh)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    accum = None
    if tcfg.grad_accum > 1:  # the update's gradient sum, sharded like the trainable leaves
        accum = GradAccum(trainable, _sds((), jnp.float32, rep), _sds((), jnp.float32, rep), _sds((), jnp.int32, rep))
    state = TrainState(_sds((), jnp.int32, rep), trainable, opt, _sds(key.shape, key.dtype, rep), accum)
    return StateLayout(frozen, state, adapter_spec)


class DeviceBytes:
    """The most bytes of new live arrays any one local device held, sampled after each creation step."""

    def __init__(self):
        self.before = {id(a) for a in jax.live_arrays()}
        self.excluded: set[int] = set()
        self.peak = 0

    def exclude(self, tree) -> None:
        self.excluded.update(id(x) for x in jax.tree_util.tree_leaves(tree))

    def sample(self) -> int:
        per_device: dict[int, int] = {}
        for a in jax.live_arrays():
            if id(a) in self.before or id(a) in self.excluded or a.is_deleted():
                continue
            nbytes = int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
            for dev in a.sharding.addressable_devices:
                per_device[dev.id] = per_device.get(dev.id, 0) + nbytes
        self.peak = max(self.peak, max(per_device.values(), default=0))
        return self.peak


def _restore_params(ckpt_dir: str, spec, targets, subdir: str | None = None):
    """Read the non-None leaves of `targets` (spec-shaped) from a checkpoint's params/ (or `subdir`), shard by shard."""
    from ivtlr_jax.convert.checkpoint import restore_sharded

    return restore_sharded(ckpt_dir, spec, targets, subdir)


def _init_params(spec, targets, seed: int):
    """Random params (the spec's initializers) for the non-None leaves of `targets`, made on the mesh."""
    named = {n: t for n, t in sp.named_leaves(spec, targets).items() if t is not None}
    infos = dict(sp.infos(spec))

    def make(key):
        keys = jax.random.split(key, len(infos))
        return {n: sp.init_leaf(infos[n], keys[i], t.dtype) for i, n in enumerate(infos) if n in named
                for t in [named[n]]}

    out = jax.jit(make, out_shardings={n: t.sharding for n, t in named.items()})(jax.random.PRNGKey(seed))
    return sp.from_named(spec, out)


def init_adapters(init_ckpt: str | None, tcfg: TrainConfig) -> dict | None:
    """The r/alpha/targets of LoRA adapters stored unmerged in the init checkpoint (an imported release with
    --keep-lora), which a LoRA run continues; None when it has none. Refuses a run they do not fit."""
    if init_ckpt is None:
        return None
    from ivtlr_jax.convert.checkpoint import read_lora_config

    meta = read_lora_config(init_ckpt)
    if meta is None:
        return None
    r, alpha = int(meta["r"]), float(meta["alpha"])
    if tcfg.finetune != "lora":
        raise ValueError(f"--init {init_ckpt!r} holds unmerged LoRA adapters (r={r}, alpha={alpha:g}, converted with "
                         f"--keep-lora); --finetune {tcfg.finetune} trains the merged weights: convert the release "
                         "again without --keep-lora, or continue the adapters with --finetune lora")
    if tcfg.lora_r != r or float(tcfg.lora_alpha) != alpha:
        raise ValueError(f"--init {init_ckpt!r} holds LoRA adapters with r={r}, alpha={alpha:g}, but this run has "
                         f"lora_r={tcfg.lora_r}, lora_alpha={tcfg.lora_alpha:g}: pass --lora-r {r} --lora-alpha "
                         f"{alpha:g} to continue them, or convert the release without --keep-lora to start new "
                         "adapters on the merged weights")
    return meta


def create_train_state(bb: Backbone, tcfg: TrainConfig, mesh, tx, dtype, init_ckpt: str | None, *,
                       restore_state=None) -> tuple[TrainState, object, dict, StateLayout]:
    """Frozen params and TrainState on the mesh, each device holding only its shards.

    init_ckpt None draws the params from the spec's initializers (benchmarks) instead of reading them.

    restore_state(layout.state) -> TrainState, when given, reads the whole state from a run checkpoint
    (resume) instead of creating it. Returns (state, frozen, report, layout); the report holds
    `state_bytes_total` and `state_peak_bytes_per_device` (measured) beside the layout's figures.
    """
    layout = state_layout(bb, tcfg, mesh, tx, dtype)
    spec = bb.param_spec()
    init_lora_meta = init_adapters(init_ckpt, tcfg) if restore_state is None else None
    monitor = DeviceBytes()
    read = (lambda targets: _restore_params(init_ckpt, spec, targets)) if init_ckpt is not None else \
        (lambda targets: _init_params(spec, targets, tcfg.seed))
    if tcfg.finetune == "lora" or restore_state is not None:
        frozen = read(layout.frozen)
        monitor.exclude(frozen)
        monitor.sample()
        trainable = None
    else:
        targets = jax.tree.map(lambda f, t: t if t is not None else f, layout.frozen, layout.state.trainable,
                               is_leaf=lambda x: x is None)
        params = read(targets)
        frozen = jax.tree.map(lambda i, x: None if i.trainable else x, spec, params, is_leaf=sp.is_info)
        trainable = jax.tree.map(lambda i, x: x if i.trainable else None, spec, params, is_leaf=sp.is_info)
        del params
        monitor.exclude(frozen)
        monitor.sample()
    if restore_state is not None:
        state = restore_state(layout.state)
        monitor.sample()
    else:
        rep = sh.replicated(mesh)
        if trainable is None and init_lora_meta is not None:  # the init checkpoint's adapters (--keep-lora import)
            from ivtlr_jax.convert.checkpoint import LORA_DIR

            trainable = _restore_params(init_ckpt, layout.adapter_spec, layout.state.trainable, subdir=LORA_DIR)
            monitor.sample()
        elif trainable is None:  # LoRA adapters, made on the mesh
            shardings = jax.tree.map(lambda s: s.sharding, layout.state.trainable)
            trainable = jax.jit(lambda k: init_lora(spec, tcfg.lora.r, k), out_shardings=shardings)(
                jax.random.PRNGKey(tcfg.seed + 1))
            monitor.sample()
        opt_sh = jax.tree.map(lambda s: s.sharding, layout.state.opt_state)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
        monitor.sample()
        step = jax.device_put(jnp.zeros((), jnp.int32), rep)
        rng = jax.device_put(jax.random.PRNGKey(tcfg.seed), rep)
        accum = None
        if layout.state.accum is not None:
            accum_sh = jax.tree.map(lambda s: s.sharding, layout.state.accum)
            accum = jax.jit(empty_accum, out_shardings=accum_sh)(trainable)
        state = TrainState(step, trainable, opt_state, rng, accum)
        monitor.sample()
    report = {**layout.report(), "state_peak_bytes_per_device": monitor.peak}
    return state, frozen, report, layout

"""Train state born sharded. One function makes a run's state (`TrainInit`: frozen params, and the TrainState of
trainable leaves or LoRA adapters, optimiser state, accumulator, step and rng); its layout is `jax.eval_shape` of it
with shardings from the spec table (`state_layout`, as MaxText's `get_abstract_state`); a start restores the state
or runs the init jitted with those out_shardings (`create_train_state`), the parameters read shard by shard from
--init (or drawn on the mesh). The dry run reports from the layout, so its figures are what the run gets; while
the state is created, every new live array is sampled per device (`DeviceBytes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ivtlr_jax import sharding as sh
from ivtlr_jax.convert.checkpoint import read_lora_meta
from ivtlr_jax.convert.load import load_params
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import LoRAMeta
from ivtlr_jax.models.adapters import adapter_spec as make_adapter_spec
from ivtlr_jax.models.base import Backbone
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.train.lora import init_lora
from ivtlr_jax.train.step import GradAccum, TrainState, empty_accum, split_params, tree_bytes_per_device


@dataclasses.dataclass(frozen=True, eq=False)
class TrainInit:
    """The one function that makes a run's state: `init(seed)` -> (frozen params, TrainState), every parameter drawn
    from the spec's initializers. A start that reads part of it calls its halves: `frozen(seed)` (no --init) and
    `state(seed, trainable)` over the trained leaves or adapters read from --init."""

    bb: Backbone
    tcfg: TrainConfig
    tx: Any
    dtype: Any

    @property
    def lora(self) -> bool:
        return self.tcfg.finetune == "lora"

    def params(self, seed):
        """Every parameter (key i of split(PRNGKey(seed)) for leaf i): in the compute dtype, the leaves full
        fine-tuning trains in float32."""
        leaves, treedef = jax.tree_util.tree_flatten(self.bb.param_spec(), is_leaf=sp.is_info)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        trained = lambda i: not self.lora and i.trainable
        return treedef.unflatten([sp.init_leaf(i, k, jnp.float32 if trained(i) else self.dtype)
                                  for i, k in zip(leaves, keys, strict=True)])

    def split(self, params):
        """(frozen, trainable): LoRA trains adapters beside all the params (trainable None: made by `state`)."""
        if self.lora:
            return params, None
        trainable, frozen = split_params(self.bb.param_spec(), params, "full")
        return frozen, trainable

    def frozen(self, seed):
        """The frozen params alone (a start without --init draws them on the mesh)."""
        return self.split(self.params(seed))[0]

    def state(self, seed, trainable=None) -> TrainState:
        """The TrainState over `trainable` (None: drawn; LoRA adapters from PRNGKey(seed + 1), A as PEFT, B zero)."""
        if trainable is None:
            trainable = init_lora(self.bb.param_spec(), self.tcfg.lora.r, jax.random.PRNGKey(seed + 1)) \
                if self.lora else self.split(self.params(seed))[1]
        accum = empty_accum(trainable) if self.tcfg.grad_accum > 1 else None
        return TrainState(jnp.zeros((), jnp.int32), trainable, self.tx.init(trainable), jax.random.PRNGKey(seed),
                          accum)

    def __call__(self, seed):
        frozen, trainable = self.split(self.params(seed))
        return frozen, self.state(seed, trainable)


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


def _placed(tree, shardings):
    """The ShapeDtypeStructs of `tree` (None leaves allowed) with the shardings at the same places of `shardings`."""
    return jax.tree.map(lambda s, x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shardings, tree, is_leaf=lambda x: x is None)


def state_layout(bb: Backbone, tcfg: TrainConfig, mesh, tx, dtype) -> StateLayout:
    """Where every array of a run lives: `jax.eval_shape` of the run's `TrainInit`, placed by the spec table (params
    and adapters by their logical axes, optimiser state like the leaves it follows, the rest replicated)."""
    frozen, state = jax.eval_shape(TrainInit(bb, tcfg, tx, dtype), tcfg.seed)
    spec = bb.param_spec()
    adapter_spec = make_adapter_spec(spec, tcfg.lora.r) if tcfg.finetune == "lora" else None
    rep = sh.replicated(mesh)
    trainable_sh = jax.tree.map(lambda s, x: None if x is None else s, sh.param_shardings(mesh, adapter_spec or spec),
                                state.trainable, is_leaf=lambda x: x is None)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, state.opt_state, trainable_sh,
                                   transform_non_params=lambda _: rep, is_leaf=lambda x: x is None)
    accum_sh = None if state.accum is None else GradAccum(trainable_sh, rep, rep, rep)
    state_sh = TrainState(rep, trainable_sh, opt_sh, rep, accum_sh)
    return StateLayout(_placed(frozen, sh.param_shardings(mesh, spec)), _placed(state, state_sh), adapter_spec)


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


def check_init_adapters(meta: LoRAMeta | None, init_ckpt: str, tcfg: TrainConfig) -> None:
    """Refuse a run that the unmerged LoRA adapters of --init (an imported release with --keep-lora) do not fit; a
    LoRA run with the same r and alpha continues them."""
    if meta is None:
        return
    r, alpha = meta.r, meta.alpha
    if tcfg.finetune != "lora":
        raise ValueError(f"--init {init_ckpt!r} holds unmerged LoRA adapters (r={r}, alpha={alpha:g}, converted with "
                         f"--keep-lora); --finetune {tcfg.finetune} trains the merged weights: convert the release "
                         "again without --keep-lora, or continue the adapters with --finetune lora")
    if tcfg.lora.meta != meta:
        raise ValueError(f"--init {init_ckpt!r} holds LoRA adapters with r={r}, alpha={alpha:g}, but this run has "
                         f"lora_r={tcfg.lora_r}, lora_alpha={tcfg.lora_alpha:g}: pass --lora-r {r} --lora-alpha "
                         f"{alpha:g} to continue them, or convert the release without --keep-lora to start new "
                         "adapters on the merged weights")


def read_init(init: TrainInit, layout: StateLayout, mesh, init_ckpt: str | None, resuming: bool):
    """(frozen params, trainable part or None) of a start, on the mesh: read shard by shard from --init (the trained
    leaves too in full fine-tuning, the adapters of a --keep-lora import in LoRA), or the frozen params drawn (no
    --init: benchmarks). Resuming, only the frozen params are read (the run checkpoint holds the rest)."""
    if init_ckpt is None:
        return jax.jit(init.frozen, out_shardings=layout.frozen_shardings)(init.tcfg.seed), None
    meta = None if resuming else read_lora_meta(init_ckpt, init.bb)
    check_init_adapters(meta, init_ckpt, init.tcfg)
    targets = layout.frozen
    if not (init.lora or resuming):  # and the leaves full fine-tuning trains
        targets = jax.tree.map(lambda f, t: t if t is not None else f, layout.frozen, layout.state.trainable,
                               is_leaf=lambda x: x is None)
    loaded = load_params(init_ckpt, mesh=mesh, targets=targets, lora="keep" if meta is not None else "base")
    if init.lora or resuming:
        return loaded.params, loaded.adapters
    return init.split(loaded.params)


def create_train_state(bb: Backbone, tcfg: TrainConfig, mesh, tx, dtype, init_ckpt: str | None, *,
                       restore_state=None) -> tuple[TrainState, object, dict, StateLayout]:
    """Frozen params and TrainState on the mesh, each device holding only its shards: the parameters from
    `read_init`, then the state restored or made by the run's init jitted with the layout's out_shardings (the
    trainable part read from --init donated to it).

    restore_state(layout.state) -> TrainState, when given, reads the whole state from a run checkpoint (resume).
    Returns (state, frozen, report, layout); the report holds the layout's figures and
    `state_peak_bytes_per_device` (measured).
    """
    init = TrainInit(bb, tcfg, tx, dtype)
    layout = state_layout(bb, tcfg, mesh, tx, dtype)
    monitor = DeviceBytes()
    frozen, trainable = read_init(init, layout, mesh, init_ckpt, resuming=restore_state is not None)
    monitor.exclude(frozen)
    monitor.sample()
    if restore_state is not None:
        state = restore_state(layout.state)
    else:
        make = jax.jit(init.state, out_shardings=layout.state_shardings, donate_argnums=(1,))
        state = make(tcfg.seed, trainable)
        del trainable
    monitor.sample()
    return state, frozen, {**layout.report(), "state_peak_bytes_per_device": monitor.peak}, layout

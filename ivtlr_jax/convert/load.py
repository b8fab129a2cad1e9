"""The one way a checkpoint folder's parameters are read (`load_params`): by IVTLRModel.from_pretrained, the trainer's
--init, --merge-lora and --to-hf. Each leaf is read from the orbax store as it is wanted, shard by shard onto a
mesh or whole onto the host; unmerged LoRA adapters are folded in by the one rule (`adapters.fold_adapters`) or
handed back beside the base weights."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.config import check_dtype
from ivtlr_jax.convert.checkpoint import (
    check_stored,
    load_config,
    orbax_checkpointer,
    read_lora_meta,
)
from ivtlr_jax.convert.layout import LORA_DIR, PARAMS_DIR
from ivtlr_jax.models import backbone_for
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import LoRAMeta, adapter_spec, fold_adapters

LORA_MODES = ("merge", "keep", "base")  # folded in; kept beside the base weights; left unread


@dataclasses.dataclass
class LoadedParams:
    """A checkpoint folder's config and parameters, and its unmerged adapters' record (and, kept, the adapters)."""

    config: Any
    params: Any  # the backbone's typed tree: jax.Arrays where the targets have shardings, else numpy arrays
    lora: LoRAMeta | None = None  # None: the folder has no unmerged adapters
    adapters: Any = None  # lora="keep": the adapters (float32), on the params' mesh or the host


def spec_targets(spec, mesh, dtype_of: Callable):
    """ShapeDtypeStructs of a spec tree (params or adapters), each leaf in `dtype_of(info)`, on `mesh` in the
    training layout (`sharding.param_shardings`; mesh None: on the host, no sharding)."""
    shardings = sh.param_shardings(mesh, spec) if mesh is not None else sp.map_spec(lambda _: None, spec)
    return jax.tree.map(lambda i, s: jax.ShapeDtypeStruct(i.shape, dtype_of(i), sharding=s), spec, shardings,
                        is_leaf=sp.is_info)


def abstract_params(bb, mesh, dtype, lora_float32: bool = False):
    """The backbone's params on `mesh` (None: the host) in `dtype` except the leaves the spec pins; lora_float32:
    the LoRA target kernels in float32 (to fold into)."""
    return spec_targets(bb.param_spec(), mesh,
                        lambda i: np.dtype(np.float32) if lora_float32 and i.lora else i.leaf_dtype(dtype))


def read_tree(folder: str, spec, targets, prefix: tuple[str, ...] = ()):
    """The non-None leaves of `targets` (ShapeDtypeStructs shaped like `spec`) read from an orbax tree folder (under
    `prefix`), cast to the target dtype on read: a jax.Array of which each device reads only its own shard where the
    target has a sharding, else a numpy array on the host. None leaves are not read (orbax partial restore)."""
    import orbax.checkpoint as ocp

    wanted = {n: t for n, t in sp.named_leaves(spec, targets).items() if t is not None}

    def restore_args(t):
        if t.sharding is not None:
            return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=t.sharding, dtype=t.dtype,
                                        global_shape=t.shape)
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype)

    at = lambda name: "/".join((*prefix, name))
    item = sp.nest({at(n): 0 for n in wanted})
    args = sp.nest({at(n): restore_args(t) for n, t in wanted.items()})
    restored = orbax_checkpointer().restore(os.path.abspath(folder), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
    for key in prefix:
        restored = restored[key]
    return sp.from_named(spec, sp.unnest(restored, wanted))


def _as_stored(spec, stored: dict, mesh):
    """Every leaf as stored (dtype and shape from the folder's metadata), on `mesh` in the training layout or the
    host."""
    shardings = sp.named_leaves(spec, sh.param_shardings(mesh, spec)) if mesh is not None else {}
    return sp.from_named(spec, {n: jax.ShapeDtypeStruct(shape, dt, sharding=shardings.get(n))
                                for n, (shape, dt) in stored.items()})


def _unfolded(spec, targets, stored: dict):
    """`targets` with the LoRA target kernels read to fold into: float32 on devices, as stored on the host."""
    def one(name, info, t):
        if t is None or not info.lora:
            return t
        return jax.ShapeDtypeStruct(t.shape, np.float32 if t.sharding is not None else stored[name][1],
                                    sharding=t.sharding)

    named = sp.named_leaves(spec, targets)
    return sp.from_named(spec, {n: one(n, i, named[n]) for n, i in sp.infos(spec)})


def _fold(spec, params, adapters, meta: LoRAMeta, targets):
    """params with the adapters folded in, each kernel in its target's dtype: in place on the host, or on the
    devices in one jitted call that donates the unfolded params."""
    named = sp.named_leaves(spec, targets)
    dtype = next(named[n].dtype for n, i in sp.infos(spec) if i.lora)  # every LoRA kernel's (load_params checks)
    if all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params)):
        return fold_adapters(params, adapters, meta.scale, dtype, in_place=True)
    fold = functools.partial(fold_adapters, scale=meta.scale, dtype=dtype)
    out_shardings = jax.tree.map(lambda t: t.sharding, targets)
    return jax.jit(fold, out_shardings=out_shardings, donate_argnums=(0,))(params, adapters)


def _read_adapters(ckpt_dir: str, bb, meta: LoRAMeta, mesh):
    """A folder's unmerged adapters in float32, on `mesh` in the training layout or on the host."""
    aspec = adapter_spec(bb.param_spec(), meta.r)
    folder = os.path.join(ckpt_dir, LORA_DIR)
    check_stored(aspec, folder, what=f"LoRA adapters in {ckpt_dir!r}")
    return read_tree(folder, aspec, spec_targets(aspec, mesh, lambda _: np.dtype(np.float32)))


def load_params(ckpt_dir: str, mesh=None, targets=None, lora: str = "merge", dtype: str | None = None,
                sample: Callable[[], Any] | None = None) -> LoadedParams:
    """The parameters of a checkpoint folder (CKPT_DIR), read leaf by leaf and, on a mesh, shard by shard.

    targets: ShapeDtypeStructs shaped like the backbone's spec (None leaves are not read); a target with a
    sharding is read as a jax.Array on it, one without onto the host as numpy. Default: every leaf in `dtype`
    (None: as stored) except the leaves the spec pins, on `mesh` in the training layout (`abstract_params`) or
    on the host (mesh None). A folder with unmerged LoRA adapters gives its weights with them folded in (lora=
    "merge", float32 arithmetic), its base weights and the adapters beside them ("keep"), or its base weights
    alone ("base"). `sample` is called after each set of arrays is made (the caller's memory probe).
    """
    if lora not in LORA_MODES:
        raise ValueError(f"lora={lora!r} is not valid; use one of {list(LORA_MODES)}")
    ckpt_dir = os.path.abspath(ckpt_dir)
    sample = sample or (lambda: None)
    cfg = load_config(ckpt_dir)
    bb = backbone_for(cfg)
    spec = bb.param_spec()
    stored = check_stored(spec, os.path.join(ckpt_dir, PARAMS_DIR), what=f"params in {ckpt_dir!r}")
    if targets is None:
        targets = _as_stored(spec, stored, mesh) if dtype is None else abstract_params(bb, mesh, check_dtype(dtype))
    meta = read_lora_meta(ckpt_dir, bb)
    merge = meta is not None and lora == "merge"
    named = sp.named_leaves(spec, targets)
    if merge and any(named[n] is None for n, i in sp.infos(spec) if i.lora):
        raise ValueError(f"{ckpt_dir!r} holds unmerged LoRA adapters: lora='merge' folds them into every LoRA target "
                         "kernel, so `targets` must name them all; or pass lora='keep' or 'base'")
    params = read_tree(os.path.join(ckpt_dir, PARAMS_DIR), spec, _unfolded(spec, targets, stored) if merge else
                       targets)
    sample()
    adapters = None
    if meta is not None and lora != "base":
        adapters = _read_adapters(ckpt_dir, bb, meta, mesh)
        sample()
    if merge:
        params = _fold(spec, params, adapters, meta, targets)
        adapters = None
        sample()
    return LoadedParams(cfg, params, meta, adapters)

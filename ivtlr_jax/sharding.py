"""Device meshes named after hardware, one logical-axis rules table, and global batches from per-host slices.

A mesh has the axes ("data", "fsdp", "tensor"). Every parameter dimension carries a logical name (in
the backbone's spec table); `LOGICAL_RULES` maps logical names to mesh axes; `logical_to_sharding` turns
the two into `NamedSharding`s, leaving a dimension replicated where its size does not divide.
CPU devices may stand in for any preset (tests use XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ivtlr_jax.models import spec as sp

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the leading (batch) axis of activations and inputs is split over these


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A named hardware layout: how many devices on how many hosts, and the mesh axis sizes.

    `num_devices=None` means "all devices found" (the `fsdp` size -1 takes the rest);
    `num_hosts=None` means any host count; `platform=None` means any platform.
    """

    name: str
    num_devices: int | None
    num_hosts: int | None
    platform: str | None
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    description: str = ""

    def axis_sizes(self, num_devices: int) -> dict[str, int]:
        """Mesh axis sizes for `num_devices` devices; a size of -1 takes what the others leave."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        known = math.prod(s for s in sizes.values() if s != -1)
        for axis, size in sizes.items():
            if size == -1:
                sizes[axis] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(
                f"preset {self.name!r}: axis sizes {sizes} do not multiply to {num_devices} devices"
            )
        return sizes

    def needs(self) -> str:
        devices = "all devices" if self.num_devices is None else _plural(self.num_devices, "device")
        hosts = "" if self.num_hosts is None else f" on {_plural(self.num_hosts, 'host')}"
        platform = f" ({self.platform})" if self.platform else ""
        return f"{devices}{hosts}{platform}"


PRESETS: dict[str, MeshPreset] = {
    p.name: p
    for p in (
        MeshPreset("cpu", 1, 1, "cpu", description="one CPU device (the first one, however many are simulated)"),
        MeshPreset("gpu_1", 1, 1, "gpu", description="one GPU"),
        MeshPreset("gpu_8", 8, 1, "gpu", fsdp=8, description="8 GPUs on one host, FSDP over all"),
        MeshPreset("tpu_v4_8", 4, 1, "tpu", fsdp=4, description="TPU v4-8: 4 chips, one host, FSDP over all"),
        MeshPreset("tpu_v4_32", 16, 4, "tpu", fsdp=16, description="TPU v4-32: 16 chips on 4 hosts, FSDP over all"),
        MeshPreset("tpu_v5e_8", 8, 1, "tpu", fsdp=8, description="TPU v5e-8: 8 chips, one host, FSDP over all"),
        MeshPreset("auto", None, None, None, fsdp=-1, description="FSDP over every device found"),
    )
}

# Logical axis name -> mesh axes (a tuple, split over in order) or None (replicated).
LOGICAL_RULES: dict[str | None, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "layers": None,  # the stacked-layer axis is scanned over, never sharded
    "vision_embed": ("fsdp",),
    "vision_mlp": ("tensor",),
    "vision_heads": ("tensor",),
    "patch": None,
    "norm": None,
    "lora_rank": None,
    None: None,
}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def get_preset(preset: str | MeshPreset) -> MeshPreset:
    """Look a preset up by name (a MeshPreset passes through)."""
    if isinstance(preset, MeshPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"--mesh={preset!r} is not a preset; use one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _platform_matches(wanted: str | None, found: str) -> bool:
    if wanted is None or found == "cpu":  # CPU devices stand in for anything (simulated meshes in tests)
        return True
    if wanted == "gpu":
        return found in ("gpu", "cuda", "rocm")
    return wanted == found


def _suggest(num_devices: int, num_hosts: int, platform: str) -> str:
    fits = [
        p.name for p in PRESETS.values()
        if p.num_devices == num_devices and p.num_hosts in (None, num_hosts) and _platform_matches(p.platform, platform)
    ]
    return "use --mesh=auto" + (f" or --mesh={' / '.join(fits)}" if fits else "")


def make_mesh(preset: str | MeshPreset, devices: Sequence[Any] | None = None) -> Mesh:
    """Build the ("data", "fsdp", "tensor") mesh of a preset after checking the devices against it.

    `devices` defaults to all devices (for the `cpu` preset: the first CPU device).
    Raises ValueError naming the preset, what it needs and what was found.
    """
    p = get_preset(preset)
    if devices is None:
        devices = jax.devices("cpu")[:1] if p.name == "cpu" else jax.devices()
    devices = list(devices)
    if not devices:
        raise ValueError(f"preset {p.name!r}: no devices given")
    platform = devices[0].platform
    num_hosts = len({d.process_index for d in devices})
    found = f"{_plural(len(devices), platform + ' device')} on {_plural(num_hosts, 'host')}"
    problem = None
    if not _platform_matches(p.platform, platform):
        problem = f"is for {p.platform} devices"
    elif p.num_devices is not None and len(devices) != p.num_devices:
        problem = f"needs {p.needs()}"
    elif p.num_hosts is not None and num_hosts != p.num_hosts and not (platform == "cpu" and num_hosts == 1):
        problem = f"needs {p.needs()}"  # one CPU process may simulate several hosts
    if problem:
        raise ValueError(f"preset {p.name!r} {problem}; found {found}; {_suggest(len(devices), num_hosts, platform)}")
    sizes = p.axis_sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # topology-aware placement refused a subset
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=types)


def describe(mesh: Mesh) -> str:
    """One line for logs: axis sizes, devices and hosts."""
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    first = mesh.devices.flat[0]
    hosts = len({d.process_index for d in mesh.devices.flat})
    return (f"mesh {axes} | {_plural(mesh.devices.size, first.platform + ' device')} on "
            f"{_plural(hosts, 'host')} (process {jax.process_index()} of {jax.process_count()})")


def maybe_initialize_distributed(preset: str | MeshPreset, **kwargs) -> bool:
    """Call `jax.distributed.initialize(**kwargs)` for presets with more than one host, once.

    Must run before anything else touches JAX's devices. Single-host presets (and `auto`) never
    initialise; a second call is a no-op. Returns True when this call initialised.
    """
    p = get_preset(preset)
    if p.num_hosts is None or p.num_hosts <= 1 or jax.distributed.is_initialized():
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # no cluster detected: the device check in make_mesh reports what was found
        logger.warning("preset %r spans %d hosts but jax.distributed.initialize() failed (%s); "
                       "continuing as a single process", p.name, p.num_hosts, e)
        return False
    logger.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True


# ---------------------------------------------------------------------------------------- parameters
def _shape_of(x) -> tuple[int, ...]:
    if isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x):
        return tuple(int(d) for d in x)
    return tuple(np.shape(x))


def _is_logical(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(e, (str, tuple, type(None))) for e in x)


def logical_to_spec(logical: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for one array: each logical name through LOGICAL_RULES.

    A dimension's logical name may be a tuple of names: their mesh axes in turn (e.g. a LoRA factor's
    ("heads", "embed") is split over tensor, then fsdp). A mesh axis is used at most once per array
    (first dimension wins); mesh axes of size 1 are
    dropped; where `shape` is given, a dimension keeps the longest prefix of its mesh axes whose
    product divides its size (none: replicated).
    """
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"logical axes {tuple(logical)} have rank {len(logical)} but the shape is {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, entry in enumerate(logical):
        axes = []
        for name in entry if isinstance(entry, tuple) else (entry,):
            if name not in LOGICAL_RULES:
                raise ValueError(f"logical axis {name!r} is not in LOGICAL_RULES; known: "
                                 f"{sorted(map(str, LOGICAL_RULES))}")
            axes += [a for a in (LOGICAL_RULES[name] or ()) if a in mesh.shape and a not in used
                     and mesh.shape[a] > 1 and a not in axes]
        if shape is not None:
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_to_sharding(mesh: Mesh, logical_tree, shapes_tree=None):
    """A NamedSharding for every leaf of a tree of logical-axis tuples (any tree: params, LoRA, batch).

    `shapes_tree` (same structure; leaves shape tuples, arrays or ShapeDtypeStructs) enables the
    divisibility fallback: a dimension that does not divide by its mesh axes stays replicated.
    """
    if shapes_tree is None:
        return jax.tree.map(lambda lg: NamedSharding(mesh, logical_to_spec(lg, mesh)), logical_tree,
                            is_leaf=_is_logical)
    return jax.tree.map(lambda lg, s: NamedSharding(mesh, logical_to_spec(lg, mesh, _shape_of(s))),
                        logical_tree, shapes_tree, is_leaf=_is_logical)


def param_shardings(mesh: Mesh, spec):
    """NamedShardings for every leaf of a spec tree (ParamInfo leaves: the backbone's params or adapters)."""
    return sp.map_spec(lambda i: NamedSharding(mesh, logical_to_spec(i.axes, mesh, i.shape)), spec)


# ---------------------------------------------------------------------------------------- batches
def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int | None = None) -> NamedSharding:
    """Leading axis split over the data axes ("data", "fsdp"), the rest replicated.

    With `batch_size`, data axes that do not divide it are dropped (all of them: replicated).
    """
    if ndim == 0:
        return replicated(mesh)
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh, shape))


def host_batch_to_global(mesh: Mesh, local_batch):
    """Global arrays from this host's slice of a batch pytree (every leaf batch-leading), split over the data axes.

    With several processes each host passes its own rows; the global batch is their concatenation in
    process order.
    """
    nproc = jax.process_count()
    leaves = jax.tree_util.tree_leaves(local_batch)
    sizes = {np.shape(v)[0] for v in leaves}
    if len(sizes) > 1:
        raise ValueError(f"batch leaves disagree on the leading (batch) size: {sorted(sizes)}")

    def place(value):
        value = np.asarray(value)
        global_shape = (value.shape[0] * nproc,) + value.shape[1:]
        sharding = batch_sharding(mesh, value.ndim, global_shape[0])
        if nproc > 1 and sharding.spec == PartitionSpec():
            raise ValueError(f"global batch {global_shape[0]} does not divide over the data axes "
                             f"{dict((a, mesh.shape[a]) for a in BATCH_AXES if a in mesh.shape)}; "
                             "use a per-host batch size that does")
        return jax.make_array_from_process_local_data(sharding, value, global_shape)

    return jax.tree.map(place, local_batch)


def batch_shardings(mesh: Mesh, batch):
    """The shardings `host_batch_to_global` gives a batch pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda v: batch_sharding(mesh, len(v.shape), v.shape[0]), batch)

"""Device meshes named after hardware, one logical-axis rules table, and global batches from per-host slices.

A mesh has the axes ("data", "fsdp", "tensor"). Every parameter dimension carries a logical name
(`param_logical_axes`); `LOGICAL_RULES` maps logical names to mesh axes; `logical_to_sharding` turns
the two into `NamedSharding`s, leaving a dimension replicated where its size does not divide.
CPU devices may stand in for any preset (tests use XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ivtlr_jax.config import ModelConfig

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the leading (batch) axis of activations and inputs is split over these
DEFAULT_REPLICATE_KEYS = ("pixel_values", "image_grid_thw")  # batch keys whose leading axis is not the batch


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
def param_logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names for every parameter, the same tree as `layout.param_shapes(cfg)`."""
    L = "layers"
    vision = {
        "patch_embed": {"kernel": ("patch", "vision_embed")},
        "blocks": {
            "norm1": {"scale": (L, "norm"), "bias": (L, "norm")},
            "norm2": {"scale": (L, "norm"), "bias": (L, "norm")},
            "qkv": {"kernel": (L, "vision_embed", "vision_heads"), "bias": (L, "vision_heads")},
            "proj": {"kernel": (L, "vision_heads", "vision_embed"), "bias": (L, "norm")},
            "fc1": {"kernel": (L, "vision_embed", "vision_mlp"), "bias": (L, "vision_mlp")},
            "fc2": {"kernel": (L, "vision_mlp", "vision_embed"), "bias": (L, "norm")},
        },
        "merger": {
            "ln_q": {"scale": ("norm",), "bias": ("norm",)},
            "fc1": {"kernel": ("vision_embed", "vision_mlp"), "bias": ("vision_mlp",)},
            "fc2": {"kernel": ("vision_mlp", "embed"), "bias": ("norm",)},
        },
    }
    llm = {
        "embed": ("vocab", "embed"),
        "layers": {
            "input_norm": (L, "norm"),
            "post_attn_norm": (L, "norm"),
            "q": {"kernel": (L, "embed", "heads"), "bias": (L, "heads")},
            "k": {"kernel": (L, "embed", "kv_heads"), "bias": (L, "kv_heads")},
            "v": {"kernel": (L, "embed", "kv_heads"), "bias": (L, "kv_heads")},
            "o": {"kernel": (L, "heads", "embed")},
            "gate": {"kernel": (L, "embed", "mlp")},
            "up": {"kernel": (L, "embed", "mlp")},
            "down": {"kernel": (L, "mlp", "embed")},
        },
        "norm": ("norm",),
    }
    if not cfg.tie_word_embeddings:
        llm["lm_head"] = ("embed", "vocab")
    return {"vision": vision, "llm": llm}


# Base kernel (input, output) logical axes of the modules LoRA may target.
_KERNEL_AXES = {
    "q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"), "o": ("heads", "embed"),
    "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed"),
    "qkv": ("vision_embed", "vision_heads"), "proj": ("vision_heads", "vision_embed"),
    "fc1": ("vision_embed", "vision_mlp"), "fc2": ("vision_mlp", "vision_embed"),
}
_LORA_A = re.compile(r"(^|_)a$", re.IGNORECASE)
_LORA_B = re.compile(r"(^|_)b$", re.IGNORECASE)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shape_of(x) -> tuple[int, ...]:
    if isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x):
        return tuple(int(d) for d in x)
    return tuple(np.shape(x))


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x)


def lora_logical_axes(lora_tree) -> Any:
    """Logical axes for a LoRA tree (leaves: arrays, ShapeDtypeStructs or shape tuples).

    A leaf whose key ends in `a`/`lora_a` under a target module (q, k, v, o, gate, up, down, ...)
    gets ([layers,] <module input axis>, "lora_rank"); one ending in `b`/`lora_b` gets
    ([layers,] "lora_rank", <module output axis>). A leading stacked-layer axis is "layers".
    Anything else is replicated.
    """

    def axes(path, leaf):
        names = [_key_name(k) for k in path]
        rank = len(_shape_of(leaf))
        module = next((n for n in reversed(names[:-1]) if n in _KERNEL_AXES), None)
        last = names[-1] if names else ""
        if module is None or rank < 2:
            return (None,) * rank
        kin, kout = _KERNEL_AXES[module]
        lead = ("layers",) * (rank - 2)
        if _LORA_A.search(last):
            return (*lead, kin, "lora_rank")
        if _LORA_B.search(last):
            return (*lead, "lora_rank", kout)
        return (None,) * rank

    return jax.tree_util.tree_map_with_path(axes, lora_tree, is_leaf=_is_shape)


def _is_logical(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x)


def logical_to_spec(logical: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for one array: each logical name through LOGICAL_RULES.

    A mesh axis is used at most once per array (first dimension wins); mesh axes of size 1 are
    dropped; where `shape` is given, a dimension keeps the longest prefix of its mesh axes whose
    product divides its size (none: replicated).
    """
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"logical axes {tuple(logical)} have rank {len(logical)} but the shape is {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical):
        if name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} is not in LOGICAL_RULES; known: {sorted(map(str, LOGICAL_RULES))}")
        axes = [a for a in (LOGICAL_RULES[name] or ()) if a in mesh.shape and a not in used and mesh.shape[a] > 1]
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


def param_shardings(mesh: Mesh, cfg: ModelConfig):
    """NamedShardings for the full parameter tree of `cfg` (layout.param_shapes)."""
    from ivtlr_jax.models.layout import param_shapes

    return logical_to_sharding(mesh, param_logical_axes(cfg), param_shapes(cfg))


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


def _gather_replicated(key: str, value: np.ndarray) -> np.ndarray:
    """Concatenate a per-host array over hosts (host order) so every host holds the same whole array."""
    from jax.experimental import multihost_utils

    shapes = np.asarray(multihost_utils.process_allgather(np.asarray(value.shape, np.int64)))
    if not (shapes == shapes[0]).all():
        raise ValueError(f"batch key {key!r}: hosts hold different shapes {shapes.tolist()}; "
                         "a replicated key must have the same shape on every host (pad it)")
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def host_batch_to_global(mesh: Mesh, local_batch: Mapping[str, np.ndarray],
                         replicate_keys: Sequence[str] = DEFAULT_REPLICATE_KEYS) -> dict[str, jax.Array]:
    """Global arrays from this host's slice of the batch (leading axis), split over the data axes.

    Keys in `replicate_keys` and 0-d values are replicated on every device; with several
    processes, replicated keys are concatenated over hosts in process order and scalars must agree.
    """
    nproc = jax.process_count()
    sizes = {k: np.shape(v)[0] for k, v in local_batch.items() if k not in replicate_keys and np.ndim(v) > 0}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch keys disagree on the leading (batch) size: {sizes}; "
                         "pass keys whose leading axis is not the batch in replicate_keys")
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if key in replicate_keys or value.ndim == 0:
            if nproc > 1 and key in replicate_keys:
                value = _gather_replicated(key, value)
            out[key] = jax.make_array_from_process_local_data(replicated(mesh), value, value.shape)
            continue
        global_shape = (value.shape[0] * nproc,) + value.shape[1:]
        sharding = batch_sharding(mesh, value.ndim, global_shape[0])
        if nproc > 1 and sharding.spec == PartitionSpec():
            raise ValueError(f"batch key {key!r}: global batch {global_shape[0]} does not divide over the "
                             f"data axes {dict((a, mesh.shape[a]) for a in BATCH_AXES if a in mesh.shape)}; "
                             "use a per-host batch size that does")
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out

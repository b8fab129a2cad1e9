"""Device meshes named after hardware, one logical-axis rules table, and global batches from per-host slices.

A mesh has the axes ("data", "fsdp", "tensor"). Every parameter dimension carries a logical name (in
the backbone's spec table); `LOGICAL_RULES` maps logical names to mesh axes; `logical_to_spec` turns
an array's names into a PartitionSpec (`param_shardings`: NamedShardings for a spec table), leaving a dimension
replicated where its size does not divide.
CPU devices may stand in for any preset (tests use XLA_FLAGS=--xla_force_host_platform_device_count=N).
A TPU preset also names its slice's topology: with libtpu installed, `compile_target` builds its mesh from
compile-only TPU devices (the whole pod, from one process on any machine) for XLA:TPU to compile for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# XLA flags the GPU presets set (before JAX starts its backend; a flag already in XLA_FLAGS keeps its value).
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # schedule async copies/collectives to overlap compute
    "--xla_gpu_enable_triton_gemm=false",  # GEMMs on cuBLAS/cuBLASLt (no Triton GEMM autotuning at compile time)
)
MULTI_GPU_XLA_FLAGS = GPU_XLA_FLAGS + (
    "--xla_gpu_enable_highest_priority_async_stream=true",  # collectives on the high-priority stream
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",  # FSDP: fewer, larger all-gathers ...
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",  # ... and reduce-scatters (128 MiB)
)
BATCH_AXES = ("data", "fsdp")  # the leading (batch) axis of activations and inputs is split over these
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """A TPU generation: the device kind JAX reports, HBM and peak dense bfloat16 FLOP/s per chip, and the
    `chip_config_name` its topologies take ("megacore": one device per chip of two TensorCores)."""

    name: str
    device_kind: str
    hbm_bytes: int
    peak_flops: float
    chip_config: str = "default"


TPU_CHIPS: dict[str, TpuChip] = {
    c.name: c
    for c in (
        TpuChip("v4", "TPU v4", 32 * GIB, 275e12, "megacore"),
        TpuChip("v5e", "TPU v5 lite", 16 * GIB, 197e12),
        TpuChip("v5p", "TPU v5", 95 * GIB, 459e12, "megacore"),
        TpuChip("v6e", "TPU v6 lite", 32 * GIB, 918e12),
    )
}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """A TPU slice as libtpu names it (`jax.experimental.topologies.get_topology_desc` builds its compile-only
    devices from these): the chip, the topology ("v4:2x2x1") and the chips of one host along each axis."""

    chip: TpuChip
    name: str
    chips_per_host: tuple[int, int, int]

    def devices(self) -> list:
        """The slice's compile-only devices (every host's, each with its `process_index`); needs libtpu, which
        one process at a time may hold."""
        from jax.experimental import topologies

        try:
            with _quiet_stderr():  # libtpu's start-up warnings about the TPU VM it is not running on
                desc = topologies.get_topology_desc(
                    topology_name=self.name, platform="tpu", chip_config_name=self.chip.chip_config,
                    chips_per_host_bounds=self.chips_per_host, num_slices=1)
        except RuntimeError as e:
            if "lockfile" in str(e):
                named = re.search(r"/\S*libtpu_lockfile", str(e))
                raise ValueError(f"another process holds libtpu ({named.group(0) if named else 'its lock file'}): "
                                 "only one process at a time can compile for TPU; wait until it ends, or use "
                                 "--compiler cpu (a JAX process on a machine without TPU, started with "
                                 "JAX_PLATFORMS unset and without importing ivtlr_jax, holds it too)") from None
            raise
        return list(desc.devices)


TPU_EXTRA = "pip install -e '.[tpu]'"  # libtpu at the version jax[tpu] pins for the installed jax


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null inside (what libtpu's C++ writes there never passes through Python)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A named hardware layout: how many devices on how many hosts, and the mesh axis sizes.

    `num_devices=None` means "all devices found" (the `fsdp` size -1 takes the rest);
    `num_hosts=None` means any host count; `platform=None` means any platform. A TPU preset's `topology`
    serves only compiling for it from elsewhere (`compile_target`); on its own TPUs the devices found are used.
    """

    name: str
    num_devices: int | None
    num_hosts: int | None
    platform: str | None
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    description: str = ""
    # set by `apply_xla_flags` before the backend starts. The CPU flags every preset needs on CPU devices
    # (ivtlr_jax.CPU_XLA_FLAGS) are set by `import ivtlr_jax`, before this module can run.
    xla_flags: tuple[str, ...] = ()
    topology: TpuTopology | None = None

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


def _tpu(name: str, chips: int, hosts: int, chip: str, topology: str, chips_per_host: tuple[int, int, int]):
    """A TPU slice's preset (named tpu_<Cloud TPU's name>): FSDP over all its chips."""
    where = "one host" if hosts == 1 else f"{hosts} hosts"
    return MeshPreset(name, chips, hosts, "tpu", fsdp=chips,
                      description=f"TPU {name[4:].replace('_', '-')}: {chips} chips on {where}, FSDP over all",
                      topology=TpuTopology(TPU_CHIPS[chip], topology, chips_per_host))


PRESETS: dict[str, MeshPreset] = {
    p.name: p
    for p in (
        MeshPreset("cpu", 1, 1, "cpu", description="one CPU device (the first one, however many are simulated)"),
        MeshPreset("gpu_1", 1, 1, "gpu", description="one GPU", xla_flags=GPU_XLA_FLAGS),
        MeshPreset("gpu_8", 8, 1, "gpu", fsdp=8, description="8 GPUs on one host, FSDP over all",
                   xla_flags=MULTI_GPU_XLA_FLAGS),
        _tpu("tpu_v4_8", 4, 1, "v4", "v4:2x2x1", (2, 2, 1)),
        _tpu("tpu_v4_32", 16, 4, "v4", "v4:2x2x4", (2, 2, 1)),
        _tpu("tpu_v4_64", 32, 8, "v4", "v4:2x4x4", (2, 2, 1)),
        _tpu("tpu_v5e_8", 8, 1, "v5e", "v5e:2x4", (2, 4, 1)),
        _tpu("tpu_v5e_32", 32, 8, "v5e", "v5e:4x8", (2, 2, 1)),
        _tpu("tpu_v5p_8", 4, 1, "v5p", "v5p:2x2x1", (2, 2, 1)),
        _tpu("tpu_v6e_8", 8, 1, "v6e", "v6e:2x4", (2, 4, 1)),
        MeshPreset("auto", None, None, None, fsdp=-1, description="FSDP over every device found",
                   xla_flags=GPU_XLA_FLAGS),  # GPU-only flags: without effect on CPU and TPU
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
        raise ValueError(f"--mesh={preset!r} is not a preset; use one of {sorted(PRESETS)} (--mesh list describes "
                         "them)")
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
    elif p.num_hosts is not None and num_hosts != p.num_hosts and platform != "cpu":
        problem = f"needs {p.needs()}"  # CPU processes stand in for any host layout (simulated pods in tests)
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


def format_presets() -> str:
    """The presets as a table (`--mesh list`): devices, hosts, mesh axes and, for TPU slices, the topology, HBM and
    peak bfloat16 FLOP/s per chip."""
    rows = [("preset", "devices", "hosts", "mesh", "topology", "HBM/chip", "peak/chip", "description")]
    for p in PRESETS.values():
        axes = " ".join(f"{a}={'rest' if n == -1 else n}" for a, n in (("data", p.data), ("fsdp", p.fsdp),
                                                                       ("tensor", p.tensor)) if n != 1)
        chip = p.topology.chip if p.topology else None
        rows.append((p.name, "all" if p.num_devices is None else str(p.num_devices),
                     "any" if p.num_hosts is None else str(p.num_hosts), axes or "-",
                     p.topology.name if p.topology else "-", f"{chip.hbm_bytes / GIB:.0f} GiB" if chip else "-",
                     f"{chip.peak_flops / 1e12:.0f} TFLOP/s" if chip else "-", p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + [f"With libtpu ({TPU_EXTRA}) a TPU preset's --dry-run compiles with XLA:TPU for its "
                              "topology, on any machine."])


# ---------------------------------------------------------------------------------------- compiling for a preset
COMPILERS = ("auto", "tpu", "cpu")


def libtpu_installed() -> bool:
    """Whether libtpu (XLA:TPU) can be imported here."""
    return importlib.util.find_spec("libtpu") is not None


def resolve_compiler(compiler: str, preset: str | MeshPreset) -> str:
    """"tpu" or "cpu": what compiles a dry run for the preset. auto: XLA:TPU for a TPU preset when libtpu is
    installed, else XLA:CPU on simulated CPU devices. ValueError (one line) for a choice that cannot be honoured."""
    p = get_preset(preset)
    if compiler not in COMPILERS:
        raise ValueError(f"--compiler {compiler!r} is not valid; use one of {', '.join(COMPILERS)}")
    if compiler == "cpu":
        return "cpu"
    if p.topology is None:
        if compiler == "tpu":
            tpus = ", ".join(n for n, q in PRESETS.items() if q.topology)
            raise ValueError(f"--compiler tpu: --mesh {p.name} is not a TPU slice; use one of {tpus}, "
                             "or --compiler cpu")
        return "cpu"
    if libtpu_installed():
        return "tpu"
    if compiler == "tpu":
        raise ValueError(f"--compiler tpu needs libtpu, which is not installed: {TPU_EXTRA} (the tpu extra), "
                         "or --compiler cpu")
    logger.warning("--mesh %s: compiling with XLA:CPU on simulated devices, as libtpu is not installed (%s compiles "
                   "with XLA:TPU for the preset's topology)", p.name, TPU_EXTRA)
    return "cpu"


@dataclasses.dataclass(frozen=True)
class CompileTarget:
    """What a dry run compiles for and with: the preset's mesh and the compiler ("xla:tpu" on compile-only devices
    of the preset's topology, else "xla:<platform>" on this machine's devices), its version and the topology."""

    preset: MeshPreset
    mesh: Mesh
    compiler: str
    compiler_version: str
    topology: str | None = None

    @property
    def platform(self) -> str:
        """The platform of the devices compiled for (what "auto" choices resolve by)."""
        return self.mesh.devices.flat[0].platform

    @property
    def hbm_bytes(self) -> int | None:
        """HBM per chip of the preset's TPU (None where unknown: CPU and GPU presets)."""
        return self.preset.topology.chip.hbm_bytes if self.preset.topology else None

    @property
    def peak_flops(self) -> float | None:
        """Peak bfloat16 FLOP/s per chip of the preset's TPU (None where unknown)."""
        return self.preset.topology.chip.peak_flops if self.preset.topology else None

    def describe(self) -> str:
        """One line: the mesh, its devices and where they are."""
        if self.topology is None:
            return describe(self.mesh)
        axes = " ".join(f"{name}={size}" for name, size in self.mesh.shape.items())
        hosts = len({d.process_index for d in self.mesh.devices.flat})
        kind = self.mesh.devices.flat[0].device_kind
        return (f"mesh {axes} | {_plural(self.mesh.devices.size, kind + ' chip')} on {_plural(hosts, 'host')} "
                f"(compile-only devices of topology {self.topology})")


def compile_target(preset: str | MeshPreset, compiler: str = "auto") -> CompileTarget:
    """The mesh to compile the preset's programs for (`resolve_compiler` picks XLA:TPU or XLA:CPU). XLA:TPU: the
    preset's mesh over its topology's compile-only devices, every host's (so a pod compiles whole, from one
    process). XLA:CPU: `make_mesh` on this machine's devices (`simulate_cpu_devices` before JAX starts)."""
    import jaxlib

    p = get_preset(preset)
    if resolve_compiler(compiler, p) == "tpu":
        from importlib.metadata import version

        mesh = make_mesh(p, p.topology.devices())
        return CompileTarget(p, mesh, "xla:tpu", f"libtpu {version('libtpu')}", p.topology.name)
    mesh = make_mesh(p)
    return CompileTarget(p, mesh, f"xla:{mesh.devices.flat[0].platform}", f"jaxlib {jaxlib.__version__}")


def xla_flags_for(preset: str | MeshPreset, existing: str = "") -> str:
    """`existing` XLA_FLAGS plus the preset's flags; a flag named in `existing` keeps the value given there."""
    have = {f.split("=", 1)[0] for f in existing.split()}
    extra = [f for f in get_preset(preset).xla_flags if f.split("=", 1)[0] not in have]
    return " ".join(existing.split() + extra)


def apply_xla_flags(preset: str | MeshPreset) -> str:
    """Put the preset's XLA flags into os.environ["XLA_FLAGS"]; returns the new value.

    XLA reads them when JAX starts its backend (the first device query), so call this before; after it
    the flags would be ignored, which is logged.
    """
    import os

    from jax._src import xla_bridge

    existing = os.environ.get("XLA_FLAGS", "")
    flags = xla_flags_for(preset, existing)
    added = [f for f in flags.split() if f not in existing.split()]
    if added and xla_bridge.backends_are_initialized():
        started = jax.default_backend()
        # another platform's flags (a GPU preset's on a CPU run) would be ignored anyway: no warning for them
        other = tuple(f"--xla_{p}_" for p in ("cpu", "gpu", "tpu") if p != started)
        late = [f for f in added if not f.startswith(other)]
        if late:
            logger.warning("preset %r: XLA flags set after JAX started its %s backend are ignored: %s",
                           get_preset(preset).name, started, " ".join(late))
    os.environ["XLA_FLAGS"] = flags
    return flags


def simulate_cpu_devices(preset: str | MeshPreset) -> None:
    """On a CPU-only host, ask XLA for the preset's device count (before JAX creates its backend), with the flags a
    program over several CPU devices needs (ivtlr_jax.CPU_XLA_FLAGS). A count already in XLA_FLAGS is kept."""
    import os

    import ivtlr_jax

    want = get_preset(preset).num_devices
    flags = os.environ.get("XLA_FLAGS", "")
    if want and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={want}".strip()
    if ivtlr_jax.simulated_cpu_devices() > 1:
        ivtlr_jax.use_multi_device_cpu_flags()


def joins_several_processes(preset: str | MeshPreset, num_processes: int | None = None) -> bool:
    """Whether `maybe_initialize_distributed` with these arguments joins (or tries to join) a multi-process run."""
    if num_processes is not None:
        return num_processes > 1
    hosts = get_preset(preset).num_hosts
    return hosts is not None and hosts > 1


def maybe_initialize_distributed(preset: str | MeshPreset, coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None,
                                 heartbeat_timeout_s: int | None = None, **kwargs) -> bool:
    """Join a multi-process run with `jax.distributed.initialize`, once; True when this call initialised.

    With `coordinator_address`, `num_processes` and `process_id` (all three) it joins that run; without
    them it lets JAX auto-detect the cluster (TPU pods, SLURM) only when the preset spans several hosts.
    Single-host presets without the three never initialise; a second call is a no-op. On CPU the
    cross-process collectives go over gloo (set before initialising). Must run before anything else
    touches JAX's devices.
    """
    p = get_preset(preset)
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    given = {k: v for k, v in explicit.items() if v is not None}
    if given and len(given) < 3:
        missing = ", ".join("--" + k.replace("_address", "").replace("_", "-") for k in explicit if k not in given)
        raise ValueError(f"a multi-process run needs --coordinator, --num-processes and --process-id together; "
                         f"missing {missing}")
    if given:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} with --num-processes {num_processes}: "
                             f"need 0 <= process id < number of processes")
        if ":" not in coordinator_address:
            raise ValueError(f"--coordinator {coordinator_address!r} must be HOST:PORT, e.g. 10.0.0.2:8476")
    if jax.distributed.is_initialized() or (given and num_processes == 1):
        return False
    if not given and (p.num_hosts is None or p.num_hosts <= 1):
        return False
    platforms = str(jax.config.jax_platforms or "cpu")
    if "cpu" in platforms.split(","):  # CPU processes (simulated hosts) exchange collectives over gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        import ivtlr_jax

        ivtlr_jax.use_multi_device_cpu_flags()  # a program over several processes' CPU devices (see CPU_XLA_FLAGS)
    if heartbeat_timeout_s is not None:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
    try:
        jax.distributed.initialize(**given, **kwargs)
    except ValueError as e:
        if given:
            raise ValueError(f"could not join the run at --coordinator {coordinator_address}: {e}") from None
        # no cluster detected: the device check in make_mesh reports what was found
        logger.warning("preset %r spans %d hosts but jax.distributed.initialize() found no cluster (%s); "
                       "continuing as a single process", p.name, p.num_hosts, e)
        return False
    logger.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True


# ---------------------------------------------------------------------------------------- parameters
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


def param_shardings(mesh: Mesh, spec):
    """NamedShardings for every leaf of a spec tree (ParamInfo leaves, each with its logical `axes` and `shape`: the
    backbone's params or adapters). A ParamInfo is not a pytree node, so it is a leaf here without naming its
    class: this module is the floor under `models/` and imports none of it."""
    return jax.tree.map(lambda i: NamedSharding(mesh, logical_to_spec(i.axes, mesh, i.shape)), spec)


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


# ---------------------------------------------------------------------------------------- inference
CACHE_AXES = ("layers", "batch", "length", "kv_heads", None)  # KVCache k/v: (layers, batch, max_len, kv_heads, hd)


def cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """A KV cache array's layout: batch over the data axes, kv heads over tensor (replicated where not dividing)."""
    return NamedSharding(mesh, logical_to_spec(CACHE_AXES, mesh, tuple(shape)))


def constrain_cache(cache, mesh: Mesh | None):
    """Inside jit: the cache's arrays constrained to `cache_sharding` (no-op without a mesh)."""
    if mesh is None:
        return cache
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, cache_sharding(mesh, x.shape)), cache)


def put_batch(mesh: Mesh, batch):
    """Host arrays of one process's batch pytree onto the mesh, each leaf's leading axis split over the data axes
    (replicated where its size does not divide them, as `batch_sharding`); scalars replicated."""
    def place(value):
        value = np.asarray(value)
        return jax.device_put(value, batch_sharding(mesh, value.ndim, value.shape[0] if value.ndim else None))

    return jax.tree.map(place, batch)

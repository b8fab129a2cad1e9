"""ivtlr_jax: IVT-LR (interleaved vision-text latent reasoning) in JAX/Flax.

`IVTLRModel`, `LatentConfig` (ivtlr_jax.latent) and `TrainConfig` (ivtlr_jax.train.config) are imported lazily
so that light subpackages (e.g. `ivtlr_jax.data`) do not pull in JAX.
"""

import os as _os

__all__ = ["IVTLRModel", "LatentConfig", "TrainConfig"]

# XLA:CPU's concurrency-optimised scheduler lets the devices of one sharded program reach independent all-gathers
# in different orders, each waiting at its own rendezvous until XLA aborts (a train step on 2 CPU devices hung in
# about 2 runs of 5). Only a program over several CPU devices has such collectives, so the flag is set only there:
# here, at import, when XLA_FLAGS (or JAX_NUM_CPU_DEVICES) asks for more than one CPU device (tests, launch_local's
# processes, a dry run's simulated devices), and by `sharding.maybe_initialize_distributed` before a CPU process
# joins others. A single-device CPU run keeps XLA's default scheduler (about 5% faster per train step). Without
# effect on GPU and TPU; a value in XLA_FLAGS wins.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def _add_xla_flags(flags) -> None:
    have = {f.split("=", 1)[0] for f in _os.environ.get("XLA_FLAGS", "").split()}
    extra = [f for f in flags if f.split("=", 1)[0] not in have]
    if extra:
        _os.environ["XLA_FLAGS"] = " ".join(_os.environ.get("XLA_FLAGS", "").split() + extra)


def simulated_cpu_devices() -> int:
    """CPU devices this process asks XLA for (XLA_FLAGS' --xla_force_host_platform_device_count, or
    JAX_NUM_CPU_DEVICES); 1 when neither is set."""
    count = 1
    for flag in _os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_force_host_platform_device_count="):
            try:
                count = int(flag.split("=", 1)[1])
            except ValueError:
                pass
    try:
        return max(count, int(_os.environ.get("JAX_NUM_CPU_DEVICES", "1")))
    except ValueError:
        return count


def use_multi_device_cpu_flags() -> None:
    """Set CPU_XLA_FLAGS (before JAX starts its backend): for programs whose collectives span several CPU devices."""
    _add_xla_flags(CPU_XLA_FLAGS)


if simulated_cpu_devices() > 1:
    use_multi_device_cpu_flags()


def tpu_attached() -> bool:
    """Whether this host has TPU chips (the device files libtpu opens: /dev/accel* on v2-v5e, /dev/vfio on v5p and
    later)."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def keep_libtpu_for_compiles() -> bool:
    """With libtpu installed (the tpu extra, for compiling for TPU topologies) on a host without TPU chips, JAX
    loads libtpu at its first device query, finds no chip, falls back to CPU, and keeps libtpu, and its lock file,
    until the process exits: a CPU training run would then stop any other process on the machine from compiling for
    TPU (and print libtpu's start-up warnings). So, when JAX_PLATFORMS is unset, no TPU is attached and no GPU
    plugin of JAX is installed, JAX_PLATFORMS is set to "cpu" here, before JAX starts its backend. Compile-only TPU
    devices (`jax.experimental.topologies`) do not depend on it. Returns whether it was set."""
    import importlib.util

    if _os.environ.get("JAX_PLATFORMS") or _os.environ.get("JAX_PLATFORM_NAME"):
        return False
    if importlib.util.find_spec("libtpu") is None or tpu_attached():
        return False
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                                                 "jax_rocm7_plugin")):
        return False
    _os.environ["JAX_PLATFORMS"] = "cpu"
    import sys

    if "jax" in sys.modules:  # jax read JAX_PLATFORMS at its import: tell its config (before its backend starts)
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


keep_libtpu_for_compiles()


def __getattr__(name):
    if name == "IVTLRModel":
        from ivtlr_jax.model import IVTLRModel

        return IVTLRModel
    if name == "LatentConfig":
        from ivtlr_jax.latent import LatentConfig

        return LatentConfig
    if name == "TrainConfig":
        from ivtlr_jax.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'ivtlr_jax' has no attribute {name!r}")

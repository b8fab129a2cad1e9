"""ivtlr_jax: IVT-LR (interleaved vision-text latent reasoning) in JAX/Flax.

`IVTLRModel`, `LatentConfig` (ivtlr_jax.latent) and `TrainConfig` (ivtlr_jax.train.config) are imported lazily
so that light subpackages (e.g. `ivtlr_jax.data`) do not pull in JAX.
"""

import os as _os

__all__ = ["IVTLRModel", "LatentConfig", "TrainConfig"]

# XLA:CPU's concurrency-optimised scheduler lets the devices of one sharded program reach independent all-gathers
# in different orders, each waiting at its own rendezvous until XLA aborts (a train step on 2 CPU devices hung in
# about 2 runs of 5). Set here, before JAX starts its backend, for every CPU run: the CLIs, the tests, their
# subprocesses and a user who imports the library. Without effect on GPU and TPU; a value in XLA_FLAGS wins.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def _add_xla_flags(flags) -> None:
    have = {f.split("=", 1)[0] for f in _os.environ.get("XLA_FLAGS", "").split()}
    extra = [f for f in flags if f.split("=", 1)[0] not in have]
    if extra:
        _os.environ["XLA_FLAGS"] = " ".join(_os.environ.get("XLA_FLAGS", "").split() + extra)


_add_xla_flags(CPU_XLA_FLAGS)


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

"""ivtlr_jax: IVT-LR (interleaved vision-text latent reasoning) in JAX/Flax.

`IVTLRModel` is imported lazily so that light subpackages (e.g. `ivtlr_jax.data`) do not pull in JAX.
"""

__all__ = ["IVTLRModel"]


def __getattr__(name):
    if name == "IVTLRModel":
        from ivtlr_jax.model import IVTLRModel

        return IVTLRModel
    raise AttributeError(f"module 'ivtlr_jax' has no attribute {name!r}")

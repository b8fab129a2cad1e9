import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The test models are tiny: XLA's compile time, not their run time, is most of the suite. The lowest LLVM
# optimisation level compiles CPU programs in about half the time (set before JAX starts its backend; the
# subprocesses the tests start inherit it).
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import ivtlr_jax  # noqa: E402,F401  (no JAX import) its CPU XLA flags into XLA_FLAGS before any test starts JAX


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(torch HF model, converted IVTLRModel) built once per session from the same saved folder."""
    from tiny import tiny_hf_model

    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.convert import convert_hf_to_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf_model(seed=0)
    hf.save_pretrained(root / "hf")
    convert_hf_to_checkpoint(str(root / "hf"), str(root / "ckpt"), dtype="float32")
    return hf, IVTLRModel.from_pretrained(str(root / "ckpt"), dtype="float32")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Training tests: synthetic data (24 train rows) and a small test YAML (tiny model, full fine-tuning, k=4);
    built once per test file (each file runs on one xdist worker)."""
    from train_cli import make_workdir

    return make_workdir(tmp_path_factory)

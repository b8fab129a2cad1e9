import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


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

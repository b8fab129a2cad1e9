"""Hugging Face / release files <-> ivtlr_jax weight conversion and the self-contained checkpoint folder."""

from ivtlr_jax.convert.checkpoint import check_params, save_checkpoint
from ivtlr_jax.convert.hf_to_jax import LATENT_TOKENS, convert_hf_to_checkpoint
from ivtlr_jax.convert.jax_to_hf import export_checkpoint_to_hf
from ivtlr_jax.convert.load import LoadedParams, load_params
from ivtlr_jax.convert.merge import export_run_checkpoint
from ivtlr_jax.convert.release import convert_release_to_checkpoint

__all__ = [
    "LATENT_TOKENS",
    "LoadedParams",
    "check_params",
    "convert_hf_to_checkpoint",
    "convert_release_to_checkpoint",
    "export_checkpoint_to_hf",
    "export_run_checkpoint",
    "load_params",
    "save_checkpoint",
]

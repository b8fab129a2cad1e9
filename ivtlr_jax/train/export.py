"""Turn a training checkpoint into a full model checkpoint (LoRA merged) that IVTLRModel loads."""

from __future__ import annotations


def export_trained_checkpoint(ckpt_path: str, dst: str, base: str | None = None, overwrite: bool = False,
                              verbose: bool = True) -> dict:
    """RUN_DIR/checkpoints/<step> (or stage_ends/<stage>) -> a self-contained CKPT_DIR at `dst`, reading only the
    parameters it writes (never the optimiser state): `convert.export_run_checkpoint`."""
    from ivtlr_jax.convert import export_run_checkpoint

    return export_run_checkpoint(ckpt_path, dst, base=base, overwrite=overwrite, verbose=verbose)

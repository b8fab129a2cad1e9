"""Run checkpoints with orbax: periodic ones (keep the last k, asynchronous) and one per finished stage."""

from __future__ import annotations

import json
import logging
import os

import jax

PERIODIC_DIR = "checkpoints"
STAGE_DIR = "stage_ends"


def _manager(path: str, keep: int | None, asynchronous: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True)
    return ocp.CheckpointManager(os.path.abspath(path), options=options)


def _args(state, meta):
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) for restoring into the layout of a live tree."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class RunCheckpoints:
    """RUN_DIR/checkpoints/<step> (every N steps, last k kept) and RUN_DIR/stage_ends/<stage> (all kept)."""

    def __init__(self, run_dir: str, keep: int = 3, asynchronous: bool = True):
        self.run_dir = run_dir
        self.periodic = _manager(os.path.join(run_dir, PERIODIC_DIR), keep, asynchronous)
        self.stages = _manager(os.path.join(run_dir, STAGE_DIR), None, asynchronous)

    def save(self, step: int, state, meta: dict, force: bool = True) -> None:
        self.periodic.save(step, args=_args(state, meta), force=force)

    def save_stage_end(self, stage: int, state, meta: dict) -> None:
        self.stages.save(stage, args=_args(state, meta), force=True)

    def latest_step(self) -> int | None:
        return self.periodic.latest_step()

    def finished_stages(self) -> list[int]:
        return list(self.stages.all_steps())

    def restore(self, step: int, like_state, stage: bool = False):
        """(state, meta) of a checkpoint, laid out like `like_state` (same shapes, dtypes, shardings)."""
        import orbax.checkpoint as ocp

        mngr = self.stages if stage else self.periodic
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(like_state)),
                                  meta=ocp.args.JsonRestore())
        out = mngr.restore(step, args=args)
        return out.state, out.meta

    def wait(self) -> None:
        self.periodic.wait_until_finished()
        self.stages.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.periodic.close()
        self.stages.close()


def read_checkpoint(path: str):
    """(state, meta) of one checkpoint step folder (RUN_DIR/checkpoints/<step> or stage_ends/<stage>)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "state")):
        raise ValueError(
            f"{path!r} is not a training checkpoint (no state/ inside); give RUN_DIR/checkpoints/<step> "
            "or RUN_DIR/stage_ends/<stage>"
        )
    ckptr = ocp.StandardCheckpointer()
    state_dir = os.path.join(path, "state")
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # StandardCheckpointer warns about a manager-level file it does not need
    try:
        meta = ckptr.metadata(state_dir)
    finally:
        absl_log.setLevel(level)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # any saving topology -> this host
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=local), tree)
    state = ckptr.restore(state_dir, target)
    with open(os.path.join(path, "meta", "metadata")) as f:
        return state, json.load(f)

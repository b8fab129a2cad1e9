"""Run checkpoints with orbax: periodic ones (keep the last k, asynchronous) and one per finished stage."""

from __future__ import annotations

import json
import logging
import os
import time

import jax

from ivtlr_jax.convert.layout import (
    META_FILE,
    META_ITEM,
    PERIODIC_DIR,
    STAGE_DIR,
    STATE_ITEM,
    UNREADABLE_DIR,
    complete_steps,
    run_checkpoint_dir,
)

logger = logging.getLogger("ivtlr_jax.train")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the ones already complete are intact."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint on disk cannot be read back (damaged, truncated, half-written)."""


def _first_line(error: BaseException) -> str:
    """The most telling one-line description of an error: an OSError in its chain if there is one."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            where = f": {e.filename}" if e.filename else ""
            return f"[Errno {e.errno}] {e.strerror}{where}"
        e = e.__cause__ or e.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _manager(path: str, keep: int | None, asynchronous: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(path), options=options)


def read_meta(path: str) -> dict:
    """The JSON meta of one checkpoint folder; UnreadableCheckpoint names the file and the error."""
    file = os.path.join(path, META_FILE)
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UnreadableCheckpoint(f"{file}: {_first_line(e)}") from None
    if not isinstance(meta, dict) or "stage" not in meta:
        raise UnreadableCheckpoint(f"{file}: not a training checkpoint's meta (no 'stage')")
    return meta


def _args(state, meta):
    import orbax.checkpoint as ocp

    return ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)})


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
        self._in_flight: dict[int, str] = {}  # id(manager) -> folder of the save still being written

    def path(self, step: int, stage: bool = False) -> str:
        return run_checkpoint_dir(self.run_dir, step, stage)

    def _write_failed(self, folder: str, error: BaseException) -> CheckpointWriteError:
        done = complete_steps(self.run_dir)
        kept = f"the complete checkpoints (latest: step {done[-1]}) are intact" if done else \
            "no complete checkpoint exists yet"
        return CheckpointWriteError(f"checkpoint {folder} could not be written ({_first_line(error)}); {kept}; "
                                    "free space (or fix the folder) and rerun with --resume")

    def _finish(self, mngr) -> None:
        """Wait for `mngr`'s save in flight; a failure of it becomes a CheckpointWriteError naming its folder."""
        folder = self._in_flight.pop(id(mngr), None)
        try:
            mngr.wait_until_finished()
            mngr.check_for_errors()
        except Exception as e:
            raise self._write_failed(folder or str(mngr.directory), e) from e

    def _save(self, mngr, step: int, folder: str, state, meta: dict) -> None:
        self._finish(mngr)
        try:
            mngr.save(step, args=_args(state, {"step": int(step), **meta}), force=True)
        except Exception as e:
            raise self._write_failed(folder, e) from e
        self._in_flight[id(mngr)] = folder

    def save(self, step: int, state, meta: dict) -> None:
        """Start writing RUN_DIR/checkpoints/<step> (asynchronously; errors surface at the next save or wait)."""
        self._save(self.periodic, step, self.path(step), state, meta)

    def save_stage_end(self, stage: int, state, meta: dict) -> None:
        """RUN_DIR/stage_ends/<stage>; one left by a run that stopped before its next periodic checkpoint (and
        was resumed from an earlier one) is replaced by the one trained again."""
        self._finish(self.stages)
        self.stages.reload()  # the steps on disk (all_steps(read=True) does the same, with a deprecation warning)
        if stage in self.stages.all_steps():
            logger.info("replacing %s (the stage was trained again after a resume)", self.path(stage, stage=True))
            self.stages.delete(stage)
        self._save(self.stages, stage, self.path(stage, stage=True), state, meta)

    def poll(self) -> None:
        """Raise CheckpointWriteError now if a save finished with an error (does not wait)."""
        for mngr in (self.periodic, self.stages):
            try:
                mngr.check_for_errors()
            except Exception as e:
                raise self._write_failed(self._in_flight.pop(id(mngr), str(mngr.directory)), e) from e

    def restore(self, step: int, like_state, stage: bool = False):
        """(state, meta) of a checkpoint, laid out like `like_state` (same shapes, dtypes, shardings).

        A checkpoint that cannot be read raises UnreadableCheckpoint naming its folder and the error.
        """
        import orbax.checkpoint as ocp

        folder = self.path(step, stage)
        meta = read_meta(folder)
        mngr = self.stages if stage else self.periodic
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_like(like_state))})
        try:
            out = mngr.restore(step, args=args)
        except Exception as e:
            raise UnreadableCheckpoint(f"{folder}: {_first_line(e)}") from e
        return out[STATE_ITEM], meta

    def set_aside(self, step: int) -> str:
        """Move a damaged periodic checkpoint out of the way (process 0) so its step can be written again."""
        src = self.path(step)
        dst = os.path.join(self.run_dir, UNREADABLE_DIR, f"checkpoint-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and os.path.isdir(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
        from ivtlr_jax.train.peers import barrier

        barrier(f"ivtlr_jax/set_aside/{step}")  # every process sees the folder gone before going on
        self.periodic.reload()
        return dst

    def wait(self) -> None:
        """Wait for the saves in flight; CheckpointWriteError if one failed."""
        errors = []
        for mngr in (self.periodic, self.stages):
            try:
                self._finish(mngr)
            except CheckpointWriteError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def close(self) -> None:
        self.wait()
        self.periodic.close()
        self.stages.close()

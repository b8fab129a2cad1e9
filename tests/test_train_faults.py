"""Training faults and run folders: damaged checkpoints, a full disk, one RUN_DIR used by several invocations,
one-line CLI errors, the batch prefetcher."""

import os

import pytest
from train_cli import (
    error_lines,
    losses,
    run_cli,
    train_config,
)


def _cli_losses(proc, out):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["step"]: r["loss"] for r in losses(out)}


def test_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes(workdir):
    """A truncated meta file, then a truncated state file, of the newest checkpoint: --resume says which step is
    unreadable, moves it aside, continues from the previous step and reproduces its losses."""
    root, cfg = workdir
    out = str(root / "damaged")
    base = ["--config", cfg, "--stage=0", "--out", out, "--save-every", "1"]
    first = _cli_losses(run_cli([*base, "--max-steps", "2"]), out)
    ckpts = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["1", "2"]
    open(os.path.join(ckpts, "2", "meta", "metadata"), "w").close()  # truncated: what a crash mid-write leaves

    proc = run_cli([*base, "--resume"])
    again = _cli_losses(proc, out)
    assert "checkpoint step 2 is unreadable" in proc.stderr and "Expecting value" in proc.stderr
    assert "resuming from step 1" in proc.stderr
    assert abs(again[2] - first[2]) <= 1e-6 * abs(first[2])  # step 2 trained again from step 1: the same loss
    assert sorted(os.listdir(ckpts)) == ["1", "2", "3"] and len(os.listdir(os.path.join(out, "unreadable"))) == 1
    state_files = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(ckpts, "3", "state")) for f in fs
                   if f == "_METADATA"]
    assert state_files
    open(state_files[0], "w").close()  # now the state of the newest one (at the end of stage 0)
    proc = run_cli(["--config", cfg, "--stages", "0-1", "--out", out, "--save-every", "1", "--resume",
                    "--max-steps", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 3 is unreadable" in proc.stderr and "resuming from step 2" in proc.stderr
    assert sorted(os.listdir(ckpts)) == ["1", "2", "3", "4"]
    assert len(os.listdir(os.path.join(out, "unreadable"))) == 2
    redone = [r for r in losses(out) if r["step"] == 3][-1]
    assert abs(redone["loss"] - again[3]) <= 1e-6 * abs(again[3])


DISK_FULL = """
import errno, os
from etils import epath
real = epath.Path.write_text
def full(self, *a, **k):  # the disk fills while checkpoint 2 is being written
    if "checkpoints/2.orbax-checkpoint-tmp" in str(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real(self, *a, **k)
epath.Path.write_text = full
"""


def test_disk_full_during_a_checkpoint_names_the_path_and_keeps_the_previous(workdir):
    from stored import read_checkpoint

    from ivtlr_jax.train.checkpoints import complete_steps

    root, cfg = workdir
    out = str(root / "disk_full")
    proc = run_cli(["--config", cfg, "--stage=0", "--out", out, "--save-every", "1", "--keep", "1",
                    "--max-steps", "3"], code=DISK_FULL)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: checkpoint "), lines[-5:]
    assert os.path.join(out, "checkpoints", "2") in lines[-1] and "No space left on device" in lines[-1]
    assert "latest: step 1) are intact" in lines[-1]
    assert complete_steps(out) == [1]  # kept although keep=1: the failed write never replaced it
    state, meta = read_checkpoint(os.path.join(out, "checkpoints", "1"))
    assert meta["step"] == 1 and int(state["step"]) == 1


def test_one_run_dir_used_by_several_invocations(workdir):
    """Checkpoint steps stay monotonic in one RUN_DIR; resumes refuse checkpoints of another stage or config; a
    stage without its previous one refuses a RUN_DIR holding another run's checkpoints (and otherwise says so
    first); --max-steps that leaves nothing to do says why."""
    import dataclasses

    from ivtlr_jax.train import plan_start
    from ivtlr_jax.train.checkpoints import complete_steps, read_meta

    root, cfg = workdir
    out = str(root / "reused")
    assert run_cli(["--config", cfg, "--stage=0", "--out", out, "--max-steps", "2"]).returncode == 0
    init = os.path.join(out, "init")
    tcfg = train_config(workdir, "reused", stages=(1,), init=init)
    with pytest.raises(ValueError, match=r"already holds checkpoints up to step 2 \(in stage 0\) and no finished "
                                         "stage 0.*--resume, or use a new --out"):
        plan_start(tcfg)
    with pytest.raises(ValueError, match=r"is in stage 0, but this run trains stage 1; finish stage 0 first"):
        plan_start(dataclasses.replace(tcfg, resume=True))
    proc = run_cli(["--config", cfg, "--stage=1", "--out", out, "--init", init])  # the same refusal, in one line
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert complete_steps(out) == [2]
    fresh = plan_start(dataclasses.replace(tcfg, out=str(root / "reused_fresh")))
    assert fresh.kind == "init" and "has no finished stage 0" in fresh.notice

    assert run_cli(["--config", cfg, "--stage=0", "--out", out, "--resume"]).returncode == 0  # finishes stage 0
    assert complete_steps(out) == [2, 3] and read_meta(os.path.join(out, "checkpoints", "3"))["stage"] == 1
    with pytest.raises(ValueError, match=r"--max-steps 3: this run starts at step 3 \(the end of stage 0\).*"
                                         "--max-steps 6 for 3 more"):
        plan_start(dataclasses.replace(tcfg, max_steps=3))
    proc = run_cli(["--config", cfg, "--stage=1", "--out", out, "--max-steps", "4"])  # from stage_ends/0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restored stage_end 0 (step 3)" in proc.stderr
    assert complete_steps(out) == [2, 3, 4] and read_meta(os.path.join(out, "checkpoints", "4"))["stage"] == 1
    with pytest.raises(ValueError, match=r"another config: lr 0.001 \(checkpoint\) vs 0.5 \(now\)"):
        plan_start(dataclasses.replace(tcfg, resume=True, lr=0.5))
    with pytest.raises(ValueError, match=r"past the end of stage 0 \(step 3\)"):
        plan_start(dataclasses.replace(tcfg, init=None))  # stage 1 again from stage_ends/0 would go back
    assert plan_start(dataclasses.replace(tcfg, resume=True)).at == 4


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(workdir):
    root, cfg = workdir
    args = ["--config", cfg, "--stage=0", "--data-source", str(root / "nowhere"), "--out", str(root / "bad_source")]
    proc = run_cli(args)
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(root / "nowhere") in lines[0]
    proc = run_cli([*args, "--debug"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_prefetcher_runs_ahead_keeps_order_forwards_errors_and_stops():
    import threading
    import time

    from ivtlr_jax.train.prefetch import Prefetcher

    made = []

    def prepare(x):
        made.append(x)
        return x * 10

    feed = Prefetcher(iter(range(100)), prepare, depth=2)
    assert next(feed) == 0
    time.sleep(0.3)
    assert len(made) == 4  # the one taken, two waiting in the queue, one blocked on the full queue: no more
    assert [next(feed) for _ in range(3)] == [10, 20, 30]
    feed.close()
    assert not any(t.name == "ivtlr-batch-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(feed)

    def failing():
        yield 1
        raise ValueError("row 7 has no image")

    feed = Prefetcher(failing(), lambda x: x, depth=2)
    assert next(feed) == 1
    with pytest.raises(ValueError, match="row 7 has no image"):
        next(feed)
    assert list(Prefetcher(iter([]), lambda x: x)) == []

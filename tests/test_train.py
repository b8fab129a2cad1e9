"""Training: sharded steps on simulated devices, LoRA/full parameter partitioning, resume, stages, NaN stop,
merge, SIGTERM."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from train_cli import (
    ROOT,
    cli_env,
    error_lines,
    losses,
    run_cli,
    train_config,
    trainable_of,
)


def test_sharded_steps_match_one_device_and_stage2_cli(workdir):
    """--stage=2 on tpu_v4_8 (4 devices) and gpu_8 (8 devices) equals the 1-device run: losses and params."""
    import jax

    root, cfg = workdir
    runs = {}
    for mesh, devices in (("cpu", None), ("tpu_v4_8", 4), ("gpu_8", 8)):
        out = str(root / f"mesh_{mesh}")
        proc = run_cli(["--config", cfg, "--stage=2", f"--mesh={mesh}", "--data", "synthetic", "--max-steps", "2",
                        "--out", out], devices)
        assert proc.returncode == 0, proc.stderr[-3000:]
        first = error_lines(proc.stderr)[0]  # stage 2 from --init in a new RUN_DIR: said before anything else
        assert first.startswith("note: ") and "no finished stage 1" in first, first
        runs[mesh] = out
    base = losses(runs["cpu"])
    assert [r["n_latent"] for r in base] == [2, 2]  # stage 2 batches carry 2 latent tokens
    p_base, meta = trainable_of(runs["cpu"], 2)
    assert meta["stage"] == 2
    for mesh in ("tpu_v4_8", "gpu_8"):
        other = losses(runs[mesh])
        np.testing.assert_allclose([r["loss"] for r in other], [r["loss"] for r in base], rtol=1e-5)
        p_other, _ = trainable_of(runs[mesh], 2)
        for a, b in zip(jax.tree_util.tree_leaves(p_base), jax.tree_util.tree_leaves(p_other), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_wrong_preset_is_a_clear_error(workdir):
    root, cfg = workdir
    proc = run_cli(["--config", cfg, "--stage=0", "--mesh=tpu_v4_8", "--max-steps", "1", "--out", str(root / "bad")])
    assert proc.returncode != 0
    assert "preset 'tpu_v4_8' needs 4 devices" in proc.stderr
    assert "Traceback" not in proc.stderr



def test_lora_trains_only_adapters_and_vision_is_frozen(workdir):
    import jax
    from stored import load_checkpoint

    from ivtlr_jax.models import spec as sp
    from ivtlr_jax.train import Trainer

    tcfg = train_config(workdir, "lora", finetune="lora", lora_r=4, lora_alpha=8, stages=(1,), max_steps=2, lr=1e-2)
    trainer = Trainer(tcfg)
    before = sp.flatten(jax.tree_util.tree_map(np.asarray, trainer.state.trainable))
    trainer.run()
    _, base = load_checkpoint(tcfg.init)
    frozen = jax.tree_util.tree_map(np.asarray, trainer.frozen)
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)  # base LLM and vision tower untouched
    after = sp.flatten(jax.tree_util.tree_map(np.asarray, trainer.state.trainable))
    targets = {f"llm/layers/{t}/{ab}" for t in ("q", "k", "v", "o", "gate", "up", "down") for ab in "ab"}
    assert set(after) == targets
    assert all(np.abs(after[n]).max() > 0 and np.abs(before[n]).max() == 0 for n in after if n.endswith("/b"))

    full = Trainer(train_config(workdir, "full", stages=(0,), max_steps=2))
    vision_before = jax.tree_util.tree_map(np.asarray, full.frozen)
    llm_before = jax.tree_util.tree_map(np.asarray, full.state.trainable)
    full.run()
    for a, b in zip(jax.tree_util.tree_leaves(vision_before), jax.tree_util.tree_leaves(full.frozen), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert {n.split("/")[0] for n in sp.flatten(full.frozen)} == {"vision"}
    assert {n.split("/")[0] for n in sp.flatten(full.state.trainable)} == {"llm"}
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(full.state.trainable))
    moved = [np.abs(np.asarray(b) - a).max() for a, b in
             zip(jax.tree_util.tree_leaves(llm_before), jax.tree_util.tree_leaves(full.state.trainable))]
    assert max(moved) > 0


def test_resume_reproduces_uninterrupted_run(workdir):
    from ivtlr_jax.train import train

    straight = train_config(workdir, "straight", stages=(0, 1), max_steps=5)
    train(straight)
    first = train_config(workdir, "resumed", stages=(0, 1), max_steps=3)
    train(first)
    again = train_config(workdir, "resumed", stages=(0, 1), max_steps=5, resume=True)
    summary = train(again)
    assert summary["step"] == 5
    want = {r["step"]: r["loss"] for r in losses(straight.out)}
    got = {r["step"]: r["loss"] for r in losses(again.out)}
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in (4, 5):  # the steps after the interruption
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step])


def test_stage_from_previous_stage_checkpoint_and_missing_start(workdir):
    from ivtlr_jax.train import Trainer, train

    tcfg = train_config(workdir, "stages", stages=(1,))
    train(tcfg)
    nxt = train_config(workdir, "stages", stages=(2,), max_steps=100)
    nxt.init = None  # must come from stage 1's checkpoint (and the base recorded in it)
    trainer = Trainer(nxt)
    assert trainer.setup.start.kind == "stage_end" and trainer.start_at == 1
    trainer.run()
    recs = [r for r in losses(nxt.out) if r["stage"] == 2]
    assert recs and all(r["n_latent"] == 2 for r in recs)
    orphan = train_config(workdir, "orphan", stages=(3,))
    orphan.init = None
    with pytest.raises(ValueError, match="--stage=3 needs a starting point"):
        Trainer(orphan)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(workdir, monkeypatch):
    from stored import read_checkpoint

    from ivtlr_jax.train import Trainer, TrainingStopped

    calls = {"n": 0}
    real = Trainer.host_batch

    def poisoned(self, batch):
        calls["n"] += 1
        hb = real(self, batch)
        if calls["n"] == 3:
            hb.images.pixel_values[:] = np.nan
        return hb

    monkeypatch.setattr(Trainer, "host_batch", poisoned)
    tcfg = train_config(workdir, "nan", stages=(0,), save_every=2)
    trainer = Trainer(tcfg)
    with pytest.raises(TrainingStopped, match="non-finite loss"):
        trainer.run()
    ckpt_root = os.path.join(tcfg.out, "checkpoints")
    assert sorted(os.listdir(ckpt_root)) == ["2"]
    state, _ = read_checkpoint(os.path.join(ckpt_root, "2"))
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree_util.tree_leaves(state["trainable"]))


def test_merge_lora_export_loads_and_matches_adapted_model(workdir):

    from stored import load_checkpoint, trainable_tree

    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.train import train
    from ivtlr_jax.train.export import export_trained_checkpoint
    from ivtlr_jax.train.lora import apply_lora

    tcfg = train_config(workdir, "merge", finetune="lora", lora_r=4, lora_alpha=8, stages=(0,), max_steps=2, lr=1e-2)
    train(tcfg)
    ckpt = os.path.join(tcfg.out, "checkpoints", "2")
    dst = os.path.join(tcfg.out, "merged")
    proc = subprocess.run([sys.executable, "tools/convert_weights.py", "--merge-lora", ckpt, "--dst", dst], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = IVTLRModel.from_pretrained(dst)
    state, meta = trainable_of(tcfg.out, 2)
    _, base = load_checkpoint(tcfg.init)
    adapters = trainable_tree(merged.backbone, {"trainable": state}, meta)
    adapted = IVTLRModel(merged.config, apply_lora(base, adapters, 8 / 4))  # the model calls the wrapped layers
    ids = np.array([[20, 21, 22, 23, 24, 25, 26, 27]])  # plain text ids (0-6 are special)
    mask = np.ones_like(ids)
    np.testing.assert_allclose(merged.logits(ids, mask), adapted.logits(ids, mask), atol=1e-4)
    assert np.abs(merged.logits(ids, mask) - IVTLRModel(merged.config, base).logits(ids, mask)).max() > 1e-3
    with pytest.raises(ValueError, match="not a training checkpoint"):
        export_trained_checkpoint(tcfg.init, os.path.join(tcfg.out, "bad"))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(workdir):
    import signal
    import time

    root, cfg = workdir
    out = str(root / "sigterm")
    env = cli_env()
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--config", cfg, "--stages", "0-3",
                             "--out", out], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 1):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout[stdout.rindex("\n{\n") + 1:])  # the summary JSON printed last
    assert summary["stopped"] == f"signal {int(signal.SIGTERM)}"
    step = summary["step"]
    assert step < 12  # 3 steps per stage, 4 stages: it stopped early
    assert str(step) in os.listdir(os.path.join(out, "checkpoints"))



def test_grad_accum_equals_one_step_over_the_same_rows_and_dry_run_compiles_that_micro_step(workdir):
    """batch_size is the rows of one optimiser update: 4 micro-steps of 2 rows give the update one step over the
    same 8 rows gives (loss and params within 1e-5), count as one step, and are what the dry run compiles."""
    import jax

    from ivtlr_jax.train import Trainer
    from ivtlr_jax.train.dry_run import abstract_step_inputs

    runs = {}
    for accum in (1, 4):
        tcfg = train_config(workdir, f"accum{accum}", stages=(1,), max_steps=1, batch_size=8, grad_accum=accum,
                            lr=1e-2, save_every=1)
        trainer = Trainer(tcfg, trace_rows=True)
        before = jax.tree_util.tree_map(np.asarray, trainer.state.trainable)
        summary = trainer.run()
        assert summary["step"] == 1
        with open(os.path.join(tcfg.out, "debug", "rows.process_0.jsonl")) as f:
            trace = [json.loads(line) for line in f]
        runs[accum] = (trainer, losses(tcfg.out), trace)
    (one, rec1, trace1), (four, rec4, trace4) = runs[1], runs[4]
    assert [len(t["rows"]) for t in trace1] == [8] and [len(t["rows"]) for t in trace4] == [2, 2, 2, 2]
    assert [t["micro"] for t in trace4] == [0, 1, 2, 3] and {t["step"] for t in trace4} == {1}
    assert sorted(r for t in trace4 for r in t["rows"]) == sorted(trace1[0]["rows"])  # the same 8 rows
    assert [r["step"] for r in rec4] == [1] and rec4[0]["rows"] == 8 and rec4[0]["micro_steps"] == 4
    assert abs(rec4[0]["loss"] - rec1[0]["loss"]) <= 1e-5 * rec1[0]["loss"]
    moved = 0.0
    for a, b, c in zip(jax.tree_util.tree_leaves(one.state.trainable), jax.tree_util.tree_leaves(four.state.trainable),
                       jax.tree_util.tree_leaves(before), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
        moved = max(moved, float(np.abs(np.asarray(a) - c).max()))
    assert moved > 1e-4  # the update did something
    # the dry run's compiled step takes the trainer's micro-step inputs: state, params, micro-batch rows
    state, frozen, batch = abstract_step_inputs(four.bb, four.tcfg, four.mesh, four.layout, n=1)
    (fed,) = [k for k in four._compiled]  # the one program the trainer ran (stage 1: n = 1)
    dry_leaves = [(x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(batch)]
    assert [(s[0], d, len(s)) for s, d in fed[1]] == [(s[0], d, len(s)) for s, d in dry_leaves]
    assert batch.batch_size == 2
    for got, want in ((state, four.state), (frozen, four.frozen)):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
            assert a.sharding.is_equivalent_to(b.sharding, len(a.shape))
    with pytest.raises(ValueError, match="does not divide into grad_accum=3"):
        Trainer(train_config(workdir, "accum3", stages=(1,), batch_size=8, grad_accum=3))


def test_dry_run_takes_the_model_from_init_auto_tiny_or_the_yaml(workdir):
    """--dry-run sizes the model the run would train: the auto-tiny model's config (no weights drawn) is the one
    the real build writes; --init CKPT gives its saved config; else the YAML's model: section; else a clear error."""
    import yaml

    from experiments.train import dry_run_model_config
    from ivtlr_jax.convert.checkpoint import load_config
    from ivtlr_jax.train.config import TrainConfig

    root, cfg = workdir
    values = yaml.safe_load(open(cfg))
    model = values.pop("model")
    fresh = TrainConfig(**{**values, "out": str(root / "dry_fresh")})
    assert fresh.init == "auto-tiny"
    planned = dry_run_model_config(fresh, {"model": model})
    assert not os.path.exists(root / "dry_fresh" / "init")  # nothing built
    built = train_config(workdir, "dry_built")  # builds RUN_DIR/init as a run does
    assert planned == load_config(built.init)
    assert planned.latent_token_id is not None and planned.hidden_size == model["hidden_size"]
    from_init = TrainConfig(**{**values, "init": built.init, "out": str(root / "dry_init")})
    assert dry_run_model_config(from_init, {"model": {"model_type": "qwen2_vl"}}) == planned
    from_yaml = TrainConfig(**{**values, "init": "ckpt/not-there", "out": str(root / "dry_yaml")})
    assert dry_run_model_config(from_yaml, {"model": {"model_type": "qwen2_vl", "num_hidden_layers": 3}}) \
        .num_hidden_layers == 3
    with pytest.raises(SystemExit, match="--init 'ckpt/not-there' is not a checkpoint folder"):
        dry_run_model_config(from_yaml, {})


def test_dry_run_compiles_lora_and_full_or_only_the_finetune_given(monkeypatch):
    """A 7B dry run compiles for minutes per mode: `--finetune lora` compiles LoRA alone, no flag compiles both."""
    import logging
    import threading

    from experiments import train

    for name in ("excepthook", "unraisablehook"):  # the CLI installs process-wide hooks and a log handler
        monkeypatch.setattr(sys, name, getattr(sys, name))
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the CPU dry run sets the device count
    asked = []
    monkeypatch.setattr(train, "run_dry", lambda *a: asked.append(a[-1]) or [])
    for extra in ([], ["--finetune", "lora"], ["--finetune", "full"]):
        train.main(["--config", "qwen2vl_7b_m3cot", "--dry-run", "--compiler", "cpu", "--mesh", "gpu_1", *extra])
    assert asked == [("lora", "full"), ("lora",), ("full",)]

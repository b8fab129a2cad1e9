"""Train state born sharded (8 simulated devices), the train step's loss against latent_forward, and the rule
that only models/ imports a concrete backbone."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import dataclasses, json, os, sys, tempfile
import jax
from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig, VisionConfig
from ivtlr_jax.convert import save_checkpoint
from ivtlr_jax.train.config import TrainConfig
from ivtlr_jax.models import backbone_for
from ivtlr_jax import sharding as sh
from ivtlr_jax.train.dry_run import dry_run
from ivtlr_jax.train.state import create_train_state
from ivtlr_jax.train.step import make_optimizer

assert len(jax.devices()) == 8, jax.devices()
# every sharded dimension divides by 8
cfg = Qwen2VLConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=(4, 6, 6), image_token_id=500, video_token_id=501,
                  vision_start_token_id=502, vision_end_token_id=503, eos_token_id=(511,), latent_token_id=505,
                  vision=VisionConfig(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, out_hidden_size=128))
bb = backbone_for(cfg)
ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
params = bb.random_params(0, "float32")
save_checkpoint(ckpt, cfg, params)
n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
out = {}
for finetune in ("full", "lora"):
    tcfg = TrainConfig(finetune=finetune, mesh="gpu_8", compute_dtype="float32", k=4, batch_size=8, lora_r=8)
    tx, _ = make_optimizer(tcfg, 10)
    state, frozen, report, layout = create_train_state(bb, tcfg, sh.make_mesh("gpu_8"), tx, "float32", ckpt)
    dry = dry_run(bb, tcfg, text=16, tail=8, n=1)
    shard_counts = sorted({len(x.addressable_shards) for x in jax.tree_util.tree_leaves(state.trainable)})
    out[finetune] = {**report, "dry_state_bytes_total": dry["state_bytes_total"],
                     "dry_state_bytes_per_device": dry["state_bytes_per_device"],
                     "dry_model": [dry["model_type"], dry["parameters"]], "parameters": n_params,
                     "trainable_dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(state.trainable)}),
                     "frozen_dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(frozen)}),
                     "shard_counts": shard_counts}
    del state, frozen
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded_start():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print("sharded start (8 devices):", json.dumps(result))  # the figures for the record (pytest -s)
    return result


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_state_is_born_sharded(sharded_start, finetune):
    r = sharded_start[finetune]
    total = r["state_bytes_total"]
    assert total > 0
    # no device ever held more than its shard plus small replicated leaves (step, rng, norms, biases)
    assert r["state_peak_bytes_per_device"] <= 1.15 * total / 8, r
    assert r["state_peak_bytes_per_device"] >= total / 8
    # the dry run reports what the real start gets
    assert r["dry_state_bytes_total"] == total
    assert r["dry_state_bytes_per_device"] == r["state_bytes_per_device"] == r["state_peak_bytes_per_device"]
    assert r["dry_model"] == ["qwen2_vl", r["parameters"]]
    assert r["trainable_dtypes"] == ["float32"]
    assert r["shard_counts"] == [8]


def test_full_fine_tuning_state_is_float32_params_and_two_moments(sharded_start):
    full, lora = sharded_start["full"], sharded_start["lora"]
    assert full["state_bytes_total"] > 10 * lora["state_bytes_total"]  # adapters are small


# ------------------------------------------------------------------------ train step == latent_forward
def _mixed_grid_batch(m, lcfg):
    """A collated-style batch: two rows, one image each of different grids, left-aligned latents, labels."""
    from tiny import image_batch, image_run

    latent, eos = 296, 299
    pv, grid = image_batch([[1, 20, 20], [1, 14, 10]], seed=4)
    prompts = [[5, 6, 7] + image_run(grid[0]) + [8, 9], [12] + image_run(grid[1]) + [13, 14, 15, 16]]
    tails = [list(range(30, 41)) + [50, 51, eos], [41, 42, 43, 44, 52, eos]]
    p, t, n = max(map(len, prompts)), max(map(len, tails)), 2
    ids = np.zeros((2, p + n + t), np.int64)
    mask, labels = np.zeros_like(ids), np.full_like(ids, -100)
    for r, (pr, tl) in enumerate(zip(prompts, tails)):
        row = pr + [latent] * n + tl
        ids[r, p - len(pr): p - len(pr) + len(row)] = row
        mask[r, p - len(pr): p - len(pr) + len(row)] = 1
        labels[r, p + n: p + n + len(tl)] = tl
    return ids, mask, labels, pv, grid


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_train_step_loss_and_grad_equal_latent_forward(tiny_pair, finetune):
    import dataclasses

    import jax
    import jax.numpy as jnp

    from ivtlr_jax import sharding as sh
    from ivtlr_jax.latent import latent_forward_jit, make_latent_batch, to_device
    from ivtlr_jax.models import spec as sp
    from ivtlr_jax.train.config import TrainConfig
    from ivtlr_jax.train.lora import apply_lora, init_lora
    from ivtlr_jax.train.step import TrainState, make_optimizer, make_train_step, split_params

    _, m = tiny_pair
    cfg = dataclasses.replace(m.config, latent_token_id=296)
    from ivtlr_jax.models import backbone_for

    bb = backbone_for(cfg)
    spec = bb.param_spec()
    tcfg = TrainConfig(finetune=finetune, k=4, lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=0.0, clip=1e9,
                       compute_dtype="float32", mesh="cpu", remat="none")
    lcfg = tcfg.latent()
    ids, mask, labels, pv, grid = _mixed_grid_batch(m, lcfg)
    batch = make_latent_batch(bb, lcfg, ids, mask, labels, pv, grid)
    assert batch.images.pixel_values.shape[:3] == (2, 1, 400)  # 400 and 140 patches: one padded layout
    if finetune == "lora":
        trainable = init_lora(spec, 4, jax.random.PRNGKey(1))
        trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # B non-zero: the adapters matter
        frozen = m.params
        params_of = lambda t: apply_lora(m.params, t, 8 / 4)
    else:
        trainable, frozen = split_params(spec, m.params, "full")
        params_of = lambda t: jax.tree.map(lambda i, a, b: a if i.trainable else b, spec, t, m.params,
                                           is_leaf=sp.is_info)
    tx, schedule = make_optimizer(tcfg, 10)
    train_step = make_train_step(bb, lcfg, tcfg, tx, schedule, jnp.float32)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.PRNGKey(0))
    device_batch = sh.host_batch_to_global(sh.make_mesh("cpu"), batch)
    _, metrics = jax.jit(train_step)(state, frozen, device_batch)
    step_grads = jax.jit(jax.grad(train_step.loss_fn))(trainable, frozen, device_batch, jax.random.PRNGKey(0))
    ref = lambda t: latent_forward_jit(bb, params_of(t), lcfg, to_device(batch))[0]
    want, grads = jax.value_and_grad(ref)(trainable)
    assert abs(float(metrics["loss"]) - float(want)) <= 1e-5 * float(want)
    got, ref_g = sp.flatten(step_grads), sp.flatten(grads)
    assert set(got) == set(ref_g) and got
    for name in ref_g:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(ref_g[name]), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    assert max(float(np.abs(np.asarray(g)).max()) for g in ref_g.values()) > 1e-4  # gradients are not all zero


# ------------------------------------------------------------------------ imports
CONCRETE = ("ivtlr_jax.models.qwen2_vl", "ivtlr_jax.models.chameleon")


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_only_models_import_a_concrete_backbone(tmp_path):
    probe = tmp_path / "probe.py"  # the checker sees both import forms
    probe.write_text("from ivtlr_jax.models import qwen2_vl\nimport ivtlr_jax.models.chameleon as c\n")
    assert {"ivtlr_jax.models.qwen2_vl", "ivtlr_jax.models.chameleon"} <= set(_imports(probe))
    pkg = os.path.join(ROOT, "ivtlr_jax")
    offenders = []
    for dirpath, _, files in os.walk(pkg):
        if os.path.relpath(dirpath, pkg).split(os.sep)[0] == "models":
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                bad = [m for m in _imports(path) if m.startswith(CONCRETE)]
                if bad:
                    offenders.append((os.path.relpath(path, ROOT), bad))
    assert not offenders, offenders

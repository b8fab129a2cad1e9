"""Inference on a mesh: a model loaded with mesh="tpu_v4_8" on 4 simulated CPU devices equals the one-device model
(logits, latent loss and selections, greedy tokens) and no device holds more than its share of the parameters;
checked in one subprocess (the device count is set before JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, os, sys, tempfile
import numpy as np
import jax
from tiny import image_batch, left_pad
from ivtlr_jax import IVTLRModel
from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig, VisionConfig
from ivtlr_jax.convert import save_checkpoint
from ivtlr_jax.convert.checkpoint import save_lora
from ivtlr_jax.models import backbone_for
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import LoRAMeta, adapter_spec

assert len(jax.devices()) == 4, jax.devices()
IMG, LAT, EOS = 500, 505, 511
# every sharded dimension divides by 4
cfg = Qwen2VLConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=(4, 6, 6), image_token_id=IMG, video_token_id=501,
                  vision_start_token_id=502, vision_end_token_id=503, eos_token_id=(EOS,), latent_token_id=LAT,
                  vision=VisionConfig(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, out_hidden_size=128))
bb = backbone_for(cfg)
root = tempfile.mkdtemp()
params = bb.random_params(0, "float32")
save_checkpoint(os.path.join(root, "plain"), cfg, params)
save_checkpoint(os.path.join(root, "lora"), cfg, params)
aspec = adapter_spec(bb.param_spec(), 4)
rng = np.random.default_rng(1)
adapters = sp.map_spec(lambda i: (rng.standard_normal(i.shape) * 0.1).astype(np.float32), aspec)
save_lora(os.path.join(root, "lora"), bb, adapters, LoRAMeta(4, 8.0))

def batch(rows, n, seed=0):
    pv, grid = image_batch([[1, 8, 8]] * rows, seed=seed)
    prompts = [[5 + r] * (1 + r % 3) + [502] + [IMG] * 16 + [503, 8, 9] + [LAT] * n for r in range(rows)]
    ids, mask = left_pad(prompts)
    return ids, mask, pv, grid

out = {}
for name in ("plain", "lora"):
    one = IVTLRModel.from_pretrained(os.path.join(root, name))
    m = IVTLRModel.from_pretrained(os.path.join(root, name), mesh="tpu_v4_8")
    r = {"report": m.load_report, "mesh_shape": dict(m.mesh.shape)}
    r["param_max_abs_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(m.params)))
    r["embed_shards"] = len({s.device for s in m.params.llm.embed.addressable_shards})
    r["embed_shard_shape"] = list(m.params.llm.embed.addressable_shards[0].data.shape)
    ids, mask, pv, grid = batch(4, 0)
    r["logits_max_abs_diff"] = float(np.abs(one.logits(ids, mask, pv, grid) - m.logits(ids, mask, pv, grid)).max())
    ids, mask, pv, grid = batch(4, 2)
    labels = np.where(mask.astype(bool), ids, -100)
    labels[:, :-2] = -100
    labels = np.concatenate([labels, np.full((4, 3), 7)], 1)
    ids2 = np.concatenate([ids, np.full((4, 3), 7)], 1)
    mask2 = np.concatenate([mask, np.ones((4, 3), mask.dtype)], 1)
    lo = one.latent_forward(ids2, mask2, labels, pv, grid, k=4)
    lm = m.latent_forward(ids2, mask2, labels, pv, grid, k=4)
    r["loss"] = [lo.loss, lm.loss]
    r["latent_logits_max_abs_diff"] = float(np.abs(lo.logits - lm.logits).max())
    r["selected_equal"] = bool((lo.selected == lm.selected).all())
    for rows in (4, 3):  # 3 rows do not divide the 4 data devices: the batch is replicated
        ids, mask, pv, grid = batch(rows, 2, seed=rows)
        go = one.generate(ids, mask, pv, grid, max_new_tokens=5, k=4, eos_token_ids=[EOS])
        gm = m.generate(ids, mask, pv, grid, max_new_tokens=5, k=4, eos_token_ids=[EOS])
        r[f"generate_{rows}_equal"] = bool((go.tokens == gm.tokens).all() and (go.lengths == gm.lengths).all()
                                            and (go.selected == gm.selected).all())
        r[f"generate_{rows}_tokens"] = go.tokens.tolist()
    out[name] = r
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_results():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, HERE]),
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print("mesh inference (4 devices):", json.dumps(result))
    return result


@pytest.mark.parametrize("name", ["plain", "lora"])
def test_mesh_model_equals_one_device_model(mesh_results, name):
    r = mesh_results[name]
    assert r["mesh_shape"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["param_max_abs_diff"] < 1e-5, r  # unmerged adapters fold to the same weights
    assert r["logits_max_abs_diff"] < 1e-5, r
    assert r["loss"][0] == pytest.approx(r["loss"][1], abs=1e-5), r
    assert r["latent_logits_max_abs_diff"] < 1e-5, r
    assert r["selected_equal"], r
    assert r["generate_4_equal"] and r["generate_3_equal"], r


@pytest.mark.parametrize("name", ["plain", "lora"])
def test_mesh_model_holds_a_share_per_device(mesh_results, name):
    r = mesh_results[name]
    report = r["report"]
    total = report["param_bytes_total"]
    assert r["embed_shards"] == 4 and r["embed_shard_shape"] == [512, 32], r  # (vocab, embed / 4)
    assert report["param_bytes_per_device"] <= 1.15 * total / 4, report
    assert total / 4 <= report["param_peak_bytes_per_device"] <= 1.15 * total / 4, report

"""Attention implementations of the shared decoder against its dense reference; remat, decode phases, XLA flags.

Every fused implementation runs here on CPU (xla; the TPU splash kernel in Pallas interpret mode): the masks
the kernels take (rows rotated to right padding + sequence lengths; segment ids and a causal mask offset past
the cache) must give the dense einsum's outputs, attention row, cache and gradients, with left padding, right
padding, both, holes and a row that is all padding; the splash kernel also for latent chunks and the suffix
over the cache, and under shard_map on simulated 4-device meshes.
"""

import functools
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivtlr_jax.latent import LatentConfig
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.chameleon.model import Chameleon
from ivtlr_jax.models.chameleon.model import decoder_spec as chameleon_decoder_spec
from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig, VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dims(kv_heads=2):
    return ly.DecoderDims(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                          num_kv_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=10000.0, rope_sections=(0,) * 8)


class _SwinChameleon:
    """Just what Chameleon's layer reads of its backbone: swin norms on."""

    config = SimpleNamespace(swin_norm=True)


# Chameleon's layer (its package's block: per-head q/k LayerNorm, norms after attention and MLP)
CHAMELEON_BLOCK = functools.partial(Chameleon.decoder_block, _SwinChameleon())


def decoder_params(d, seed=0, scale=10.0, qk_norm=False):
    """Random decoder weights, projections scaled up so attention is far from uniform (qk_norm: with Chameleon's
    per-head q/k LayerNorm weights)."""
    p = sp.init_params_numpy(chameleon_decoder_spec(d) if qk_norm else ly.decoder_spec(d), seed)
    layers = jax.tree.map(lambda x: x * scale if x.ndim == 3 else x, p.layers)
    return jax.tree.map(jnp.asarray, p.replace(layers=layers))


# valid rows of a 2 x 24 batch: left padding, right padding, both, none, all padding
MASKS = {
    "left": [[0] * 5 + [1] * 19, [0] * 9 + [1] * 15],
    "right": [[1] * 20 + [0] * 4, [1] * 24],
    "both": [[0] * 3 + [1] * 17 + [0] * 4, [0] * 1 + [1] * 21 + [0] * 2],
    "all_pad_row": [[0] * 24, [0] * 2 + [1] * 22],
}


def inputs(mask, d, seed=1, extra=0):
    valid = np.asarray(mask, bool)
    b, s = valid.shape
    rng = np.random.default_rng(seed)
    embeds = jnp.asarray(rng.normal(size=(b, s, d.hidden_size)).astype(np.float32))
    pos = np.clip(np.cumsum(valid, 1) - 1, 0, None)[:, None].astype(np.int32)  # (B, 1, S)
    kv_valid = np.concatenate([valid, np.ones((b, extra), bool)], 1)  # slots past the prompt: tokens decoded later
    return embeds, jnp.asarray(pos), jnp.asarray(kv_valid)


PALLAS = ly.AttentionSpec("pallas", interpret=True)  # the TPU kernel, run by the Pallas interpreter on CPU
STATIC = ("attn_row", "layer_wrapper", "attention", "kv_len", "block")
decode_at = jax.jit(ly.decoder, static_argnums=(1, 5), static_argnames=STATIC)  # cache_index a Python int
decode_traced = jax.jit(ly.decoder, static_argnums=(1,), static_argnames=STATIC)  # cache_index traced


def run(d, params, embeds, pos, kv_valid, attention, cache_len=None, attn_row=True, block=ly.pre_norm_block):
    b, s, _ = embeds.shape
    cache = ly.init_cache(d, b, cache_len or s, embeds.dtype)
    return decode_at(params, d, embeds, pos, cache, 0, kv_valid, attn_row=attn_row, attention=attention,
                     block=block)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("variant", ["qwen", "chameleon"])
def test_fused_prefill_equals_dense(mask, variant):
    """The xla kernel path (rotated rows + sequence lengths) == the dense einsum: hidden, cache, attention row."""
    d = dims()
    params = decoder_params(d, qk_norm=variant == "chameleon")
    block = CHAMELEON_BLOCK if variant == "chameleon" else ly.pre_norm_block
    embeds, pos, kv_valid = inputs(MASKS[mask], d, extra=3)
    want = run(d, params, embeds, pos, kv_valid, "dense", cache_len=27, block=block)
    got = run(d, params, embeds, pos, kv_valid, "xla", cache_len=27, block=block)
    valid = np.asarray(kv_valid[:, :24])
    for a, b in ((want[0], got[0]), (want[1].k, got[1].k), (want[1].v, got[1].v)):
        a, b = np.asarray(a)[:, :24] if a.ndim == 3 else np.asarray(a)[:, :, :24], np.asarray(b)
        b = b[:, :24] if b.ndim == 3 else b[:, :, :24]
        sel = valid if a.ndim == 3 else np.broadcast_to(valid, a.shape[:3])
        assert np.isfinite(b).all()
        np.testing.assert_allclose(a[sel], b[sel], atol=1e-4, rtol=1e-4)
    row_w, row_g = np.asarray(want[2]), np.asarray(got[2])
    real = valid[:, -1]  # the row is the last query's: compared where that query is a real token
    if real.any():
        assert np.abs(row_w - row_g)[real].max() <= 1e-6
        np.testing.assert_allclose(row_g[real].sum(-1), 1.0, atol=1e-5)
    assert (row_g[:, 24:] == 0).all() and np.isfinite(row_g).all()


def test_cached_chunks_at_static_and_traced_offsets_equal_one_pass():
    """Prefill (fused) + a chunk at a static index + a chunk at a traced index with a kv_len bound + one-token
    steps == one pass, with the dense reference as the one pass; the attention rows agree too."""
    d = dims()
    params = decoder_params(d)
    embeds, pos, kv_valid = inputs(MASKS["left"], d, extra=4)
    full, _, _ = run(d, params, embeds, pos, kv_valid[:, :24], "dense")

    cache = ly.init_cache(d, 2, 28, jnp.float32)
    pieces, rows = [], []
    for a, z in ((0, 10), (10, 14), (14, 20), (20, 21), (21, 22)):
        x, p = embeds[:, a:z], pos[:, :, a:z]
        if a == 14:
            h, cache, row = decode_traced(params, d, x, p, cache, jnp.int32(a), kv_valid, attn_row=True,
                                          attention="xla", kv_len=20)
        else:
            h, cache, row = decode_at(params, d, x, p, cache, a, kv_valid, attn_row=True, attention="xla")
        pieces.append(h)
        rows.append(row)
    got = np.concatenate(pieces, 1)
    valid = np.asarray(kv_valid[:, :22])
    np.testing.assert_allclose(got[valid], np.asarray(full)[:, :22][valid], atol=2e-5, rtol=1e-5)
    # the last piece's row == the dense row of a pass over the first 22 slots
    _, _, want_row = run(d, params, embeds[:, :22], pos[:, :, :22], kv_valid, "dense", cache_len=28)
    np.testing.assert_allclose(np.asarray(rows[-1]), np.asarray(want_row), atol=1e-6)


def test_only_valid_cache_slots_are_read():
    """NaN in every cache slot a chunk may not see changes nothing: those slots are never read."""
    d = dims()
    params = decoder_params(d)
    embeds, pos, kv_valid = inputs(MASKS["left"], d, extra=4)
    _, cache, _ = decode_at(params, d, embeds[:, :20], pos[:, :, :20], ly.init_cache(d, 2, 28, jnp.float32), 0,
                            kv_valid, attention="xla")
    poison = jax.tree.map(lambda c: c.at[:, :, 20:].set(jnp.nan), cache)
    x, p = embeds[:, 20:21], pos[:, :, 20:21]
    for fn, index, kv_len in ((decode_at, 20, None), (decode_traced, jnp.int32(20), 20)):  # static, traced + bound
        a, _, _ = fn(params, d, x, p, cache, index, kv_valid, attn_row=True, kv_len=kv_len)
        b, _, row_b = fn(params, d, x, p, poison, index, kv_valid, attn_row=True, kv_len=kv_len)
        assert np.isfinite(np.asarray(b)).all() and np.isfinite(np.asarray(row_b)).all()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for attention in ("xla", "dense"):  # a prefill reads no cache slot
        h, _, _ = decode_at(params, d, embeds, pos, jax.tree.map(jnp.zeros_like, cache), 0, kv_valid,
                            attention=attention)
        h2, _, _ = decode_at(params, d, embeds, pos, jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), cache), 0,
                             kv_valid, attention=attention)
        np.testing.assert_array_equal(np.asarray(h), np.asarray(h2))


@pytest.mark.parametrize("mask", ["both", "all_pad_row"])
def test_fused_gradients_equal_dense_and_stay_finite(mask):
    d = dims()
    params = decoder_params(d)
    embeds, pos, kv_valid = inputs(MASKS[mask], d)
    valid = kv_valid[..., None]

    def loss(params, embeds, attention):
        h, _, _ = run(d, params, embeds, pos, kv_valid, attention, attn_row=False)
        return jnp.sum(jnp.where(valid, jnp.tanh(h), 0.0))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads = {a: grad(params, embeds, a) for a in ("dense", "xla")}
    for g_dense, g_xla in zip(jax.tree.leaves(grads["dense"]), jax.tree.leaves(grads["xla"])):
        assert np.isfinite(np.asarray(g_xla)).all()
        np.testing.assert_allclose(np.asarray(g_xla), np.asarray(g_dense), atol=2e-4, rtol=2e-4)


def test_bfloat16_fused_close_to_dense():
    d = dims()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), decoder_params(d, scale=3.0))
    embeds, pos, kv_valid = inputs(MASKS["both"], d)
    embeds = embeds.astype(jnp.bfloat16)
    want = run(d, params, embeds, pos, kv_valid, "dense")
    got = run(d, params, embeds, pos, kv_valid, "xla")
    valid = np.asarray(kv_valid)
    diff = np.abs(np.asarray(want[0], np.float32) - np.asarray(got[0], np.float32))[valid]
    assert diff.max() <= 0.1 * np.abs(np.asarray(want[0], np.float32)).max()
    assert np.abs(np.asarray(want[2]) - np.asarray(got[2])).max() <= 1e-2


@pytest.mark.slow
def test_tpu_flash_kernel_in_interpret_mode_equals_dense():
    """The Pallas TPU kernel with segment ids, run by the Pallas interpreter on CPU (lengths padded to 128)."""
    d = dims(kv_heads=1)
    params = decoder_params(d)
    embeds, pos, kv_valid = inputs([MASKS["both"][0], MASKS["left"][0]], d)  # row 1 ends on a real token
    want = run(d, params, embeds, pos, kv_valid, "dense")
    got = run(d, params, embeds, pos, kv_valid, PALLAS)
    valid = np.asarray(kv_valid)
    np.testing.assert_allclose(np.asarray(got[0])[valid], np.asarray(want[0])[valid], atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(got[2])[1] - np.asarray(want[2])[1]).max() <= 1e-6


def test_resolve_attention():
    assert ly.resolve_attention("auto", jnp.float32, 128, "cpu") == "xla"
    assert ly.resolve_attention("auto", jnp.bfloat16, 128, "cuda") == "cudnn"
    assert ly.resolve_attention("auto", jnp.float32, 128, "cuda") == "xla"  # cuDNN flash needs 16-bit inputs
    assert ly.resolve_attention("auto", jnp.bfloat16, 96 + 4, "cuda") == "xla"  # head_dim not a multiple of 8
    assert ly.resolve_attention("dense", jnp.bfloat16, 128, "cuda") == "dense"
    assert ly.resolve_attention("auto", jnp.bfloat16, 128, "tpu") == "pallas"  # any number of chips
    with pytest.raises(ValueError, match="attention='flash'"):
        ly.resolve_attention("flash", jnp.float32, 128)
    # the spec follows the mesh's devices, not the default backend (a TPU program compiled from a CPU host)
    tpu_mesh = types.SimpleNamespace(devices=np.asarray([types.SimpleNamespace(platform="tpu")] * 4, object))
    spec = ly.attention_spec("auto", jnp.bfloat16, 16, tpu_mesh)
    assert spec.impl == "pallas" and spec.mesh is tpu_mesh and not spec.interpret
    cpu_mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
    assert ly.attention_spec("auto", jnp.bfloat16, 16, cpu_mesh) == ly.AttentionSpec("xla", cpu_mesh)
    assert ly.attention_spec(PALLAS, jnp.float32, 16, cpu_mesh) is PALLAS  # a spec passes through
    assert ly.attention_spec("dense", jnp.float32, 16).impl == "dense"
    with pytest.raises(ValueError, match="impl='auto'"):
        ly.AttentionSpec("auto")
    d = dims()
    with pytest.raises(ValueError, match="kv_len=40"):
        decode_traced(decoder_params(d), d, jnp.zeros((1, 1, 64)), jnp.zeros((1, 1, 1), jnp.int32),
                   ly.init_cache(d, 1, 8, jnp.float32), jnp.int32(3), jnp.ones((1, 8), bool), kv_len=40)


# ----------------------------------------------------------------------------- remat
def test_remat_policies_give_the_same_loss_and_gradient_and_save_what_they_say():
    from collections import Counter

    from jax._src.ad_checkpoint import saved_residuals

    from ivtlr_jax.train.remat import Remat

    d = dims()
    params = decoder_params(d)
    embeds, pos, kv_valid = inputs(MASKS["left"], d)

    def loss(params, policy):
        cache = ly.init_cache(d, 2, 24, jnp.float32)
        h, _, _ = ly.decoder(params, d, embeds, pos, cache, 0, kv_valid, layer_wrapper=Remat(policy))
        return jnp.sum(jnp.where(kv_valid[..., None], jnp.sin(h), 0.0))

    def saved_widths(policy):  # widths of the per-layer values the backward pass keeps (stacked over layers)
        res = saved_residuals(lambda p: loss(p, policy), params)
        return Counter(a.shape[-1] for a, why in res if "argument" not in why and a.shape[0] == d.num_layers)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_loss, ref_grad = grad(params, "none")
    for policy in ("full", "dots_except_mlp", "dots"):
        value, g = grad(params, policy)
        assert abs(float(value) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    full = saved_widths("full")
    q, kv, h, mlp = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.hidden_size, d.intermediate_size
    attention = Counter([q, kv, kv, q, h])  # q, k, v, context, o projections
    assert saved_widths("dots_except_mlp") - full == attention
    assert saved_widths("dots")[mlp] == 2  # gate and up kept too


def test_auto_remat_by_model_size():
    from experiments.bench_train import model_config
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.train.remat import resolve_remat

    assert resolve_remat("auto", backbone_for(model_config("2b")).dims) == "dots"
    assert resolve_remat("auto", backbone_for(model_config("7b")).dims) == "dots_except_mlp"
    assert resolve_remat("full", dims()) == "full"
    with pytest.raises(ValueError, match="remat='some'"):
        resolve_remat("some", dims())


# ----------------------------------------------------------------------------- decoding
def tiny_backbone():
    from ivtlr_jax.models import backbone_for

    cfg = Qwen2VLConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3), image_token_id=120,
                      latent_token_id=121, eos_token_id=(127,),
                      vision=VisionConfig(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2.0, out_hidden_size=64))
    bb = backbone_for(cfg)
    params = bb.init_params(jax.random.PRNGKey(0))
    return bb, params.replace(llm=decoder_params(bb.dims, seed=3, scale=5.0).replace(
        embed=params.llm.embed * 20, lm_head=params.llm.lm_head * 20))


def test_decode_phases_and_donated_cache_equal_one_program():
    """prefill_jit + decode_jit (cache donated, short phases) give generate_jit's tokens; the cache is consumed."""
    from ivtlr_jax.generate import decode_jit, decode_phase_ends, generate_jit, prefill_jit
    from ivtlr_jax.latent import make_latent_batch, to_device

    assert decode_phase_ends(1, 4) == [] and decode_phase_ends(9, 4) == [5, 9]
    assert decode_phase_ends(10, 4) == [5, 9, 10]
    bb, params = tiny_backbone()
    lcfg = LatentConfig(k=0)
    ids = np.asarray([[0, 0, 5, 6, 7, 121, 121], [8, 9, 10, 11, 12, 121, 121]], np.int32)
    batch = to_device(make_latent_batch(bb, lcfg, ids, (ids > 0).astype(np.int32)))
    key, temp, top_p = jax.random.PRNGKey(0), jnp.float32(1e-6), jnp.float32(1.0)
    kw = dict(max_new_tokens=11, eos_ids=(127,), pad_id=0, greedy=True)
    tokens, lengths, _, steps = generate_jit(bb, params, lcfg, batch, key, temp, top_p, **kw)
    assert int(steps) == 11 and len(set(np.asarray(tokens).ravel().tolist())) > 2
    for block in (3, 256):
        cache, first, _ = prefill_jit(bb, params, lcfg, batch, key, temp, top_p, max_new_tokens=11, greedy=True)
        got, got_len, got_steps, _ = decode_jit(bb, params, batch.kv_valid, batch.positions, cache, first, key, temp,
                                             top_p, decode_block=block, **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(tokens))
        np.testing.assert_array_equal(np.asarray(got_len), np.asarray(lengths))
        assert int(got_steps) == 11
        assert cache.k.is_deleted() and cache.v.is_deleted()  # donated: updated in place, not copied


# ----------------------------------------------------------------------------- XLA flags
def test_gpu_presets_add_xla_flags_without_overriding_the_user():
    from ivtlr_jax import sharding as sh

    flags = sh.xla_flags_for("gpu_1", "--xla_gpu_enable_triton_gemm=true --foo=1")
    assert flags.split()[:2] == ["--xla_gpu_enable_triton_gemm=true", "--foo=1"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags.split()
    assert "--xla_gpu_enable_triton_gemm=false" not in flags
    assert "highest_priority_async_stream" in sh.xla_flags_for("gpu_8")
    assert sh.xla_flags_for("tpu_v4_8", "--a=1") == "--a=1"


def test_late_xla_flags_warn_only_for_the_running_platform(monkeypatch, caplog):
    """After the backend started, a GPU preset's flags on a CPU run are not worth a warning; a flag this
    platform would have read is, and only the flags this call added are named."""
    import dataclasses
    import logging

    import jax

    from ivtlr_jax import sharding as sh

    jax.devices()  # the backend has started
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_user_flag=1")
    with caplog.at_level(logging.WARNING, logger="ivtlr_jax.sharding"):
        sh.apply_xla_flags("gpu_1")
    assert not caplog.records
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in os.environ["XLA_FLAGS"]
    late = dataclasses.replace(sh.get_preset("gpu_1"), name="late", xla_flags=("--xla_cpu_late_flag=1",))
    with caplog.at_level(logging.WARNING, logger="ivtlr_jax.sharding"):
        sh.apply_xla_flags(late)
    [record] = caplog.records
    assert "--xla_cpu_late_flag=1" in record.getMessage() and "user_flag" not in record.getMessage()


def test_preset_xla_flags_are_known_to_this_jaxlib():
    """XLA aborts on an unknown flag: start JAX with every preset flag (they are GPU flags: no effect on CPU)."""
    from ivtlr_jax import sharding as sh

    flags = " ".join(sorted({f for p in sh.PRESETS.values() for f in p.xla_flags}))
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# ----------------------------------------------------------------------------- masks with holes, right padding
HOLES = [[0] * 3 + [1] * 6 + [0] * 2 + [1] * 9 + [0, 1, 1, 0], [1] * 4 + [0] + [1] * 10 + [0] * 3 + [1] * 6]


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_fused_prefill_with_holes_in_the_mask_equals_dense(attention):
    """Real tokens need not be one run: a mask with holes gives the dense path's hidden states, cache and row."""
    d = dims(kv_heads=1) if attention == "pallas" else dims()
    params = decoder_params(d)
    embeds, pos, kv_valid = inputs(HOLES, d, extra=3)
    want = run(d, params, embeds, pos, kv_valid, "dense", cache_len=27)
    got = run(d, params, embeds, pos, kv_valid, PALLAS if attention == "pallas" else "xla", cache_len=27)
    valid = np.asarray(kv_valid[:, :24])
    np.testing.assert_allclose(np.asarray(got[0])[valid], np.asarray(want[0])[valid], atol=1e-4, rtol=1e-4)
    for a, b in ((want[1].k, got[1].k), (want[1].v, got[1].v)):
        np.testing.assert_allclose(np.asarray(b)[:, :, :24][:, valid], np.asarray(a)[:, :, :24][:, valid], atol=1e-5)
    assert np.abs(np.asarray(got[2]) - np.asarray(want[2])).max() <= 1e-6  # rows of the last real queries


def test_attention_row_on_right_padding_is_the_last_real_tokens(tiny_pair):
    """Right-padded input: the row (fused and dense) is the last real token's, as transformers' eager attentions
    averaged over layers and heads at that query."""
    import torch

    hf, m = tiny_pair
    bb = m.backbone
    ids = np.zeros((2, 30), np.int64)
    mask = np.zeros_like(ids)
    for r, n in enumerate((23, 30)):
        ids[r, :n] = np.arange(5, 5 + n) + 3 * r
        mask[r, :n] = 1
    pos = bb.positions(ids, mask, None, "sequential")
    emb = bb.embed(m.params, jnp.asarray(ids), None).embeds
    rows = {}
    for attention in ("xla", "dense"):
        cache = bb.init_cache(2, 30, emb.dtype)
        _, _, rows[attention] = jax.jit(bb.decode, static_argnames=("attn_row", "attention"), static_argnums=4)(
            m.params, emb, jnp.asarray(pos), cache, 0, jnp.asarray(mask, bool), attn_row=True, attention=attention)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos[:, 0]).long(), output_attentions=True)
    att = torch.stack(out.attentions).mean((0, 2)).numpy()  # (B, S, S) layers and heads averaged
    last = mask.sum(1) - 1
    ref = att[np.arange(2), last]
    for attention, row in rows.items():
        assert np.abs(np.asarray(row) - ref).max() <= 1e-4, attention
    assert np.abs(np.asarray(rows["xla"]) - np.asarray(rows["dense"])).max() <= 1e-6
    assert (np.asarray(rows["xla"])[0, 23:] == 0).all()


# ----------------------------------------------------------------------------- the TPU splash kernel, every pass
# Pallas interpret mode on CPU against the dense path: float32 within 1e-5, bfloat16 within 2e-2 (absolute and
# relative: a bfloat16 ulp of hidden states near 4 is 3e-2). Every row kind in one batch: left, right, both,
# none, all padding, holes; head_dim 16 (padded to the kernel's 128 lanes); GQA (kv 2 of 4 heads) and MHA.
PREFILL_ROWS = [r for rows in MASKS.values() for r in rows] + HOLES  # (10, 24)
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def assert_close(got, want, dtype, where=None):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    if where is not None:
        got, want = got[where], want[where]
    np.testing.assert_allclose(got, want, **TOL[dtype])


def cast_case(d, dtype, embeds):
    params = jax.tree.map(lambda x: x.astype(dtype), decoder_params(d, scale=10.0 if dtype == jnp.float32 else 3.0))
    return params, embeds.astype(dtype)


@pytest.mark.parametrize("dtype,kv_heads", [(jnp.float32, 2), (jnp.float32, 4), (jnp.bfloat16, 2)])
def test_splash_prefill_equals_dense(dtype, kv_heads):
    """Causal prefill with left/right/both padding, an all-pad row and holes: hidden states, cache and row."""
    d = dims(kv_heads=kv_heads)
    embeds, pos, kv_valid = inputs(PREFILL_ROWS, d, extra=3)
    params, embeds = cast_case(d, dtype, embeds)
    want = run(d, params, embeds, pos, kv_valid, "dense", cache_len=27)
    got = run(d, params, embeds, pos, kv_valid, PALLAS, cache_len=27)
    valid = np.asarray(kv_valid[:, :24])
    assert_close(got[0][:, :24], want[0][:, :24], dtype, valid)
    for a, b in ((got[1].k, want[1].k), (got[1].v, want[1].v)):
        assert_close(a[:, :, :24], b[:, :, :24], dtype, (slice(None), valid))
    assert np.abs(np.asarray(got[2]) - np.asarray(want[2])).max() <= (1e-6 if dtype == jnp.float32 else 1e-4)


def test_splash_prefill_gradients_equal_dense():
    """float32 gradients (params and embeddings) through the kernel's backward pass, every row kind in one batch."""
    d = dims()
    params = decoder_params(d)
    embeds, pos, kv_valid = inputs(PREFILL_ROWS, d)
    valid = kv_valid[..., None]

    def loss(params, embeds, attention):
        h, _, _ = run(d, params, embeds, pos, kv_valid, attention, attn_row=False)
        return jnp.sum(jnp.where(valid, jnp.tanh(h), 0.0))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for g_dense, g_pallas in zip(jax.tree.leaves(grad(params, embeds, "dense")),
                                 jax.tree.leaves(grad(params, embeds, PALLAS)), strict=True):
        scale = max(float(np.abs(np.asarray(g_dense)).max()), 1.0)
        assert np.isfinite(np.asarray(g_pallas)).all()
        assert np.abs(np.asarray(g_pallas) - np.asarray(g_dense)).max() <= 1e-5 * scale


PREFIX, CHUNK, STEPS = 24, 5, 2  # the latent loop's pieces: a prefix, STEPS chunks of CHUNK = K + 1, a suffix
SUFFIX_ROWS = [[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3, [1] * 6, [1] * 5 + [0], [1] * 2 + [0] * 4]


@functools.partial(jax.jit, static_argnums=(1,), static_argnames=("attention",))
def latent_pieces(params, d, embeds, pos, kv_valid, attention):
    """Prefix at 0, a chunk at a static index, the others at traced indices with kv_len (as latent_step calls
    them), then the right-padded suffix (as suffix_hidden): each piece's hidden states and attention row."""
    cache = ly.init_cache(d, embeds.shape[0], kv_valid.shape[1], embeds.dtype)
    outs, start = [], 0
    for size in (PREFIX,) + (CHUNK,) * STEPS + (kv_valid.shape[1] - PREFIX - STEPS * CHUNK,):
        index, kv_len = start, None
        if PREFIX < start < PREFIX + STEPS * CHUNK:
            index, kv_len = jnp.int32(start), PREFIX + STEPS * CHUNK
        h, cache, row = ly.decoder(params, d, embeds[:, start:start + size], pos[:, :, start:start + size], cache,
                                   index, kv_valid, attn_row=True, attention=attention, kv_len=kv_len)
        outs.append((h, row))
        start += size
    return outs, cache


@pytest.mark.parametrize("dtype,kv_heads", [(jnp.float32, 2), (jnp.bfloat16, 4)])
def test_splash_latent_chunks_and_suffix_equal_dense(dtype, kv_heads):
    """Latent chunks after a cached prefix (static and traced offsets) and a right-padded suffix: hidden states,
    attention rows (what the next step selects by) and the cache."""
    d = dims(kv_heads=kv_heads)
    prefix = np.asarray(MASKS["left"] + MASKS["both"] + HOLES, bool)
    valid = np.concatenate([prefix, np.ones((6, STEPS * CHUNK), bool), np.asarray(SUFFIX_ROWS, bool)], 1)
    embeds = jnp.asarray(np.random.default_rng(2).normal(size=valid.shape + (d.hidden_size,)), jnp.float32)
    params, embeds = cast_case(d, dtype, embeds)
    pos = jnp.asarray(np.clip(np.cumsum(valid, 1) - 1, 0, None)[:, None].astype(np.int32))
    want, want_cache = latent_pieces(params, d, embeds, pos, jnp.asarray(valid), attention="dense")
    got, got_cache = latent_pieces(params, d, embeds, pos, jnp.asarray(valid), attention=PALLAS)
    start = 0
    for (h_got, row_got), (h_want, row_want) in zip(got, want, strict=True):
        assert_close(h_got, h_want, dtype, valid[:, start:start + h_got.shape[1]])
        assert np.abs(np.asarray(row_got) - np.asarray(row_want)).max() <= (1e-6 if dtype == jnp.float32 else 1e-4)
        start += h_got.shape[1]
    for a, b in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
        assert_close(a, b, dtype, (slice(None), valid))


@pytest.mark.slow
def test_splash_latent_loss_and_gradient_equal_dense(tiny_pair):
    """The whole training loss of a tiny model (prefix, K+1 chunks over the cache, suffix), kernel vs dense."""
    from test_latent import LATENT, latent_batch

    from ivtlr_jax.latent import latent_loss, make_latent_batch, to_device

    _, m = tiny_pair
    bb = m.backbone.replace_config(latent_token_id=LATENT)
    lcfg = LatentConfig(k=4)
    batch = to_device(make_latent_batch(bb, lcfg, *latent_batch(2)))
    loss = jax.jit(jax.value_and_grad(lambda p, attention: latent_loss(bb, p, lcfg, batch, attention=attention)),
                   static_argnums=1)
    want, g_want = loss(m.params, "dense")
    got, g_got = loss(m.params, PALLAS)
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


SHARDED_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from test_attention import (CHUNK, HOLES, MASKS, PREFIX, STEPS, SUFFIX_ROWS, decoder_params, dims, inputs,
                            latent_pieces, run)
from ivtlr_jax import sharding as sh
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import tpu_attention as ta

def on_mesh(mesh, d, params, *arrays):
    params = jax.device_put(params, sh.param_shardings(mesh, ly.decoder_spec(d)))
    return params, [jax.device_put(a, sh.batch_sharding(mesh, a.ndim, a.shape[0])) for a in arrays]

def diff(a, b, where):
    return float(np.abs(np.asarray(a) - np.asarray(b))[where].max())

out = {}
fsdp = sh.make_mesh("tpu_v4_8", jax.devices())  # fsdp=4
split = sh.make_mesh(sh.MeshPreset("fsdp2_tensor2", 4, None, None, fsdp=2, tensor=2), jax.devices())
d = dims()
for name, mesh, rows in (("fsdp4_batch8", fsdp, [r for k in ("left", "right", "both", "all_pad_row")
                                                for r in MASKS[k]]),
                         ("fsdp4_batch1", fsdp, MASKS["both"][:1])):
    embeds, pos, kv_valid = inputs(rows, d)
    params = decoder_params(d)
    spec = ly.AttentionSpec("pallas", mesh, interpret=True)
    valid = np.asarray(kv_valid)

    def loss(params, embeds, attention):
        h, _, _ = run(d, params, embeds, pos, kv_valid, attention, attn_row=False)
        return jnp.sum(jnp.where(kv_valid[..., None], jnp.tanh(h), 0.0))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    want, g_want = run(d, params, embeds, pos, kv_valid, "dense"), grad(params, embeds, "dense")
    mparams, (membeds, mpos, mkv) = on_mesh(mesh, d, params, embeds, pos, kv_valid)
    got = run(d, mparams, membeds, mpos, mkv, spec)
    g_got = grad(mparams, membeds, spec)
    out[name] = {"spec": [str(x) for x in ta.head_batch_spec(mesh, len(rows), d.num_kv_heads)],
                 "hidden": diff(got[0], want[0], valid), "row": float(np.abs(np.asarray(got[2]) - want[2]).max()),
                 "cache": max(diff(got[1].k, want[1].k, (slice(None), valid)),
                              diff(got[1].v, want[1].v, (slice(None), valid))),
                 "grad": max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1))
                             for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)))}

prefix = np.asarray(MASKS["left"] + HOLES, bool)
valid = np.concatenate([prefix, np.ones((4, STEPS * CHUNK), bool), np.asarray(SUFFIX_ROWS[:4], bool)], 1)
embeds = jnp.asarray(np.random.default_rng(2).normal(size=valid.shape + (d.hidden_size,)), jnp.float32)
pos = jnp.asarray(np.clip(np.cumsum(valid, 1) - 1, 0, None)[:, None].astype(np.int32))
params = decoder_params(d)
want, _ = latent_pieces(params, d, embeds, pos, jnp.asarray(valid), attention="dense")
mparams, (membeds, mpos, mkv) = on_mesh(split, d, params, embeds, pos, jnp.asarray(valid))
got, _ = latent_pieces(mparams, d, membeds, mpos, mkv, attention=ly.AttentionSpec("pallas", split, interpret=True))
start, hidden, row = 0, 0.0, 0.0
for (hg, rg), (hw, rw) in zip(got, want):
    hidden = max(hidden, diff(hg, hw, valid[:, start:start + hg.shape[1]]))
    row = max(row, float(np.abs(np.asarray(rg) - np.asarray(rw)).max()))
    start += hg.shape[1]
out["fsdp2_tensor2_latent"] = {"spec": [str(x) for x in ta.head_batch_spec(split, 4, d.num_kv_heads)],
                               "hidden": hidden, "row": row}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_splash_under_shard_map_on_four_cpu_devices_equals_dense():
    """The kernel under shard_map on simulated meshes: rows over fsdp (4 ways; batch 1 replicated), and rows over
    fsdp with kv heads over tensor for the latent pieces; equal to the dense path on one device."""
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", SHARDED_CHILD, os.path.dirname(os.path.abspath(__file__))],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["fsdp4_batch8"]["spec"] == ["fsdp", "None"], result
    assert result["fsdp4_batch1"]["spec"] == ["None", "None"], result  # 1 row does not divide: replicated
    assert result["fsdp2_tensor2_latent"]["spec"] == ["fsdp", "tensor"], result
    for name, r in result.items():
        assert r["hidden"] <= 1e-5 and r["row"] <= 1e-6, (name, r)
        assert r.get("cache", 0.0) <= 1e-5 and r.get("grad", 0.0) <= 1e-5, (name, r)

"""Attention implementations of the shared decoder against its dense reference; remat, decode phases, XLA flags.

Every fused implementation runs here in float32 on CPU (xla; the TPU kernel in Pallas interpret mode):
the masks the kernels take (rows rotated to right padding + sequence lengths; segment ids) must give the
dense einsum's outputs, attention row, cache and gradients, with left padding, right padding, both, and a
row that is all padding.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivtlr_jax.latent import LatentConfig
from ivtlr_jax.models import layers as ly
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.qwen2_vl import ModelConfig, VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dims(qk_norm=False, post_norm=False, kv_heads=2):
    return ly.DecoderDims(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                          num_kv_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=10000.0, rope_sections=(0,) * 8,
                          qk_norm=qk_norm, post_norm=post_norm)


def decoder_params(d, seed=0, scale=10.0):
    """Random decoder weights, projections scaled up so attention is far from uniform."""
    p = sp.init_params_numpy(ly.decoder_spec(d), seed)
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
STATIC = ("attn_row", "layer_wrapper", "attention", "kv_len")
decode_at = jax.jit(ly.decoder, static_argnums=(1, 5), static_argnames=STATIC)  # cache_index a Python int
decode_traced = jax.jit(ly.decoder, static_argnums=(1,), static_argnames=STATIC)  # cache_index traced


def run(d, params, embeds, pos, kv_valid, attention, cache_len=None, attn_row=True):
    b, s, _ = embeds.shape
    cache = ly.init_cache(d, b, cache_len or s, embeds.dtype)
    return decode_at(params, d, embeds, pos, cache, 0, kv_valid, attn_row=attn_row, attention=attention)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("variant", ["qwen", "chameleon"])
def test_fused_prefill_equals_dense(mask, variant):
    """The xla kernel path (rotated rows + sequence lengths) == the dense einsum: hidden, cache, attention row."""
    d = dims(qk_norm=variant == "chameleon", post_norm=variant == "chameleon")
    params = decoder_params(d)
    embeds, pos, kv_valid = inputs(MASKS[mask], d, extra=3)
    want = run(d, params, embeds, pos, kv_valid, "dense", cache_len=27)
    got = run(d, params, embeds, pos, kv_valid, "xla", cache_len=27)
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
    with pytest.raises(ValueError, match="attention='flash'"):
        ly.resolve_attention("flash", jnp.float32, 128)
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

    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
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

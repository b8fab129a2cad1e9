"""The IVT-LR latent loop against the slow PyTorch oracle, plus unit tests of the scan loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import oracle_latent_forward
from tiny import image_batch, image_run

from ivtlr_jax import IVTLRModel
from ivtlr_jax.latent import (
    LatentConfig,
    chunked_cross_entropy,
    latent_forward,
    latent_forward_jit,
    latent_loss,
    latent_start,
    latent_step,
    make_latent_batch,
    suffix_hidden,
    to_device,
)

LATENT, EOS = 296, 299
GRID = [[1, 20, 20], [1, 20, 24]]  # 100 and 120 image tokens: rows select over their own images


@pytest.fixture(scope="module")
def lm(tiny_pair):
    hf, m = tiny_pair
    cfg = dataclasses.replace(m.config, latent_token_id=LATENT, start_latent_token_id=294, end_latent_token_id=295)
    return hf, IVTLRModel(cfg, m.params)


def latent_batch(n, grid=GRID, seed=0):
    """Two rows: prompt with an image, n latent tokens, steps + answer; first latent aligned by left padding."""
    pv, grid = image_batch(grid, seed=seed)
    prompts = [[5, 6, 7] + image_run(grid[0]) + [8, 9], [12] + image_run(grid[1]) + [13, 14, 15, 16]]
    tails = [list(range(30, 41)) + [50, 51, EOS], [41, 42, 43, 44, 52, EOS]]
    p = max(map(len, prompts))
    t = max(map(len, tails))
    ids = np.zeros((2, p + n + t), np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for r, (pr, tl) in enumerate(zip(prompts, tails)):
        row = pr + [LATENT] * n + tl
        start = p - len(pr)
        ids[r, start : start + len(row)] = row
        mask[r, start : start + len(row)] = 1
        labels[r, p + n : p + n + len(tl)] = tl
    return ids, mask, labels, pv, grid


ORACLE_CASES = [
    # n, k, latent_text, position_mode, selection_order
    (0, 4, True, "sequential", "position"),
    (0, 4, True, "mrope", "position"),
    (1, 4, True, "sequential", "position"),
    (3, 4, True, "sequential", "position"),
    (3, 32, True, "sequential", "position"),
    (3, 32, True, "mrope", "position"),
    (1, 32, False, "sequential", "position"),
    (3, 4, False, "mrope", "position"),
    (3, 0, True, "sequential", "position"),
    (1, 0, True, "mrope", "position"),
    (3, 4, True, "sequential", "score"),
]


@pytest.mark.parametrize("n,k,latent_text,mode,order", ORACLE_CASES)
def test_matches_oracle(lm, n, k, latent_text, mode, order):
    hf, m = lm
    ids, mask, labels, pv, grid = latent_batch(n)
    out = m.latent_forward(ids, mask, labels, pv, grid, k=k, latent_text=latent_text, position_mode=mode,
                           selection_order=order)
    loss, logits, sel, valid = oracle_latent_forward(hf, LATENT, ids, mask, labels, pv, grid, k, latent_text,
                                                     mode, order)
    assert out.logits.shape == logits.shape
    assert out.selected.shape == (n, 2, k)
    np.testing.assert_array_equal(out.selected, sel)
    assert np.abs(out.logits - logits)[valid].max() <= 1e-4
    assert abs(out.loss - loss) <= 1e-5 * abs(loss)


def test_shapes_dtypes_and_selection_invariants(lm):
    _, m = lm
    n, k = 3, 32
    ids, mask, labels, pv, grid = latent_batch(n)
    out = m.latent_forward(ids, mask, labels, pv, grid, k=k)
    s = ids.shape[1]
    assert out.logits.shape == (2, s - n + n * (k + 1), m.config.vocab_size)
    assert out.logits.dtype == np.float32 and np.issubdtype(out.selected.dtype, np.integer)
    assert isinstance(out.loss, float) and np.isfinite(out.loss)
    n_img = [100, 120]
    for b in range(2):
        picks = out.selected[:, b].reshape(-1)
        assert len(set(picks.tolist())) == n * k  # no image position selected twice
        assert picks.min() >= 0 and picks.max() < n_img[b]  # inside the row's own image span
    assert out.selected[:, 0].max() < 100


def test_n0_equals_plain_forward(lm):
    _, m = lm
    ids, mask, labels, pv, grid = latent_batch(0)
    out = m.latent_forward(ids, mask, labels, pv, grid, k=4)
    logits = m.logits(ids, mask, pv, grid, position_mode="sequential")
    np.testing.assert_allclose(out.logits[mask > 0], logits[mask > 0], atol=1e-5)
    lp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    nll = -np.take_along_axis(np.asarray(lp), np.where(keep, tgt, 0)[..., None], -1)[..., 0]
    assert abs(out.loss - nll[keep].mean()) <= 1e-5 * out.loss


def coconut_oracle(hf, ids, mask, labels, pv, grid):
    """Coconut with torch: each <|latent|> slot, in turn, becomes the last hidden state before it."""
    import torch

    lm_ = hf.model.language_model
    with torch.no_grad():
        emb = hf.model.get_input_embeddings()(torch.tensor(ids))
        feats = torch.cat(hf.model.get_image_features(torch.tensor(pv), torch.tensor(grid)).pooler_output)
        img = (torch.tensor(ids) == hf.config.image_token_id).unsqueeze(-1).expand_as(emb)
        emb = emb.masked_scatter(img, feats)
        pos = torch.tensor((np.cumsum(mask, 1) - 1).clip(0))
        for t in np.nonzero(ids[0] == LATENT)[0]:
            out = lm_(inputs_embeds=emb[:, :t], attention_mask=torch.tensor(mask[:, :t]), position_ids=pos[:, :t])
            emb[:, t] = out.last_hidden_state[:, -1]
        out = lm_(inputs_embeds=emb, attention_mask=torch.tensor(mask), position_ids=pos)
        logits = hf.lm_head(out.last_hidden_state).float()
    lab = np.where(mask > 0, labels, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.tensor(lab[:, 1:]).reshape(-1).long(), ignore_index=-100)
    return float(loss), logits.numpy()


def test_k0_is_coconut_chunk_of_one(lm):
    hf, m = lm
    ids, mask, labels, pv, grid = latent_batch(2)
    out = m.latent_forward(ids, mask, labels, pv, grid, k=0)
    assert out.logits.shape[1] == ids.shape[1]  # each latent slot holds exactly h
    assert out.selected.shape == (2, 2, 0)
    loss, logits = coconut_oracle(hf, ids, mask, labels, pv, grid)
    valid = mask.astype(bool)
    assert np.abs(out.logits - logits)[valid].max() <= 1e-4
    assert abs(out.loss - loss) <= 1e-5 * abs(loss)


def unrolled_loss(m, lcfg, batch):
    """The latent loss as a function of offsets added to h before every step (production pieces, unrolled)."""
    bb = m.backbone

    def loss_of(params, offsets):  # offsets (n, B, H)
        hidden, emb, carry, kv_valid = latent_start(bb, params, lcfg, batch)
        chunks = []
        for t in range(batch.n):
            carry = carry.replace(h=carry.h + offsets[t].astype(carry.h.dtype))
            carry, (out, _) = latent_step(bb, params, lcfg, batch, emb, kv_valid, carry, t)
            chunks.append(out)
        hidden = suffix_hidden(bb, params, batch, jnp.concatenate([hidden, *chunks], 1), carry.cache)
        return chunked_cross_entropy(bb, params, hidden, batch.labels)

    return loss_of


def _grad_setup(lm, latent_grad, n=3):
    _, m = lm
    lcfg = LatentConfig(k=4, latent_grad=latent_grad)
    ids, mask, labels, pv, grid = latent_batch(n)
    batch = to_device(make_latent_batch(m.backbone, lcfg, ids, mask, labels, pv, grid))
    return m, lcfg, batch, jnp.zeros((n, 2, m.config.hidden_size))


def test_stop_gradient_through_latent_state(lm):
    """With latent_grad="stop" no gradient reaches h at any step; with "full" every step's h gets one."""
    for mode in ("stop", "full"):
        m, lcfg, batch, zero = _grad_setup(lm, mode)
        loss_of = unrolled_loss(m, lcfg, batch)
        loss, g = jax.jit(jax.value_and_grad(lambda off: loss_of(m.params, off)))(zero)
        want = jax.jit(lambda p: latent_loss(m.backbone, p, lcfg, batch))(m.params)
        assert abs(float(loss) - float(want)) <= 1e-6 * abs(float(want))  # the unrolled pieces are the loop
        per_step = np.abs(np.asarray(g)).reshape(batch.n, -1).max(1)
        if mode == "stop":
            assert (per_step == 0.0).all(), per_step
        else:
            assert (per_step > 1e-6).all(), per_step


def test_full_gradient_matches_finite_differences(lm):
    """float64: the analytic gradient w.r.t. h at every step equals central differences within ~1e-6."""
    with jax.enable_x64(True):
        m, lcfg, batch, zero = _grad_setup(lm, "full")
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), m.params)
        loss_of = jax.jit(lambda off: unrolled_loss(m, lcfg, batch)(params64, off))
        zero = zero.astype(jnp.float64)
        g = jax.grad(loss_of)(zero)
        assert g.dtype == jnp.float64 and float(jnp.abs(g).max()) > 1e-6
        flat = jnp.abs(g).reshape(-1)
        one_hot = jnp.zeros(g.size, jnp.float64).at[jnp.argmax(flat)].set(1.0).reshape(g.shape)
        rng = np.random.default_rng(0)
        rand = jnp.asarray(rng.normal(size=g.shape))
        for direction in (g / jnp.linalg.norm(g), one_hot, rand / jnp.linalg.norm(rand)):
            eps = 1e-5
            fd = (loss_of(eps * direction) - loss_of(-eps * direction)) / (2 * eps)
            analytic = jnp.vdot(g, direction)
            assert abs(float(fd - analytic)) <= 1e-6 * max(abs(float(analytic)), 1e-3), (float(fd), float(analytic))


def test_same_shapes_do_not_retrace(lm):
    _, m = lm
    ids, mask, labels, pv, grid = latent_batch(1)
    lcfg = LatentConfig(k=4)
    latent_forward(m.backbone, m.params, lcfg, ids, mask, labels, pv, grid)
    before = latent_forward_jit._cache_size()
    pv2, _ = image_batch(grid, seed=5)
    labels2 = labels.copy()
    labels2[labels2 == 50] = 60
    latent_forward(m.backbone, m.params, lcfg, ids, mask, labels2, pv2, grid)
    assert latent_forward_jit._cache_size() == before


def test_bad_inputs(lm):
    _, m = lm
    ids, mask, labels, pv, grid = latent_batch(2)
    p = int(np.argmax(ids[0] == LATENT))
    bad = ids.copy()
    bad[1, p : p + 2] = 7  # row 1 without latent tokens
    with pytest.raises(ValueError, match="different numbers of <\\|latent\\|>"):
        m.latent_forward(bad, mask, labels, pv, grid, k=4)
    gap = ids.copy()
    gap[:, p + 1], gap[:, p + 2] = 7, LATENT
    with pytest.raises(ValueError, match="not contiguous"):
        m.latent_forward(gap, mask, labels, pv, grid, k=4)
    shifted = np.roll(ids, 1, axis=1)
    shifted[0] = ids[0]
    with pytest.raises(ValueError, match="same index in every row"):
        m.latent_forward(shifted, np.roll(mask, 1, 1) * 0 + 1, labels, pv, grid, k=4)
    with pytest.raises(ValueError, match="labels has shape"):
        m.latent_forward(ids, mask, labels[:, 1:], pv, grid, k=4)
    with pytest.raises(ValueError, match="k=-1"):
        m.latent_forward(ids, mask, labels, pv, grid, k=-1)
    with pytest.raises(ValueError, match="n\\*k"):
        m.latent_forward(ids, mask, labels, pv, grid, k=64)
    _, plain = lm[0], IVTLRModel(dataclasses.replace(m.config, latent_token_id=None), m.params)
    with pytest.raises(ValueError, match="--add-latent-tokens"):
        plain.latent_forward(ids, mask, labels, pv, grid, k=4)


def test_chunked_training_loss_equals_full_loss_and_gradient(lm):
    _, m = lm
    bb, lcfg = m.backbone, LatentConfig(k=4)
    ids, mask, labels, pv, grid = latent_batch(2)
    batch = to_device(make_latent_batch(bb, lcfg, ids, mask, labels, pv, grid))
    full = latent_forward_jit(bb, m.params, lcfg, batch)[0]
    chunked = jax.jit(latent_loss, static_argnums=(0, 2))(bb, m.params, lcfg, batch)
    assert abs(float(full) - float(chunked)) <= 1e-5 * float(full)
    g_full = jax.jit(jax.grad(lambda p: latent_forward_jit(bb, p, lcfg, batch)[0]))(m.params)
    g_chunk = jax.jit(jax.grad(lambda p: latent_loss(bb, p, lcfg, batch)))(m.params)
    for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_chunk)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["sequential", "mrope"])
def test_repadded_batch_gives_the_same_loss(lm, mode):
    """Multi-host shape agreement widens batches with pads; the computation must not change."""
    from ivtlr_jax.data import repad

    _, m = lm
    ids, mask, labels, pv, grid = latent_batch(3)
    p = int(np.argmax(ids[0] == LATENT))
    wide = repad({"input_ids": ids, "attention_mask": mask, "labels": labels, "prefix_len": np.int32(p)},
                 p + 5, ids.shape[1] - p + 7, pad_id=0)
    assert wide["input_ids"].shape == (2, ids.shape[1] + 12) and int(wide["prefix_len"]) == p + 5
    a = m.latent_forward(ids, mask, labels, pv, grid, k=4, position_mode=mode)
    b = m.latent_forward(wide["input_ids"], wide["attention_mask"], wide["labels"], pv, grid, k=4,
                         position_mode=mode)
    assert abs(a.loss - b.loss) <= 1e-5 * a.loss
    np.testing.assert_array_equal(a.selected, b.selected)
    valid = make_latent_batch(m.backbone, LatentConfig(k=4), ids, mask, labels, pv, grid).kv_valid  # real tokens
    np.testing.assert_allclose(b.logits[:, 5:5 + a.logits.shape[1]][valid], a.logits[valid], atol=1e-4)


def test_image_after_the_first_latent_token_is_refused(lm):
    """Only the prefix is embedded with images: image tokens in the suffix are an error naming the row."""
    _, m = lm
    ids, mask, labels, pv, grid = latent_batch(2)
    p = int(np.argmax(ids[0] == LATENT))
    late = np.concatenate([ids[:, :p], ids[:, p:p + 2], np.full((2, 2), 290), ids[:, p + 2:]], 1)
    mask2 = np.concatenate([mask[:, :p + 2], np.ones((2, 2), mask.dtype), mask[:, p + 2:]], 1)
    late[0, p + 2:p + 4] = 30  # row 1 only
    with pytest.raises(ValueError, match=r"^row 1: image tokens \(id 290\) come after the first <\|latent\|>") as e:
        make_latent_batch(m.backbone, LatentConfig(k=4), late, mask2)
    assert "\n" not in str(e.value) and "before the latent tokens" in str(e.value)


def test_mask_with_holes_gives_the_dense_result(lm):
    """A prompt whose real tokens are not one run (a masked token inside it): the fused prefill (xla) gives the
    dense path's loss, logits and selections."""
    _, m = lm
    ids, mask, labels, pv, grid = latent_batch(2)
    holes = mask.copy()
    first = int(np.argmax(mask[0]))
    holes[0, first + 1] = 0  # row 0: its second prompt token masked out
    holes[1, -3] = 0  # row 1: a hole in the suffix too
    labels = np.where(holes > 0, labels, -100)
    lcfg = LatentConfig(k=4)
    a = latent_forward(m.backbone, m.params, lcfg, ids, holes, labels, pv, grid, attention="xla")
    b = latent_forward(m.backbone, m.params, lcfg, ids, holes, labels, pv, grid, attention="dense")
    np.testing.assert_array_equal(np.asarray(a.selected), np.asarray(b.selected))
    assert abs(float(a.loss) - float(b.loss)) <= 1e-5 * abs(float(b.loss))
    valid = make_latent_batch(m.backbone, lcfg, ids, holes, labels, pv, grid).kv_valid
    np.testing.assert_allclose(np.asarray(a.logits)[valid], np.asarray(b.logits)[valid], atol=1e-4)

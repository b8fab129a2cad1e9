"""The causal audit: each intervention of the latent loop changes exactly what it names; the image-side
interventions; the paired statistics against hand-computed values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_latent import LATENT, latent_batch
from tiny import image_run

from ivtlr_jax import IVTLRModel
from ivtlr_jax.eval.audit import (
    ablation_stats,
    blank_image,
    intervene_images,
    mcnemar_exact,
    paired_bootstrap_ci,
    parse_ablations,
    shuffle_permutation,
)
from ivtlr_jax.latent import (
    LatentConfig,
    ablate_h,
    derangement,
    latent_prefill,
    latent_start,
    latent_step,
    make_latent_batch,
    to_device,
)


@pytest.fixture(scope="module")
def lm(tiny_pair):
    hf, m = tiny_pair
    cfg = dataclasses.replace(m.config, latent_token_id=LATENT, start_latent_token_id=294, end_latent_token_id=295)
    return hf, IVTLRModel(cfg, m.params)


def _batch(m, lcfg, n=3):
    ids, mask, labels, pv, grid = latent_batch(n)
    return to_device(make_latent_batch(m.backbone, lcfg, ids, mask, labels, pv, grid))


def _unrolled(m, lcfg, batch, replace_h):
    """The intact loop's pieces, unrolled, with h replaced by replace_h(h, t) before every step."""
    bb = m.backbone
    hidden, emb, carry, kv_valid = latent_start(bb, m.params, lcfg, batch)
    chunks, sels = [], []
    for t in range(batch.n):
        carry = carry.replace(h=replace_h(carry.h, t))
        carry, (out, idx) = latent_step(bb, m.params, lcfg, batch, emb, kv_valid, carry, t)
        chunks.append(out)
        sels.append(idx)
    return jnp.concatenate([hidden, *chunks], 1), jnp.stack(sels)


@pytest.mark.parametrize("ablate", ["latent-zero", "latent-shuffle", "latent-noise"])
def test_latent_ablations_change_only_the_h_slot(lm, ablate):
    """The ablated loop equals the intact loop with only h replaced before each chunk."""
    _, m = lm
    intact = LatentConfig(k=4)
    lcfg = dataclasses.replace(intact, ablate=ablate, ablate_seed=3)
    batch = _batch(m, intact)
    hidden, _, selected = latent_prefill(m.backbone, m.params, lcfg, batch)
    want, want_sel = _unrolled(m, intact, batch, lambda h, t: ablate_h(lcfg, h, t))
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(selected), np.asarray(want_sel))
    base, _, base_sel = latent_prefill(m.backbone, m.params, intact, batch)
    p = batch.prefix_len
    np.testing.assert_array_equal(np.asarray(hidden[:, :p]), np.asarray(base[:, :p]))  # the prefix is untouched
    np.testing.assert_array_equal(np.asarray(selected[0]), np.asarray(base_sel[0]))  # step 0 selects from the prefix
    assert not np.allclose(np.asarray(hidden[:, p:]), np.asarray(base[:, p:]))


def test_latent_zero_noise_shuffle_values():
    lcfg = LatentConfig(k=4, ablate="latent-zero")
    h = jax.random.normal(jax.random.PRNGKey(0), (5, 8))
    assert not np.asarray(ablate_h(lcfg, h, 0)).any()
    noisy = ablate_h(dataclasses.replace(lcfg, ablate="latent-noise", ablate_seed=1), h, 2)
    np.testing.assert_allclose(np.linalg.norm(noisy, axis=-1), np.linalg.norm(h, axis=-1), rtol=1e-5)
    again = ablate_h(dataclasses.replace(lcfg, ablate="latent-noise", ablate_seed=1), h, 2)
    np.testing.assert_array_equal(np.asarray(noisy), np.asarray(again))
    shuffled = np.asarray(ablate_h(dataclasses.replace(lcfg, ablate="latent-shuffle"), h, 0))
    src = [int(np.nonzero((np.asarray(h) == row).all(1))[0][0]) for row in shuffled]
    assert sorted(src) == list(range(5)) and all(s != i for i, s in enumerate(src))  # a derangement
    np.testing.assert_array_equal(np.asarray(ablate_h(LatentConfig(k=4), h, 0)), np.asarray(h))


@pytest.mark.parametrize("b", [2, 3, 4, 7])
def test_derangement_has_no_fixed_point(b):
    for seed in range(20):
        perm = np.asarray(derangement(b, jax.random.PRNGKey(seed)))
        assert sorted(perm.tolist()) == list(range(b)) and (perm != np.arange(b)).all()
        host = shuffle_permutation(b, seed)
        assert sorted(host.tolist()) == list(range(b)) and (host != np.arange(b)).all()


def test_select_random_differs_from_top_k_and_reproduces(lm):
    _, m = lm
    intact = LatentConfig(k=4)
    batch = _batch(m, intact)
    sel = lambda lcfg: np.asarray(latent_prefill(m.backbone, m.params, lcfg, batch)[2])  # noqa: E731
    top = sel(intact)
    rnd = sel(dataclasses.replace(intact, ablate="select-random", ablate_seed=5))
    assert not np.array_equal(rnd, top)
    np.testing.assert_array_equal(rnd, sel(dataclasses.replace(intact, ablate="select-random", ablate_seed=5)))
    assert not np.array_equal(rnd, sel(dataclasses.replace(intact, ablate="select-random", ablate_seed=6)))
    for r, n_img in enumerate([100, 120]):  # never used twice, inside the row's own image
        picks = rnd[:, r].reshape(-1)
        assert len(set(picks.tolist())) == picks.size and picks.min() >= 0 and picks.max() < n_img


def test_select_bottom_takes_the_least_attended(lm):
    _, m = lm
    intact = LatentConfig(k=4)
    lcfg = dataclasses.replace(intact, ablate="select-bottom")
    batch = _batch(m, intact)
    _, emb, carry, _ = latent_start(m.backbone, m.params, intact, batch)
    bottom = np.asarray(latent_prefill(m.backbone, m.params, lcfg, batch)[2])
    scores = np.take_along_axis(np.asarray(carry.attn), np.asarray(emb.image_pos), 1)
    scores = np.where(np.asarray(emb.image_valid), scores, np.inf)
    for r in range(2):
        want = np.sort(np.argsort(scores[r], kind="stable")[:4])
        np.testing.assert_array_equal(bottom[0, r], want)


def test_bad_ablation_is_refused():
    with pytest.raises(ValueError, match="ablate"):
        LatentConfig(ablate="latent-one")
    with pytest.raises(ValueError, match="unknown"):
        parse_ablations("latent-zero,image-flip")
    assert parse_ablations("latent-zero, image-blank,latent-zero") == ["latent-zero", "image-blank"]
    assert parse_ablations(None) == []


def test_image_blank_changes_the_image_embeddings_only(lm):
    from ivtlr_jax.data import process_image

    _, m = lm
    bb = m.backbone
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    blank = blank_image(image)
    assert blank.size == image.size
    assert np.asarray(blank).reshape(-1, 3).std(0).max() == 0
    np.testing.assert_allclose(np.asarray(blank)[0, 0], np.asarray(image).reshape(-1, 3).mean(0), atol=0.5)
    opts = bb.image_options()
    embs = []
    for im in (image, blank):
        pv, grid = process_image(im, opts)
        grid = np.asarray(grid).reshape(1, 3)
        ids = np.asarray([[5, 6] + image_run(grid[0]) + [8, 9]], np.int32)
        mask = np.ones_like(ids)
        images = bb.prepare_images(ids, mask, pv, grid)
        embs.append((ids, bb.embed(m.params, jnp.asarray(ids), jax.tree.map(jnp.asarray, images))))
    (ids, a), (ids_b, b) = embs
    np.testing.assert_array_equal(ids, ids_b)
    is_img = ids[0] == m.config.image_token_id
    np.testing.assert_array_equal(np.asarray(a.embeds)[0, ~is_img], np.asarray(b.embeds)[0, ~is_img])
    assert not np.allclose(np.asarray(a.embeds)[0, is_img], np.asarray(b.embeds)[0, is_img])
    np.testing.assert_array_equal(np.asarray(a.image_pos), np.asarray(b.image_pos))


def test_image_shuffle_permutes_images_across_rows():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    out = intervene_images(images, "image-shuffle", seed=2)
    perm = shuffle_permutation(3, 2)
    for i, j in enumerate(perm):
        np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(images[j]))
        assert j != i
    with pytest.raises(ValueError, match="image ablation"):
        intervene_images(images, "latent-zero")


# ----------------------------------------------------------------------------- statistics
def test_mcnemar_exact_hand_values():
    # b = intact right / ablated wrong, c = the reverse; p = 2 * P(Binom(b + c, 1/2) <= min(b, c))
    def pairs(b, c, both=0, neither=0):
        intact = [1] * b + [0] * c + [1] * both + [0] * neither
        ablated = [0] * b + [1] * c + [1] * both + [0] * neither
        return intact, ablated

    assert mcnemar_exact(*pairs(1, 5, 3, 2)) == pytest.approx(14 / 64)  # 2 * (1 + 6) / 2^6
    assert mcnemar_exact(*pairs(0, 3)) == pytest.approx(0.25)  # 2 * 1 / 8
    assert mcnemar_exact(*pairs(2, 2)) == 1.0  # 2 * 11 / 16 capped
    assert mcnemar_exact(*pairs(0, 0, 4, 4)) == 1.0  # no discordant pair
    assert mcnemar_exact(*pairs(8, 0)) == pytest.approx(2 / 256)
    assert mcnemar_exact(*pairs(2, 8)) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_paired_bootstrap_hand_values():
    # every row flips right -> wrong: every resample's mean difference is -1
    assert paired_bootstrap_ci([1, 1, 1, 1], [0, 0, 0, 0]) == (-1.0, -1.0)
    assert paired_bootstrap_ci([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)
    # differences (0, -1): resample means -1, -0.5, 0 with probabilities 1/4, 1/2, 1/4 -> interval [-1, 0]
    assert paired_bootstrap_ci([1, 1], [1, 0], seed=0) == (-1.0, 0.0)
    a = np.random.default_rng(0).integers(0, 2, 200)
    b = np.where(np.random.default_rng(1).random(200) < 0.2, 1 - a, a)
    ci = paired_bootstrap_ci(a, b, seed=7)
    assert ci == paired_bootstrap_ci(a, b, seed=7)  # seeded
    assert ci[0] <= (b.mean() - a.mean()) <= ci[1]
    # normal approximation of the paired difference's standard error, as a sanity bound on the width
    d = b - a
    se = d.std() / np.sqrt(d.size)
    assert abs((ci[1] - ci[0]) - 2 * 1.96 * se) < 0.25 * (2 * 1.96 * se)


def test_ablation_stats_table():
    intact = [1, 1, 1, 0, 1, 0]
    ablated = [0, 1, 0, 0, 1, 1]
    s = ablation_stats(intact, ablated, list("AABCAD"), list("BACCAA"), seed=0)
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["delta"] == pytest.approx(3 / 6 - 4 / 6)
    assert s["p_value"] == 1.0  # b=2, c=1: 2 * (1 + 3) / 8 capped at 1
    assert s["changed"] == pytest.approx(3 / 6)
    assert s["ci95"][0] <= s["delta"] <= s["ci95"][1]


def test_audit_log_and_reports(tmp_path):
    from types import SimpleNamespace

    from ivtlr_jax.eval.audit import AuditLog
    from ivtlr_jax.eval.report import ablation_chart, audit_markdown

    sel = np.array([[[0, 1]], [[2, 3]]])  # (n=2, B=1, k=2)
    h = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # (n, B, H)
    intact = SimpleNamespace(selected=sel, latent_h=h)
    blank = SimpleNamespace(selected=np.array([[[0, 2]], [[1, 5]]]), latent_h=np.array([[[1.0, 1.0]], [[0.0, 2.0]]]))
    log = AuditLog(["image-blank"])
    log.add({"correct": True, "extracted": "A"}, intact, 0, {"image-blank": ({"correct": False, "extracted": "B"},
                                                                            blank)})
    log.add({"correct": False, "extracted": "C"}, intact, 0, {"image-blank": ({"correct": False, "extracted": "C"},
                                                                             blank)})
    med = log.mediation()
    assert med[0]["cosine_image_blank"] == pytest.approx(1 / np.sqrt(2)) and med[1]["cosine_image_blank"] == 1.0
    assert med[0]["overlap_with_intact"]["image-blank"] == 0.5 and med[0]["overlap_other_steps"]["image-blank"] == 0.5
    assert med[1]["overlap_with_intact"]["image-blank"] == 0.0 and med[1]["overlap_other_steps"]["image-blank"] == 0.5
    stats = log.ablations()["image-blank"]
    assert stats["accuracy"] == 0.0 and stats["delta"] == -0.5 and stats["changed"] == 0.5 and stats["p_value"] == 1.0
    summary = {"accuracy": 0.5, "ablations": log.ablations(), "mediation": med}
    text = "\n".join(audit_markdown(summary))
    assert "| image-blank | 0.00 | -50.00 |" in text and "| 0 | 0.7071 | 0.500 / 0.500 |" in text
    ablation_chart(str(tmp_path / "a.png"), "t", 0.5, summary["ablations"])
    assert (tmp_path / "a.png").stat().st_size > 0

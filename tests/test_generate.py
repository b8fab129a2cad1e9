"""KV-cached generation after the latent steps against repeated full forwards, early stop, bad input."""

import dataclasses

import numpy as np
import pytest
from oracle import reference_greedy
from tiny import image_batch, image_run, left_pad

from ivtlr_jax import IVTLRModel
from ivtlr_jax.generate import SamplingConfig, generate, generate_jit, latent_prompt
from ivtlr_jax.latent import LatentConfig

LATENT = 296
GRID = [[1, 20, 20], [1, 20, 24]]  # 100 and 120 image tokens
T = 6  # new tokens


@pytest.fixture(scope="module")
def lm(tiny_pair):
    _, m = tiny_pair
    cfg = dataclasses.replace(m.config, latent_token_id=LATENT, start_latent_token_id=294, end_latent_token_id=295)
    return IVTLRModel(cfg, m.params)


def test_greedy_equals_transformers_generate(tiny_pair, lm):
    """n = 0 with native M-RoPE positions: our cached greedy decoding equals transformers' generate."""
    import torch

    hf, _ = tiny_pair
    ids, mask, pv, grid = prompt_batch(0)
    res = lm.generate(ids, mask, pv, grid, max_new_tokens=T, position_mode="mrope", eos_token_ids=[299])
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid), max_new_tokens=T,
                          do_sample=False, eos_token_id=299, pad_token_id=0)
    want = out[:, ids.shape[1]:].numpy()
    assert want.shape == (2, T)
    np.testing.assert_array_equal(res.tokens, want)


def prompt_batch(n, grid=GRID, seed=0):
    """Two prompts of different lengths with an image each, n latent tokens, left-padded."""
    pv, grid = image_batch(grid, seed=seed)
    prompts = [[5, 6, 7] + image_run(grid[0]) + [8, 9], [12] + image_run(grid[1]) + [13, 14, 15, 16, 17, 18]]
    ids, mask = left_pad([p + [LATENT] * n for p in prompts])
    return ids, mask, pv, grid


@pytest.mark.parametrize("n,k,mode", [(0, 4, "sequential"), (3, 4, "sequential"), (3, 32, "mrope")])
def test_cached_greedy_equals_full_forwards(lm, n, k, mode):
    ids, mask, pv, grid = prompt_batch(n)
    res = lm.generate(ids, mask, pv, grid, max_new_tokens=T, k=k, position_mode=mode, eos_token_ids=[299])
    want = reference_greedy(lm, n, ids, mask, pv, grid, T, k, mode)
    assert res.tokens.shape == (2, T) and res.lengths.shape == (2,)
    assert res.selected.shape == (n, 2, k)
    assert not (want == 299).any()  # no EOS: every row runs to max_new_tokens
    np.testing.assert_array_equal(res.tokens, want)
    np.testing.assert_array_equal(res.lengths, [T, T])
    assert res.steps == T
    if n:
        sel = lm.latent_forward(ids, mask, None, pv, grid, k=k, position_mode=mode).selected
        np.testing.assert_array_equal(res.selected, sel)


def test_early_stop_on_eos_and_padding(lm):
    ids, mask, pv, grid = prompt_batch(3)
    free = lm.generate(ids, mask, pv, grid, max_new_tokens=T, k=4, eos_token_ids=[299])
    # Pick EOS ids the rows emit early: row 0 stops at its 3rd token at the latest, row 1 at its 2nd.
    eos = (int(free.tokens[0, 2]), int(free.tokens[1, 1]))
    res = lm.generate(ids, mask, pv, grid, max_new_tokens=T, k=4, eos_token_ids=eos, pad_token_id=0)
    for r in range(2):
        hit = int(np.nonzero(np.isin(free.tokens[r], eos))[0][0])
        assert res.lengths[r] == hit + 1
        np.testing.assert_array_equal(res.tokens[r, : hit + 1], free.tokens[r, : hit + 1])
        assert (res.tokens[r, hit + 1 :] == 0).all()
    assert res.steps == int(res.lengths.max()) < T  # the loop stopped once both rows were done


def test_plain_generation_without_image_and_single_row(lm):
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    res = lm.generate(ids, mask, max_new_tokens=4, eos_token_ids=[299])
    want = reference_greedy(lm, 0, ids, mask, None, None, 4, 0, "sequential")
    np.testing.assert_array_equal(res.tokens, want)
    assert res.selected.shape == (0, 2, 32)
    one = lm.generate(ids[1:, 2:], mask[1:, 2:], max_new_tokens=4, eos_token_ids=[299])
    np.testing.assert_array_equal(one.tokens[0], want[1])


def test_sampling_is_seeded_and_top_p_small_is_greedy(lm):
    ids, mask, pv, grid = prompt_batch(1)
    kw = dict(max_new_tokens=T, k=4, eos_token_ids=[299])
    a = lm.generate(ids, mask, pv, grid, temperature=1.5, seed=3, **kw)
    b = lm.generate(ids, mask, pv, grid, temperature=1.5, seed=3, **kw)
    c = lm.generate(ids, mask, pv, grid, temperature=1.5, seed=4, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    greedy = lm.generate(ids, mask, pv, grid, **kw)
    nucleus = lm.generate(ids, mask, pv, grid, temperature=1.0, top_p=1e-6, seed=9, **kw)
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_one_compilation_per_shape(lm):
    ids, mask, pv, grid = prompt_batch(2)
    lcfg = LatentConfig(k=4)
    generate(lm.backbone, lm.params, lcfg, ids, mask, pv, grid, max_new_tokens=3, eos_token_ids=[299])
    before = generate_jit._cache_size()
    pv2, _ = image_batch(grid, seed=7)
    ids2 = ids.copy()
    ids2[ids2 == 13] = 40
    generate(lm.backbone, lm.params, lcfg, ids2, mask, pv2, grid, max_new_tokens=3, eos_token_ids=[299],
             sampling=SamplingConfig())
    assert generate_jit._cache_size() == before


def test_bad_inputs(lm):
    ids, mask, pv, grid = prompt_batch(3)
    final = ids.shape[1] - 3 + 3 * 5
    with pytest.raises(ValueError, match="max_cache_len=20"):
        lm.generate(ids, mask, pv, grid, k=4, max_new_tokens=4, max_cache_len=20)
    lm.generate(ids, mask, pv, grid, k=4, max_new_tokens=4, max_cache_len=final + 4)
    with pytest.raises(ValueError, match="must end with the latent tokens"):
        lm.generate(np.concatenate([ids, ids[:, :2]], 1), np.concatenate([mask, mask[:, -2:]], 1), pv, grid, k=4)
    right = np.concatenate([ids[:, :1], ids], 1)
    right_mask = np.concatenate([mask[:, :1] * 0 + 1, mask], 1)
    right_mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-pad"):
        lm.generate(right, right_mask, pv, grid, k=4)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        lm.generate(ids, mask, pv, grid, k=4, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(ids, mask, pv, grid, k=4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="n\\*k"):
        lm.generate(ids, mask, pv, grid, k=64)
    plain = IVTLRModel(dataclasses.replace(lm.config, latent_token_id=None), lm.params)
    with pytest.raises(ValueError, match="--add-latent-tokens"):
        latent_prompt(plain.config, [5, 6], 3)
    assert latent_prompt(lm.config, [5, 6], 2) == [5, 6, LATENT, LATENT]
    ids0, mask0 = left_pad([[5, 6, 7]])
    assert plain.generate(ids0, mask0, max_new_tokens=2).tokens.shape == (1, 2)  # n = 0 works without the token

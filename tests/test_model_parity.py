"""Numerical parity of the Flax Qwen2-VL with transformers' PyTorch model (float32, eager attention)."""

import numpy as np
import pytest
import torch
from tiny import image_batch, image_run, left_pad

from ivtlr_jax.models.base import sequential_positions

TOL = 1e-4
GRID = [[1, 20, 20], [1, 14, 10]]  # 280x280 and 196x140 images: 100 and 35 image tokens


def two_row_batch():
    pv, grid = image_batch(GRID, seed=1)
    r0 = [5, 6, 7] + image_run(grid[0]) + [8, 9, 10, 11]
    r1 = [12, 13] + image_run(grid[1]) + list(range(20, 100))
    ids, mask = left_pad([r0, r1])
    assert mask[0, 0] == 0  # row 0 needs left padding
    return ids, mask, pv, grid


def hf_logits(hf, ids, mask, pv, grid, position_ids=None):
    kw = {"position_ids": torch.tensor(position_ids).long()} if position_ids is not None else {}
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                 image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor((ids == hf.config.image_token_id)
                                                                                  .astype(np.int64)),
                 output_attentions=True, **kw)
    return out


def test_vision_tower_parity(tiny_pair):
    hf, m = tiny_pair
    pv, grid = image_batch(GRID, seed=2)
    ours = np.asarray(m.image_features(pv, grid))
    with torch.no_grad():
        ref = torch.cat(hf.model.get_image_features(torch.tensor(pv), torch.tensor(grid)).pooler_output).numpy()
    assert ours.shape == (135, 64)
    assert np.abs(ours - ref).max() <= TOL


def test_images_do_not_attend_to_each_other(tiny_pair):
    _, m = tiny_pair
    pv, grid = image_batch(GRID, seed=3)
    both = np.asarray(m.image_features(pv, grid))
    first = np.asarray(m.image_features(pv[:400], grid[:1]))
    np.testing.assert_allclose(both[:100], first, atol=1e-5)


@pytest.mark.parametrize("mode", ["mrope", "sequential"])
def test_logits_parity(tiny_pair, mode):
    hf, m = tiny_pair
    ids, mask, pv, grid = two_row_batch()
    ours = m.logits(ids, mask, pv, grid, position_mode=mode)
    pos = sequential_positions(mask)[:, 0] if mode == "sequential" else None
    ref = hf_logits(hf, ids, mask, pv, grid, position_ids=pos).logits.numpy()
    valid = mask.astype(bool)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref)[valid].max() <= TOL


def test_position_modes_differ_on_images(tiny_pair):
    """Guards the parity test: with images the two modes must give different logits."""
    _, m = tiny_pair
    ids, mask, pv, grid = two_row_batch()
    a = m.logits(ids, mask, pv, grid, position_mode="mrope")
    b = m.logits(ids, mask, pv, grid, position_mode="sequential")
    assert np.abs(a - b)[mask.astype(bool)].max() > 1e-2


def test_mrope_positions_match_hf_rope_index(tiny_pair):
    hf, m = tiny_pair
    ids, mask, _, grid = two_row_batch()
    ref, _ = hf.model.get_rope_index(torch.tensor(ids), torch.tensor((ids == 290).astype(np.int64)),
                                     image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
    ours = m.backbone.positions(ids, mask, grid, "mrope").transpose(1, 0, 2)  # (3, B, S) as HF
    valid = mask.astype(bool)
    np.testing.assert_array_equal(ours[:, valid], ref.numpy()[:, valid])


def test_attention_row_parity(tiny_pair):
    hf, m = tiny_pair
    ids, mask, pv, grid = two_row_batch()
    bb = m.backbone
    emb = bb.embed(m.params, ids, m._images(ids, mask, pv, grid)).embeds
    pos = bb.positions(ids, mask, grid, "sequential")
    cache = bb.init_cache(2, ids.shape[1], emb.dtype)
    _, _, row = bb.decode(m.params, emb, pos, cache, 0, mask.astype(bool), attn_row=True)
    out = hf_logits(hf, ids, mask, pv, grid, position_ids=pos[:, 0])
    ref = torch.stack(out.attentions).mean((0, 2))[:, -1, :].numpy()  # layers, heads averaged; last query
    assert np.abs(np.asarray(row) - ref).max() <= TOL
    np.testing.assert_allclose(np.asarray(row).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("mode", ["mrope", "sequential"])
def test_cached_chunks_equal_full_pass(tiny_pair, mode):
    """Prefill + multi-token chunks + single-token steps through the cache == one full pass."""
    _, m = tiny_pair
    bb = m.backbone
    ids, mask, pv, grid = two_row_batch()
    full = m.logits(ids, mask, pv, grid, position_mode=mode)
    emb = bb.embed(m.params, ids, m._images(ids, mask, pv, grid)).embeds
    pos = bb.positions(ids, mask, grid, mode)
    b, s = ids.shape
    cache = bb.init_cache(b, s + 8, emb.dtype)  # a cache longer than needed
    kv_valid = np.zeros((b, s + 8), bool)
    kv_valid[:, :s] = mask.astype(bool)
    cuts = [0, 50, 90, s - 3, s - 2, s - 1, s]
    pieces = []
    for a, z in zip(cuts[:-1], cuts[1:]):
        h, cache, _ = bb.decode(m.params, emb[:, a:z], pos[:, :, a:z], cache, a, kv_valid)
        pieces.append(np.asarray(bb.lm_head(m.params, h)))
    chunked = np.concatenate(pieces, 1)
    assert np.abs(chunked - full)[mask.astype(bool)].max() <= TOL


def test_bad_inputs_raise_clear_errors(tiny_pair):
    _, m = tiny_pair
    ids, mask, pv, grid = two_row_batch()
    with pytest.raises(ValueError, match="pixel_values has shape"):
        m.logits(ids, mask, pv[:-4], grid)
    with pytest.raises(ValueError, match="image tokens"):
        m.logits(ids[:, 5:], mask[:, 5:], pv, grid)
    with pytest.raises(ValueError, match="position_mode"):
        m.logits(ids, mask, pv, grid, position_mode="rope")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        m.logits(ids, mask[:, 1:], pv, grid)
    with pytest.raises(ValueError, match="pass both or neither"):
        m.logits(ids, mask, pv, None)


def test_config_validation():
    from ivtlr_jax.config import check_dtype
    from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig, VisionConfig

    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2VLConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 2, 2),
                    vision=VisionConfig(out_hidden_size=64))
    with pytest.raises(ValueError, match="dtype='float16'"):
        check_dtype("float16")


def test_config_reads_flat_and_nested_layouts():
    from tiny import tiny_hf_config

    from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig

    nested = Qwen2VLConfig.from_hf_dict(tiny_hf_config().to_dict())
    d = tiny_hf_config(tie=True).to_dict()
    text = d.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**d, **text, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    flat["vision_config"] = {**d["vision_config"], "in_chans": 3}
    old = Qwen2VLConfig.from_hf_dict(flat)
    assert old.tie_word_embeddings and not nested.tie_word_embeddings
    assert old.mrope_section == nested.mrope_section == (2, 3, 3)
    assert (old.hidden_size, old.num_hidden_layers, old.vision.depth) == (64, 2, 2)

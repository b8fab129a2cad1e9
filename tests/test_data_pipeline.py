"""Encoded splits and the batch iterator: determinism, exact resume, host shards."""

import numpy as np
import pytest

from ivtlr_jax.data.curriculum import CurriculumOptions, encode_row
from ivtlr_jax.data.loaders import load_split
from ivtlr_jax.data.pipeline import BatchIterator, encode_split
from ivtlr_jax.data.synthetic import synthetic_dataset
from ivtlr_jax.models.qwen2_vl import ImageOptions
from ivtlr_jax.models.qwen2_vl.small import tiny_tokenizer as build_tiny_tokenizer

N_ROWS = 23
SMALL = ImageOptions(reference_size=(56, 56))  # grid (1, 4, 4): 4 image tokens, fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_tiny_tokenizer()
    tok.add_tokens(["<|latent|>", "<|start-latent|>", "<|end-latent|>"], special_tokens=True)
    raw = synthetic_dataset(N_ROWS, "train", seed=3)
    path = tmp_path_factory.mktemp("syn_disk")
    raw.save_to_disk(str(path))
    ds = load_split("synthetic", "train", source=str(path))
    split = encode_split(ds, tok, SMALL)
    return tok, ds, split


def _iterator(setup, **kwargs):
    tok, _, split = setup
    args = dict(batch_size=4, latent_id=tok.convert_tokens_to_ids("<|latent|>"), pad_id=tok.pad_token_id,
                curriculum=CurriculumOptions(max_latent_stage=2, epochs_per_stage=1), seed=7, num_epochs=4,
                image_options=SMALL, prefix_buckets=(32, 64, 128), tail_buckets=(64, 128, 256), num_workers=1)
    args.update(kwargs)
    return BatchIterator(split, **args)


def test_encode_split_matches_encode_row(setup):
    tok, ds, split = setup
    assert len(split) == N_ROWS
    for i in (0, 5, N_ROWS - 1):
        assert split.encodings[i] == encode_row(tok, ds[i], split.grids[i])
    assert split.grids.tolist()[0] == [1, 4, 4]


def test_batches_and_stages(setup):
    tok, _, _ = setup
    latent = tok.convert_tokens_to_ids("<|latent|>")
    it = _iterator(setup)
    assert it.steps_per_epoch == 6
    batches = list(it)
    assert len(batches) == 24
    for k, b in enumerate(batches):
        stage = k // 6
        n = min(stage, 2)
        assert int(b["num_latent"]) == n
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] in {p + t for p in (32, 64, 128)
                                                                               for t in (64, 128, 256)}
        assert b["pixel_values"].shape == (4 * 16, 1176) and b["image_grid_thw"].tolist() == [[1, 4, 4]] * 4
        p = int(b["prefix_len"])
        if n:
            assert (b["input_ids"][:, p:p + n] == latent).all()
            assert (b["labels"][:, :p + n] == -100).all()
    assert it.shapes_seen == {b["input_ids"].shape for b in batches}  # what the log counts is what came
    assert 2 <= len(it.shapes_seen) <= 9  # stages change the lengths; buckets bound the compilations (3 x 3)


def test_epoch_order_deterministic(setup):
    a, b = _iterator(setup), _iterator(setup)
    assert np.array_equal(a.epoch_order(2), b.epoch_order(2))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), _iterator(setup, seed=8).epoch_order(0))
    assert sorted(a.epoch_order(0).tolist()) == list(range(N_ROWS))


def _same(x, y):
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_resume_mid_epoch(setup):
    full = list(_iterator(setup, num_epochs=2))
    first = _iterator(setup, num_epochs=2, num_workers=2, prefetch=3)
    head = [next(first) for _ in range(8)]  # epoch 1, step 2: mid-epoch
    state = first.state_dict()
    assert (state["epoch"], state["step"]) == (1, 2)
    first.close()
    resumed = _iterator(setup, num_epochs=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(full)
    for x, y in zip(head + rest, full, strict=True):
        _same(x, y)
    with pytest.raises(ValueError, match="seed"):
        _iterator(setup, seed=1).load_state_dict(state)


@pytest.mark.parametrize("drop_last", [False, True])
def test_host_shards_disjoint_and_complete(setup, drop_last):
    hosts = 3
    seen = []
    for h in range(hosts):
        it = _iterator(setup, num_epochs=1, process_index=h, process_count=hosts, drop_last=drop_last)
        rows = []
        for b in it:
            assert b["input_ids"].shape[0] == 4
            filler = b["example_index"] == -1
            assert (b["labels"][filler] == -100).all()
            rows += b["example_index"][~filler].tolist()
        seen.append(rows)
    flat = [r for rows in seen for r in rows]
    assert len(flat) == len(set(flat))  # disjoint
    # every host collates to the same shapes at every step, without talking to the others
    shapes = [[(b["input_ids"].shape, int(b["prefix_len"])) for b in  # exact lengths: no bucket hides a gap
               _iterator(setup, num_epochs=3, process_index=h, process_count=hosts, drop_last=drop_last,
                         prefix_buckets=None, tail_buckets=None)]
              for h in range(hosts)]
    assert shapes[0] == shapes[1] == shapes[2]
    if drop_last:
        assert len(flat) == (N_ROWS // 12) * 12
    else:
        assert sorted(flat) == list(range(N_ROWS))  # complete


def test_iterator_errors(setup):
    with pytest.raises(ValueError, match="process_index"):
        _iterator(setup, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        _iterator(setup, batch_size=0)
    with pytest.raises(ValueError, match="gives no batch"):
        _iterator(setup, batch_size=30, drop_last=True)

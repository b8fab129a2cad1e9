"""Stage layouts and labels, aligned collation and bucketing."""

import numpy as np
import pytest

from ivtlr_jax.data.collate import bucket_length, collate, make_buckets
from ivtlr_jax.data.curriculum import CurriculumOptions, TextEncoding, build_stage_example, encode_text, latent_plan
from ivtlr_jax.models.qwen2_vl.small import tiny_tokenizer as build_tiny_tokenizer

LAT, START, END, PAD = 900, 901, 902, 0
ENC = TextEncoding(prompt_ids=(1, 2, 3, 4), step_ids=((10, 11), (20,), (30, 31, 32)), answer_ids=(40, 41, 99))


def _flat(seq):
    return [t for s in seq for t in s]


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_stage_layout_reference(stage):
    opts = CurriculumOptions(max_latent_stage=3)
    ex = build_stage_example(ENC, stage, LAT, opts)
    n = min(stage, 3)
    kept = _flat(ENC.step_ids[stage:]) if stage <= 3 else []
    tail = kept + list(ENC.answer_ids)
    assert ex["input_ids"].tolist() == list(ENC.prompt_ids) + [LAT] * n + tail
    assert ex["labels"].tolist() == [-100] * (4 + n) + tail
    assert ex["anchor"] == 4 and ex["num_latent"] == n
    assert ex["input_ids"].dtype == np.int32 and ex["labels"].dtype == np.int32


def test_stage_past_max_without_padding():
    short = TextEncoding((1, 2), ((10,),), (40, 99))
    opts = CurriculumOptions(max_latent_stage=3, pad_latent_to_max=False)
    ex = build_stage_example(short, 5, LAT, opts)
    assert ex["input_ids"].tolist() == [1, 2, LAT, 40, 99] and ex["num_latent"] == 1
    assert latent_plan(5, 1, CurriculumOptions(max_latent_stage=3)) == (3, 1)
    # more latents than steps before max: n = s, every step dropped
    assert build_stage_example(short, 2, LAT, opts)["input_ids"].tolist() == [1, 2, LAT, LAT, 40, 99]


@pytest.mark.parametrize("stage", [0, 2])
def test_stage_with_markers(stage):
    opts = CurriculumOptions(max_latent_stage=3, latent_markers=True)
    ex = build_stage_example(ENC, stage, LAT, opts, start_latent_id=START, end_latent_id=END)
    tail = _flat(ENC.step_ids[stage:]) + list(ENC.answer_ids)
    assert ex["input_ids"].tolist() == [1, 2, 3, 4, START] + [LAT] * stage + [END] + tail
    assert ex["labels"].tolist() == [-100] * (6 + stage) + tail
    assert ex["anchor"] == (5 if stage else 4)
    with pytest.raises(ValueError, match="start_latent_id"):
        build_stage_example(ENC, 1, LAT, opts)


def test_curriculum_options():
    opts = CurriculumOptions()
    assert [opts.stage_for_epoch(e) for e in (0, 3, 4, 15)] == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="epochs_per_stage"):
        CurriculumOptions(epochs_per_stage=0)


def test_encode_text_with_tokenizer():
    tok = build_tiny_tokenizer()
    enc = encode_text(tok, "Q?", ["a", "b"], "One. Two. Three. Four", "B", 100)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert list(enc.prompt_ids).count(pad) == 100
    assert [tok.decode(s) for s in enc.step_ids] == ["One. Two\n", "Three\n", "Four\n"]
    assert enc.answer_ids[-1] == tok.eos_token_id
    short = encode_text(tok, "Q?", ["a", "b"], "One. Two. Three. Four", "B", 100,
                        max_length=len(enc.prompt_ids) + len(enc.answer_ids) + len(enc.step_ids[0]))
    assert short.step_ids == enc.step_ids[:1]


def _example(prompt_len, n_latent, tail_len, rows=4, index=0):
    ids = [7] * prompt_len + [LAT] * n_latent + [8] * tail_len
    labels = [-100] * (prompt_len + n_latent) + [8] * tail_len
    return {"input_ids": np.array(ids, np.int32), "labels": np.array(labels, np.int32), "anchor": prompt_len,
            "num_latent": n_latent, "pixel_values": np.full((rows, 1176), index, np.float32),
            "image_grid_thw": np.array([1, 2, 2]), "example_index": index}


@pytest.mark.parametrize("n_latent", [0, 2])
def test_collate_left_alignment(n_latent):
    examples = [_example(5, n_latent, 3, index=0), _example(9, n_latent, 1, index=1), _example(7, n_latent, 6, index=2)]
    batch = collate(examples, PAD, prefix_buckets=None, tail_buckets=None)
    p = int(batch["prefix_len"])
    assert p == 9 and batch["input_ids"].shape == (3, 9 + n_latent + 6)
    for row, e in enumerate(examples):
        if n_latent:
            assert batch["input_ids"][row].tolist().index(LAT) == p
        first_real = int(np.argmax(batch["attention_mask"][row]))
        assert first_real == p - e["anchor"]
        length = len(e["input_ids"])
        np.testing.assert_array_equal(batch["input_ids"][row, first_real:first_real + length], e["input_ids"])
        np.testing.assert_array_equal(batch["labels"][row, first_real:first_real + length], e["labels"])
        assert batch["attention_mask"][row].sum() == length
        assert (batch["input_ids"][row][batch["attention_mask"][row] == 0] == PAD).all()
        assert (batch["labels"][row][batch["attention_mask"][row] == 0] == -100).all()
    assert batch["pixel_values"].shape == (12, 1176)
    np.testing.assert_array_equal(batch["pixel_values"][:, 0], np.repeat([0, 1, 2], 4))
    assert batch["image_grid_thw"].shape == (3, 3) and batch["image_grid_thw"].dtype == np.int32
    assert int(batch["num_latent"]) == n_latent and batch["example_index"].tolist() == [0, 1, 2]


def test_collate_buckets_and_errors():
    examples = [_example(5, 1, 3), _example(9, 1, 1)]
    batch = collate(examples, PAD, prefix_buckets=(8, 16, 32), tail_buckets=(4, 8))
    assert int(batch["prefix_len"]) == 16 and batch["input_ids"].shape == (2, 16 + 4)
    assert batch["input_ids"][1].tolist().index(LAT) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        collate(examples, PAD, prefix_buckets=(4,), tail_buckets=(8,))
    with pytest.raises(ValueError, match="num_latent"):
        collate([_example(5, 1, 3), _example(5, 2, 3)], PAD)
    with pytest.raises(ValueError, match="at least one"):
        collate([], PAD)


def test_make_buckets():
    buckets = make_buckets(4096)
    assert buckets[-1] == 4096 and len(buckets) <= 24
    assert all(b % 32 == 0 for b in buckets) and list(buckets) == sorted(set(buckets))
    assert bucket_length(33, buckets) == 64 and bucket_length(32, buckets) == 32
    assert bucket_length(17, None) == 17
    # every length <= max is padded by at most ~25% + one multiple
    assert all(bucket_length(n, buckets) <= max(1.25 * n + 32, 64) for n in range(1, 4097))
    with pytest.raises(ValueError, match="growth"):
        make_buckets(128, growth=1.0)

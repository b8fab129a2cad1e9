"""Loading local folders in the hub's layout, row normalisation and bad rows."""

import io
import logging
import os

import datasets
import numpy as np
import pytest
from PIL import Image

from ivtlr_jax.data.loaders import load_split, load_split_with_summary, normalise_row
from ivtlr_jax.data.synthetic import main as synthetic_main


def _png(seed=0, mode="RGB"):
    rgb = np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _write(folder, split, columns, features):
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    ds.to_parquet(os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))


def _m3cot_folder(folder):
    img = {"bytes": _png(), "path": None}
    rows = [  # (id, image, choices, answer)
        ("good-0", img, ["cat", "dog"], "B"),
        ("good-1", {"bytes": _png(1, "L"), "path": None}, ["x", "y", "z"], "A"),
        ("good-2", {"bytes": _png(2, "P"), "path": None}, ["x", "y", "z"], " c "),
        ("no-image", None, ["a", "b"], "A"),
        ("corrupt", {"bytes": b"\x89PNG not really", "path": None}, ["a", "b"], "A"),
        ("many-choices", img, [str(i) for i in range(27)], "A"),
        ("empty-choices", img, [], "A"),
        ("answer-out-of-range", img, ["a", "b"], "E"),
    ]
    n = len(rows)
    columns = {
        "id": [r[0] for r in rows], "category": ["c"] * n, "image_id": [r[0] for r in rows],
        "question": ["What is it?"] * n, "choices": [r[2] for r in rows], "context": [""] * n,
        "answer": [r[3] for r in rows], "rationale": ["First. Second. Third. Fourth."] * n, "split": ["train"] * n,
        "image": [r[1] for r in rows], "domain": ["science"] * n, "topic": ["t"] * n,
    }
    features = {k: datasets.Value("string") for k in columns if k not in ("choices", "image")}
    features.update(choices=datasets.List(datasets.Value("string")), image=datasets.Image())
    _write(folder, "train", columns, {k: features[k] for k in columns})


def test_m3cot_local_parquet(tmp_path, caplog):
    _m3cot_folder(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="ivtlr_jax.data.loaders"):
        ds, summary = load_split_with_summary("m3cot", "train", source=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert ds["id"] == ["good-0", "good-1", "good-2"]
    assert ds["answer"] == ["B", "A", "C"]
    assert summary.skipped == {"no_image": 1, "bad_image": 1, "bad_choices": 2, "bad_answer": 1}
    assert summary.bad_image_ids == ("corrupt",)
    assert any("corrupt" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert any("kept 3 of 8 rows" in r.message for r in caplog.records)
    row = ds[0]
    assert row["rationale"] == "First. Second. Third. Fourth." and row["domain"] == "science"
    assert Image.open(io.BytesIO(row["image"])).size == (30, 20)
    with pytest.raises(ValueError, match="no parquet files for split 'test'"):
        load_split("m3cot", "test", source=str(tmp_path))


def test_scienceqa_local_parquet(tmp_path):
    img = {"bytes": _png(3), "path": None}
    rows = [  # (image, choices, answer, lecture, solution)
        (img, ["a", "b", "c"], 2, "Lecture text.", "Solution text."),
        (img, ["a", "b"], 0, "", ""),
        (img, ["a", "b"], 1, None, "Only solution."),
        (None, ["a", "b"], 0, "L", "S"),
        (img, ["a", "b"], 5, "L", "S"),
    ]
    n = len(rows)
    columns = {
        "image": [r[0] for r in rows], "question": ["Which?"] * n, "choices": [r[1] for r in rows],
        "answer": [r[2] for r in rows], "hint": [""] * n, "task": ["closed choice"] * n, "grade": ["grade5"] * n,
        "subject": ["natural science"] * n, "topic": ["physics"] * n, "category": ["c"] * n, "skill": ["s"] * n,
        "lecture": [r[3] for r in rows], "solution": [r[4] for r in rows],
    }
    features = {k: datasets.Value("string") for k in columns}
    features.update(image=datasets.Image(), choices=datasets.List(datasets.Value("string")),
                    answer=datasets.Value("int64"))
    _write(str(tmp_path), "validation", columns, {k: features[k] for k in columns})
    ds, summary = load_split_with_summary("scienceqa", "validation", source=str(tmp_path),
                                          cache_dir=str(tmp_path / "c"))
    assert ds["answer"] == ["C", "A", "B"]
    assert ds["rationale"] == ["Lecture text. Solution text.", "A", "Only solution."]
    assert ds["domain"] == ["natural science"] * 3
    assert ds["id"] == ["scienceqa-validation-0", "scienceqa-validation-1", "scienceqa-validation-2"]
    assert summary.skipped == {"no_image": 1, "bad_answer": 1}


def test_synthetic_cli_roundtrip(tmp_path):
    out = str(tmp_path / "syn")
    synthetic_main(["--out", out, "--n", "12", "--seed", "5"])
    assert sorted(os.listdir(os.path.join(out, "data"))) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    ds = load_split("synthetic", "train", source=out, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 12 and len(load_split("synthetic", "test", source=out, cache_dir=str(tmp_path / "c"))) == 1
    for row in ds:
        assert len(row["choices"]) == 4 and row["answer"] in "ABCD"
        assert 3 <= row["rationale"].count(". ") + 1 <= 7
        assert row["domain"] in ("mathematics", "commonsense")
    again = load_split("synthetic", "train", source=out, cache_dir=str(tmp_path / "c2"))
    assert again["question"] == ds["question"] and again["image"] == ds["image"]


def test_normalise_row_bad_values():
    good = {"id": "x", "image": {"bytes": _png(), "path": None}, "question": "q", "choices": ["a", "b"],
            "answer": "A", "rationale": "r"}
    assert normalise_row(good, "m3cot", 0, "train")[1] == ""
    assert normalise_row({**good, "answer": 1}, "m3cot", 0, "train")[1] == "bad_answer"
    assert normalise_row({**good, "answer": None}, "m3cot", 0, "train")[1] == "bad_answer"
    assert normalise_row({**good, "answer": "1"}, "scienceqa", 0, "train")[1] == "bad_answer"
    assert normalise_row({**good, "answer": True}, "scienceqa", 0, "train")[1] == "bad_answer"
    assert normalise_row({**good, "choices": None}, "m3cot", 0, "train")[1] == "bad_choices"
    assert normalise_row({**good, "choices": ["a", 3]}, "m3cot", 0, "train")[1] == "bad_choices"
    assert normalise_row({**good, "question": None}, "m3cot", 0, "train")[1] == "bad_text"
    assert normalise_row({**good, "image": b""}, "m3cot", 0, "train")[1] == "no_image"


def test_bad_names_and_sources(tmp_path):
    with pytest.raises(ValueError, match="dataset name must be one of"):
        load_split("coco", "train")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        load_split("m3cot", "train", source=str(f))


def test_synthetic_default_in_memory():
    ds, summary = load_split_with_summary("synthetic", "validation")
    assert len(ds) == 200 and summary.kept == 200 and summary.skipped == {}
    assert set(ds["domain"]) <= {"mathematics", "commonsense"}

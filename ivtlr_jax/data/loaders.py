"""Load M3CoT, ScienceQA and the synthetic set through ``datasets`` and normalise their rows.

Normalised row (every dataset): ``id`` str, ``image`` bytes (encoded file), ``question`` str,
``choices`` list[str] (1..26), ``answer`` option letter, ``rationale`` str, ``domain`` str,
``topic`` str. Bad rows are skipped and counted in one summary line:

* no image (None, empty bytes and no path)            -> "no_image"
* image bytes PIL cannot decode (warning names the id)  -> "bad_image"
* choices not a list of strings, empty, or > 26         -> "bad_choices"
* answer not a letter in range (M3CoT/synthetic) or not
  an int index in range (ScienceQA)                     -> "bad_answer"
* question or rationale not a string                    -> "bad_text"
"""

from __future__ import annotations

import glob
import io
import logging
import os
import string
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from ivtlr_jax.data.text import MAX_CHOICES, index_to_letter

logger = logging.getLogger(__name__)

DATASET_NAMES = ("m3cot", "scienceqa", "synthetic")
DEFAULT_SOURCES = {"m3cot": "LightChen2333/M3CoT", "scienceqa": "derek-thomas/ScienceQA"}
SKIP_REASONS = ("no_image", "bad_image", "bad_choices", "bad_answer", "bad_text")
SYNTHETIC_SIZES = {"train": 2000, "validation": 200, "test": 200}
NORMALISED_COLUMNS = ("id", "image", "question", "choices", "answer", "rationale", "domain", "topic")


def _image_bytes(value) -> bytes | None:
    """Raw encoded bytes of an image cell ({"bytes","path"} dict, bytes, path str, PIL) or None."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data)
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if isinstance(value, str) and os.path.isfile(value):
        with open(value, "rb") as f:
            return f.read()
    return None


def _image_ok(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # PIL raises many types for broken files
        return False


def _letter_answer(answer, n_choices: int) -> str | None:
    if not isinstance(answer, str):
        return None
    letter = answer.strip().strip("()").strip().upper()
    if len(letter) != 1 or letter not in string.ascii_uppercase[:n_choices]:
        return None
    return letter


def _index_answer(answer, n_choices: int) -> str | None:
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < n_choices:
        return None
    return index_to_letter(answer)


def normalise_row(row: dict, name: str, index: int, split: str, verify_image: bool = True) -> tuple[dict, str]:
    """One raw row -> (normalised row, skip reason or "")."""
    if name == "scienceqa":
        row_id = str(row.get("id") or f"scienceqa-{split}-{index}")
        lecture = (row.get("lecture") or "").strip()
        solution = (row.get("solution") or "").strip()
        rationale = " ".join(p for p in (lecture, solution) if p)
        domain, topic = row.get("subject") or "", row.get("topic") or ""
    else:
        row_id = str(row.get("id") or f"{name}-{split}-{index}")
        rationale = row.get("rationale")
        rationale = "" if rationale is None else rationale
        domain, topic = row.get("domain") or "", row.get("topic") or ""
    out = {"id": row_id, "image": b"", "question": "", "choices": [], "answer": "", "rationale": "",
           "domain": str(domain), "topic": str(topic)}
    data = _image_bytes(row.get("image"))
    if data is None:
        return out, "no_image"
    question, choices = row.get("question"), row.get("choices")
    if not isinstance(question, str) or not isinstance(rationale, str):
        return out, "bad_text"
    if (not isinstance(choices, (list, tuple)) or not 1 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) for c in choices)):
        return out, "bad_choices"
    if name == "scienceqa":
        letter = _index_answer(row.get("answer"), len(choices))
    else:
        letter = _letter_answer(row.get("answer"), len(choices))
    if letter is None:
        return out, "bad_answer"
    if verify_image and not _image_ok(data):
        return out, "bad_image"
    if name == "scienceqa" and not rationale:
        rationale = letter  # both lecture and solution empty: the method page says use the answer
    out.update(image=data, question=question, choices=list(choices), answer=letter, rationale=rationale)
    return out, ""


def _normalise_batch(batch: dict, indices: list[int], name: str, split: str, verify_images: bool) -> dict:
    keys = list(batch)
    out = {c: [] for c in (*NORMALISED_COLUMNS, "skip")}
    for j, index in enumerate(indices):
        row, reason = normalise_row({k: batch[k][j] for k in keys}, name, index, split, verify_images)
        for c in NORMALISED_COLUMNS:
            out[c].append(row[c])
        out["skip"].append(reason)
    return out


def _split_files(folder: str, split: str) -> list[str]:
    patterns = [os.path.join(folder, "data", f"{split}-*.parquet"), os.path.join(folder, f"{split}-*.parquet"),
                os.path.join(folder, "data", split, "*.parquet"), os.path.join(folder, split, "*.parquet"),
                os.path.join(folder, "*", f"{split}-*.parquet")]
    for pattern in patterns:
        files = sorted(glob.glob(pattern))
        if files:
            return files
    return []


def _load_raw(name: str, split: str, source: str | None, cache_dir: str | None):
    import datasets

    if name == "synthetic" and source is None:
        from ivtlr_jax.data.synthetic import synthetic_dataset

        if split not in SYNTHETIC_SIZES:
            raise ValueError(f"split for the synthetic set must be one of {tuple(SYNTHETIC_SIZES)}, got {split!r}")
        return synthetic_dataset(SYNTHETIC_SIZES[split], split), "built-in generator"
    source = source or DEFAULT_SOURCES[name]
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "dataset_dict.json")):
            dd = datasets.load_from_disk(source)
            if split not in dd:
                raise ValueError(f"split {split!r} not in save_to_disk folder {source}; it has {sorted(dd)}")
            return dd[split], source
        if os.path.isfile(os.path.join(source, "state.json")):
            return datasets.load_from_disk(source), source
        files = _split_files(source, split)
        if not files:
            found = sorted(os.path.relpath(p, source) for p in glob.glob(os.path.join(source, "**", "*.parquet"),
                                                                            recursive=True))
            raise ValueError(
                f"no parquet files for split {split!r} in {source} (expected data/{split}-*.parquet as the hub "
                f"serves them, or a save_to_disk folder); parquet files found: {found[:10]}"
            )
        return datasets.load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cache_dir), source
    if os.path.exists(source):
        raise ValueError(f"source {source!r} exists but is not a folder; pass a folder or a hub id")
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir), source
    except Exception as exc:
        raise ValueError(
            f"could not load {name} split {split!r} from the hub id {source!r} ({type(exc).__name__}: {exc}); "
            "without hub access pass source=<local folder> (hub-layout parquet or a save_to_disk folder)"
        ) from exc


@dataclass(frozen=True)
class LoadSummary:
    """What load_split kept and skipped (reason -> count; ids of undecodable images)."""

    name: str
    split: str
    origin: str
    total: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    bad_image_ids: tuple[str, ...] = ()

    def line(self) -> str:
        skipped = ", ".join(f"{r} {self.skipped[r]}" for r in SKIP_REASONS if self.skipped.get(r)) or "none"
        return (f"{self.name}/{self.split} from {self.origin}: kept {self.kept} of {self.total} rows; "
                f"skipped: {skipped}")


def load_split(name: str, split: str, source: str | None = None, **kwargs):
    """A normalised ``datasets.Dataset`` of one split; see the module docstring for the fields.

    ``source``: a hub id (default per dataset), a folder of hub-layout parquet files, or a
    ``save_to_disk`` folder. ``synthetic`` with no source is generated in memory. Keyword
    options as in load_split_with_summary.
    """
    return load_split_with_summary(name, split, source, **kwargs)[0]


def load_split_with_summary(name: str, split: str, source: str | None = None, *, num_proc: int | None = None,
                            verify_images: bool = True, cache_dir: str | None = None,
                            limit: int | None = None):
    """load_split, also returning the LoadSummary (logged as one line)."""
    import datasets

    if name not in DATASET_NAMES:
        raise ValueError(f"dataset name must be one of {DATASET_NAMES}, got {name!r}")
    raw, origin = _load_raw(name, split, source, cache_dir)
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    if "image" in raw.features and isinstance(raw.features["image"], datasets.Image):
        raw = raw.cast_column("image", datasets.Image(decode=False))
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Value("binary"),
        "question": datasets.Value("string"), "choices": datasets.List(datasets.Value("string")),
        "answer": datasets.Value("string"), "rationale": datasets.Value("string"),
        "domain": datasets.Value("string"), "topic": datasets.Value("string"),
        "skip": datasets.Value("string"),
    })
    normalised = raw.map(
        _normalise_batch, batched=True, batch_size=256, with_indices=True, remove_columns=raw.column_names,
        fn_kwargs={"name": name, "split": split, "verify_images": verify_images}, features=features,
        num_proc=num_proc if num_proc and num_proc > 1 and len(raw) > 512 else None,
        desc=f"normalise {name}/{split}",
    )
    reasons = normalised["skip"]
    counts = Counter(r for r in reasons if r)
    bad_ids: list[str] = []
    if counts.get("bad_image"):
        bad_ids = normalised.select([i for i, r in enumerate(reasons) if r == "bad_image"])["id"]
        for row_id in bad_ids:
            logger.warning("%s/%s: skipping example %s: undecodable image", name, split, row_id)
    keep = [i for i, r in enumerate(reasons) if not r]
    result = normalised.select(keep).remove_columns("skip")
    summary = LoadSummary(name, split, str(origin), len(reasons), len(result), dict(counts), tuple(bad_ids))
    logger.info(summary.line())
    return result, summary

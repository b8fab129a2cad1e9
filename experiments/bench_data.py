"""Data-pipeline throughput: examples/s from encoded image bytes to collated batches.

Measures decode + RGB + resize to 280x280 + normalise + patchify + stage layout + aligned
collation (the per-epoch work; tokenisation is done once per split and timed separately).
Usage: python experiments/bench_data.py [--n 512] [--batch-size 16] [--format png|jpeg]
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file (python experiments/bench_x.py): make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import io
import json
import logging
import os
import time

from PIL import Image


def _dataset(n: int, fmt: str, size: int):
    import datasets

    from ivtlr_jax.data.loaders import load_split
    from ivtlr_jax.data.synthetic import make_example

    rows = [make_example(i % 256, "train", seed=11) for i in range(n)]
    for r in rows:
        image = Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")
        if size != image.width:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=90)
        r["image"] = {"bytes": buf.getvalue(), "path": None}
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    features = datasets.Features({
        **{k: datasets.Value("string") for k in columns if k not in ("choices", "image")},
        "choices": datasets.List(datasets.Value("string")), "image": datasets.Image()})
    raw = datasets.Dataset.from_dict(columns, features=features)
    tmp = os.path.join("/tmp", f"bench_data_{n}_{fmt}_{size}")
    raw.save_to_disk(tmp)
    return load_split("synthetic", "train", source=tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="examples per timed run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--format", choices=("png", "jpeg"), default="png")
    parser.add_argument("--source-size", type=int, default=280, help="side of the stored square images")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--out", default=None, help="optional JSON file for the figures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ivtlr_jax.data.curriculum import CurriculumOptions
    from ivtlr_jax.data.pipeline import BatchIterator, encode_split
    from ivtlr_jax.models.qwen2_vl import ImageOptions
    from ivtlr_jax.models.qwen2_vl.small import tiny_tokenizer as build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_tokens(["<|latent|>"], special_tokens=True)
    latent = tok.convert_tokens_to_ids("<|latent|>")
    ds = _dataset(args.n, args.format, args.source_size)
    t0 = time.perf_counter()
    images = ImageOptions()  # the Qwen2-VL processor at the release's 280x280
    split = encode_split(ds, tok, images)
    encode_s = time.perf_counter() - t0
    results = {"cores": os.cpu_count(), "n": len(split), "format": args.format, "source_size": args.source_size,
               "tokenise_examples_per_s": round(len(split) / encode_s, 1)}
    curriculum = CurriculumOptions(epochs_per_stage=1)
    for label, workers, kind in (("serial", 0, "thread"), ("threads_2", 2, "thread"), ("processes_2", 2, "process")):
        it = BatchIterator(split, batch_size=args.batch_size, latent_id=latent, pad_id=tok.pad_token_id,
                           curriculum=curriculum, image_options=images, num_workers=workers, worker_type=kind,
                           prefetch=4,
                           start_epoch=args.stage, num_epochs=args.stage + 1, drop_last=True)
        next(it)  # warm the pool
        t0 = time.perf_counter()
        count = sum(int((b["example_index"] >= 0).sum()) for b in it)
        seconds = time.perf_counter() - t0
        results[f"{label}_examples_per_s"] = round(count / seconds, 1)
        it.close()
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()

"""Evaluate a converted (or trained) checkpoint on M3CoT, ScienceQA or the synthetic set.

  python -m experiments.evaluate --ckpt CKPT --data m3cot --split test [--method ivtlr] [--n-latent 3]
      [--batch-size 16] [--limit N] [--out DIR] [--save-selections DIR] [--mesh auto] [--dtype auto]
  python -m experiments.evaluate --ckpt CKPT --dry-run --mesh tpu_v5e_8 [--batch-size 16]   # memory per chip

The model is read shard by shard onto --mesh (default: every local device) in the training layout; generation
runs there with the batch split over the data axes. --dry-run compiles generation ahead of time on abstract
arrays (only the checkpoint's config is read) and prints the per-chip memory of parameters, KV cache and
temporaries; on a CPU-only host a preset's device count is simulated.

Writes to --out: predictions.jsonl (one row per example), summary.json, summary.md and
accuracy_by_domain.png. Accuracy is exact match of the option letter extracted from the generated
text (method page, section 4); mean autoregressive steps count latent steps plus generated tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import string
import sys
import time
from collections import Counter, defaultdict

import numpy as np

log = logging.getLogger("evaluate")

# method -> how the prompt ends and what each latent step feeds back (paper Tables 1 and 2)
METHODS = {
    "ivtlr": "IVT-LR: n latent steps of [k selected image embeddings ; h]",
    "no-cot": "plain generation of the answer, no latent steps (n = 0)",
    "cot": "plain generation of the written reasoning and the answer (n = 0, long max_new_tokens)",
    "coconut": "latent steps of [h] only (k = 0): without latent vision, Coconut",
    "no-latent-text": "latent steps of [k selected image embeddings] only: without latent text",
    "no-latent": "an IVT-LR checkpoint without the latent part (n = 0)",
}
DEFAULT_MAX_NEW_TOKENS = {"cot": 512}  # every other method: 64
ANSWER_FORMATS = ("auto", "letter", "index")

_ANSWER_RE = re.compile(r"(?:the\s+answer\s+is|answer\s*:)\s*:?\s*[\(\[\{]?\s*([A-Za-z]|\d+)(?![A-Za-z0-9])",
                        re.IGNORECASE)
_BARE_RE = re.compile(r"^\s*[\(\[\{]?\s*([A-Za-z]|\d+)\s*[\)\]\}]?\s*\.?\s*$")


def _normalise_answer(token: str, answer_format: str) -> str | None:
    if token.isdigit():
        if answer_format == "letter" or int(token) >= 26:
            return None
        return string.ascii_uppercase[int(token)]  # index-trained checkpoints: 0 -> A
    if answer_format == "index":
        return None
    return token.upper()


def extract_answer(text: str, answer_format: str = "auto") -> str | None:
    """The option letter after the last "the answer is" / "Answer:" (case-insensitive), or None.

    Digits are 0-based option indices (ScienceQA checkpoints trained on index targets) unless
    answer_format="letter"; with "index" only digits count. A text that is nothing but one option
    ("B", "(b).") counts too. Lower-case "a"/"i" followed by a word is read as an article, not an option.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r} is not valid; use one of {list(ANSWER_FORMATS)}")
    found = None
    for m in _ANSWER_RE.finditer(text):
        token = m.group(1)
        if token in ("a", "i") and re.match(r"\s+[A-Za-z]", text[m.end():]):
            continue
        value = _normalise_answer(token, answer_format)
        if value is not None:
            found = value
    if found is None:
        m = _BARE_RE.match(text)
        if m:
            found = _normalise_answer(m.group(1), answer_format)
    return found


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.evaluate",
        description="Accuracy, autoregressive steps and latency of IVT-LR (and its baselines/ablations) on a "
                    "multiple-choice visual-reasoning split, with KV-cached batched generation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {k:<15} {v}" for k, v in METHODS.items()) + "\n\nexamples:\n"
               "  python -m experiments.evaluate --ckpt ckpt/ivtlr --data m3cot --split test\n"
               "  python -m experiments.evaluate --ckpt ckpt/nocot --data scienceqa --method no-cot "
               "--answer-format index\n"
               "  python -m experiments.evaluate --ckpt ckpt/ivtlr --data synthetic --limit 32 "
               "--save-selections out/sel",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint folder (tools/convert_weights.py or the trainer)")
    p.add_argument("--data", default=None, choices=["m3cot", "scienceqa", "synthetic"],
                   help="dataset (required unless --dry-run)")
    p.add_argument("--data-source", default=None,
                   help="hub id, hub-layout parquet folder or save_to_disk folder (default: the dataset's hub id; "
                        "synthetic: generated in memory)")
    p.add_argument("--split", default="test", help="split name (default: test)")
    p.add_argument("--method", default="ivtlr", choices=list(METHODS), help="what to run (default: ivtlr)")
    p.add_argument("--n-latent", type=int, default=3,
                   help="latent steps for ivtlr / coconut / no-latent-text (default: 3, the release's last stage)")
    p.add_argument("--k", type=int, default=None,
                   help="image embeddings selected per latent step (default: the backbone's, as in the release: "
                        "Qwen2-VL 32, Chameleon 64)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generation batch (default: 16)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of the split")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated tokens at most (default: 512 for cot, else 64)")
    p.add_argument("--max-cache-len", type=int, default=8192,
                   help="rows whose prompt + latent chunks + max_new_tokens exceed this are skipped and counted "
                        "(default: 8192)")
    p.add_argument("--position-mode", default=None, choices=["sequential", "mrope"],
                   help="positions of the final sequence (default: the checkpoint's recorded rule, else sequential, "
                        "the release's)")
    p.add_argument("--selection-order", default="position", choices=["position", "score"],
                   help="order of the selected image embeddings inside a latent chunk (default: position)")
    p.add_argument("--answer-format", default="auto", choices=list(ANSWER_FORMATS),
                   help="auto: letters, digits read as 0-based indices; letter or index: only that kind")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="parameter dtype (default: auto = bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--mesh", default="auto",
                   help="device mesh preset the model is sharded over (ivtlr_jax.sharding.PRESETS: cpu, gpu_1, gpu_8, "
                        "tpu_v4_8, tpu_v5e_8, ...; default: auto = every local device)")
    p.add_argument("--dry-run", action="store_true",
                   help="no evaluation and no weights read: compile generation for --mesh on abstract arrays and "
                        "print the per-chip memory (parameters, KV cache, temporaries); JSON to --out "
                        "(default eval/dry_run.json)")
    p.add_argument("--resize-mode", default="reference", choices=["reference", "smart"],
                   help="reference: every image 280x280 (release); smart: Qwen2-VL's smart_resize")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="output folder (default: eval/<data>-<split>-<method>)")
    p.add_argument("--save-selections", default=None, metavar="DIR",
                   help="write, for the first --num-selections examples, the image with the patches chosen at "
                        "each latent step outlined (one colour per step) as PNG")
    p.add_argument("--num-selections", type=int, default=8, help="examples drawn by --save-selections (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def method_settings(args) -> tuple[int, int, bool]:
    """(n latent steps, k, latent_text) for the chosen method."""
    if args.method in ("no-cot", "cot", "no-latent"):
        return 0, args.k, True
    if args.n_latent < 1:
        raise ValueError(f"--method {args.method} needs --n-latent >= 1, got {args.n_latent}")
    if args.method == "coconut":
        return args.n_latent, 0, True
    return args.n_latent, args.k, args.method != "no-latent-text"


def _prompt_text(tok, ids, image_pad_id: int, image_token: str = "<|image_pad|>") -> str:
    """Prompt as text with the image-placeholder run shown once with its count."""
    out, run = [], 0
    for t in list(ids) + [-1]:
        if t == image_pad_id:
            run += 1
            continue
        if run:
            out.append(f"{image_token}x{run}")
            run = 0
        if t != -1:
            out.append(tok.decode([t], skip_special_tokens=False))
    return "".join(out)


def _bar_chart(path: str, title: str, names: list[str], values: list[float]) -> str:
    """Accuracy bars as PNG: matplotlib when installed, else a plain PIL drawing. Returns what drew it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1), 3.5))
        bars = ax.bar(names, [100 * v for v in values], color="#4c72b0")
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    bar_w, gap, h, top, bottom = 80, 30, 300, 40, 40
    w = gap + len(names) * (bar_w + gap)
    img = Image.new("RGB", (max(w, 320), h + top + bottom), "white")
    d = ImageDraw.Draw(img)
    d.text((gap, 10), title, fill="black")
    d.line([(gap // 2, top + h), (img.width - gap // 2, top + h)], fill="black")
    for i, (name, v) in enumerate(zip(names, values)):
        x0 = gap + i * (bar_w + gap)
        y0 = top + h - int(round(h * v))
        d.rectangle([x0, y0, x0 + bar_w, top + h], fill=(76, 114, 176))
        d.text((x0, max(top, y0 - 14)), f"{100 * v:.1f}%", fill="black")
        d.text((x0, top + h + 6), name[:14], fill="black")
    img.save(path)
    return "PIL (matplotlib not installed)"


STEP_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                (240, 50, 230), (210, 245, 60)]


def draw_selections(path: str, pixels: np.ndarray, grid, selected: np.ndarray, merge: int = 2,
                    patch: int = 14, title: str = "") -> None:
    """The resized image (H, W, 3) with each latent step's chosen image tokens outlined, plus a legend."""
    from PIL import Image, ImageDraw

    t, gh, gw = (int(v) for v in grid)
    mh, mw = gh // merge, gw // merge
    cell = merge * patch
    scale = max(1, 560 // max(pixels.shape[:2]))
    img = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST)
    legend_h = 22 * (len(selected) + 1) + 8
    canvas = Image.new("RGB", (img.width, img.height + legend_h), "white")
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    for step, idx in enumerate(selected):
        colour = STEP_COLOURS[step % len(STEP_COLOURS)]
        inset = step % 3  # steps never share a token; the inset keeps touching outlines apart
        for j in np.asarray(idx).tolist():
            r, c = (j % (mh * mw)) // mw, j % mw
            x0, y0 = c * cell * scale + inset, r * cell * scale + inset
            d.rectangle([x0, y0, x0 + cell * scale - 1 - 2 * inset, y0 + cell * scale - 1 - 2 * inset],
                        outline=colour, width=2)
    y = img.height + 6
    d.text((6, y), title[:90], fill="black")
    for step, idx in enumerate(selected):
        y += 22
        colour = STEP_COLOURS[step % len(STEP_COLOURS)]
        d.rectangle([6, y + 2, 22, y + 16], outline=colour, width=3)
        d.text((30, y + 2), f"latent step {step + 1}: {len(idx)} image tokens", fill="black")
    canvas.save(path)


def _markdown(summary: dict) -> str:
    lines = [
        f"# Evaluation: {summary['method']} on {summary['data']}/{summary['split']}",
        "",
        f"checkpoint `{summary['ckpt']}`; n_latent={summary['n_latent']}, k={summary['k']}, "
        f"latent_text={summary['latent_text']}, position_mode={summary['position_mode']}, "
        f"max_new_tokens={summary['max_new_tokens']}, batch_size={summary['batch_size']}, "
        f"device {summary['device']}, mesh {summary['mesh']} {summary['mesh_axes']}, "
        f"parameters {summary['param_peak_bytes_per_device'] / 2**30:.3f} GiB per device "
        f"({summary['param_bytes_total'] / 2**30:.3f} GiB in all)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| examples | {summary['examples']} |",
        f"| accuracy | {100 * summary['accuracy']:.2f} % |",
        f"| no answer found | {summary['no_answer']} |",
        f"| mean generated tokens | {summary['mean_generated_tokens']:.2f} |",
        f"| mean AR steps (latent + generated) | {summary['mean_ar_steps']:.2f} |",
        f"| seconds / sample | {summary['seconds_per_sample']:.4f} |",
        f"| samples / s | {summary['samples_per_s']:.2f} |",
        f"| seconds / sample incl. compilation | {summary['seconds_per_sample_with_compile']:.4f} |",
        "",
        "| domain | examples | correct | accuracy |",
        "|---|---|---|---|",
    ]
    for name, d in summary["by_domain"].items():
        lines.append(f"| {name} | {d['examples']} | {d['correct']} | {100 * d['accuracy']:.2f} % |")
    skipped = {**summary["skipped_load"], **summary["skipped_eval"]}
    lines += ["", "skipped rows: " + (", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "none"), ""]
    return "\n".join(lines)


def evaluate(args) -> dict:
    """Run the evaluation described by parsed args; returns the summary (also written to --out)."""
    import jax
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.data import (
        IGNORE_INDEX,
        ImageOptions,
        collate,
        encode_split,
        load_split_with_summary,
        make_buckets,
        model_view,
        process_image,
    )
    from ivtlr_jax.generate import latent_prompt

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.data is None:
        raise ValueError("--data is required (m3cot, scienceqa or synthetic) unless --dry-run")
    n, k, latent_text = method_settings(args)  # k None: the backbone's default, once the model is loaded
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(args.method, 64)
    if max_new < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new}")
    out_dir = args.out or os.path.join("eval", f"{args.data}-{args.split}-{args.method}")
    os.makedirs(out_dir, exist_ok=True)

    model = IVTLRModel.from_pretrained(args.ckpt, dtype=args.dtype, mesh=args.mesh)
    cfg, bb = model.config, model.backbone
    k = bb.default_k if k is None else k
    args.position_mode = model.resolve_position_mode(args.position_mode)  # the checkpoint's default when not given
    latent_prompt(cfg, [], n)  # a checkpoint without <|latent|> asked for latent steps: stop here
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.ckpt)
    if tok.eos_token_id is None and not cfg.eos_token_id:
        raise ValueError("neither the tokenizer nor the checkpoint config names an EOS token")
    eos_ids = tuple(sorted({*cfg.eos_token_id, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or eos_ids[0])
    image_pad_id = tok.convert_tokens_to_ids(bb.prompt.image_token)
    if image_pad_id != cfg.image_token_id:
        raise ValueError(f"tokenizer maps {bb.prompt.image_token} to {image_pad_id} but the checkpoint's "
                         f"image_token_id is {cfg.image_token_id}; pass the checkpoint's own tokenizer")

    ds, load_summary = load_split_with_summary(args.data, args.split, args.data_source, limit=args.limit)
    log.info(load_summary.line())
    options = ImageOptions(**bb.image_options(args.resize_mode))
    split = encode_split(ds, tok, options, prompt=bb.prompt)
    chunk = (k + int(latent_text)) if n else 0
    skipped: Counter = Counter()
    rows = []
    for i, enc in enumerate(split.encodings):
        if len(enc.prompt_ids) + n * chunk + max_new > args.max_cache_len:
            skipped["too_long"] += 1
            log.warning("skipping %s: prompt of %d tokens + %d latent x %d + %d new > --max-cache-len %d",
                        split.ids[i], len(enc.prompt_ids), n, chunk, max_new, args.max_cache_len)
            continue
        rows.append(i)
    buckets = make_buckets(max_len=max(32, -(-args.max_cache_len // 32) * 32))

    records: list[dict] = []
    shapes_seen: set = set()
    steady_time, steady_rows, total_time = 0.0, 0, 0.0
    selections_left = args.num_selections if args.save_selections else 0
    if args.save_selections:
        os.makedirs(args.save_selections, exist_ok=True)
    bar = tqdm(total=len(rows), desc=f"{args.method} {args.data}/{args.split}", unit="ex", disable=args.no_progress)
    correct_so_far = 0
    pos = 0
    topics = ds.select_columns(["topic"])["topic"]
    while pos < len(rows):
        t0 = time.perf_counter()
        chosen = rows[pos : pos + args.batch_size]
        pos += len(chosen)
        examples, kept = [], []
        for i, image in zip(chosen, split.images(chosen)):
            try:
                pixels, grid = process_image(image, options)
            except ValueError as e:
                skipped["bad_image"] += 1
                log.warning("skipping %s: image rejected by the processor (%s)", split.ids[i], e)
                bar.update(1)
                continue
            ids = latent_prompt(cfg, split.encodings[i].prompt_ids, n)
            examples.append({"input_ids": np.asarray(ids, np.int32), "labels": np.full(len(ids), IGNORE_INDEX),
                             "anchor": len(split.encodings[i].prompt_ids), "num_latent": n,
                             "pixel_values": pixels, "image_grid_thw": grid})
            kept.append(i)
        if not examples:
            continue
        real = len(examples)
        while len(examples) < args.batch_size:  # filler rows keep one shape per bucket; outputs dropped
            examples.append(examples[0])
        batch = collate(examples, pad_id, prefix_buckets=buckets, tail_buckets=None)
        grids = batch["image_grid_thw"]
        shape = (batch["input_ids"].shape, None if grids is None else tuple(map(tuple, grids.tolist())))
        res = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             batch["image_grid_thw"], max_new_tokens=max_new, k=k, latent_text=latent_text,
                             position_mode=args.position_mode, selection_order=args.selection_order,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             eos_token_ids=eos_ids, pad_token_id=pad_id)
        texts = [tok.decode(res.tokens[r, : res.lengths[r]].tolist(), skip_special_tokens=True) for r in range(real)]
        dt = time.perf_counter() - t0
        total_time += dt
        if shape in shapes_seen:
            steady_time, steady_rows = steady_time + dt, steady_rows + real
        shapes_seen.add(shape)
        for r, i in enumerate(kept):
            pred = extract_answer(texts[r], args.answer_format)
            gold = split.answers[i]
            ok = pred == gold
            correct_so_far += ok
            records.append({
                "id": split.ids[i], "domain": split.domains[i], "topic": topics[i],
                "prompt": _prompt_text(tok, split.encodings[i].prompt_ids, image_pad_id, bb.prompt.image_token),
                "n_latent": n,
                "generated": texts[r], "extracted": pred, "gold": gold, "correct": bool(ok),
                "generated_tokens": int(res.lengths[r]), "ar_steps": int(res.lengths[r]) + n,
                "selected": res.selected[:, r].tolist() if n and k else None,
            })
            if selections_left > 0 and n and k:
                pixels_u8 = model_view(split.images([i])[0], options)
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split.ids[i])
                if options.processor == "chameleon":  # a side x side grid of codes over the square image
                    side = int(round(options.tokens_per_image ** 0.5))
                    grid, merge, patch = (1, side, side), 1, options.reference_size[0] // side
                else:
                    grid, merge, patch = batch["image_grid_thw"][r], options.merge_size, options.patch_size
                draw_selections(os.path.join(args.save_selections, f"{safe}.png"), pixels_u8, grid,
                                res.selected[:, r], merge=merge, patch=patch,
                                title=f"{split.ids[i]}: gold {gold}, predicted {pred}")
                selections_left -= 1
        bar.update(real)
        bar.set_postfix(acc=f"{correct_so_far / max(len(records), 1):.3f}")
    bar.close()
    if args.save_selections and not (n and k):
        log.warning("--save-selections: method %s selects no image tokens; nothing drawn", args.method)

    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    by_domain: dict = defaultdict(lambda: {"examples": 0, "correct": 0})
    for rec in records:
        d = by_domain[rec["domain"] or "(none)"]
        d["examples"] += 1
        d["correct"] += int(rec["correct"])
    for d in by_domain.values():
        d["accuracy"] = d["correct"] / d["examples"]
    count = len(records)
    timed_rows, timed = (steady_rows, steady_time) if steady_rows else (count, total_time)
    summary = {
        "ckpt": os.path.abspath(args.ckpt), "data": args.data, "data_source": args.data_source, "split": args.split,
        "method": args.method, "n_latent": n, "k": k, "latent_text": latent_text,
        "position_mode": args.position_mode, "selection_order": args.selection_order,
        "max_new_tokens": max_new, "batch_size": args.batch_size, "temperature": args.temperature,
        "answer_format": args.answer_format, "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "mesh": args.mesh, "mesh_axes": dict(model.mesh.shape), "mesh_devices": int(model.mesh.devices.size),
        "dtype": str(model.dtype),
        "param_bytes_total": model.load_report["param_bytes_total"],
        "param_peak_bytes_per_device": model.load_report["param_peak_bytes_per_device"],
        "examples": count, "correct": int(sum(r["correct"] for r in records)),
        "accuracy": sum(r["correct"] for r in records) / count if count else 0.0,
        "no_answer": sum(r["extracted"] is None for r in records),
        "by_domain": dict(sorted(by_domain.items())),
        "mean_generated_tokens": float(np.mean([r["generated_tokens"] for r in records])) if count else 0.0,
        "mean_ar_steps": float(np.mean([r["ar_steps"] for r in records])) if count else 0.0,
        "seconds_per_sample": timed / timed_rows if timed_rows else 0.0,
        "samples_per_s": timed_rows / timed if timed else 0.0,
        "seconds_per_sample_with_compile": total_time / count if count else 0.0,
        "timing_excludes_compilation": bool(steady_rows),
        "compiled_shapes": len(shapes_seen),
        "skipped_load": dict(load_summary.skipped), "skipped_eval": dict(skipped),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(_markdown(summary))
    if summary["by_domain"]:
        drawn = _bar_chart(os.path.join(out_dir, "accuracy_by_domain.png"),
                           f"{args.method} on {args.data}/{args.split}: accuracy by domain",
                           list(summary["by_domain"]), [d["accuracy"] for d in summary["by_domain"].values()])
        summary["chart"] = drawn
    print(f"{args.method} on {args.data}/{args.split}: accuracy {100 * summary['accuracy']:.2f}% over {count} "
          f"examples, {summary['mean_ar_steps']:.1f} AR steps, {summary['seconds_per_sample']:.3f} s/sample; "
          f"wrote {out_dir}")
    return summary


# ----------------------------------------------------------------------------- dry run
def generation_dry_run(cfg, mesh_name: str, dtype: str = "auto", batch_size: int = 16, max_new_tokens: int = 64,
                       n: int = 3, k: int | None = None, latent_text: bool = True, text: int | None = None) -> dict:
    """Compile `generate_jit` for `mesh_name` on abstract arrays (ShapeDtypeStructs with the inference layout) and
    report per-device bytes: parameters, KV cache, and the compiler's memory analysis (arguments, outputs,
    temporaries). The batch is the train dry run's reference row (text + one reference image) ending with n
    latent tokens (`train.dry_run.example_batch` with no tail)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from ivtlr_jax import sharding as sh
    from ivtlr_jax.config import LatentConfig
    from ivtlr_jax.generate import generate_jit
    from ivtlr_jax.model import abstract_params, resolve_dtype
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.models.layers import resolve_attention
    from ivtlr_jax.train.dry_run import DRY_RUN_TEXT, _memory, example_batch
    from ivtlr_jax.train.step import tree_bytes_per_device

    if cfg.latent_token_id is None:  # any id inside the vocabulary lays the batch out the same way
        cfg = dataclasses.replace(cfg, latent_token_id=cfg.vocab_size - 1)
    if getattr(cfg, "image_vocab", None) == ():  # Chameleon without its vocabulary map: any ids size the gathers
        cfg = dataclasses.replace(cfg, image_vocab=tuple(range(4, 4 + cfg.vq.num_embeddings)))
    bb = backbone_for(cfg)
    preset = sh.get_preset(mesh_name)
    mesh = sh.make_mesh(preset)
    platform = preset.platform or mesh.devices.flat[0].platform
    dtype = resolve_dtype(dtype, platform)
    k = bb.default_k if k is None else k
    lcfg = LatentConfig(k=k if n else 0, latent_text=latent_text)
    one = example_batch(bb, lcfg, 1, DRY_RUN_TEXT if text is None else text, tail=0, n=n)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype), one)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                         sh.batch_shardings(mesh, batch))
    params = abstract_params(bb, mesh, dtype)
    rep = sh.replicated(mesh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    eos = tuple(cfg.eos_token_id) or (0,)
    compiled = generate_jit.lower(bb, params, lcfg, batch, key, scalar, scalar, max_new_tokens=max_new_tokens,
                                  eos_ids=eos, pad_id=eos[0], greedy=True, mesh=mesh).compile()
    final_len = int(one.kv_valid.shape[1])
    d = bb.dims
    cache_shape = (d.num_layers, batch_size, final_len + max_new_tokens, d.num_kv_heads, d.head_dim)
    cache_shard = sh.cache_sharding(mesh, cache_shape).shard_shape(cache_shape)
    target = {"gpu": "cuda"}.get(preset.platform, preset.platform or platform)
    leaves = jax.tree_util.tree_leaves(params)
    out = {
        "mesh": mesh_name, "mesh_describe": sh.describe(mesh), "mesh_axes": dict(mesh.shape), "dtype": dtype,
        "batch_size": batch_size, "prompt_len": int(one.prefix_ids.shape[1]) + n, "final_len": final_len,
        "max_new_tokens": max_new_tokens, "n_latent": n, "k": lcfg.k,
        "attention": resolve_attention("auto", dtype, d.head_dim, target),  # on the preset's devices
        "attention_compiled": resolve_attention("auto", dtype, d.head_dim),  # here
        "param_bytes_total": int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)),
        "param_bytes_per_device": tree_bytes_per_device(params, jax.tree.map(lambda x: x.sharding, params)),
        "kv_cache_bytes_total": 2 * int(np.prod(cache_shape)) * jnp.dtype(dtype).itemsize,
        "kv_cache_bytes_per_device": 2 * int(np.prod(cache_shard)) * jnp.dtype(dtype).itemsize,
    }
    out.update(_memory(compiled))
    return out


def format_generation_dry_run(r: dict) -> str:
    """A readable table of `generation_dry_run`'s figures (GiB per device)."""
    gib = 2**30
    rows = [("parameters", r["param_bytes_per_device"]), ("KV cache", r["kv_cache_bytes_per_device"])]
    if "compiler_total_bytes_per_device" in r:
        rows += [("compiler: arguments", r["compiler_argument_size_in_bytes"]),
                 ("compiler: outputs", r["compiler_output_size_in_bytes"]),
                 ("compiler: temporaries", r["compiler_temp_size_in_bytes"]),
                 ("compiler: total", r["compiler_total_bytes_per_device"])]
    lines = [f"generation memory per device on --mesh {r['mesh']} ({r['mesh_describe']})",
             f"{'':<24}{'GiB':>10}"] + [f"{name:<24}{v / gib:>10.3f}" for name, v in rows]
    lines.append(f"batch {r['batch_size']} rows, prompt {r['prompt_len']} tokens ({r['final_len']} with the latent "
                 f"chunks of n={r['n_latent']}, k={r['k']}) + {r['max_new_tokens']} new, {r['dtype']} parameters "
                 f"({r['param_bytes_total'] / gib:.2f} GiB in all), attention {r['attention']} (compiled here with "
                 f"{r['attention_compiled']}); the KV cache lives in the temporaries")
    return "\n".join(lines)


def run_dry(args) -> dict:
    """--dry-run: the checkpoint's config only (no weights), the generation program compiled for --mesh."""
    from ivtlr_jax.convert.checkpoint import load_config

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    n, k, latent_text = method_settings(args)
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(args.method, 64)
    result = generation_dry_run(load_config(args.ckpt), args.mesh, args.dtype, args.batch_size, max_new, n, k,
                                latent_text)
    print(format_generation_dry_run(result))
    path = args.out or os.path.join("eval", "dry_run.json")
    if not path.endswith(".json"):
        path = os.path.join(path, "dry_run.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from experiments.train import simulate_devices_for_dry_run
    from ivtlr_jax import sharding as sh

    sh.get_preset(args.mesh)  # an unknown --mesh: one line naming the presets
    if args.dry_run:
        simulate_devices_for_dry_run(args.mesh)  # CPU-only host: the preset's device count (before JAX starts)
        return run_dry(args)
    sh.apply_xla_flags(args.mesh)  # before JAX starts its backend
    return evaluate(args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")

"""The batched evaluation runner: a checkpoint, a split and a method in; prediction records and a summary out.

`prepare` fixes everything generation needs (model on its mesh, tokenizer, encoded split, the rows that fit);
`Evaluation.batches` cuts those rows into the same batches every time, so other runs over the same checkpoint
(other generation options, interventions) can be paired row by row with the intact one; `run` generates and
scores; `evaluate` does all of it and writes the reports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from typing import Any

import numpy as np

from ivtlr_jax.eval.config import EvalConfig, max_new_tokens, method_settings
from ivtlr_jax.eval.pictures import save_selection_picture
from ivtlr_jax.eval.report import write_predictions, write_summary
from ivtlr_jax.eval.scoring import extract_answer, score_records

log = logging.getLogger("ivtlr_jax.eval")


def prompt_text(tok, ids, image_token_id: int, image_token: str) -> str:
    """Prompt as text with the image-placeholder run shown once with its count."""
    out, run = [], 0
    for t in list(ids) + [-1]:
        if t == image_token_id:
            run += 1
            continue
        if run:
            out.append(f"{image_token}x{run}")
            run = 0
        if t != -1:
            out.append(tok.decode([t], skip_special_tokens=False))
    return "".join(out)


@dataclasses.dataclass
class EvalBatch:
    """One generation batch: the split rows it holds (in order), the collated inputs (filled up to the batch size
    with copies of its first row, whose outputs are dropped) and the rows whose image the processor rejected."""

    rows: list[int]
    inputs: dict | None
    rejected: list[int]

    @property
    def shape(self) -> tuple:
        """What the compiled program depends on: ids shape and image grids."""
        grids = self.inputs["image_grid_thw"]
        return self.inputs["input_ids"].shape, None if grids is None else tuple(map(tuple, grids.tolist()))


@dataclasses.dataclass
class Timing:
    """Wall time per batch; batches of a shape seen before exclude compilation."""

    total_time: float = 0.0
    steady_time: float = 0.0
    steady_rows: int = 0
    shapes_seen: set = dataclasses.field(default_factory=set)

    def add(self, shape, seconds: float, rows: int) -> None:
        self.total_time += seconds
        if shape in self.shapes_seen:
            self.steady_time, self.steady_rows = self.steady_time + seconds, self.steady_rows + rows
        self.shapes_seen.add(shape)

    def figures(self, count: int) -> dict:
        timed_rows, timed = (self.steady_rows, self.steady_time) if self.steady_rows else (count, self.total_time)
        return {
            "seconds_per_sample": timed / timed_rows if timed_rows else 0.0,
            "samples_per_s": timed_rows / timed if timed else 0.0,
            "seconds_per_sample_with_compile": self.total_time / count if count else 0.0,
            "timing_excludes_compilation": bool(self.steady_rows),
            "compiled_shapes": len(self.shapes_seen),
        }


@dataclasses.dataclass
class Evaluation:
    """Everything fixed before generation: the config, the method's (n, k, latent_text, max_new), the model and
    tokenizer, the encoded split and the rows that fit --max-cache-len."""

    cfg: EvalConfig
    n: int
    k: int
    latent_text: bool
    max_new: int
    position_mode: str
    model: Any
    tok: Any
    eos_ids: tuple
    pad_id: int
    image_token_id: int
    ds: Any
    split: Any
    topics: list
    options: Any
    load_summary: Any
    rows: list[int]
    skipped: Counter
    buckets: Any

    @property
    def bb(self):
        return self.model.backbone

    @property
    def selects(self) -> bool:
        """Whether the method selects image tokens (latent steps with k > 0)."""
        return bool(self.n and self.k)

    def batch_rows(self) -> list[list[int]]:
        """The evaluated rows cut into batches of --batch-size, in split order."""
        size = self.cfg.batch_size
        return [self.rows[pos : pos + size] for pos in range(0, len(self.rows), size)]

    def make_batch(self, chosen: list[int], image_ablation: str | None = None, seed: int = 0) -> EvalBatch:
        """Process the images and lay out the latent prompts of these rows; rejected images are skipped, counted and
        logged. image_ablation: an input-side intervention of the audit (image-blank, image-shuffle) on the
        decoded images of these rows first."""
        from ivtlr_jax.data import IGNORE_INDEX, collate, process_image
        from ivtlr_jax.generate import latent_prompt

        images = self.split.images(chosen)
        if image_ablation is not None:
            images = ablated_images(images, image_ablation, seed)
        examples, kept, rejected = [], [], []
        for i, image in zip(chosen, images):
            try:
                pixels, grid = process_image(image, self.options)
            except ValueError as e:
                self.skipped["bad_image"] += 1
                log.warning("skipping %s: image rejected by the processor (%s)", self.split.ids[i], e)
                rejected.append(i)
                continue
            ids = latent_prompt(self.model.config, self.split.encodings[i].prompt_ids, self.n)
            examples.append({"input_ids": np.asarray(ids, np.int32), "labels": np.full(len(ids), IGNORE_INDEX),
                             "anchor": len(self.split.encodings[i].prompt_ids), "num_latent": self.n,
                             "pixel_values": pixels, "image_grid_thw": grid})
            kept.append(i)
        if not examples:
            return EvalBatch([], None, rejected)
        while len(examples) < self.cfg.batch_size:  # filler rows keep one shape per bucket; outputs dropped
            examples.append(examples[0])
        return EvalBatch(kept, collate(examples, self.pad_id, prefix_buckets=self.buckets, tail_buckets=None),
                         rejected)

    def generate(self, batch: EvalBatch, **options):
        """`IVTLRModel.generate` on one batch with the run's settings; `options` override them."""
        x = batch.inputs
        kwargs = dict(max_new_tokens=self.max_new, k=self.k, latent_text=self.latent_text,
                      position_mode=self.position_mode, selection_order=self.cfg.selection_order,
                      deepstack_latent=self.cfg.deepstack_latent == "on",
                      temperature=self.cfg.temperature, top_p=self.cfg.top_p, seed=self.cfg.seed,
                      eos_token_ids=self.eos_ids, pad_token_id=self.pad_id)
        kwargs.update(options)
        return self.model.generate(x["input_ids"], x["attention_mask"], x["pixel_values"], x["image_grid_thw"],
                                   **kwargs)

    def decode(self, res, rows: int) -> list[str]:
        """The generated text of the first `rows` rows (special tokens dropped)."""
        return [self.tok.decode(res.tokens[r, : res.lengths[r]].tolist(), skip_special_tokens=True)
                for r in range(rows)]

    def record(self, i: int, r: int, text: str, res) -> dict:
        """The prediction record of split row i, batch row r."""
        split = self.split
        pred = extract_answer(text, self.cfg.answer_format)
        gold = split.answers[i]
        return {
            "id": split.ids[i], "domain": split.domains[i], "topic": self.topics[i],
            "prompt": prompt_text(self.tok, split.encodings[i].prompt_ids, self.image_token_id,
                                  self.bb.prompt.image_token),
            "n_latent": self.n,
            "generated": text, "extracted": pred, "gold": gold, "correct": bool(pred == gold),
            "generated_tokens": int(res.lengths[r]), "ar_steps": int(res.lengths[r]) + self.n,
            "selected": res.selected[:, r].tolist() if self.selects else None,
        }


def load_tokenizer(path: str, model):
    """(tokenizer, eos ids, pad id, image token id): the tokenizer at `path`, checked against the model's config."""
    from transformers import AutoTokenizer

    mcfg, bb = model.config, model.backbone
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None and not mcfg.eos_token_id:
        raise ValueError("neither the tokenizer nor the checkpoint config names an EOS token")
    eos_ids = tuple(sorted({*mcfg.eos_token_id, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (mcfg.pad_token_id or eos_ids[0])
    image_token_id = tok.convert_tokens_to_ids(bb.prompt.image_token)
    if image_token_id != mcfg.image_token_id:
        raise ValueError(f"tokenizer maps {bb.prompt.image_token} to {image_token_id} but the checkpoint's "
                         f"image_token_id is {mcfg.image_token_id}; pass the checkpoint's own tokenizer")
    return tok, eos_ids, pad_id, image_token_id


def ablated_images(images: list, name: str, seed: int) -> list:
    """The images of one batch under an image-side ablation; images that do not decode stay as they are (the
    processor rejects them as in the intact run)."""
    from ivtlr_jax.data.images import decode_image
    from ivtlr_jax.eval.audit import intervene_images

    decoded = []
    for image in images:
        try:
            decoded.append(decode_image(image))
        except ValueError:
            decoded.append(None)
    good = [j for j, d in enumerate(decoded) if d is not None]
    out = list(images)
    for j, image in zip(good, intervene_images([decoded[j] for j in good], name, seed)):
        out[j] = image
    return out


def prepare(cfg: EvalConfig) -> Evaluation:
    """Check the config, load the model, tokenizer and split, and keep the rows whose prompt, latent chunks and
    new tokens fit cfg.max_cache_len (the others are counted as too_long). Creates cfg.out_dir."""
    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.data import encode_split, load_split_with_summary, make_buckets
    from ivtlr_jax.generate import latent_prompt

    cfg.check()
    if cfg.data is None:
        raise ValueError("--data is required (m3cot, scienceqa or synthetic) unless --dry-run")
    n, k, latent_text = method_settings(cfg)  # k None: the backbone's default, once the model is loaded
    max_new = max_new_tokens(cfg)
    if max_new < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new}")
    os.makedirs(cfg.out_dir, exist_ok=True)

    model = IVTLRModel.from_pretrained(cfg.ckpt, dtype=cfg.dtype, mesh=cfg.mesh)
    bb = model.backbone
    k = bb.default_k if k is None else k
    position_mode = model.resolve_position_mode(cfg.position_mode)  # the checkpoint's default when not given
    latent_prompt(model.config, [], n)  # a checkpoint without <|latent|> asked for latent steps: stop here
    tok, eos_ids, pad_id, image_token_id = load_tokenizer(cfg.tokenizer or cfg.ckpt, model)

    ds, load_summary = load_split_with_summary(cfg.data, cfg.split, cfg.data_source, limit=cfg.limit)
    log.info(load_summary.line())
    options = bb.image_options(cfg.resize_mode)
    split = encode_split(ds, tok, options, prompt=bb.prompt)
    chunk = (k + int(latent_text)) if n else 0
    skipped: Counter = Counter()
    rows = []
    for i, enc in enumerate(split.encodings):
        if len(enc.prompt_ids) + n * chunk + max_new > cfg.max_cache_len:
            skipped["too_long"] += 1
            log.warning("skipping %s: prompt of %d tokens + %d latent x %d + %d new > --max-cache-len %d",
                        split.ids[i], len(enc.prompt_ids), n, chunk, max_new, cfg.max_cache_len)
            continue
        rows.append(i)
    buckets = make_buckets(max_len=max(32, -(-cfg.max_cache_len // 32) * 32))
    topics = ds.select_columns(["topic"])["topic"]
    return Evaluation(cfg, n, k, latent_text, max_new, position_mode, model, tok, eos_ids, pad_id, image_token_id,
                      ds, split, topics, options, load_summary, rows, skipped, buckets)


def run_ablations(ev: Evaluation, batch: EvalBatch, batch_index: int, names: list[str], intact) -> dict:
    """Each ablation on the same batch as the intact run: {name: (GenerateOutput, texts)} for its rows."""
    from ivtlr_jax.eval.audit import IMAGE_ABLATIONS

    out = {}
    for name in names:
        if name == "deepstack-bare":
            if not ev.bb.latent_extras:
                raise ValueError(f"--ablate deepstack-bare compares the DeepStack modes of the latent loop; this "
                                 f"checkpoint is {ev.bb.model_type}, which has no DeepStack (use it with qwen3_vl)")
            res = ev.generate(batch, deepstack_latent=False, with_states=True)
        elif name in IMAGE_ABLATIONS:
            ablated = ev.make_batch(batch.rows, image_ablation=name, seed=ev.cfg.seed + batch_index)
            if ablated.rows != batch.rows:
                lost = sorted(set(batch.rows) - set(ablated.rows))
                raise ValueError(f"--ablate {name}: the processor rejected rows {lost} under the ablation only; "
                                 "the paired audit needs the same rows")
            res = ev.generate(ablated, with_states=True)
        else:
            res = ev.generate(batch, ablate=name, ablate_seed=ev.cfg.seed, with_states=True)
        out[name] = (res, ev.decode(res, len(batch.rows)))
    return out


def run(ev: Evaluation, audit: dict | None = None) -> tuple[list[dict], Timing]:
    """Generate and score every kept row, batch by batch (a progress bar unless cfg.no_progress); draw the first
    cfg.num_selections rows' selections into cfg.save_selections. Returns the records in split order and the
    timing. With cfg.ablate, each ablation runs on every batch right after the intact run and `audit` (a dict)
    receives an `AuditLog` of the paired results."""
    from tqdm.auto import tqdm

    from ivtlr_jax.eval.audit import AuditLog, parse_ablations

    cfg = ev.cfg
    names = parse_ablations(cfg.ablate)
    log_ = AuditLog(names) if names else None
    if audit is not None and log_ is not None:
        audit["log"] = log_
    records: list[dict] = []
    timing = Timing()
    selections_left = cfg.num_selections if cfg.save_selections else 0
    if cfg.save_selections:
        os.makedirs(cfg.save_selections, exist_ok=True)
    bar = tqdm(total=len(ev.rows), desc=f"{cfg.method} {cfg.data}/{cfg.split}", unit="ex", disable=cfg.no_progress)
    correct_so_far = 0
    for batch_index, chosen in enumerate(ev.batch_rows()):
        t0 = time.perf_counter()
        batch = ev.make_batch(chosen)
        bar.update(len(batch.rejected))
        if not batch.rows:
            continue
        res = ev.generate(batch, with_states=True) if names else ev.generate(batch)
        texts = ev.decode(res, len(batch.rows))
        timing.add(batch.shape, time.perf_counter() - t0, len(batch.rows))
        if names:
            ablated = run_ablations(ev, batch, batch_index, names, res)
        for r, i in enumerate(batch.rows):
            rec = ev.record(i, r, texts[r], res)
            records.append(rec)
            if names:
                log_.add(rec, res, r, {name: (ev.record(i, r, t[r], a), a) for name, (a, t) in ablated.items()})
            correct_so_far += rec["correct"]
            if selections_left > 0 and ev.selects:
                grids = batch.inputs["image_grid_thw"]  # None: the backbone's images have no grid
                save_selection_picture(cfg.save_selections, ev.bb, ev.options, ev.split.images([i])[0],
                                       None if grids is None else grids[r], res.selected[:, r], ev.split.ids[i],
                                       rec["gold"], rec["extracted"])
                selections_left -= 1
        bar.update(len(batch.rows))
        bar.set_postfix(acc=f"{correct_so_far / max(len(records), 1):.3f}")
    bar.close()
    if cfg.save_selections and not ev.selects:
        log.warning("--save-selections: method %s selects no image tokens; nothing drawn", cfg.method)
    return records, timing


def summarize(ev: Evaluation, records: list[dict], timing: Timing) -> dict:
    """summary.json's content: the run's settings, the model's placement, the scores, timing and skipped rows."""
    import jax

    cfg, model = ev.cfg, ev.model
    device = jax.devices()[0]
    return {
        "ckpt": os.path.abspath(cfg.ckpt), "data": cfg.data, "data_source": cfg.data_source, "split": cfg.split,
        "method": cfg.method, "n_latent": ev.n, "k": ev.k, "latent_text": ev.latent_text,
        "position_mode": ev.position_mode, "selection_order": cfg.selection_order,
        "deepstack_latent": cfg.deepstack_latent if ev.bb.latent_extras else None,
        "max_new_tokens": ev.max_new, "batch_size": cfg.batch_size, "temperature": cfg.temperature,
        "answer_format": cfg.answer_format, "device": f"{device.platform}:{device.device_kind}",
        "mesh": cfg.mesh, "mesh_axes": dict(model.mesh.shape), "mesh_devices": int(model.mesh.devices.size),
        "dtype": str(model.dtype),
        "param_bytes_total": model.load_report["param_bytes_total"],
        "param_peak_bytes_per_device": model.load_report["param_peak_bytes_per_device"],
        **score_records(records),
        **timing.figures(len(records)),
        "skipped_load": dict(ev.load_summary.skipped), "skipped_eval": dict(ev.skipped),
    }


def summarize_audit(summary: dict, audit_log, seed: int) -> dict:
    """summary with `ablations` and `mediation` added from the run's AuditLog."""
    summary["ablations"] = audit_log.ablations(seed)
    summary["mediation"] = audit_log.mediation()
    return summary


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation cfg describes and write predictions.jsonl, summary.json, summary.md and
    accuracy_by_domain.png to cfg.out_dir; returns the summary."""
    ev = prepare(cfg)
    audit: dict = {}
    records, timing = run(ev, audit)
    write_predictions(cfg.out_dir, records)
    summary = summarize(ev, records, timing)
    if "log" in audit:
        summarize_audit(summary, audit["log"], cfg.seed)
    write_summary(cfg.out_dir, summary)
    return summary

"""Encoded splits and the resumable, host-sharded batch iterator over the curriculum."""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ivtlr_jax.config import PromptFormat
from ivtlr_jax.data.collate import DEFAULT_BUCKETS, collate
from ivtlr_jax.data.curriculum import (
    IGNORE_INDEX,
    CurriculumOptions,
    TextEncoding,
    build_stage_example,
    stage_extent,
)
from ivtlr_jax.data.images import ImageProcessor, image_grid, image_token_count, process_image
from ivtlr_jax.data.text import (
    IMAGE_PAD_TOKEN,
    _token_id,
    answer_text,
    expand_image_pads,
    prompt_text,
    split_steps,
    tokenize_prompts,
    truncate_steps,
)

logger = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    """A normalised split with its stage-independent token ids; images stay encoded until batching."""

    dataset: object  # normalised datasets.Dataset (image bytes read per batch)
    encodings: list[TextEncoding]
    grids: np.ndarray  # (N, 3) int64 image_grid_thw per row
    ids: list[str]
    domains: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.encodings)

    def images(self, indices: Sequence[int]) -> list[bytes]:
        return self.dataset.select_columns(["image"])[[int(i) for i in indices]]["image"]


def _need_options(image_options: ImageProcessor | None) -> ImageProcessor:
    if image_options is None:
        raise ValueError("image_options is required: pass the backbone's image processor (Backbone.image_options())")
    return image_options


def encode_split(dataset, tokenizer, image_options: ImageProcessor | None = None, *,
                 prompt: PromptFormat | None = None, chat_template: str | None = None,
                 max_length: int | None = None) -> EncodedSplit:
    """Tokenise every row of a normalised split (batched; same ids as curriculum.encode_text).

    image_options: the backbone's image processor; prompt: its PromptFormat (None: a chat prompt with the
    tokenizer's own template and <|image_pad|> placeholders)."""
    options = _need_options(image_options)
    prompt = prompt or PromptFormat(style="chat", image_token=IMAGE_PAD_TOKEN)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set it (Qwen2-VL-Instruct: <|im_end|>)")
    cols = dataset.select_columns(["id", "question", "choices", "rationale", "answer", "domain"]).to_dict()
    n = len(cols["id"])
    if options.same_grid:
        grids = np.tile(image_grid(b"", options), (n, 1))
    else:
        grids = np.stack([image_grid(b, options) for b in dataset.select_columns(["image"])["image"]]) if n else \
            np.zeros((0, 3), np.int64)
    prompts = [prompt_text(tokenizer, q, c, prompt, chat_template)
               for q, c in zip(cols["question"], cols["choices"], strict=True)]
    steps = [split_steps(r) for r in cols["rationale"]]
    flat_steps = [s + "\n" for row in steps for s in row]
    prompt_ids = tokenize_prompts(tokenizer, prompts, prompt)
    step_ids = tokenizer(flat_steps, add_special_tokens=False)["input_ids"] if flat_steps else []
    answer_ids = tokenizer([answer_text(a, prompt.answer_format) for a in cols["answer"]],
                           add_special_tokens=False)["input_ids"] if n else []
    pad_id, eos = _token_id(tokenizer, prompt.image_token), int(tokenizer.eos_token_id)
    encodings, k = [], 0
    for i in range(n):
        prompt_i = expand_image_pads(prompt_ids[i], pad_id, [image_token_count(grids[i], options)])
        row_steps = [list(map(int, s)) for s in step_ids[k:k + len(steps[i])]]
        k += len(steps[i])
        answer = [int(t) for t in answer_ids[i]] + [eos]
        row_steps = truncate_steps(len(prompt_i), row_steps, len(answer), max_length)
        encodings.append(TextEncoding(tuple(prompt_i), tuple(tuple(s) for s in row_steps), tuple(answer)))
    return EncodedSplit(dataset, encodings, grids, list(cols["id"]), list(cols["domain"]), list(cols["answer"]))


def _process(value, options: ImageProcessor):
    return process_image(value, options)


class BatchIterator:
    """Batches of the curriculum over epochs, deterministic in (seed, epoch), exactly resumable.

    batch_size is per host. Each global batch (batch_size * process_count rows of the epoch's
    permutation) is split into process_count contiguous slices; host process_index takes its
    slice, so hosts see disjoint rows that together cover the epoch. Without drop_last the
    short final batch is split as evenly as possible and each host fills its batch with copies
    of a row whose labels are all -100 and example_index is -1. `steps_multiple` rounds an epoch up to a
    multiple of that many batches (the micro-steps of whole optimiser updates), the extra ones all filler.
    """

    def __init__(self, split: EncodedSplit, *, batch_size: int, latent_id: int, pad_id: int,
                 curriculum: CurriculumOptions | None = None, seed: int = 0, num_epochs: int | None = None,
                 shuffle: bool = True, drop_last: bool = False, process_index: int = 0, process_count: int = 1,
                 image_options: ImageProcessor | None = None, prefix_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                 tail_buckets: Sequence[int] | None = DEFAULT_BUCKETS, num_workers: int = 2,
                 worker_type: str = "thread", prefetch: int = 2, start_latent_id: int | None = None,
                 end_latent_id: int | None = None, start_epoch: int = 0, steps_multiple: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
        if worker_type not in ("thread", "process"):
            raise ValueError(f"worker_type must be 'thread' or 'process', got {worker_type!r}")
        if len(split) == 0:
            raise ValueError("split has no rows")
        self.split = split
        self.steps_multiple = max(1, int(steps_multiple))
        self.batch_size, self.latent_id, self.pad_id = batch_size, latent_id, pad_id
        self.curriculum = curriculum or CurriculumOptions()
        self.seed, self.num_epochs, self.shuffle, self.drop_last = seed, num_epochs, shuffle, drop_last
        self.process_index, self.process_count = process_index, process_count
        self.image_options = image_options
        self.prefix_buckets, self.tail_buckets = prefix_buckets, tail_buckets
        self.marker_ids = {"start_latent_id": start_latent_id, "end_latent_id": end_latent_id}
        self.prefetch = max(0, prefetch)
        self.epoch, self.step = start_epoch, 0
        self.last_stage: int | None = None
        self.shapes_seen: set[tuple[int, int]] = set()
        self._num_workers, self._worker_type = num_workers, worker_type
        self._pool: cf.Executor | None = None
        self._pending: dict[tuple[int, int], list] = {}
        self._orders: dict[int, np.ndarray] = {}
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"drop_last with {len(split)} rows and global batch {self.global_batch_size} gives no batch"
            )
        logger.info("length buckets: prefix %s, tail %s", tuple(prefix_buckets or ()), tuple(tail_buckets or ()))

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.process_count

    @property
    def steps_per_epoch(self) -> int:
        n, g, m = len(self.split), self.global_batch_size, self.steps_multiple
        if self.drop_last:
            return n // g // m * m
        return -(-n // (g * m)) * m

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Permutation of row indices for an epoch: a function of (seed, epoch) only."""
        if epoch not in self._orders:
            n = len(self.split)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def global_rows(self, epoch: int, step: int) -> np.ndarray:
        """Row indices of the whole global batch at (epoch, step), over all hosts."""
        g = self.global_batch_size
        return self.epoch_order(epoch)[step * g:(step + 1) * g]

    def host_rows(self, epoch: int, step: int) -> np.ndarray:
        """Row indices this host reads at (epoch, step); fewer than batch_size only in a short last batch."""
        g = self.global_batch_size
        window = self.epoch_order(epoch)[step * g:(step + 1) * g]
        return np.array_split(window, self.process_count)[self.process_index]

    def state_dict(self) -> dict:
        """Position after the last batch returned; load_state_dict(state) resumes exactly there."""
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step, "num_rows": len(self.split),
                "process_count": self.process_count, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_rows", len(self.split)),
                          ("process_count", self.process_count), ("batch_size", self.batch_size)):
            if key in state and state[key] != mine:
                raise ValueError(f"iterator state has {key}={state[key]!r} but this iterator has {mine!r}")
        if not 0 <= int(state["step"]) < self.steps_per_epoch:
            raise ValueError(f"iterator state step={state['step']} outside [0, {self.steps_per_epoch})")
        self._pending.clear()
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _executor(self) -> cf.Executor | None:
        if self._num_workers <= 0:
            return None
        if self._pool is None:
            cls = cf.ThreadPoolExecutor if self._worker_type == "thread" else cf.ProcessPoolExecutor
            self._pool = cls(max_workers=self._num_workers)
        return self._pool

    def _submit(self, position: tuple[int, int]) -> None:
        if position in self._pending or (self.num_epochs is not None and position[0] >= self.num_epochs):
            return
        rows = self.host_rows(*position)
        if len(rows) == 0:
            rows = self.epoch_order(position[0])[:1]
        images = self.split.images(rows)
        options = _need_options(self.image_options)
        pool = self._executor()
        if pool is None:
            self._pending[position] = [_process(v, options) for v in images]
        else:
            self._pending[position] = [pool.submit(_process, v, options) for v in images]

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        return (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            self.close()
            raise StopIteration
        position = (self.epoch, self.step)
        self._submit(position)
        ahead = position
        for _ in range(self.prefetch):
            ahead = self._advance(*ahead)
            self._submit(ahead)
        results = [r.result() if isinstance(r, cf.Future) else r for r in self._pending.pop(position)]
        batch = self._assemble(position, results)
        self.epoch, self.step = self._advance(*position)
        return batch

    def _assemble(self, position: tuple[int, int], images: list) -> dict[str, np.ndarray]:
        epoch, step = position
        stage = self.curriculum.stage_for_epoch(epoch)
        rows = self.host_rows(epoch, step)
        real = len(rows)
        if real == 0:
            rows = self.epoch_order(epoch)[:1]
        examples = []
        for r, (pixels, grid) in zip(rows, images, strict=True):
            ex = build_stage_example(self.split.encodings[int(r)], stage, self.latent_id, self.curriculum,
                                     **self.marker_ids)
            ex.update(pixel_values=pixels, image_grid_thw=grid, example_index=int(r) if real else -1)
            examples.append(ex)
        while len(examples) < self.batch_size:  # filler rows: no loss
            filler = dict(examples[0])
            filler["labels"] = np.full_like(filler["labels"], IGNORE_INDEX)
            filler["example_index"] = -1
            examples.append(filler)
        # The widest row of the whole global batch (every host knows every row's text): one shape on all hosts.
        extents = [stage_extent(self.split.encodings[int(r)], stage, self.curriculum)
                   for r in (self.global_rows(epoch, step) if len(self.global_rows(epoch, step)) else rows)]
        batch = collate(examples, self.pad_id, prefix_buckets=self.prefix_buckets, tail_buckets=self.tail_buckets,
                        min_prefix=max(a for a, _ in extents), min_tail=max(n - a for a, n in extents))
        shape = batch["input_ids"].shape
        if shape not in self.shapes_seen:
            self.shapes_seen.add(shape)
            logger.info("new batch shape %s (prefix %d) at stage %d; %d shapes so far", shape,
                        int(batch["prefix_len"]), stage, len(self.shapes_seen))
        self.last_stage = stage
        return batch

    def close(self) -> None:
        """Stop the worker pool (also done at the end of the last epoch)."""
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

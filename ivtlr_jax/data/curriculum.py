"""The multi-stage curriculum (method page section 2): stage -> token ids and labels.

At stage s:  prompt + <|latent|> x n + steps[s:] + answer + EOS, n = min(s, max_latent_stage);
past max_latent_stage all steps are dropped and n = max_latent_stage (pad_latent_to_max) or
min(#steps, max_latent_stage) (not pad_latent_to_max). latent_markers puts <|start-latent|>
before and <|end-latent|> after the latent block (Coconut; off in reference mode).
Labels are -100 on the prompt, markers and latent tokens, the token id elsewhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ivtlr_jax.data.text import (
    build_prompt_ids,
    encode_answer,
    encode_steps,
    split_steps,
    truncate_steps,
)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CurriculumOptions:
    """Curriculum settings; defaults are reference mode (4 epochs per stage, 3 latent stages)."""

    max_latent_stage: int = 3
    epochs_per_stage: int = 4
    pad_latent_to_max: bool = True
    latent_markers: bool = False

    def __post_init__(self):
        if self.max_latent_stage < 0:
            raise ValueError(f"max_latent_stage must be >= 0, got {self.max_latent_stage}")
        if self.epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage must be >= 1, got {self.epochs_per_stage}")

    def stage_for_epoch(self, epoch: int) -> int:
        """stage = epoch // epochs_per_stage."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return epoch // self.epochs_per_stage


@dataclass(frozen=True)
class TextEncoding:
    """Stage-independent token ids of one example."""

    prompt_ids: tuple[int, ...]
    step_ids: tuple[tuple[int, ...], ...]
    answer_ids: tuple[int, ...]  # ends with EOS


def encode_text(tokenizer, question: str, choices: Sequence[str], rationale: str, answer: str,
                num_image_tokens: int, *, chat_template: str | None = None,
                max_length: int | None = None) -> TextEncoding:
    """Prompt (image pad expanded to num_image_tokens = t*h*w/4), steps and answer ids.

    max_length drops trailing whole steps so prompt + steps + answer fits (the release: 3400).
    """
    prompt = build_prompt_ids(tokenizer, question, choices, num_image_tokens, chat_template)
    steps = encode_steps(tokenizer, split_steps(rationale))
    answer_ids = encode_answer(tokenizer, answer)
    steps = truncate_steps(len(prompt), steps, len(answer_ids), max_length)
    return TextEncoding(tuple(prompt), tuple(tuple(s) for s in steps), tuple(answer_ids))


def encode_row(tokenizer, row: dict, grid_thw, *, merge_size: int = 2, chat_template: str | None = None,
               max_length: int | None = None) -> TextEncoding:
    """encode_text for a normalised row whose image has grid grid_thw (t, h, w): t*h*w / merge_size^2 tokens."""
    return encode_text(tokenizer, row["question"], row["choices"], row["rationale"], row["answer"],
                       int(np.prod(grid_thw)) // merge_size**2, chat_template=chat_template, max_length=max_length)


def latent_plan(stage: int, num_steps: int, options: CurriculumOptions) -> tuple[int, int]:
    """(number of latent tokens n, number of leading steps replaced) at this stage."""
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")
    if stage > options.max_latent_stage:
        n = options.max_latent_stage if options.pad_latent_to_max else min(num_steps, options.max_latent_stage)
        return n, num_steps
    return stage, min(stage, num_steps)


def stage_extent(encoding: TextEncoding, stage: int, options: CurriculumOptions) -> tuple[int, int]:
    """(anchor, length) of `build_stage_example`'s row without building it."""
    n, n_skip = latent_plan(stage, len(encoding.step_ids), options)
    markers = 2 if options.latent_markers and n > 0 else 0
    tail = sum(len(s) for s in encoding.step_ids[n_skip:]) + len(encoding.answer_ids)
    anchor = len(encoding.prompt_ids) + (1 if markers else 0)
    return anchor, len(encoding.prompt_ids) + n + markers + tail


def build_stage_example(encoding: TextEncoding, stage: int, latent_id: int,
                        options: CurriculumOptions = CurriculumOptions(), *,
                        start_latent_id: int | None = None, end_latent_id: int | None = None) -> dict:
    """Token layout of one example at a stage.

    Returns input_ids (L,) int32, labels (L,) int32 (-100 on prompt, markers, latents),
    anchor (int: index of the first <|latent|>, or of the end of the prompt when n == 0; rows
    are aligned on it) and num_latent (int n).
    """
    if options.latent_markers and (start_latent_id is None or end_latent_id is None):
        raise ValueError(
            "latent_markers=True needs start_latent_id and end_latent_id (ids of <|start-latent|>, <|end-latent|>), "
            f"got {start_latent_id!r}, {end_latent_id!r}"
        )
    n, n_skip = latent_plan(stage, len(encoding.step_ids), options)
    prompt = list(encoding.prompt_ids)
    block = [latent_id] * n
    if options.latent_markers:
        block = [start_latent_id, *block, end_latent_id]
    tail = list(itertools.chain.from_iterable(encoding.step_ids[n_skip:])) + list(encoding.answer_ids)
    input_ids = np.asarray(prompt + block + tail, dtype=np.int32)  # (L,)
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int32)  # (L,)
    labels[len(prompt) + len(block):] = tail
    anchor = len(prompt) + (1 if options.latent_markers and n > 0 else 0)
    return {"input_ids": input_ids, "labels": labels, "anchor": anchor, "num_latent": n}

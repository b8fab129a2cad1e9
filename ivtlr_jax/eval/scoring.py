"""Scoring: the option letter a generated text names, and accuracy over records (overall and per domain)."""

from __future__ import annotations

import re
import string
from collections import defaultdict

import numpy as np

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


def accuracy_by_domain(records: list[dict]) -> dict:
    """{domain: {examples, correct, accuracy}} sorted by domain name; rows without a domain count as "(none)"."""
    by_domain: dict = defaultdict(lambda: {"examples": 0, "correct": 0})
    for rec in records:
        d = by_domain[rec["domain"] or "(none)"]
        d["examples"] += 1
        d["correct"] += int(rec["correct"])
    for d in by_domain.values():
        d["accuracy"] = d["correct"] / d["examples"]
    return dict(sorted(by_domain.items()))


def score_records(records: list[dict]) -> dict:
    """Counts and means over prediction records: examples, correct, accuracy, no_answer, by_domain and the mean
    generated tokens and autoregressive steps (latent steps + generated tokens)."""
    count = len(records)
    return {
        "examples": count, "correct": int(sum(r["correct"] for r in records)),
        "accuracy": sum(r["correct"] for r in records) / count if count else 0.0,
        "no_answer": sum(r["extracted"] is None for r in records),
        "by_domain": accuracy_by_domain(records),
        "mean_generated_tokens": float(np.mean([r["generated_tokens"] for r in records])) if count else 0.0,
        "mean_ar_steps": float(np.mean([r["ar_steps"] for r in records])) if count else 0.0,
    }

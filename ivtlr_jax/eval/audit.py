"""The causal audit: input-side interventions on the images and the paired statistics of an ablated run.

The latent-side interventions (latent-zero, latent-noise, latent-shuffle, select-random, select-bottom) are
options of the one latent loop (`LatentConfig.ablate`); the image-side ones are made here, on the host, before
the images are processed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ivtlr_jax.latent import LATENT_ABLATIONS

IMAGE_ABLATIONS = ("image-blank", "image-shuffle")
ABLATIONS = LATENT_ABLATIONS + IMAGE_ABLATIONS
# comparisons that exist for some backbones only: deepstack-bare re-feeds selected image tokens without their
# DeepStack features (LatentConfig.deepstack_latent=False; Qwen3-VL)
BACKBONE_ABLATIONS = ("deepstack-bare",)
BOOTSTRAP_SAMPLES = 2000


def parse_ablations(text: str | None) -> list[str]:
    """A comma list of ablation names -> the list (empty for None or ""); unknown names are refused."""
    names = [s.strip() for s in (text or "").split(",") if s.strip()]
    bad = [s for s in names if s not in ABLATIONS + BACKBONE_ABLATIONS]
    if bad:
        known = list(ABLATIONS + BACKBONE_ABLATIONS)
        raise ValueError(f"--ablate {text!r}: unknown {bad}; use a comma list of {known}")
    return list(dict.fromkeys(names))


def blank_image(image: Image.Image) -> Image.Image:
    """An image of the same size and mode filled with the image's mean colour."""
    rgb = np.asarray(image.convert("RGB"), np.float64)  # (H, W, 3)
    colour = tuple(int(round(c)) for c in rgb.reshape(-1, 3).mean(0))
    return Image.new("RGB", image.size, colour)


def shuffle_permutation(count: int, seed: int) -> np.ndarray:
    """A seeded permutation of `count` rows with no fixed point when count >= 2 (one cycle)."""
    order = np.random.default_rng(seed).permutation(count)
    perm = np.empty(count, np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def intervene_images(images: list, name: str, seed: int = 0) -> list:
    """Apply an image-side ablation to decoded PIL images of one batch (each keeps its own size)."""
    if name == "image-blank":
        return [blank_image(im) for im in images]
    if name == "image-shuffle":
        perm = shuffle_permutation(len(images), seed)
        return [images[int(j)].convert("RGB").resize(images[i].size) for i, j in enumerate(perm)]
    raise ValueError(f"{name!r} is not an image ablation; use one of {list(IMAGE_ABLATIONS)}")


def mcnemar_exact(intact, ablated) -> float:
    """Two-sided exact McNemar p-value: binomial(b + c, 1/2) on the discordant pairs, doubled, capped at 1."""
    intact, ablated = np.asarray(intact, bool), np.asarray(ablated, bool)
    b = int((intact & ~ablated).sum())
    c = int((~intact & ablated).sum())
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2.0 ** m
    return min(1.0, 2.0 * tail)


def paired_bootstrap_ci(intact, ablated, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(ablated - intact) over rows resampled with replacement (pairs kept)."""
    diff = np.asarray(ablated, np.float64) - np.asarray(intact, np.float64)  # (N,)
    if diff.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, diff.size, (samples, diff.size))
    means = diff[idx].mean(1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def ablation_stats(intact_correct, ablated_correct, intact_answers, ablated_answers, seed: int = 0) -> dict:
    """accuracy, delta (ablated - intact), ci95, the exact McNemar p-value and the share of changed answers."""
    a, b = np.asarray(intact_correct, bool), np.asarray(ablated_correct, bool)
    if a.shape != b.shape:
        raise ValueError(f"intact has {a.shape[0]} rows and the ablation {b.shape[0]}; they must be the same rows")
    changed = [x != y for x, y in zip(intact_answers, ablated_answers, strict=True)]
    low, high = paired_bootstrap_ci(a, b, seed)
    return {
        "accuracy": float(b.mean()) if b.size else float("nan"),
        "delta": float(b.mean() - a.mean()) if b.size else float("nan"),
        "ci95": [low, high],
        "p_value": mcnemar_exact(a, b),
        "changed": float(np.mean(changed)) if changed else float("nan"),
    }


def step_overlaps(intact_sel, ablated_sel) -> tuple[list[float], list[float]]:
    """Per latent step, for one row's selections (n, k): the share of the ablated step's picks the intact run made
    at the same step, and the share it made at another step."""
    a, b = np.asarray(intact_sel), np.asarray(ablated_sel)
    same, other = [], []
    for t in range(a.shape[0]):
        picks = set(b[t].tolist())
        others = set(a[np.arange(a.shape[0]) != t].reshape(-1).tolist())
        same.append(len(picks & set(a[t].tolist())) / max(len(picks), 1))
        other.append(len(picks & others) / max(len(picks), 1))
    return same, other


class AuditLog:
    """The paired results of the intact run and each ablation, row by row, as the runner produces them.

    Keeps per row only what the statistics need (correctness, answer, per-step cosines and overlaps), not h."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.intact_correct: list[bool] = []
        self.intact_answers: list = []
        self.correct = {name: [] for name in self.names}
        self.answers = {name: [] for name in self.names}
        self.cosine: list[np.ndarray] = []  # per row (n,): intact h_t vs image-blank h_t
        self.same = {name: [] for name in self.names}  # per row (n,)
        self.other = {name: [] for name in self.names}

    def add(self, rec: dict, res, r: int, ablated: dict) -> None:
        """One row: the intact record and GenerateOutput (batch row r), and {name: (record, GenerateOutput)}."""
        self.intact_correct.append(bool(rec["correct"]))
        self.intact_answers.append(rec["extracted"])
        selects = res.selected.shape[0] and res.selected.shape[2]
        for name, (arec, ares) in ablated.items():
            self.correct[name].append(bool(arec["correct"]))
            self.answers[name].append(arec["extracted"])
            if selects:
                same, other = step_overlaps(res.selected[:, r], ares.selected[:, r])
                self.same[name].append(same)
                self.other[name].append(other)
            if name == "image-blank" and res.latent_h is not None and res.latent_h.shape[0]:
                x, y = res.latent_h[:, r].astype(np.float64), ares.latent_h[:, r].astype(np.float64)  # (n, H)
                den = np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-12)
                self.cosine.append((x * y).sum(-1) / den)

    def ablations(self, seed: int = 0) -> dict:
        """{name: {accuracy, delta, ci95, p_value, changed}}, each paired with the intact run."""
        return {name: ablation_stats(self.intact_correct, self.correct[name], self.intact_answers,
                                     self.answers[name], seed) for name in self.names}

    def mediation(self) -> list[dict]:
        """Per latent step: the mean cosine between the intact and image-blank runs' h_t, and for each ablation
        the overlap of its step-t selections with the intact run's step t and with the intact run's other steps."""
        steps = max([len(c) for c in self.cosine] + [len(v[0]) for v in self.same.values() if v] + [0])
        out = []
        for t in range(steps):
            entry = {"step": t,
                     "cosine_image_blank": float(np.mean([c[t] for c in self.cosine])) if self.cosine else None}
            entry["overlap_with_intact"] = {n: float(np.mean([s[t] for s in v])) for n, v in self.same.items() if v}
            entry["overlap_other_steps"] = {n: float(np.mean([s[t] for s in v])) for n, v in self.other.items() if v}
            out.append(entry)
        return out

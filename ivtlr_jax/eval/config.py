"""What an evaluation runs: the methods of the paper (Tables 1 and 2), their settings and the run's options."""

from __future__ import annotations

import dataclasses
import os

from ivtlr_jax.eval.scoring import ANSWER_FORMATS

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


@dataclasses.dataclass
class EvalConfig:
    """One evaluation run; the fields are the evaluation CLI's flags (see `python -m experiments.evaluate --help`).

    k=None: the backbone's release value; position_mode=None: the checkpoint's recorded rule;
    max_new_tokens=None: DEFAULT_MAX_NEW_TOKENS for the method, else 64; out=None: eval/<data>-<split>-<method>.
    """

    ckpt: str
    data: str | None = None
    data_source: str | None = None
    split: str = "test"
    method: str = "ivtlr"
    n_latent: int = 3
    k: int | None = None
    batch_size: int = 16
    limit: int | None = None
    max_new_tokens: int | None = None
    max_cache_len: int = 8192
    position_mode: str | None = None
    selection_order: str = "position"
    deepstack_latent: str = "on"  # on: a re-fed image token carries its DeepStack features (Qwen3-VL); off: bare
    answer_format: str = "auto"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    mesh: str = "auto"
    resize_mode: str = "reference"
    tokenizer: str | None = None
    out: str | None = None
    save_selections: str | None = None
    num_selections: int = 8
    no_progress: bool = False
    ablate: str | None = None  # comma list of causal-audit ablations (ivtlr_jax.eval.audit.ABLATIONS)

    @classmethod
    def from_namespace(cls, ns) -> EvalConfig:
        """The fields of an argparse namespace (or any object) that name a field here; other attributes ignored."""
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})

    def check(self) -> None:
        """Errors that need no model: each names the flag, the value seen and what would be valid."""
        for name, value, valid in (("--method", self.method, METHODS), ("--answer-format", self.answer_format,
                                                                          ANSWER_FORMATS),
                                   ("--deepstack-latent", self.deepstack_latent, ("on", "off"))):
            if value not in valid:
                raise ValueError(f"{name} {value!r} is not valid; use one of {list(valid)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        from ivtlr_jax.eval.audit import parse_ablations

        parse_ablations(self.ablate)

    @property
    def out_dir(self) -> str:
        return self.out or os.path.join("eval", f"{self.data}-{self.split}-{self.method}")


def method_settings(cfg) -> tuple[int, int | None, bool]:
    """(n latent steps, k, latent_text) for the chosen method; cfg: an EvalConfig or the CLI's namespace.

    k is cfg.k, None meaning the backbone's default (resolved once the model is known)."""
    if cfg.method in ("no-cot", "cot", "no-latent"):
        return 0, cfg.k, True
    if cfg.n_latent < 1:
        raise ValueError(f"--method {cfg.method} needs --n-latent >= 1, got {cfg.n_latent}")
    if cfg.method == "coconut":
        return cfg.n_latent, 0, True
    return cfg.n_latent, cfg.k, cfg.method != "no-latent-text"


def max_new_tokens(cfg) -> int:
    """Generated tokens at most: the flag, else the method's default (512 for cot, 64 otherwise)."""
    return cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(cfg.method, 64)

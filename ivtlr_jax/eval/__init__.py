"""Evaluation: answer scoring, the batched runner over a split (the paper's methods), reports, pictures of the
selected image tokens and the generation dry run. Takes a checkpoint and its backbone; never names a model."""

from ivtlr_jax.eval.config import DEFAULT_MAX_NEW_TOKENS, METHODS, EvalConfig, max_new_tokens, method_settings
from ivtlr_jax.eval.dry_run import format_generation_dry_run, generation_dry_run, save_dry_run
from ivtlr_jax.eval.pictures import STEP_COLOURS, draw_selections, save_selection_picture
from ivtlr_jax.eval.report import bar_chart, markdown, summary_line, write_predictions, write_summary
from ivtlr_jax.eval.runner import EvalBatch, Evaluation, Timing, evaluate, prepare, prompt_text, run, summarize
from ivtlr_jax.eval.scoring import ANSWER_FORMATS, accuracy_by_domain, extract_answer, score_records

__all__ = [
    "ANSWER_FORMATS", "DEFAULT_MAX_NEW_TOKENS", "METHODS", "STEP_COLOURS", "EvalBatch", "EvalConfig", "Evaluation",
    "Timing", "accuracy_by_domain", "bar_chart", "draw_selections", "evaluate", "extract_answer",
    "format_generation_dry_run", "generation_dry_run", "markdown", "max_new_tokens", "method_settings", "prepare",
    "prompt_text", "run", "save_dry_run", "save_selection_picture", "score_records", "summarize", "summary_line",
    "write_predictions", "write_summary",
]

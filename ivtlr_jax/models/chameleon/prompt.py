"""Chameleon's prompt conventions (the release's): plain text, the image placeholder inside the question between
<racm3:break> and <eoss>, the answer named by its 0-based index."""

from __future__ import annotations

from ivtlr_jax.config import PromptFormat

PROMPT = PromptFormat(style="plain", image_token="<image>", image_start="<racm3:break>", image_end="<eoss>",
                      answer_format="index")

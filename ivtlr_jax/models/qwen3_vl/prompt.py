"""Qwen3-VL's prompt conventions: Qwen2-VL's chat prompt (user turn [image, text]) with Qwen3-VL-Instruct's template
structure, which has no default system turn."""

from __future__ import annotations

from ivtlr_jax.config import PromptFormat
from ivtlr_jax.models.qwen2_vl import prompt as qwen2_prompt

# Qwen2-VL's template without its default system turn. Used when a tokenizer has no template of its own.
CHAT_TEMPLATE = qwen2_prompt.CHAT_TEMPLATE.replace(qwen2_prompt.DEFAULT_SYSTEM_TURN, "", 1)

PROMPT = PromptFormat(style="chat", image_token="<|image_pad|>", answer_format="letter", chat_template=CHAT_TEMPLATE)

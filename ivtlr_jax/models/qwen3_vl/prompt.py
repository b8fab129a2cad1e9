"""Qwen3-VL's prompt conventions: Qwen2-VL's chat prompt (user turn [image, text]) with Qwen3-VL-Instruct's template
structure, which has no default system turn."""

from __future__ import annotations

from ivtlr_jax.config import PromptFormat

# "<|im_start|>{role}\n{content}<|im_end|>\n" per turn, an image item as "<|vision_start|><|image_pad|><|vision_end|>",
# a video item with <|video_pad|> (refused by the model); generation prompt "<|im_start|>assistant\n". Used when a
# tokenizer has no template of its own.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part.get('type') == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.get('type') == 'video' or 'video' in part -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

PROMPT = PromptFormat(style="chat", image_token="<|image_pad|>", answer_format="letter", chat_template=CHAT_TEMPLATE)

"""Qwen2-VL's prompt conventions: a chat prompt (user turn [image, text]) and the built-in chat template."""

from __future__ import annotations

from ivtlr_jax.config import PromptFormat

# Built-in chat template with the structure of Qwen2-VL-Instruct's: a default system turn
# ("You are a helpful assistant.") unless the first message is a system message; each turn
# "<|im_start|>{role}\n{content}<|im_end|>\n"; an image item renders as
# "<|vision_start|><|image_pad|><|vision_end|>", a video item with <|video_pad|>; the
# generation prompt is "<|im_start|>assistant\n". Used when a tokenizer has no template.
DEFAULT_SYSTEM_TURN = (  # the template's first lines: the default system turn
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    + DEFAULT_SYSTEM_TURN
    + "{{ '<|im_start|>' + message['role'] + '\\n' }}"
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

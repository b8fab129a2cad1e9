"""Steps, prompts and answer targets, exactly as IVT-LR's method page (sections 1 and 4) states."""

from __future__ import annotations

import string
from collections.abc import Sequence

import jinja2

IMAGE_PAD_TOKEN = "<|image_pad|>"
LATENT_TOKEN = "<|latent|>"
ANSWER_PREFIX = "Therefore, the answer is "
MAX_CHOICES = 26
NUM_STEP_CHUNKS = 3

_JINJA = jinja2.Environment(autoescape=False, keep_trailing_newline=True)


def split_steps(rationale: str) -> list[str]:
    """Rationale -> reasoning steps: newlines to spaces, strip, split on ". ", regroup to 3."""
    if not isinstance(rationale, str):
        raise ValueError(f"rationale must be a string, got {type(rationale).__name__}: {rationale!r}")
    pieces = rationale.replace("\n", " ").strip().split(". ")
    if pieces[-1] == "":
        pieces.pop()
    if len(pieces) <= NUM_STEP_CHUNKS:
        return pieces
    base, extra = divmod(len(pieces), NUM_STEP_CHUNKS)
    chunks, start = [], 0
    for i in range(NUM_STEP_CHUNKS):
        end = start + base + (1 if i < extra else 0)
        chunks.append(". ".join(pieces[start:end]))
        start = end
    return chunks


def index_to_letter(index: int, num_choices: int | None = None) -> str:
    """0 -> "A", 1 -> "B", ... (at most 26 options)."""
    limit = MAX_CHOICES if num_choices is None else min(num_choices, MAX_CHOICES)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < limit:
        raise ValueError(f"answer index must be an int in [0, {limit}), got {index!r}")
    return string.ascii_uppercase[index]


def _question_block(question: str, choices: Sequence[str], image_text: str = "") -> str:
    """The question and its options: [Question]:{<image_text>q}, [Options]:, (A).{c0} ... one per line, each
    line ending in a newline; the inputs checked."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}: {question!r}")
    if not 1 <= len(choices) <= MAX_CHOICES:
        raise ValueError(f"choices must hold 1..{MAX_CHOICES} options, got {len(choices)}: {choices!r}")
    options = "\n".join(
        f"({string.ascii_uppercase[i]}).{{{str(choice).strip()}}}" for i, choice in enumerate(choices)
    )
    return f"[Question]:{{{image_text}{question.strip()}}}\n[Options]:\n{options}\n"


def format_question(question: str, choices: Sequence[str]) -> str:
    """The user text: "[Question]:{q}\\n[Options]:\\n(A).{c0}\\n(B).{c1}...\\nAnswer:\\n"."""
    return _question_block(question, choices) + "Answer:\n"


def answer_text(answer: str, answer_format: str = "letter") -> str:
    """The supervised target before EOS: "Therefore, the answer is X" (X the letter, or its 0-based index)."""
    answer = str(answer)
    if answer_format == "index":
        if len(answer) != 1 or not answer.isalpha():
            raise ValueError(f"answer {answer!r} is not an option letter; cannot render it as an index")
        answer = str(string.ascii_uppercase.index(answer.upper()))
    return ANSWER_PREFIX + answer


def format_plain_question(question: str, choices: Sequence[str], image_text: str) -> str:
    """The release's Chameleon prompt: "[Question]:{<image>question}\n[Options]:\n(A).{c0}...\nAnswer:"."""
    return _question_block(question, choices, image_text) + "Answer:"


def prompt_text(tokenizer, question: str, choices: Sequence[str], fmt=None, chat_template: str | None = None) -> str:
    """The prompt as text with ONE image placeholder (expanded to its token count after tokenising)."""
    if fmt is None or fmt.style == "chat":
        fallback = fmt.chat_template if fmt is not None else None
        return render_chat(tokenizer, format_question(question, choices), chat_template, fallback_template=fallback)
    image = (fmt.image_start or "") + fmt.image_token + (fmt.image_end or "")
    return format_plain_question(question, choices, image)


def tokenize_prompts(tokenizer, texts: Sequence[str], fmt=None) -> list[list[int]]:
    """Token ids of prompt texts: a chat template writes its own specials; a plain prompt gets the tokenizer's BOS."""
    if not texts:
        return []
    plain = fmt is not None and fmt.style == "plain"
    return [list(map(int, ids)) for ids in tokenizer(list(texts), add_special_tokens=plain)["input_ids"]]


def render_chat(tokenizer, user_text: str, chat_template: str | None = None,
                fallback_template: str | None = None) -> str:
    """Chat text for one user turn [image, text] with the generation prompt (one image pad).

    The template: `chat_template`, else the tokenizer's own, else `fallback_template` (the backbone's built-in
    one, `PromptFormat.chat_template`)."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}
    ]
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    if not fallback_template:
        raise ValueError("the tokenizer has no chat template and none was given; pass chat_template, or a "
                         "PromptFormat whose chat_template is the model's built-in one")
    template = _JINJA.from_string(fallback_template)
    return template.render(messages=messages, add_generation_prompt=True)


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(f"tokenizer has no token {token!r}; use the model's own tokenizer (the checkpoint's)")
    return int(token_id)


def expand_image_pads(ids: Sequence[int], image_pad_id: int, num_image_tokens: Sequence[int]) -> list[int]:
    """Replace the i-th image-pad id by num_image_tokens[i] copies, as Qwen2-VL's processor does."""
    out: list[int] = []
    seen = 0
    for t in ids:
        if t == image_pad_id:
            if seen >= len(num_image_tokens):
                raise ValueError(
                    f"prompt holds more image pads than images: {len(num_image_tokens)} image(s) given"
                )
            out.extend([image_pad_id] * int(num_image_tokens[seen]))
            seen += 1
        else:
            out.append(int(t))
    if seen != len(num_image_tokens):
        raise ValueError(f"prompt holds {seen} image pad(s) but {len(num_image_tokens)} image(s) given")
    return out


def build_prompt_text(
    tokenizer, question: str, choices: Sequence[str], num_image_tokens: int,
    chat_template: str | None = None,
) -> str:
    """Prompt as text, with <|image_pad|> repeated num_image_tokens times (for inspection)."""
    text = render_chat(tokenizer, format_question(question, choices), chat_template)
    return text.replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * int(num_image_tokens), 1)


def build_prompt_ids(
    tokenizer, question: str, choices: Sequence[str], num_image_tokens: int,
    chat_template: str | None = None, fmt=None,
) -> list[int]:
    """Prompt token ids (training and inference alike), image placeholder expanded to num_image_tokens."""
    if int(num_image_tokens) < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    text = prompt_text(tokenizer, question, choices, fmt, chat_template)
    ids = tokenize_prompts(tokenizer, [text], fmt)[0]
    token = IMAGE_PAD_TOKEN if fmt is None else fmt.image_token
    return expand_image_pads(ids, _token_id(tokenizer, token), [int(num_image_tokens)])


def encode_steps(tokenizer, steps: Sequence[str]) -> list[list[int]]:
    """Each step tokenised as step + "\\n"."""
    if not steps:
        return []
    batch = tokenizer([s + "\n" for s in steps], add_special_tokens=False)["input_ids"]
    return [list(map(int, ids)) for ids in batch]


def encode_answer(tokenizer, answer: str, answer_format: str = "letter") -> list[int]:
    """Tokens of "Therefore, the answer is X" followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set it (Qwen2-VL-Instruct: <|im_end|>)")
    ids = tokenizer(answer_text(answer, answer_format), add_special_tokens=False)["input_ids"]
    return [int(t) for t in ids] + [int(tokenizer.eos_token_id)]


def truncate_steps(
    prompt_len: int, step_ids: list[list[int]], answer_len: int, max_length: int | None
) -> list[list[int]]:
    """Keep the longest prefix of whole steps so prompt + steps + answer fits max_length."""
    if max_length is None:
        return step_ids
    budget = max_length - prompt_len - answer_len
    kept, used = [], 0
    for ids in step_ids:
        if used + len(ids) > budget:
            break
        kept.append(ids)
        used += len(ids)
    return kept

"""Steps, prompts, chat template and the tiny tokenizer."""

import jinja2
import pytest

from ivtlr_jax.data.text import (
    build_prompt_ids,
    build_prompt_text,
    encode_answer,
    encode_steps,
    format_question,
    index_to_letter,
    render_chat,
    split_steps,
)
from ivtlr_jax.models.qwen2_vl.prompt import CHAT_TEMPLATE as QWEN2VL_CHAT_TEMPLATE
from ivtlr_jax.models.qwen2_vl.small import SPECIAL_TOKENS as TINY_SPECIAL_TOKENS
from ivtlr_jax.models.qwen2_vl.small import tiny_tokenizer as build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def sentences(n):
    return ". ".join(f"Sentence {i}" for i in range(n)) + ("." if n else "")


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, []),
        (1, ["Sentence 0."]),
        (3, ["Sentence 0", "Sentence 1", "Sentence 2."]),
        (4, ["Sentence 0. Sentence 1", "Sentence 2", "Sentence 3."]),
        (10, ["Sentence 0. Sentence 1. Sentence 2. Sentence 3", "Sentence 4. Sentence 5. Sentence 6",
              "Sentence 7. Sentence 8. Sentence 9."]),
    ],
)
def test_split_steps_counts(n, expected):
    assert split_steps(sentences(n)) == expected


def test_split_steps_edge_cases():
    assert split_steps("") == []
    assert split_steps("  \n ") == []
    assert split_steps("A. B. ") == ["A", "B."]  # stripped first, so no trailing empty piece
    assert split_steps("line one\nline two. x") == ["line one line two", "x"]
    # 5 pieces -> chunks of 2, 2, 1
    assert split_steps("a. b. c. d. e") == ["a. b", "c. d", "e"]
    with pytest.raises(ValueError, match="rationale must be a string"):
        split_steps(None)


def test_format_question_exact():
    text = format_question(" What is shown? ", ["a cat ", "a dog"])
    assert text == "[Question]:{What is shown?}\n[Options]:\n(A).{a cat}\n(B).{a dog}\nAnswer:\n"
    with pytest.raises(ValueError, match="choices"):
        format_question("q", [])
    with pytest.raises(ValueError, match="choices"):
        format_question("q", [str(i) for i in range(27)])


def test_index_to_letter():
    assert index_to_letter(0) == "A" and index_to_letter(25) == "Z"
    with pytest.raises(ValueError, match="answer index"):
        index_to_letter(26)
    with pytest.raises(ValueError, match="answer index"):
        index_to_letter(1, num_choices=1)


EXPECTED_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>USER<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_builtin_template_structure(tok):
    assert render_chat(tok, "USER") == EXPECTED_CHAT
    # a tokenizer without a template falls back to the backbone's built-in one
    class NoTemplate:
        chat_template = None

    assert render_chat(NoTemplate(), "USER", fallback_template=QWEN2VL_CHAT_TEMPLATE) == EXPECTED_CHAT
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(NoTemplate(), "USER")
    env = jinja2.Environment()
    with_system = env.from_string(QWEN2VL_CHAT_TEMPLATE).render(
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
        add_generation_prompt=False,
    )
    assert with_system == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_prompt_text_and_ids(tok):
    text = build_prompt_text(tok, "Q?", ["x", "y"], 4)
    assert text == EXPECTED_CHAT.replace("<|image_pad|>", "<|image_pad|>" * 4).replace(
        "USER", "[Question]:{Q?}\n[Options]:\n(A).{x}\n(B).{y}\nAnswer:\n")
    ids = build_prompt_ids(tok, "Q?", ["x", "y"], 4)
    # id-level expansion equals tokenising the expanded string
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == 4
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="num_image_tokens"):
        build_prompt_ids(tok, "Q?", ["x"], 0)


def test_steps_and_answer_ids(tok):
    steps = encode_steps(tok, ["one", "two"])
    assert [tok.decode(s) for s in steps] == ["one\n", "two\n"]
    answer = encode_answer(tok, "C")
    assert answer[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(answer[:-1]) == "Therefore, the answer is C"


def test_tiny_tokenizer(tok, tmp_path):
    ids = tok.convert_tokens_to_ids(TINY_SPECIAL_TOKENS)
    assert len(set(ids)) == len(TINY_SPECIAL_TOKENS)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    for t in TINY_SPECIAL_TOKENS:  # each special token encodes to exactly one id
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    assert "<<" in tok.get_vocab() and tok.convert_tokens_to_ids("<<") not in ids
    text = "Any text: émoji 🙂, 中文, <<tags>>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    again = build_tiny_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert render_chat(loaded, "USER") == EXPECTED_CHAT
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    custom = build_tiny_tokenizer(["hello world"] * 3, vocab_size=300)
    assert len(custom) <= 300 and "<<" in custom.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(vocab_size=100)


def test_data_package_imports_no_jax_or_model_code():
    import subprocess
    import sys

    code = (
        "import sys, ivtlr_jax.data, ivtlr_jax.data.synthetic\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'torch')"
        " or m.startswith(('ivtlr_jax.models', 'ivtlr_jax.latent', 'ivtlr_jax.model')))\n"
        "assert not bad, bad\n"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    env = {**__import__("os").environ, "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

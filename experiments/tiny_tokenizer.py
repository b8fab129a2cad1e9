"""A small, deterministic byte-level BPE tokenizer with Qwen2-VL's special tokens (embedded default, tests).

It stands in for the Qwen2-VL tokenizer where no checkpoint is available: same special
tokens, same chat-template structure, the ordinary token ``<<`` (latent-token init copies
its rows), and byte-level coverage so any text encodes.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ivtlr_jax.models.chameleon.config import image_code_name
from ivtlr_jax.models.qwen2_vl.prompt import CHAT_TEMPLATE as QWEN2VL_CHAT_TEMPLATE

# Order fixes their ids: 0..6 right after training (special tokens come first).
TINY_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_BUILTIN_CORPUS = [
    "You are a helpful assistant.",
    "[Question]:{What is the sum of the red numbers minus the number of blue squares?}",
    "[Options]:\n(A).{12}\n(B).{7}\n(C).{3}\n(D).{25}\nAnswer:\n",
    "Therefore, the answer is A. Therefore, the answer is B. Therefore, the answer is C. "
    "Therefore, the answer is D. Therefore, the answer is E.",
    "The red numbers are 3, 7 and 2. Their sum is 12. There are 2 blue squares. "
    "12 minus 2 is 10. So the result is 10.",
    "How many green circles are there? The largest blue number plus the number of "
    "triangles. The smallest yellow number times two.",
    "Which of the following is the main function of the leaves of a plant? Photosynthesis "
    "turns light, water and carbon dioxide into sugar and oxygen.",
    "Look at the picture. Which animal is shown in the image? The image shows a bird on a "
    "branch, so the answer is the bird.",
    "Lecture: A force is a push or a pull. Solution: The magnet pulls the paper clip.",
    "Which word would you find on a dictionary page? Think about the order of the letters.",
    "the of and to in is that it for on with as was at by an be this are from or have",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    ". , ; : ! ? ( ) [ ] { } < > = + - * / % & | ^ ~ ' \" \n",
    "x<<y a<<b 1<<2 << << << << << << << << << << << << << << << << << << << <<",
]


def build_tiny_tokenizer(
    corpus: list[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` (default: a built-in one) and wrap it like Qwen2-VL's."""
    if vocab_size < 256 + len(TINY_SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least "
            f"{256 + len(TINY_SPECIAL_TOKENS) + 1} (256 bytes, the special tokens and '<<')"
        )
    texts = list(_BUILTIN_CORPUS if corpus is None else corpus)
    # Repeat '<<' so its merge is learned whatever the corpus: latent-token init copies it.
    texts += ["<<"] * 64
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.token_to_id("<<") is None:
        raise ValueError(
            f"corpus of {len(texts)} texts with vocab_size={vocab_size} did not learn the "
            "token '<<'; raise vocab_size"
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=TINY_SPECIAL_TOKENS[1:2] + TINY_SPECIAL_TOKENS[3:],
        model_max_length=32768,
    )
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tok


CHAMELEON_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<racm3:break>", "<eoss>"]


def build_tiny_chameleon_tokenizer(num_codes: int, corpus: list[str] | None = None,
                                   vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE wrapped like Chameleon's: <s> BOS, </s> EOS, <pad>, the image placeholder and its
    start/end markers, and one IMGIMG token per VQ code (ids right after the learned vocabulary)."""
    texts = list(_BUILTIN_CORPUS if corpus is None else corpus) + ["<<"] * 64
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=CHAMELEON_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.token_to_id("<<") is None:
        raise ValueError(f"vocab_size={vocab_size} did not learn the token '<<'; raise vocab_size")
    backend.add_special_tokens([image_code_name(c) for c in range(num_codes)])
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=CHAMELEON_SPECIAL_TOKENS[3:], model_max_length=32768)

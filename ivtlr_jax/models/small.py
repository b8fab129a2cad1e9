"""Small random models of a backbone, for the embedded default (`python -m experiments.train`) and the benchmarks.

A backbone that has them names its module in the registry (`Entry.small`, `small_models(model_type)`); the module
provides:
- `EMBEDDED_DEFAULT`: the embedded default's YAML under experiments/configs (None: no embedded default);
- `tiny_model(corpus, vocab_size, model, vision) -> (tokenizer, config)`: the tiny model of `init: auto-tiny`, its
  tokenizer trained on `corpus` (`model` / `vision`: the YAML's overrides of its sizes);
- optionally `fit_tiny(params, config, pictures, seed) -> params`: adjust the random weights to the training
  pictures (decoded RGB arrays) before the model is saved;
- `bench_model(vocab, hidden, layers) -> (transformers model class, its config, latent token id)` and
  `bench_batch(batch, n_latent, text_len, tail, seed, vocab) -> (ids, mask, pixel_values, grid)`: the benchmarks'
  small model and prompts.
Here: the byte-level BPE tokenizer every tiny model trains (any text encodes; the ordinary token `<<` that
latent-token init copies is always learned).
"""

from __future__ import annotations

BUILTIN_CORPUS = [
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


def train_bpe(corpus: list[str] | None, vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE (a `tokenizers.Tokenizer`) trained on `corpus` (None: a built-in one); the special tokens
    take ids 0.. in their order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(BUILTIN_CORPUS if corpus is None else corpus)
    texts += ["<<"] * 64  # so that its merge is learned whatever the corpus: latent-token init copies it
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.token_to_id("<<") is None:
        raise ValueError(f"corpus of {len(texts)} texts with vocab_size={vocab_size} did not learn the token '<<'; "
                         "raise vocab_size")
    return backend

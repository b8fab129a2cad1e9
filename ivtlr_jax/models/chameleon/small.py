"""Chameleon's small random models (see `ivtlr_jax.models.small`): the embedded default's tiny model, its
byte-level BPE tokenizer wrapped like Chameleon's and its VQ tokenizer fitted to the training pictures, and the
benchmarks' small model (the Qwen benchmark LLM's shape; a small VQ tokenizer giving 1024 codes per 64x64 image)."""

from __future__ import annotations

import numpy as np

from ivtlr_jax.models.chameleon.config import ChameleonConfig, VQConfig, image_code_name
from ivtlr_jax.models.small import train_bpe

EMBEDDED_DEFAULT = "tiny_chameleon.yaml"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<racm3:break>", "<eoss>"]
TINY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
# a 64x64 VQ tokenizer with 4 levels (8x8 = 64 codes per image, about the 100 image tokens of the tiny Qwen2-VL)
# and a 256-entry codebook, fitted to the training pictures by `fit_tiny`
TINY_VQ = dict(embed_dim=16, num_embeddings=256, latent_channels=16, resolution=64, base_channels=32,
               channel_multiplier=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=())


def tiny_tokenizer(num_codes: int, corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE wrapped like Chameleon's: <s> BOS, </s> EOS, <pad>, the image placeholder and its
    start/end markers, and one IMGIMG token per VQ code (ids right after the learned vocabulary)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = train_bpe(corpus, vocab_size, SPECIAL_TOKENS)
    backend.add_special_tokens([image_code_name(c) for c in range(num_codes)])
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=SPECIAL_TOKENS[3:], model_max_length=32768)


def tiny_model(corpus, vocab_size, model=None, vq=None):
    """(tokenizer, config) of the tiny Chameleon: TINY_MODEL / TINY_VQ sizes, `model` / `vq` overriding them."""
    v = {**TINY_VQ, **(vq or {})}
    tok = tiny_tokenizer(v["num_embeddings"], corpus, vocab_size=vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<racm3:break>", "<eoss>", "<s>", "</s>", "<pad>")}
    codes = tuple(tok.convert_tokens_to_ids(image_code_name(c)) for c in range(v["num_embeddings"]))
    cfg = ChameleonConfig(vocab_size=len(tok), **{**TINY_MODEL, **(model or {})},
                          image_token_id=ids["<image>"], image_start_token_id=ids["<racm3:break>"],
                          image_end_token_id=ids["<eoss>"], image_vocab=codes, bos_token_id=ids["<s>"],
                          eos_token_id=(ids["</s>"],), pad_token_id=ids["<pad>"], vq=VQConfig(**v))
    return tok, cfg


def _kmeans(points: np.ndarray, weights: np.ndarray, centres: np.ndarray, iters: int) -> np.ndarray:
    """Weighted Lloyd iterations from the given centres; a centre that loses all its points stays put."""
    for _ in range(iters):
        d = (points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None]
        nearest = d.argmin(1)
        mass = np.bincount(nearest, weights, len(centres))
        sums = np.zeros_like(centres)
        np.add.at(sums, nearest, points * weights[:, None])
        moved = mass > 0
        centres[moved] = sums[moved] / mass[moved, None]
    return centres


def fit_tiny(params, cfg, pictures=(), seed: int = 0, iters: int = 15):
    """Give the tiny random Chameleon a VQ tokenizer whose codes tell the pictures' colours apart.

    Chameleon's real tokenizer is trained to reconstruct images, so its codes carry what is in them; a
    random one does not: every GroupNorm-conv residual branch stacked on the pixels scrambles them, and
    random codebook entries split that output arbitrarily. A logistic probe on each picture's code counts
    (800 warm-up training pictures, 200 held out) finds the dominant colour 37% of the time with a random
    tokenizer (chance 25%), 61% with the first change below, 71% with both. Two standard initialisations,
    no decoder training:
    - each encoder residual block's last conv starts at zero (identity-at-init residual branches), so
      the encoder is conv_in, the stride-2 convs and the output head: random but close to linear in
      the pixels;
    - the codebook is the k-means of the encoder's outputs over `pictures` (the training split's
      pictures, decoded RGB), as VQ-VAE codebooks are often initialised from data. Without pictures it stays
      random.
    """
    import jax

    from ivtlr_jax.models.chameleon.images import pixels as chameleon_pixels
    from ivtlr_jax.models.chameleon.model import encode_latents

    def identity_branch(block):
        c = block.conv2
        return block.replace(conv2=c.replace(kernel=np.zeros_like(c.kernel), bias=np.zeros_like(c.bias)))

    enc = params.vq.encoder
    enc = enc.replace(down=tuple(lv.replace(blocks=tuple(identity_branch(b) for b in lv.blocks)) for lv in enc.down),
                      mid_block_1=identity_branch(enc.mid_block_1), mid_block_2=identity_branch(enc.mid_block_2))
    vq = params.vq.replace(encoder=enc)
    if len(pictures):
        r = cfg.vq.resolution
        pixels = np.stack([chameleon_pixels(im, r) for im in pictures])
        latents = jax.jit(encode_latents)
        z = np.concatenate([np.asarray(latents(vq, pixels[i:i + 64])) for i in range(0, len(pixels), 64)])
        points, counts = np.unique(z.reshape(-1, z.shape[-1]), axis=0, return_counts=True)
        book = np.array(vq.codebook, np.float32)
        k = min(len(book), len(points))
        rng = np.random.default_rng(seed)
        book[:k] = points[rng.choice(len(points), k, replace=False)]  # distinct starting centres
        book[:k] = _kmeans(points, counts.astype(np.float32), book[:k], iters)
        vq = vq.replace(codebook=book.astype(np.asarray(vq.codebook).dtype))
    return params.replace(vq=vq)


# ----------------------------------------------------------------------------- the benchmarks' small model
BENCH_VQ = dict(embed_dim=32, num_embeddings=1024, latent_channels=32, resolution=64, base_channels=64,
                channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])  # 1024 codes per 64x64 image


def bench_ids(vocab: int) -> dict:
    """Token ids of the Chameleon benchmark model: the image codes sit in the middle of the vocabulary."""
    return {"latent": vocab - 5, "image_end": vocab - 4, "image_start": vocab - 3, "image": vocab - 2,
            "eos": vocab - 1, "first_code": vocab // 2}


def bench_model(vocab: int = 8192, hidden: int = 512, layers: int = 8):
    """(transformers class, its ChameleonConfig, latent token id) of the small benchmark model (head_dim 64,
    GQA 4:1, 1024 codes per image)."""
    from transformers import ChameleonConfig as HFChameleonConfig
    from transformers import ChameleonForConditionalGeneration

    ids = bench_ids(vocab)
    vmap = {"<image>": ids["image"], "<racm3:break>": ids["image_start"], "<eoss>": ids["image_end"]}
    for c in range(BENCH_VQ["num_embeddings"]):
        vmap[image_code_name(c)] = ids["first_code"] + c
    heads = hidden // 64
    cfg = HFChameleonConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                            vocabulary_map=vmap, vq_config=BENCH_VQ, eos_token_id=ids["eos"], bos_token_id=None,
                            pad_token_id=0)
    return ChameleonForConditionalGeneration, cfg, ids["latent"]


def bench_batch(batch: int, n_latent: int = 0, text_len: int = 128, tail: int = 0, seed: int = 0,
                vocab: int = 8192):
    """Rows of [text, one 64x64 image (1024 tokens with its markers), text] + n latents + tail;
    pixels (B, 3, 64, 64)."""
    ids_ = bench_ids(vocab)
    rng = np.random.default_rng(seed)
    res = BENCH_VQ["resolution"]
    pixel_values = rng.uniform(-1, 1, size=(batch, 3, res, res)).astype(np.float32)
    half, codes = text_len // 2, (res // 2) ** 2
    rows = []
    for _ in range(batch):
        text = rng.integers(10, ids_["first_code"] - 1, size=text_len).tolist()
        rows.append(text[:half] + [ids_["image_start"]] + [ids_["image"]] * codes + [ids_["image_end"]]
                    + text[half:] + [ids_["latent"]] * n_latent
                    + rng.integers(10, ids_["first_code"] - 1, size=tail).tolist())
    ids = np.array(rows, np.int64)
    return ids, np.ones_like(ids), pixel_values, None


def generation_prompts(cfg, batch: int, n: int, text_tokens: int, seed: int = 0):
    """Same-length prompts for `cfg` (a converted config that knows its latent token): random text, one image
    (its VQ codes between their markers), n latent tokens; (ids, mask, pixel values, None)."""
    rng = np.random.default_rng(seed)
    res, codes = cfg.vq.resolution, cfg.vq.tokens_per_image
    first_code = min(cfg.image_vocab)
    rows = []
    for _ in range(batch):
        text = rng.integers(10, first_code - 1, size=text_tokens).tolist()
        rows.append(text[: text_tokens // 3] + [cfg.image_start_token_id] + [cfg.image_token_id] * codes
                    + [cfg.image_end_token_id] + text[text_tokens // 3:] + [cfg.latent_token_id] * n)
    ids = np.asarray(rows, np.int32)
    return ids, np.ones_like(ids), rng.uniform(-1, 1, size=(batch, 3, res, res)).astype(np.float32), None


def hf_reference(hf_eager, hf_sdpa):
    """What the benchmarks' PyTorch reference generation needs of the transformers model (see the Qwen2-VL one):
    the VQ codes' token embeddings as image features, 1-D positions, image codes never generated."""
    import torch

    def image_features(pv, grid, dtype, dev):
        return hf_eager.model.get_image_features(torch.as_tensor(pv, device=dev)).pooler_output[0]

    def head(hidden):
        logits = hf_sdpa.lm_head(hidden)
        logits[..., hf_sdpa.model.vocabulary_mapping.image_tokens] = torch.finfo(logits.dtype).min
        return logits

    return hf_eager.model, hf_sdpa.model, image_features, lambda pos: pos[0], head

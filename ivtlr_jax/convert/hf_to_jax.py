"""Hugging Face Qwen2-VL folder (safetensors) -> ivtlr_jax checkpoint folder, one tensor at a time.

Each stacked array is allocated once in the target dtype and filled row by row, so peak host memory
is about the output size plus the largest source tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
from tqdm.auto import tqdm

from ivtlr_jax.config import ModelConfig, check_dtype
from ivtlr_jax.convert.checkpoint import (
    copy_tokenizer_files,
    format_mismatch,
    map_tree,
    np_dtype,
    save_checkpoint,
)
from ivtlr_jax.convert.keymap import (
    Entry,
    get_path,
    hf_entries,
    hf_to_tree,
    is_ignored_key,
    normalize_key,
)
from ivtlr_jax.convert.safetensors_io import SafetensorsReader
from ivtlr_jax.models.layout import param_shapes

log = logging.getLogger(__name__)

LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
LATENT_INIT_TOKEN = "<<"
EMBED_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"


@dataclasses.dataclass
class _Plan:
    """Which source tensor fills each entry, and what the check found."""

    sources: dict[str, str]  # hf_name (old layout) -> name in the files
    lm_head_from_embed: bool
    ignored: list[str]


def match_source(entries: list[Entry], reader: SafetensorsReader, cfg: ModelConfig, src: str) -> _Plan:
    """Pair every expected entry with a stored tensor; raise listing missing, unexpected, mis-shaped keys."""
    stored: dict[str, str] = {}
    for name in reader.infos:
        old = normalize_key(name)
        if old in stored:
            raise ValueError(f"--src {src!r}: {stored[old]!r} and {name!r} are the same tensor in two key layouts")
        stored[old] = name
    expected = {e.hf_name for e in entries}
    missing, misshaped, sources = [], [], {}
    lm_head_from_embed = False
    for e in entries:
        if e.hf_name not in stored:
            if e.hf_name == LM_HEAD_NAME and EMBED_NAME in stored:
                lm_head_from_embed = True  # untied config but no head stored: use the embedding
                continue
            missing.append(e.hf_name)
            continue
        shape = reader.infos[stored[e.hf_name]].shape
        if shape != e.hf_shape:
            misshaped.append(f"{stored[e.hf_name]}: shape {list(shape)}, expected {list(e.hf_shape)}")
        sources[e.hf_name] = stored[e.hf_name]
    ignored = [n for old, n in stored.items() if old not in expected and is_ignored_key(old)]
    unexpected = []
    for old, name in stored.items():
        if old in expected or is_ignored_key(old):
            continue
        if old == LM_HEAD_NAME and cfg.tie_word_embeddings:
            ignored.append(name)  # tied head stored anyway: the embedding is the head
            continue
        unexpected.append(name)
    if missing or misshaped or unexpected:
        raise ValueError(
            f"--src {src!r}: the safetensors do not match its config.json (Qwen2-VL, "
            f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vision depth {cfg.vision.depth}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings}): "
            + format_mismatch(sorted(missing), sorted(unexpected), sorted(misshaped))
        )
    return _Plan(sources, lm_head_from_embed, ignored)


def _prepare_latent_tokenizer(src: str, vocab_size: int):
    """Load the source tokenizer and add the latent tokens; returns (tokenizer, ids, newly_added, new_vocab)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise ValueError(
            f"--add-latent-tokens: could not load a tokenizer from --src {src!r} ({type(e).__name__}: {e}); "
            "the folder needs tokenizer.json or vocab.json + merges.txt"
        ) from e
    vocab = tok.get_vocab()
    newly_added = [t for t in LATENT_TOKENS if t not in vocab]
    if newly_added:
        try:  # transformers >= 5
            tok.add_special_tokens({"extra_special_tokens": list(newly_added)}, replace_extra_special_tokens=False)
        except TypeError:  # transformers 4
            tok.add_special_tokens(
                {"additional_special_tokens": list(newly_added)}, replace_additional_special_tokens=False
            )
    ids = {t: tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS}
    new_vocab = max(vocab_size, len(tok), max(ids.values()) + 1)
    return tok, ids, newly_added, new_vocab


def _init_latent_rows(params: dict, cfg: ModelConfig, tok, rows: list[int], real_rows: int, old_vocab: int) -> str:
    """Set embedding (and untied head) rows `rows` to those of `<<`, or to the mean row; returns which."""
    embed = params["llm"]["embed"]  # (vocab, hidden)
    head = params["llm"].get("lm_head")  # (hidden, vocab) or None when tied
    init_id = tok.convert_tokens_to_ids(LATENT_INIT_TOKEN)
    if init_id is None or init_id == tok.unk_token_id or not 0 <= init_id < old_vocab:
        log.warning(
            "token %r is not in the tokenizer (id %s): new latent rows start from the mean embedding row",
            LATENT_INIT_TOKEN, init_id,
        )
        n = max(1, min(real_rows, old_vocab))
        embed[rows] = embed[:n].astype(np.float32).mean(axis=0).astype(embed.dtype)
        if head is not None:
            head[:, rows] = head[:, :n].astype(np.float32).mean(axis=1, keepdims=True).astype(head.dtype)
        return "mean"
    embed[rows] = embed[init_id]
    if head is not None:
        head[:, rows] = head[:, init_id : init_id + 1]
    return LATENT_INIT_TOKEN


def convert_hf_to_checkpoint(
    src: str,
    dst: str,
    dtype: str = "float32",
    add_latent_tokens: bool = False,
    *,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Convert a Hugging Face Qwen2-VL folder into a self-contained ivtlr_jax checkpoint; returns a summary."""
    start = time.time()
    check_dtype(dtype)
    target = np_dtype(dtype)
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    cfg = ModelConfig.from_hf_dir(src)
    with open(os.path.join(src, "config.json")) as f:
        hf_config = json.load(f)
    reader = SafetensorsReader(src)
    entries = hf_entries(cfg)
    plan = match_source(entries, reader, cfg, src)
    if os.path.exists(os.path.join(dst, "params")) and not overwrite:
        raise ValueError(
            f"--dst {dst!r} already holds a checkpoint (params/ exists); choose a new folder or --overwrite"
        )

    old_vocab = cfg.vocab_size
    tok, latent_ids, new_rows = None, None, []
    if add_latent_tokens:
        tok, latent_ids, newly_added, new_vocab = _prepare_latent_tokenizer(src, old_vocab)
        real_rows = len(tok) - len(newly_added)  # rows of tokens that existed before
        new_rows = sorted({latent_ids[t] for t in newly_added} | set(range(old_vocab, new_vocab)))
        cfg = dataclasses.replace(
            cfg,
            vocab_size=new_vocab,
            start_latent_token_id=latent_ids["<|start-latent|>"],
            end_latent_token_id=latent_ids["<|end-latent|>"],
            latent_token_id=latent_ids["<|latent|>"],
        )

    # Every array allocated once, in its final shape and dtype.
    params = map_tree(lambda shape: np.empty(shape, target), param_shapes(cfg))
    ordered = sorted(
        (e for e in entries if e.hf_name in plan.sources),
        key=lambda e: (reader.infos[plan.sources[e.hf_name]].path, reader.infos[plan.sources[e.hf_name]].start),
    )
    largest = max(reader.infos[plan.sources[e.hf_name]].nbytes for e in ordered)
    for e in tqdm(ordered, desc="converting", unit="tensor", disable=not verbose):
        arr = reader.get(plan.sources[e.hf_name])
        out = get_path(params, e.path)
        if e.layer is not None:
            out = out[e.layer]
        if e.path == ("llm", "embed"):
            out = out[:old_vocab]
        elif e.path == ("llm", "lm_head"):
            out = out[:, :old_vocab]
        out[...] = hf_to_tree(e, arr)
        del arr
    if plan.lm_head_from_embed:
        log.warning("%s: config is untied but has no %s; the head starts as the embedding", src, LM_HEAD_NAME)
        params["llm"]["lm_head"][:, :old_vocab] = params["llm"]["embed"][:old_vocab].T

    latent_init = None
    if add_latent_tokens:
        if new_rows:
            latent_init = _init_latent_rows(params, cfg, tok, new_rows, real_rows, old_vocab)
        else:
            log.warning("latent tokens already in the tokenizer: their rows are kept as stored")

    save_checkpoint(dst, cfg, params, hf_config, overwrite=overwrite)
    copied = copy_tokenizer_files(src, dst)
    if tok is not None:
        tok.save_pretrained(dst)
        _check_saved_tokenizer(dst, latent_ids)

    leaves = list(_leaves(params))
    summary = {
        "src": src,
        "dst": dst,
        "dtype": dtype,
        "tensors": len(ordered),
        "parameters": int(sum(leaf.size for leaf in leaves)),
        "bytes": int(sum(leaf.nbytes for leaf in leaves)),
        "largest_tensor_bytes": int(largest),
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "lm_head_from_embedding": plan.lm_head_from_embed,
        "ignored_tensors": plan.ignored,
        "latent_token_ids": latent_ids,
        "latent_init": latent_init,
        "copied_files": copied,
        "seconds": round(time.time() - start, 2),
    }
    if verbose:
        print(format_summary(summary))
    return summary


def _leaves(tree: dict):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value


def _check_saved_tokenizer(dst: str, latent_ids: dict[str, int]) -> None:
    """Reload the tokenizer written to dst and make sure the latent tokens kept their ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dst)
    got = {t: tok.convert_tokens_to_ids(t) for t in latent_ids}
    if got != latent_ids:
        raise ValueError(f"tokenizer saved in {dst!r} maps the latent tokens to {got}, expected {latent_ids}")


def format_summary(summary: dict) -> str:
    """A few human-readable lines for the end of a conversion."""
    lines = [
        f"wrote {summary['dst']}",
        f"  tensors    {summary['tensors']}",
        f"  parameters {summary['parameters']:,}",
        f"  dtype      {summary['dtype']}",
        f"  bytes      {summary['bytes']:,} ({summary['bytes'] / 2**30:.2f} GiB)",
        f"  vocab      {summary['vocab_size']} (tied head: {summary['tie_word_embeddings']})",
    ]
    if summary.get("lm_head_from_embedding"):
        lines.append("  lm_head    not stored: initialised from the embedding")
    if summary.get("latent_token_ids"):
        init = {"mean": f"mean row, the tokenizer has no {LATENT_INIT_TOKEN!r}", None: "rows kept as stored"}.get(
            summary["latent_init"], f"rows of {LATENT_INIT_TOKEN!r}")
        lines.append(f"  latent ids {summary['latent_token_ids']} (init: {init})")
    if summary.get("ignored_tensors"):
        lines.append(f"  ignored    {summary['ignored_tensors']}")
    return "\n".join(lines)

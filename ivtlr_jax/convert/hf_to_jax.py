"""Hugging Face folder (safetensors) -> ivtlr_jax checkpoint folder, one tensor at a time, for any backbone.

The key map comes from the backbone's spec table (`models.spec.hf_entries`). Each array is allocated once
in its final dtype and filled row by row, so peak host memory is about the output plus the largest
source tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
from tqdm.auto import tqdm

from ivtlr_jax.config import check_dtype
from ivtlr_jax.convert.checkpoint import copy_tokenizer_files, np_dtype, save_checkpoint
from ivtlr_jax.convert.safetensors_io import SafetensorsReader
from ivtlr_jax.models import backbone_for, model_config_from_hf_dir
from ivtlr_jax.models import spec as sp

log = logging.getLogger(__name__)

LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")
LATENT_INIT_TOKEN = "<<"
EMBED_PATH, HEAD_PATH = "llm/embed", "llm/lm_head"


@dataclasses.dataclass
class Plan:
    """Which stored tensor fills each HF entry, and what the check found."""

    entries: list[sp.HFEntry]
    sources: dict[str, str]  # hf_name (spec layout) -> name in the files
    lm_head_from_embed: bool
    ignored: list[str]


def describe_backbone(cfg) -> str:
    bb = backbone_for(cfg)
    d = bb.dims
    return (f"{bb.model_type}, {d.num_layers} layers, hidden {d.hidden_size}, "
            f"tie_word_embeddings={d.tie_word_embeddings}")


def match_source(bb, infos: dict, src: str, what: str = "the safetensors") -> Plan:
    """Pair every entry of the spec with a stored tensor; raise listing missing, unexpected, mis-shaped keys.

    `infos` maps stored names to objects with a `.shape`.
    """
    entries = sp.hf_entries(bb.param_spec())
    stored: dict[str, str] = {}
    for name in infos:
        canonical = bb.hf_name(name)
        if canonical in stored:
            raise ValueError(f"--src {src!r}: {stored[canonical]!r} and {name!r} are the same tensor in two key "
                             "layouts")
        stored[canonical] = name
    by_name = {e.hf_name: e for e in entries}
    head = next((e for e in entries if e.path == HEAD_PATH), None)
    embed = next((e for e in entries if e.path == EMBED_PATH), None)
    missing, misshaped, sources = [], [], {}
    lm_head_from_embed = False
    for e in entries:
        if e.hf_name not in stored:
            if e is head and embed is not None and embed.hf_name in stored:
                lm_head_from_embed = True  # untied config but no head stored: use the embedding
                continue
            missing.append(e.hf_name)
            continue
        shape = tuple(infos[stored[e.hf_name]].shape)
        if shape != e.hf_shape:
            misshaped.append(f"{stored[e.hf_name]}: shape {list(shape)}, expected {list(e.hf_shape)}")
        sources[e.hf_name] = stored[e.hf_name]
    ignored, unexpected = [], []
    for canonical, name in stored.items():
        if canonical in by_name:
            continue
        if bb.hf_ignored(canonical) or (canonical == "lm_head.weight" and bb.dims.tie_word_embeddings):
            ignored.append(name)  # buffers, or a tied head stored anyway (the embedding is the head)
            continue
        unexpected.append(name)
    if missing or misshaped or unexpected:
        raise ValueError(
            f"--src {src!r}: {what} do not match its config.json ({describe_backbone(bb.config)}): "
            + sp.format_mismatch(sorted(missing), sorted(unexpected), sorted(misshaped))
        )
    return Plan(entries, sources, lm_head_from_embed, ignored)


def fill_params(bb, plan: Plan, get, dtype, verbose: bool = True, sort_key=None, old_vocab: int | None = None):
    """Allocate the params in their final dtypes and fill them from `get(stored_name)`, one tensor at a time.

    Returns (params typed tree of numpy arrays, largest source tensor bytes). Embedding rows (and head
    columns) past `old_vocab` are left for the caller (new tokens).
    """
    spec = bb.param_spec()
    arrays = {name: np.empty(info.shape, info.leaf_dtype(dtype)) for name, info in sp.infos(spec)}
    todo = [e for e in plan.entries if e.hf_name in plan.sources]
    if sort_key is not None:
        todo.sort(key=lambda e: sort_key(plan.sources[e.hf_name]))
    largest = 0
    for e in tqdm(todo, desc="converting", unit="tensor", disable=not verbose):
        arr = get(plan.sources[e.hf_name])
        largest = max(largest, arr.nbytes)
        out = arrays[e.path]
        if e.row is not None:
            out = out[e.row]
        if old_vocab is not None and e.path == EMBED_PATH:
            out = out[:old_vocab]
        elif old_vocab is not None and e.path == HEAD_PATH:
            out = out[:, :old_vocab]
        out[...] = e.to_tree(arr)
        del arr
    if plan.lm_head_from_embed:
        n = old_vocab or arrays[EMBED_PATH].shape[0]
        arrays[HEAD_PATH][:, :n] = arrays[EMBED_PATH][:n].T
    return sp.unflatten(spec, arrays), largest


def load_tokenizer(src: str, why: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise ValueError(
            f"{why}: could not load a tokenizer from {src!r} ({type(e).__name__}: {e}); "
            "the folder needs tokenizer.json or vocab.json + merges.txt"
        ) from e


def add_latent_tokens_to(tok, vocab_size: int):
    """Add the latent tokens to `tok` where missing; returns (ids, newly_added, new_vocab)."""
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
    return ids, newly_added, new_vocab


def existing_latent_ids(src: str, vocab_size: int) -> dict[str, int] | None:
    """The latent ids of a folder whose tokenizer already holds all three tokens inside the vocabulary."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
    except Exception:
        return None
    vocab = tok.get_vocab()
    if not all(t in vocab for t in LATENT_TOKENS):
        return None
    ids = {t: int(vocab[t]) for t in LATENT_TOKENS}
    return ids if max(ids.values()) < vocab_size else None


def with_latent_ids(cfg, ids: dict[str, int], vocab_size: int):
    return dataclasses.replace(cfg, vocab_size=vocab_size, start_latent_token_id=ids["<|start-latent|>"],
                               end_latent_token_id=ids["<|end-latent|>"], latent_token_id=ids["<|latent|>"])


def init_latent_rows(params, tok, rows: list[int], real_rows: int, old_vocab: int) -> str:
    """Set embedding (and untied head) rows `rows` to those of `<<`, or to the mean row; returns which."""
    embed = params.llm.embed  # (vocab, hidden)
    head = params.llm.lm_head  # (hidden, vocab) or None when tied
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


def check_saved_tokenizer(dst: str, latent_ids: dict[str, int]) -> None:
    """Reload the tokenizer written to dst and make sure the latent tokens kept their ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dst)
    got = {t: tok.convert_tokens_to_ids(t) for t in latent_ids}
    if got != latent_ids:
        raise ValueError(f"tokenizer saved in {dst!r} maps the latent tokens to {got}, expected {latent_ids}")


def write_converted(src: str, dst: str, cfg, params, hf_config: dict, tok, latent_ids, *, overwrite: bool) -> list:
    """Save the checkpoint folder: params, configs, the source's tokenizer/processor files (+ latent tokens)."""
    save_checkpoint(dst, cfg, params, hf_config, overwrite=overwrite)
    copied = copy_tokenizer_files(src, dst)
    if tok is not None:
        tok.save_pretrained(dst)
        check_saved_tokenizer(dst, latent_ids)
    return copied


def convert_hf_to_checkpoint(
    src: str,
    dst: str,
    dtype: str = "float32",
    add_latent_tokens: bool = False,
    *,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Convert a Hugging Face folder (any supported backbone) into a self-contained checkpoint; returns a summary."""
    start = time.time()
    check_dtype(dtype)
    target = np_dtype(dtype)
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    cfg = model_config_from_hf_dir(src)
    with open(os.path.join(src, "config.json")) as f:
        hf_config = json.load(f)
    reader = SafetensorsReader(src)
    plan = match_source(backbone_for(cfg), reader.infos, src)
    if os.path.exists(os.path.join(dst, "params")) and not overwrite:
        raise ValueError(
            f"--dst {dst!r} already holds a checkpoint (params/ exists); choose a new folder or --overwrite"
        )

    old_vocab = cfg.vocab_size
    tok, latent_ids, new_rows, real_rows = None, None, [], old_vocab
    if add_latent_tokens:
        tok = load_tokenizer(src, "--add-latent-tokens")
        latent_ids, newly_added, new_vocab = add_latent_tokens_to(tok, old_vocab)
        real_rows = len(tok) - len(newly_added)  # rows of tokens that existed before
        new_rows = sorted({latent_ids[t] for t in newly_added} | set(range(old_vocab, new_vocab)))
        cfg = with_latent_ids(cfg, latent_ids, new_vocab)
    else:
        latent_ids = existing_latent_ids(src, old_vocab)  # a folder already trained with latent tokens
        if latent_ids is not None:
            cfg = with_latent_ids(cfg, latent_ids, old_vocab)
    bb = backbone_for(cfg)
    info = reader.infos
    params, largest = fill_params(bb, plan, reader.get, target, verbose,
                                  sort_key=lambda name: (info[name].path, info[name].start), old_vocab=old_vocab)
    if plan.lm_head_from_embed:
        log.warning("%s: config is untied but has no lm_head.weight; the head starts as the embedding", src)
    latent_init = None
    if add_latent_tokens:
        if new_rows:
            latent_init = init_latent_rows(params, tok, new_rows, real_rows, old_vocab)
        else:
            log.warning("latent tokens already in the tokenizer: their rows are kept as stored")
    copied = write_converted(src, dst, cfg, params, hf_config, tok, latent_ids, overwrite=overwrite)
    leaves = list(sp.flatten(params).values())
    summary = {
        "src": src,
        "dst": dst,
        "model_type": bb.model_type,
        "dtype": dtype,
        "tensors": len(plan.sources),
        "parameters": int(sum(leaf.size for leaf in leaves)),
        "bytes": int(sum(leaf.nbytes for leaf in leaves)),
        "largest_tensor_bytes": int(largest),
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bb.dims.tie_word_embeddings,
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


def format_summary(summary: dict) -> str:
    """A few human-readable lines for the end of a conversion."""
    lines = [
        f"wrote {summary['dst']}",
        f"  model      {summary.get('model_type', '?')}",
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

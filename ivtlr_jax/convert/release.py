"""The authors' released IVT-LR checkpoint (one state dict, PEFT LoRA unmerged) -> a self-contained checkpoint folder.

The release (method page, section 7) is one `torch.save`d dict written by DeepSpeed's `zero_to_fp32`:
`[module.]base_causallm.base_model.model.<transformers names>` (the 4.51 names, or the >= 4.52 ones), the
LoRA targets (q, k, v, o, gate, up, down of the LLM) stored as `<proj>.base_layer.{weight,bias}`,
`<proj>.lora_A.default.weight` (r, in) and `<proj>.lora_B.default.weight` (out, r), and `embedding.weight`,
an alias of the input embedding. Frozen weights are bfloat16, LoRA tensors float32. A safetensors file
holding the same dict is read too.

The key map comes from the backbone's spec table, as for Hugging Face folders. Sizes come from the file
(the embedding's rows) and the base folder's tokenizer (the latent ids), never from constants. The
adapters are merged W' = W + (alpha / r) B A in float32, or kept (`keep_lora`) as the trainer's LoRA
state beside the base weights. PEFT given a bare list of names also wraps same-named modules outside the LLM
(Qwen2.5-VL's vision blocks have mlp.gate_proj/up_proj/down_proj): those adapters are merged in every case, as
the trainer adapts only the LLM. Each array of the output is allocated once and filled one source tensor
at a time, so peak host memory is about the output plus the largest source tensor.

Reading the file is `release_io`; its key map and the pairing with the spec, `release_keys`; planning the
conversion and writing the folder, here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np

from ivtlr_jax.config import check_dtype
from ivtlr_jax.convert.checkpoint import np_dtype, save_lora
from ivtlr_jax.convert.hf_to_jax import (
    EMBED_PATH,
    LATENT_INIT_TOKEN,
    add_latent_tokens_to,
    fill_params,
    load_tokenizer,
    with_latent_ids,
    write_converted,
)
from ivtlr_jax.convert.layout import LORA_CONFIG_NAME, LORA_DIR, PARAMS_DIR
from ivtlr_jax.convert.release_io import SafetensorsRelease, open_release
from ivtlr_jax.convert.release_keys import (
    EMBED_ALIAS,
    RELEASE_PREFIX,
    ReleaseKeys,
    ReleasePlan,
    name_patterns,
    plan_release,
    sort_keys,
)
from ivtlr_jax.models import backbone_for, model_config_from_hf_dir
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import LoRAMeta, adapter_spec, fold_lora

log = logging.getLogger(__name__)

RELEASE_LORA_ALPHA = 16.0
RELEASE_POSITION_MODE = "sequential"  # the release passes 1-D position ids: its models use sequential positions


def _check_paths(release: str, base: str, dst: str, dtype: str, lora_alpha: float, overwrite: bool):
    """(release, base, dst) as absolute paths, after refusing a bad dtype, alpha, base folder or taken --dst."""
    check_dtype(dtype)
    if not lora_alpha > 0:
        raise ValueError(f"--lora-alpha {lora_alpha} must be > 0 (the release used {RELEASE_LORA_ALPHA:g})")
    release, base, dst = os.path.abspath(release), os.path.abspath(base), os.path.abspath(dst)
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ValueError(f"--base {base!r} has no config.json; give the Hugging Face folder of the model the release "
                         "was trained from (e.g. Qwen2-VL-7B-Instruct, chameleon-7b): its config, tokenizer and "
                         "processor files go into the checkpoint")
    if os.path.exists(os.path.join(dst, PARAMS_DIR)) and not overwrite:
        raise ValueError(f"--dst {dst!r} already holds a checkpoint ({PARAMS_DIR}/ exists); choose a new folder or "
                         "--overwrite")
    return release, base, dst


def release_config(cfg, base: str, shapes: dict, keys: ReleaseKeys):
    """(model config, tokenizer with the latent tokens, their ids): the base folder's config `cfg` with the
    vocabulary the release was trained with (its embedding's rows), the latent ids and the release's position rule."""
    embed_hf = next(e.hf_name for e in sp.hf_entries(backbone_for(cfg).param_spec()) if e.path == EMBED_PATH)
    embed_key = keys.plain.get(embed_hf, keys.alias)
    if embed_key is not None and len(shapes[embed_key]) == 2:
        cfg = dataclasses.replace(cfg, vocab_size=int(shapes[embed_key][0]))
    tok = load_tokenizer(base, "--base")
    ids, newly_added, needed = add_latent_tokens_to(tok, cfg.vocab_size)
    if needed > cfg.vocab_size:
        raise ValueError(
            f"--base {base!r}: its tokenizer has {len(tok) - len(newly_added)} tokens, {len(tok)} with the latent "
            f"tokens {list(ids)} (ids {list(ids.values())}), but the release's embedding has {cfg.vocab_size} rows; "
            "--base must be the model the release was trained from")
    cfg = dataclasses.replace(with_latent_ids(cfg, ids, cfg.vocab_size), position_mode=RELEASE_POSITION_MODE)
    return cfg, tok, ids


def read_release_params(bb, reader, rplan: ReleasePlan, lora: LoRAMeta, keep_lora: bool, target, verbose: bool):
    """(params, largest source tensor's bytes, adapters or None): every spec entry filled from the file one tensor
    at a time, each LoRA target folded W + (alpha / r) B A in float32, or (keep_lora) left as stored with its
    factors kept as the trainer's adapters; factors outside the trainer's targets are always folded."""
    target_of = {rplan.plan.sources[k]: v for k, v in {**rplan.lora, **rplan.merged_only}.items()}  # base -> (A, B)
    always_merged = {rplan.plan.sources[k] for k in rplan.merged_only}
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(name: str) -> np.ndarray:
        arr = reader.get(name)
        if name not in target_of:
            return arr
        a_key, b_key = target_of[name]
        a = np.ascontiguousarray(reader.get(a_key).T, np.float32)  # (in, r): our A is PEFT's lora_A transposed
        b = np.ascontiguousarray(reader.get(b_key).T, np.float32)  # (r, out)
        if keep_lora and name not in always_merged:
            factors[name] = (a, b)
            return arr
        return fold_lora(arr.T, a, b, lora.scale).T  # W + (alpha / r) B A in float32, as (out, in)

    params, largest = fill_params(bb, rplan.plan, get, target, verbose)
    return params, largest, _adapter_tree(bb, rplan, factors) if keep_lora else None


def convert_release_to_checkpoint(
    release: str,
    base: str,
    dst: str,
    dtype: str = "float32",
    keep_lora: bool = False,
    lora_alpha: float = RELEASE_LORA_ALPHA,
    *,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Convert the authors' release file into a checkpoint folder (LoRA merged, or kept as the trainer's state).

    `base` is the Hugging Face folder the release was trained from (config.json, tokenizer, processor files;
    its weights are not read). Returns a summary.
    """
    start = time.time()
    release, base, dst = _check_paths(release, base, dst, dtype, lora_alpha, overwrite)
    with open(os.path.join(base, "config.json")) as f:
        hf_config = json.load(f)
    reader = open_release(release)
    cfg = model_config_from_hf_dir(base)
    keys = sort_keys(backbone_for(cfg), reader.shapes, release)
    cfg, tok, ids = release_config(cfg, base, reader.shapes, keys)
    bb = backbone_for(cfg)
    rplan = plan_release(bb, keys, reader.shapes, release)
    lora = LoRAMeta(rplan.rank, lora_alpha)
    params, largest, adapters = read_release_params(bb, reader, rplan, lora, keep_lora, np_dtype(dtype), verbose)
    alias = _check_alias(reader, keys, rplan, params.llm.embed, release)
    rows_match = _latent_rows_match(params, tok, ids)
    if rows_match is False:
        log.warning("%s: the head rows of the latent tokens %s differ from the row of %r; the release left them "
                    "equal: is --base the model (and tokenizer) it was trained from?", release, ids, LATENT_INIT_TOKEN)
    copied = write_converted(base, dst, cfg, params, hf_config, tok, ids, overwrite=overwrite)
    if keep_lora:
        save_lora(dst, bb, adapters, lora, source=os.path.basename(release), overwrite=overwrite)
    leaves = list(sp.flatten(params).values())
    summary = {
        "src": release, "base": base, "dst": dst, "model_type": bb.model_type, "dtype": dtype,
        "format": "safetensors" if isinstance(reader, SafetensorsRelease) else "torch",
        "module_prefix": keys.module_prefix,
        "tensors": len(rplan.plan.sources) + 2 * (len(rplan.lora) + len(rplan.merged_only)),
        "parameters": int(sum(leaf.size for leaf in leaves)), "bytes": int(sum(leaf.nbytes for leaf in leaves)),
        "largest_tensor_bytes": int(largest), "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bb.dims.tie_word_embeddings, "ignored_tensors": rplan.plan.ignored,
        "embedding_alias": alias, "latent_token_ids": ids, "latent_rows_match_init": rows_match,
        "lora": {**lora.to_dict(), "scale": lora.scale, "kept": keep_lora,
                 "targets": sorted({e.path.split("/")[-2] for e in rplan.plan.entries if e.info.lora}),
                 "kernels": len(rplan.lora), "merged_outside_targets": name_patterns(sorted(rplan.merged_only))},
        "position_mode": cfg.position_mode, "copied_files": copied, "seconds": round(time.time() - start, 2),
    }
    if keep_lora:
        summary["lora_bytes"] = int(sum(x.nbytes for x in sp.flatten(adapters).values()))
    if verbose:
        print(format_release_summary(summary))
    return summary


def _check_alias(reader, keys: ReleaseKeys, rplan: ReleasePlan, embed: np.ndarray, src: str) -> str:
    """The alias must hold the embedding: same storage, or equal values (compared block by block)."""
    if keys.alias is None or rplan.embed_from_alias:
        return "absent" if keys.alias is None else "used as the embedding"
    embed_key = rplan.plan.sources[next(e.hf_name for e in rplan.plan.entries if e.path == EMBED_PATH)]
    if reader.same_storage(keys.alias, embed_key):
        return "same storage as the embedding"
    alias = reader.get(keys.alias)
    for start in range(0, alias.shape[0], 4096):
        if not np.array_equal(alias[start:start + 4096].astype(embed.dtype), embed[start:start + 4096]):
            raise ValueError(f"--from-release {src!r}: {keys.alias!r} should alias the input embedding "
                             f"{embed_key!r} but their values differ (from row {start} on); the file is damaged or "
                             "not the release")
    return "equal to the embedding"


def _latent_rows_match(params, tok, ids: dict[str, int]) -> bool | None:
    """Whether the head (or tied embedding) rows of the latent ids equal those of `<<`, as the release left them."""
    init_id = tok.convert_tokens_to_ids(LATENT_INIT_TOKEN)
    table = params.llm.lm_head.T if params.llm.lm_head is not None else params.llm.embed  # (vocab, hidden)
    if init_id is None or init_id == tok.unk_token_id or not 0 <= init_id < table.shape[0]:
        return None
    return all(np.array_equal(table[i], table[init_id]) for i in ids.values())


def _adapter_tree(bb, rplan: ReleasePlan, factors: dict):
    """The trainer's LoRA state (LoRAAdapter a (L, in, r), b (L, r, out), float32) from the file's factors."""

    spec = bb.param_spec()
    aspec = adapter_spec(spec, rplan.rank)
    arrays = {name: np.empty(info.shape, np.float32) for name, info in sp.infos(aspec)}
    for e in rplan.plan.entries:
        if not e.info.lora:
            continue
        a, b = factors[rplan.plan.sources[e.hf_name]]
        leaf = e.path.rsplit("/", 1)[0]  # "llm/layers/q"
        for part, arr in (("a", a), ("b", b)):
            out = arrays[f"{leaf}/{part}"]
            out[e.row if e.row is not None else ...] = arr
    return sp.unflatten(aspec, arrays)


def format_release_summary(summary: dict) -> str:
    lora = summary["lora"]
    lines = [
        f"wrote {summary['dst']}",
        f"  from       {summary['src']} ({summary['format']}{', module. prefix' if summary['module_prefix'] else ''})",
        f"  base       {summary['base']}",
        f"  model      {summary['model_type']}",
        f"  tensors    {summary['tensors']}",
        f"  parameters {summary['parameters']:,}",
        f"  dtype      {summary['dtype']}",
        f"  bytes      {summary['bytes']:,} ({summary['bytes'] / 2**30:.2f} GiB)",
        f"  vocab      {summary['vocab_size']} (tied head: {summary['tie_word_embeddings']})",
        f"  latent ids {summary['latent_token_ids']}",
        f"  positions  {summary['position_mode']} (the release's)",
        (f"  LoRA       r={lora['r']}, alpha={lora['alpha']:g} on {', '.join(lora['targets'])} "
         f"({lora['kernels']} kernels): "
         + (f"kept as the trainer's LoRA state ({LORA_DIR}/, {LORA_CONFIG_NAME})" if lora["kept"]
            else f"merged (W + {lora['scale']:g} B A in float32)")),
    ]
    if lora.get("merged_outside_targets"):
        lines.append(f"  LoRA also  on {', '.join(lora['merged_outside_targets'])} (outside the trainer's targets; "
                     "merged)")
    if summary.get("ignored_tensors"):
        lines.append(f"  ignored    {summary['ignored_tensors']}")
    return "\n".join(lines)


__all__ = ["EMBED_ALIAS", "RELEASE_LORA_ALPHA", "RELEASE_PREFIX", "convert_release_to_checkpoint", "name_patterns",
           "open_release"]

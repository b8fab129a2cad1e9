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
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import pickle
import re
import sys
import time

import numpy as np

from ivtlr_jax.config import check_dtype
from ivtlr_jax.convert.checkpoint import LORA_CONFIG_NAME, LORA_DIR, np_dtype, save_lora
from ivtlr_jax.convert.hf_to_jax import (
    EMBED_PATH,
    LATENT_INIT_TOKEN,
    Plan,
    add_latent_tokens_to,
    describe_backbone,
    fill_params,
    load_tokenizer,
    with_latent_ids,
    write_converted,
)
from ivtlr_jax.convert.safetensors_io import SafetensorsReader, read_header
from ivtlr_jax.models import backbone_for, model_config_from_hf_dir
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.adapters import LoRAMeta, adapter_spec, fold_lora

log = logging.getLogger(__name__)

RELEASE_PREFIX = "base_causallm.base_model.model."
MODULE_PREFIX = "module."
EMBED_ALIAS = "embedding.weight"
ADAPTER_NAME = "default"
RELEASE_LORA_ALPHA = 16.0
RELEASE_POSITION_MODE = "sequential"  # the release passes 1-D position ids: its models use sequential positions
TORCH_INSTALL = ("pip install 'ivtlr_jax[torch]' --extra-index-url https://download.pytorch.org/whl/cpu "
                 "(the CPU build of the pinned torch; a bare `pip install torch` pulls a multi-GB CUDA wheel)")

_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
_WRAPPED_RE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<leaf>weight|bias)$")
_LAYER_RE = re.compile(r"\.(layers|blocks)\.(\d+)\.")


# ----------------------------------------------------------------------------- reading the file
def import_torch(what: str):
    """torch, or a ValueError that says how to install the optional extra."""
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{what}: reading a torch .pth file needs PyTorch, which is not installed; install it with "
                         f"{TORCH_INSTALL}, or give a safetensors file holding the same dict") from e
    return torch


_MADV_DONTNEED = 4


def _drop_pages(address: int, nbytes: int) -> None:
    """Give back the resident pages of a read-only private file mapping (Linux); a no-op elsewhere.

    Pages of an mmap-ed file count in the process's resident memory once touched; dropping them after
    each tensor keeps peak memory at the output plus one tensor. The mapping stays valid (re-read on use).
    """
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end > start:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED))
        except (OSError, AttributeError):
            pass


class TorchRelease:
    """A `torch.save`d state dict, loaded with weights_only=True (no code runs) and mmap=True (nothing is read).

    `get(name)` copies one tensor into an owned numpy array and drops its file pages again.
    """

    def __init__(self, path: str):
        torch = import_torch(f"--from-release {path!r}")
        self.path, self._torch, self._mmap = path, torch, True
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                log.warning("%s: %s; reading it without mmap (the whole file goes to memory)", path, e)
                self._mmap = False
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            text = str(e)
            detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
            first = " ".join(detail.split()) or type(e).__name__
            if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
                raise ValueError(f"--from-release {path!r} is neither a torch checkpoint nor a safetensors file "
                                 f"({first})") from None
            raise ValueError(
                f"--from-release {path!r}: refused by torch.load(weights_only=True): the file needs code execution "
                f"to unpickle, which a plain state dict of tensors never does ({first}); it is not the authors' "
                "release, or it was tampered with") from None
        if not isinstance(obj, dict):
            raise ValueError(f"--from-release {path!r} holds a {type(obj).__name__}, expected a dict of tensors "
                             "(the state dict written by zero_to_fp32)")
        bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"--from-release {path!r}: entries that are not tensors: {[str(b) for b in bad[:10]]}; "
                             "expected a flat dict name -> tensor")
        self._tensors = obj
        self.shapes = {k: tuple(v.shape) for k, v in obj.items()}
        self.dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in obj.items()}

    def same_storage(self, a: str, b: str) -> bool:
        ta, tb = self._tensors[a], self._tensors[b]
        return ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr() and \
            ta.storage_offset() == tb.storage_offset() and ta.stride() == tb.stride() and ta.shape == tb.shape

    def get(self, name: str) -> np.ndarray:
        import ml_dtypes

        t = self._tensors[name].detach()
        if t.dtype == self._torch.bfloat16:
            view = t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        elif t.is_floating_point() or t.dtype in (self._torch.int64, self._torch.int32, self._torch.bool):
            view = t.numpy()
        else:
            raise ValueError(f"--from-release {self.path!r}: tensor {name!r} has dtype {t.dtype}, which this "
                             "converter does not read (float32, bfloat16, float16)")
        out = np.array(view, copy=True)
        del view
        if self._mmap:  # file-backed pages only: dropping anonymous memory would lose its contents
            storage = t.untyped_storage()
            _drop_pages(storage.data_ptr(), storage.nbytes())
        return out


class SafetensorsRelease(SafetensorsReader):
    """One safetensors file holding the release's dict (header only at construction, one tensor per get)."""

    def __init__(self, path: str):
        self.folder, self.files = os.path.dirname(path), [path]
        self.infos, _ = read_header(path)
        self.path = path
        self.shapes = {k: tuple(i.shape) for k, i in self.infos.items()}
        self.dtypes = {k: str(i.dtype) for k, i in self.infos.items()}

    def same_storage(self, a: str, b: str) -> bool:
        return False

    def get(self, name: str) -> np.ndarray:
        """The tensor read straight into a new array (no mapping: file pages never count as our memory)."""
        info = self.infos[name]
        out = np.empty(info.shape, info.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                n = f.readinto(buf[done:])
                if not n:
                    raise ValueError(f"--from-release {self.path!r}: tensor {name!r} ends past the end of the file")
                done += n
        return out


def open_release(path: str):
    """The reader for a release file: a torch zip/pickle (.pth, .pt, .bin) or a safetensors file."""
    if not os.path.isfile(path):
        raise ValueError(f"--from-release {path!r} is not a file; give the release's .pth (or a safetensors file "
                         "holding the same dict)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and _looks_like_safetensors(path):  # not a torch zip: a safetensors header?
        return SafetensorsRelease(path)
    if path.endswith(".safetensors"):
        read_header(path)  # raises, saying what is wrong with it
    return TorchRelease(path)  # a torch zip, or a legacy torch pickle


def _looks_like_safetensors(path: str) -> bool:
    try:
        read_header(path)
        return True
    except (ValueError, OSError):
        return False


# ----------------------------------------------------------------------------- the key map
@dataclasses.dataclass
class ReleaseKeys:
    """The stored keys of a release file, sorted by what they hold (names in the spec's HF layout)."""

    plain: dict[str, str]  # HF name -> stored key (everything outside the LoRA targets)
    wrapped: dict[str, str]  # HF name -> stored key (<proj>.base_layer.{weight,bias})
    lora_a: dict[str, str]  # HF kernel name (<proj>.weight) -> stored lora_A key
    lora_b: dict[str, str]
    alias: str | None  # the stored `embedding.weight`
    outside: list[str]  # stored keys outside the release's layout
    module_prefix: bool


def sort_keys(bb, names, src: str) -> ReleaseKeys:
    """Strip `module.` and the wrapper prefix, map either transformers layout to the spec's, split LoRA parts."""
    keys = ReleaseKeys({}, {}, {}, {}, None, [], False)
    seen: dict[tuple, str] = {}
    for name in names:
        rest = name
        if rest.startswith(MODULE_PREFIX):
            rest = rest[len(MODULE_PREFIX):]
            keys.module_prefix = True
        if rest == EMBED_ALIAS:
            slot, table, hf = ("alias",), None, None
        elif not rest.startswith(RELEASE_PREFIX):
            keys.outside.append(name)
            continue
        else:
            rest = rest[len(RELEASE_PREFIX):]
            m = _LORA_RE.match(rest)
            w = _WRAPPED_RE.match(rest)
            if m and m["adapter"] == ADAPTER_NAME:
                hf = bb.hf_name(f"{m['module']}.weight")
                table = keys.lora_a if m["part"] == "lora_A" else keys.lora_b
            elif m:
                keys.outside.append(name)  # an adapter of another name: not the release's
                continue
            elif w:
                hf, table = bb.hf_name(f"{w['module']}.{w['leaf']}"), keys.wrapped
            else:
                hf, table = bb.hf_name(rest), keys.plain
            slot = (id(table), hf)
        if slot in seen:
            raise ValueError(f"--from-release {src!r}: {seen[slot]!r} and {name!r} are the same tensor twice (with and "
                             "without `module.`, or in both transformers name layouts)")
        seen[slot] = name
        if table is None:
            keys.alias = name
        else:
            table[hf] = name
    return keys


def release_name(hf_name: str, part: str | None = None) -> str:
    """The key the release uses for a spec HF name: plain, `base_layer`-wrapped, or a LoRA factor."""
    if part is None:
        return RELEASE_PREFIX + hf_name
    module, leaf = hf_name.rsplit(".", 1)
    if part == "base_layer":
        return f"{RELEASE_PREFIX}{module}.base_layer.{leaf}"
    return f"{RELEASE_PREFIX}{module}.{part}.{ADAPTER_NAME}.weight"


def _ranges(idx: list[int]) -> str:
    idx = sorted(set(idx))
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def name_patterns(names) -> list[str]:
    """Names with a layer/block index folded into one `{i}` pattern per tensor kind, the indices listed."""
    groups: dict[str, list[int]] = {}
    for name in names:
        m = _LAYER_RE.search(name)
        if m is None:
            groups.setdefault(name, [])
            continue
        pattern = name[: m.start(2)] + "{i}" + name[m.end(2):]
        groups.setdefault(pattern, []).append(int(m.group(2)))
    out = []
    for pattern, idx in groups.items():
        if len(idx) == 1:
            out.append(pattern.replace("{i}", str(idx[0]), 1))
        elif idx:
            out.append(f"{pattern} (i = {_ranges(idx)})")
        else:
            out.append(pattern)
    return sorted(out)


@dataclasses.dataclass
class ReleasePlan:
    """What fills each spec entry, which LoRA factors go with each target kernel, and the LoRA rank."""

    plan: Plan
    lora: dict[str, tuple[str, str]]  # HF kernel name -> (stored lora_A, stored lora_B)
    rank: int
    embed_from_alias: bool
    # kernels the release's PEFT wrapped outside the trainer's LoRA targets -> (lora_A, lora_B): always merged
    merged_only: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


def plan_release(bb, keys: ReleaseKeys, shapes: dict, src: str) -> ReleasePlan:
    """Pair every spec entry (and every LoRA target) with stored keys; raise listing missing, unexpected and
    mis-shaped keys by pattern."""
    entries = sp.hf_entries(bb.param_spec())
    targets = {e.hf_name.rsplit(".", 1)[0] for e in entries if e.info.lora}  # LoRA target modules
    missing, misshaped, ignored = [], [], []
    sources: dict[str, str] = {}
    used: set[str] = set()
    lora: dict[str, tuple[str, str]] = {}
    merged_only: dict[str, tuple[str, str]] = {}
    ranks: dict[str, int] = {}
    embed_from_alias = False
    tied = bb.dims.tie_word_embeddings

    def check_shape(stored: str, want: tuple) -> None:
        if tuple(shapes[stored]) != tuple(want):
            misshaped.append(f"{stored}: shape {list(shapes[stored])}, expected {list(want)}")

    for e in entries:
        module = e.hf_name.rsplit(".", 1)[0]
        wrapped = module in targets
        table = keys.wrapped if wrapped else keys.plain
        stored = table.get(e.hf_name)
        outside_targets = False
        if stored is None and not wrapped and e.hf_name in keys.wrapped:  # a same-named module outside the LLM
            stored, outside_targets = keys.wrapped[e.hf_name], True
        if stored is None and e.path == EMBED_PATH and keys.alias is not None:
            stored, embed_from_alias = keys.alias, True
        if stored is None:
            missing.append(release_name(e.hf_name, "base_layer" if wrapped else None))
            continue
        used.add(stored)
        sources[e.hf_name] = stored
        check_shape(stored, e.hf_shape)
        if not (e.info.lora or (outside_targets and len(e.hf_shape) == 2)):  # kernels carry the factors
            continue
        out_dim, in_dim = e.hf_shape
        factors = []
        for part, table in (("lora_A", keys.lora_a), ("lora_B", keys.lora_b)):
            name = table.get(e.hf_name)
            if name is None:
                missing.append(release_name(e.hf_name, part))
            else:
                used.add(name)
                factors.append(name)
        if len(factors) == 2:
            a, b = factors
            r = shapes[a][0] if len(shapes[a]) == 2 else -1
            ranks[a] = r
            check_shape(a, (r, in_dim))
            check_shape(b, (out_dim, r))
            (merged_only if outside_targets else lora)[e.hf_name] = (a, b)
    if keys.alias is not None and not embed_from_alias:
        used.add(keys.alias)
        embed = next(e for e in entries if e.path == EMBED_PATH)
        check_shape(keys.alias, embed.hf_shape)
    unexpected = list(keys.outside)
    for table, part in ((keys.plain, None), (keys.wrapped, "base_layer"), (keys.lora_a, "lora_A"),
                        (keys.lora_b, "lora_B")):
        for hf, name in table.items():
            if name in used:
                continue
            if part is None and (bb.hf_ignored(hf) or (hf == "lm_head.weight" and tied)):
                ignored.append(name)  # buffers, or a tied head stored anyway
                continue
            unexpected.append(name)
    distinct = sorted(set(ranks.values()))
    if len(distinct) > 1:
        misshaped.append(f"LoRA ranks differ between targets: {distinct} (lora_A first dimension)")
    if missing or misshaped or unexpected:
        raise ValueError(
            f"--from-release {src!r} does not match --base ({describe_backbone(bb.config)}, the release's PEFT "
            f"LoRA on {sorted({t.rsplit('.', 1)[-1] for t in targets})}): "
            + sp.format_mismatch(name_patterns(missing), name_patterns(unexpected), sorted(misshaped)))
    return ReleasePlan(Plan(entries, sources, False, ignored), lora, distinct[0] if distinct else 0, embed_from_alias,
                       merged_only)


# ----------------------------------------------------------------------------- conversion
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
    check_dtype(dtype)
    target = np_dtype(dtype)
    if not lora_alpha > 0:
        raise ValueError(f"--lora-alpha {lora_alpha} must be > 0 (the release used {RELEASE_LORA_ALPHA:g})")
    release, base, dst = os.path.abspath(release), os.path.abspath(base), os.path.abspath(dst)
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ValueError(f"--base {base!r} has no config.json; give the Hugging Face folder of the model the release "
                         "was trained from (e.g. Qwen2-VL-7B-Instruct, chameleon-7b): its config, tokenizer and "
                         "processor files go into the checkpoint")
    if os.path.exists(os.path.join(dst, "params")) and not overwrite:
        raise ValueError(f"--dst {dst!r} already holds a checkpoint (params/ exists); choose a new folder or "
                         "--overwrite")
    cfg = model_config_from_hf_dir(base)
    with open(os.path.join(base, "config.json")) as f:
        hf_config = json.load(f)
    reader = open_release(release)
    keys = sort_keys(backbone_for(cfg), reader.shapes, release)

    # Sizes from the file: the embedding's rows are the vocabulary the release was trained with.
    embed_hf = next(e.hf_name for e in sp.hf_entries(backbone_for(cfg).param_spec()) if e.path == EMBED_PATH)
    embed_key = keys.plain.get(embed_hf, keys.alias)
    if embed_key is not None and len(reader.shapes[embed_key]) == 2:
        cfg = dataclasses.replace(cfg, vocab_size=int(reader.shapes[embed_key][0]))
    tok = load_tokenizer(base, "--base")
    ids, newly_added, needed = add_latent_tokens_to(tok, cfg.vocab_size)
    if needed > cfg.vocab_size:
        raise ValueError(
            f"--base {base!r}: its tokenizer has {len(tok) - len(newly_added)} tokens, {len(tok)} with the latent "
            f"tokens {list(ids)} (ids {list(ids.values())}), but the release's embedding has {cfg.vocab_size} rows; "
            "--base must be the model the release was trained from")
    cfg = dataclasses.replace(with_latent_ids(cfg, ids, cfg.vocab_size), position_mode=RELEASE_POSITION_MODE)
    bb = backbone_for(cfg)
    rplan = plan_release(bb, keys, reader.shapes, release)
    lora = LoRAMeta(rplan.rank, lora_alpha)
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
    alias = _check_alias(reader, keys, rplan, params.llm.embed, release)
    rows_match = _latent_rows_match(params, tok, ids)
    if rows_match is False:
        log.warning("%s: the head rows of the latent tokens %s differ from the row of %r; the release left them "
                    "equal: is --base the model (and tokenizer) it was trained from?", release, ids, LATENT_INIT_TOKEN)
    adapters = None
    if keep_lora:
        adapters = _adapter_tree(bb, rplan, factors)
    copied = write_converted(base, dst, cfg, params, hf_config, tok, ids, overwrite=overwrite)
    if keep_lora:
        save_lora(dst, bb, adapters, lora, source=os.path.basename(release), overwrite=overwrite)
    leaves = list(sp.flatten(params).values())
    summary = {
        "src": release,
        "base": base,
        "dst": dst,
        "model_type": bb.model_type,
        "dtype": dtype,
        "format": "safetensors" if isinstance(reader, SafetensorsRelease) else "torch",
        "module_prefix": keys.module_prefix,
        "tensors": len(rplan.plan.sources) + 2 * (len(rplan.lora) + len(rplan.merged_only)),
        "parameters": int(sum(leaf.size for leaf in leaves)),
        "bytes": int(sum(leaf.nbytes for leaf in leaves)),
        "largest_tensor_bytes": int(largest),
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bb.dims.tie_word_embeddings,
        "ignored_tensors": rplan.plan.ignored,
        "embedding_alias": alias,
        "latent_token_ids": ids,
        "latent_rows_match_init": rows_match,
        "lora": {**lora.to_dict(), "scale": lora.scale, "kept": keep_lora,
                 "targets": sorted({e.path.split("/")[-2] for e in rplan.plan.entries if e.info.lora}),
                 "kernels": len(rplan.lora), "merged_outside_targets": name_patterns(sorted(rplan.merged_only))},
        "position_mode": cfg.position_mode,
        "copied_files": copied,
        "seconds": round(time.time() - start, 2),
    }
    if keep_lora:
        summary["lora_bytes"] = int(sum(x.nbytes for x in sp.flatten(adapters).values()))
    if verbose:
        print(format_release_summary(summary))
    return summary


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

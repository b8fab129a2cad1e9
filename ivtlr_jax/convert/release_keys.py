"""The release's key map: its stored names (`module.`, the PEFT wrapper, either transformers layout) sorted into
plain, `base_layer`-wrapped and LoRA factor tensors, and paired with the backbone's spec entries (`plan_release`),
refusing a file that does not match with the missing, unexpected and mis-shaped keys named by pattern."""

from __future__ import annotations

import dataclasses
import re

from ivtlr_jax.convert.hf_to_jax import EMBED_PATH, Plan, describe_backbone
from ivtlr_jax.models import spec as sp

RELEASE_PREFIX = "base_causallm.base_model.model."
MODULE_PREFIX = "module."
EMBED_ALIAS = "embedding.weight"
ADAPTER_NAME = "default"

_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
_WRAPPED_RE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<leaf>weight|bias)$")
_LAYER_RE = re.compile(r"\.(layers|blocks)\.(\d+)\.")


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

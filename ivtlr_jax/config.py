"""Plain dataclasses: backbone configs (read from Hugging Face config.json files), prompt formats and options.

Each backbone config carries `model_type`; `model_config_from_dict` picks the class from it.
Every config class coerces its values to the field types on construction (`coerce`: PyYAML reads `1e-3`
as a string), and `config_from_dict` builds any of them, nested sections included, from a mapping.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_DTYPES = ("float32", "bfloat16")
# attention implementation: auto = cudnn on CUDA GPUs (bf16/fp16), pallas on one TPU chip, xla elsewhere;
# dense = the plain einsum over the cache (the reference every implementation is tested against)
ATTENTION_CHOICES = ("auto", "xla", "cudnn", "pallas", "dense")
# layer rematerialisation: auto = by model size (models.layers.resolve_remat); full keeps least memory
REMAT_CHOICES = ("auto", "full", "dots_except_mlp", "dots", "none")


# ----------------------------------------------------------------------------- coercion
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_TYPE_NAMES = {int: "an int", float: "a float", bool: "a bool (true or false)", str: "a string"}


def _expected(tp) -> str:
    """How an error names the type a value should have: 'a float', 'an int or null', 'a list of ints'."""
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in sorted(args, key=lambda a: a is type(None)))
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_expected(args[0]).split(' ', 1)[1].split(' (')[0]}s"
        kinds = {_expected(a).split(" ", 1)[1].split(" (")[0] for a in args}
        return f"a list of {len(args)} {kinds.pop()}s" if len(kinds) == 1 else f"a list of {len(args)} values"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _scalar(value, tp):
    """value as int, float, bool or str, or None when it is not one (bools are not numbers here)."""
    is_bool = isinstance(value, (bool, np.bool_))
    text = value.strip() if isinstance(value, str) else None
    if tp is bool:
        if is_bool or (isinstance(value, numbers.Integral) and value in (0, 1)):
            return bool(value)
        return _BOOL_WORDS.get(text.lower()) if text is not None else None
    if is_bool:
        return None
    if tp is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
        try:
            f = float(text if text is not None else value)
        except (TypeError, ValueError):
            return None
        return int(f) if f.is_integer() else None
    if tp is float:
        if isinstance(value, numbers.Real):
            return float(value)
        try:
            return float(text) if text is not None else None
        except ValueError:
            return None
    if tp is str:
        return value if isinstance(value, str) else str(value) if isinstance(value, numbers.Real) else None
    raise TypeError(f"no coercion to {tp!r}")


def coerce(value, tp, key: str, shown=None):
    """`value` as the type annotation `tp` names (int, float, bool, str, tuples, X | None, a config
    dataclass from a mapping, Any); a ValueError naming `key`, the value and the type when it cannot be."""
    if tp is Any or type(value) is tp:  # already right (fast path: configs are built often)
        return value
    shown = tp if shown is None else shown
    bad = ValueError(f"{key}: {value!r} is not {_expected(shown)}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], key, shown)
        for a in options:
            try:
                return coerce(value, a, key)
            except ValueError:
                pass
        raise bad
    if value is None:
        raise bad
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)):
            raise bad
        items = value.tolist() if isinstance(value, np.ndarray) else value
        items = list(items) if isinstance(items, (list, tuple)) else None
        if len(args) == 2 and args[1] is Ellipsis:
            if isinstance(value, tuple) and all(type(v) is args[0] for v in value):
                return value
            items = [value] if items is None else items  # one value: a list of one
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        if items is None or len(items) != len(args):
            raise bad
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return config_from_dict(tp, value, prefix=f"{key}.")
        raise bad
    if tp in (int, float, bool, str):
        out = _scalar(value, tp)
        if out is None:
            raise bad
        return out
    if isinstance(value, tp):
        return value
    raise bad


@functools.cache
def _field_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def coerce_fields(obj) -> None:
    """Coerce every field of a config dataclass to its annotated type, in place (frozen ones included)."""
    hints = _field_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, coerce(getattr(obj, f.name), hints[f.name], f.name))


def config_from_dict(cls, d: Mapping, prefix: str = ""):
    """A config dataclass from a mapping (YAML, JSON, flags): unknown keys refused, every value coerced to its
    field's type (nested sections too; errors name the key as `section.key`)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__}: {d!r} is not {_expected(cls)}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {[prefix + str(k) for k in unknown]} for {cls.__name__}; valid keys: "
                         f"{sorted(names)}")
    hints = _field_hints(cls)
    return cls(**{k: coerce(v, hints[k], prefix + k) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a backbone's prompts look; the data layer builds prompts from this (no model code needed).

    style "chat": the tokenizer's chat template, user turn [image, text] (Qwen2-VL-Instruct).
    style "plain": no template; the image placeholder sits inside the question (Chameleon's release).
    The image placeholder is repeated once per image token between `image_start` and `image_end`
    (a chat template writes those itself). answer_format: the target names the option by its
    "letter" (A, B, ...) or by its 0-based "index" digit.
    """

    style: str
    image_token: str
    image_start: str | None = None
    image_end: str | None = None
    answer_format: str = "letter"

    def __post_init__(self):
        coerce_fields(self)
        if self.style not in ("chat", "plain"):
            raise ValueError(f"PromptFormat.style={self.style!r} is not valid; use 'chat' or 'plain'")
        if self.answer_format not in ("letter", "index"):
            raise ValueError(f"PromptFormat.answer_format={self.answer_format!r}; use 'letter' or 'index'")


QWEN2VL_PROMPT = PromptFormat(style="chat", image_token="<|image_pad|>", answer_format="letter")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2-VL vision tower (a ViT with 2-D rotary and a 2x2 patch merger)."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584  # the merger's output width = the LLM's hidden size
    rope_theta: float = 10000.0

    def __post_init__(self):
        coerce_fields(self)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one `pixel_values` row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole Qwen2-VL: decoder-only LLM with M-RoPE plus the vision tower."""

    model_type = "qwen2_vl"
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    latent_token_id: int | None = None
    start_latent_token_id: int | None = None
    end_latent_token_id: int | None = None
    # the checkpoint's default position rule when a caller gives none (None: the backbone's native "mrope");
    # a model imported from the authors' release records "sequential", the positions it was trained with
    position_mode: str | None = None
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        coerce_fields(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section={list(self.mrope_section)} must have 3 entries summing to "
                f"head_dim/2 = {self.head_dim // 2} (head_dim = hidden_size / num_attention_heads)"
            )
        if self.position_mode not in (None, "sequential", "mrope"):
            raise ValueError(f"position_mode={self.position_mode!r} is not valid; use 'sequential', 'mrope' or None "
                             "(the native rule)")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size={self.vision.out_hidden_size} must equal the LLM "
                f"hidden_size={self.hidden_size}"
            )

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From `to_dict()` or a YAML `model:` section; values coerced to the field types."""
        return config_from_dict(cls, {k: v for k, v in d.items() if k != "model_type"})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str):
        with open(path) as f:
            return model_config_from_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read an HF Qwen2-VL config: the flat old hub layout or the nested transformers-5 layout."""
        text = dict(hf.get("text_config") or {})
        flat = {k: v for k, v in hf.items() if k not in ("text_config", "vision_config")}
        # Text keys may live at the top (old layout) or under text_config (new layout).
        merged = {**flat, **text}

        def get(key, default=None):
            return merged.get(key, default)

        rope = get("rope_parameters") or get("rope_scaling") or {}
        mrope = rope.get("mrope_section")
        if mrope is None:
            raise ValueError(
                "config.json: no mrope_section found in rope_parameters or rope_scaling; "
                "a Qwen2-VL config needs e.g. rope_scaling={'type': 'mrope', 'mrope_section': [16, 24, 24]}"
            )
        rope_theta = rope.get("rope_theta", get("rope_theta", 1000000.0))
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("config.json: hidden_size and num_attention_heads are required")
        vis = dict(hf.get("vision_config") or {})
        vrope = vis.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=vis.get("depth", 32),
            embed_dim=vis.get("embed_dim", 1280),
            num_heads=vis.get("num_heads", 16),
            mlp_ratio=vis.get("mlp_ratio", 4),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            out_hidden_size=vis.get("hidden_size", hidden),
            rope_theta=vrope.get("rope_theta", 10000.0),
        )
        eos = get("eos_token_id", 151645)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            mrope_section=tuple(mrope),
            tie_word_embeddings=tie,
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            eos_token_id=eos,
            pad_token_id=get("pad_token_id"),
            vision=vision,
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ValueError(f"--src {path!r}: no config.json there; point it at a Hugging Face model folder")
        with open(cfg_path) as f:
            return cls.from_hf_dict(json.load(f))


Qwen2VLConfig = ModelConfig


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Chameleon's VQ-VAE image tokenizer (encoder side): conv levels, mid attention, codebook."""

    embed_dim: int = 256
    num_embeddings: int = 8192
    double_latent: bool = False
    latent_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] | None = None
    attn_type: str = "vanilla"

    def __post_init__(self):
        coerce_fields(self)

    @property
    def latent_size(self) -> int:
        """Side of the code grid: resolution / 2^(levels - 1) (32 for the 7B config)."""
        return self.resolution // 2 ** (len(self.channel_multiplier) - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size**2


CHAMELEON_PROMPT = PromptFormat(style="plain", image_token="<image>", image_start="<racm3:break>",
                                image_end="<eoss>", answer_format="index")


def image_code_name(code: int) -> str:
    """Chameleon's vocabulary name of image code `code`: IMGIMG + digits written A..J + a closing Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_vocabulary(vocabulary_map: dict[str, int]) -> tuple[int, ...]:
    """Codebook index -> BPE id from the `IMGIMG...` names (as transformers' ChameleonImageVocabularyMapping).

    A name is IMGIMG + the code written with letters A..J for digits 0..9 + one trailing character.
    Every code from 0 to the largest must have a name.
    """
    digits = {chr(ord("A") + i): str(i) for i in range(10)}
    img2bpe = {}
    for name, bpe in vocabulary_map.items():
        if name.startswith("IMGIMG"):
            img2bpe[int("".join(digits.get(c, c) for c in name[len("IMGIMG") : -1]))] = int(bpe)
    if not img2bpe:
        return ()
    missing = sorted(set(range(max(img2bpe) + 1)) - set(img2bpe))
    if missing:
        raise ValueError(f"config.json: vocabulary_map names image codes up to {max(img2bpe)} but not {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; every code needs its IMGIMG entry")
    return tuple(img2bpe[c] for c in range(len(img2bpe)))


@dataclasses.dataclass(frozen=True)
class ChameleonConfig:
    """Chameleon: a Llama-style decoder with per-head q/k LayerNorm over one vocabulary of text and image codes."""

    model_type = "chameleon"
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    swin_norm: bool = False
    image_token_id: int = 8711  # the <image> placeholder the processor repeats per image token
    image_start_token_id: int | None = None  # <racm3:break>
    image_end_token_id: int | None = None  # <eoss>
    image_vocab: tuple[int, ...] = ()  # codebook index -> BPE id; these columns are masked in the logits
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    latent_token_id: int | None = None
    start_latent_token_id: int | None = None
    end_latent_token_id: int | None = None
    position_mode: str | None = None  # the checkpoint's default position rule (None: native, i.e. sequential)
    vq: VQConfig = dataclasses.field(default_factory=VQConfig)

    def __post_init__(self):
        coerce_fields(self)
        if self.position_mode not in (None, "sequential"):
            raise ValueError(f"position_mode={self.position_mode!r} is not valid for Chameleon; use 'sequential' or "
                             "None (1-D RoPE has no other rule)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.image_vocab and len(self.image_vocab) < self.vq.num_embeddings:
            raise ValueError(f"the vocabulary maps {len(self.image_vocab)} image codes but the VQ codebook has "
                             f"{self.vq.num_embeddings}; config.json's vocabulary_map needs one IMGIMG name per code")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChameleonConfig:
        """From `to_dict()` or a YAML `model:` section; values coerced to the field types."""
        return config_from_dict(cls, {k: v for k, v in d.items() if k != "model_type"})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ChameleonConfig:
        """Read a transformers ChameleonConfig dict (config.json)."""
        vocab_map = hf.get("vocabulary_map") or {}
        if "<image>" not in vocab_map:
            raise ValueError("config.json: vocabulary_map has no '<image>' entry; a Chameleon config maps the image "
                             "placeholder and the IMGIMG image-code tokens to ids")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only default RoPE)")
        vq = dict(hf.get("vq_config") or {})
        vq_fields = {f.name for f in dataclasses.fields(VQConfig)}
        eos = hf.get("eos_token_id", 2)
        heads = hf.get("num_attention_heads", 32)
        return cls(
            vocab_size=hf.get("vocab_size", 65536), hidden_size=hf.get("hidden_size", 4096),
            intermediate_size=hf.get("intermediate_size", 11008), num_hidden_layers=hf.get("num_hidden_layers", 32),
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), swin_norm=bool(hf.get("swin_norm")),
            image_token_id=int(vocab_map["<image>"]), image_start_token_id=vocab_map.get("<racm3:break>"),
            image_end_token_id=vocab_map.get("<eoss>"), image_vocab=image_vocabulary(vocab_map),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(np.atleast_1d(eos).tolist()),
            pad_token_id=hf.get("pad_token_id"),
            vq=VQConfig(**{k: v for k, v in vq.items() if k in vq_fields}),
        )


CONFIG_CLASSES = {"qwen2_vl": ModelConfig, "chameleon": ChameleonConfig}


def model_config_from_dict(d: dict[str, Any]):
    """A backbone config from its `to_dict()` form (no model_type: a Qwen2-VL checkpoint of before it existed)."""
    kind = d.get("model_type", "qwen2_vl")
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"model_type={kind!r} is not supported; known: {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[kind].from_dict(d)


def model_config_from_hf_dir(path: str):
    """The backbone config of a Hugging Face model folder, by its config.json's model_type."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"--src {path!r}: no config.json there; point it at a Hugging Face model folder")
    with open(cfg_path) as f:
        hf = json.load(f)
    kind = hf.get("model_type", "qwen2_vl")
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"--src {path!r}: config.json has model_type={kind!r}; supported: {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[kind].from_hf_dict(hf)


def check_dtype(dtype: str) -> str:
    """Validate a dtype name given by a user."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {list(SUPPORTED_DTYPES)}")
    return dtype


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """IVT-LR latent-step options; the defaults are the release's behaviour (reference mode)."""

    k: int = 32  # image embeddings selected per step; 0 = "without latent vision" (Coconut)
    latent_text: bool = True  # False = "without latent text": the chunk is V_t alone
    position_mode: str = "sequential"  # or "mrope": native 3-D positions for the prompt
    selection_order: str = "position"  # or "score": order of V_t inside the chunk
    latent_grad: str = "stop"  # or "full": back-propagate through every latent step

    def __post_init__(self):
        coerce_fields(self)
        if self.k < 0:
            raise ValueError(f"k={self.k!r} must be an integer >= 0 (image embeddings per latent step)")
        choices = {
            "position_mode": ("sequential", "mrope"),
            "selection_order": ("position", "score"),
            "latent_grad": ("stop", "full"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; use one of {list(valid)}")
        if self.chunk_len == 0:
            raise ValueError("k=0 with latent_text=False leaves nothing to feed back; use n=0 latent tokens instead")

    @property
    def chunk_len(self) -> int:
        """Vectors per latent step: K image embeddings plus the hidden state when latent_text."""
        return self.k + int(self.latent_text)


@dataclasses.dataclass
class TrainConfig:
    """Everything `experiments.train` reads from YAML and flags; defaults are the method's reference setup."""

    # what to train
    init: str | None = None  # converted checkpoint (with latent tokens) to start from
    out: str = "runs/ivtlr"  # RUN_DIR: checkpoints, metrics.jsonl, plots
    data: str = "m3cot"  # m3cot | scienceqa | synthetic
    data_source: str | None = None  # hub id or local folder
    train_split: str = "train"
    eval_split: str = "test"
    limit: int | None = None  # use only the first N training rows
    stages: tuple[int, ...] | None = None  # None: the whole curriculum 0..max_latent_stage
    resume: bool = False  # continue from the latest checkpoint in `out`
    # curriculum
    epochs_per_stage: int = 4
    max_latent_stage: int = 3
    pad_latent_to_max: bool = True
    latent_markers: bool = False
    # latent options (LatentConfig)
    k: int | None = None  # None: the backbone's default (Qwen2-VL 32, Chameleon 64)
    latent_text: bool = True
    position_mode: str = "sequential"
    selection_order: str = "position"
    latent_grad: str = "stop"
    # optimisation
    finetune: str = "lora"  # lora | full
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lr: float = 4e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 0.7
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear
    batch_size: int = 64  # global batch (rows per optimiser step, before accumulation)
    grad_accum: int = 1
    compute_dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    remat: str = "auto"  # layer rematerialisation: auto (by model size) | full | dots_except_mlp | dots | none
    attention: str = "auto"  # attention kernel: auto | xla | cudnn | pallas | dense (see ATTENTION_CHOICES)
    max_length: int | None = 1024
    seed: int = 0
    max_steps: int | None = None
    # infrastructure
    mesh: str = "auto"
    log_every: int = 10
    save_every: int = 200
    keep: int = 3
    peak_tflops: float | None = None  # per device, for MFU; None: looked up from the device kind
    eval_limit: int | None = None
    eval_batch_size: int = 16
    max_new_tokens: int = 64
    num_workers: int = 2

    def __post_init__(self):
        coerce_fields(self)
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"finetune={self.finetune!r} is not valid; use 'lora' or 'full'")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"schedule={self.schedule!r} is not valid; use constant, cosine or linear")
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat={self.remat!r} is not valid; use one of {', '.join(REMAT_CHOICES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={self.attention!r} is not valid; use one of {', '.join(ATTENTION_CHOICES)}")
        if self.compute_dtype not in ("auto",) + SUPPORTED_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not valid; use auto, float32 or bfloat16")
        for name in ("batch_size", "grad_accum", "epochs_per_stage", "log_every", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.stages is not None:
            if any(s < 0 for s in self.stages):
                raise ValueError(f"stages={list(self.stages)} must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        """From YAML values and flags: unknown keys refused, every value coerced to its field's type."""
        return config_from_dict(cls, d)

    def latent(self, default_k: int = 32) -> LatentConfig:
        """The latent options; `default_k` (the backbone's) when k is not set."""
        return LatentConfig(k=default_k if self.k is None else self.k, latent_text=self.latent_text,
                            position_mode=self.position_mode, selection_order=self.selection_order,
                            latent_grad=self.latent_grad)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages) if self.stages is not None else None
        return d

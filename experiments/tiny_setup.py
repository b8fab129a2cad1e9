"""The embedded defaults' tiny models: Qwen2-VL- or Chameleon-architecture, random weights, no torch needed.

Tokenizer: a byte-level BPE trained on the synthetic training texts. Weights: drawn in our layout,
exported as a Hugging Face folder (safetensors + config.json + tokenizer), then converted back with
`--add-latent-tokens` by the same converter a user runs on a real checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(HERE, "configs")
AUTO_TINY = "auto-tiny"  # `init:` value that builds the tiny random model into RUN_DIR/init

TINY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=(4, 6, 6), rope_theta=10000.0)
TINY_VISION = dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2)
# Chameleon: a 64x64 VQ tokenizer with 4 levels (8x8 = 64 codes per image, about the 100 image tokens of the
# tiny Qwen2-VL) and a 256-entry codebook.
TINY_CHAMELEON = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)
TINY_VQ = dict(embed_dim=16, num_embeddings=256, latent_channels=16, resolution=64, base_channels=32,
               channel_multiplier=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=())


def _tiny_qwen2vl(corpus, vocab_size, model, vision):
    from experiments.tiny_tokenizer import build_tiny_tokenizer
    from ivtlr_jax.config import ModelConfig, VisionConfig

    tok = build_tiny_tokenizer(corpus, vocab_size=vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    m = {**TINY_MODEL, **(model or {})}
    m["mrope_section"] = tuple(m["mrope_section"])
    v = {**TINY_VISION, **(vision or {})}
    cfg = ModelConfig(vocab_size=len(tok), **m, image_token_id=ids["<|image_pad|>"],
                      video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                      vision_end_token_id=ids["<|vision_end|>"], eos_token_id=(ids["<|im_end|>"],),
                      pad_token_id=ids["<|endoftext|>"], vision=VisionConfig(**v, out_hidden_size=m["hidden_size"]))
    return tok, cfg


def _tiny_chameleon(corpus, vocab_size, model, vq):
    from experiments.tiny_tokenizer import build_tiny_chameleon_tokenizer, image_code_name
    from ivtlr_jax.config import ChameleonConfig, VQConfig

    v = {**TINY_VQ, **(vq or {})}
    tok = build_tiny_chameleon_tokenizer(v["num_embeddings"], corpus, vocab_size=vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<racm3:break>", "<eoss>", "<s>", "</s>", "<pad>")}
    codes = tuple(tok.convert_tokens_to_ids(image_code_name(c)) for c in range(v["num_embeddings"]))
    cfg = ChameleonConfig(vocab_size=len(tok), **{**TINY_CHAMELEON, **(model or {})},
                          image_token_id=ids["<image>"], image_start_token_id=ids["<racm3:break>"],
                          image_end_token_id=ids["<eoss>"], image_vocab=codes, bos_token_id=ids["<s>"],
                          eos_token_id=(ids["</s>"],), pad_token_id=ids["<pad>"], vq=VQConfig(**v))
    return tok, cfg


def make_tiny_checkpoint(out_dir: str, corpus: list[str] | None = None, vocab_size: int = 768, seed: int = 0,
                         model: dict | None = None, vision: dict | None = None, backbone: str = "qwen2_vl") -> str:
    """Write HF_DIR (out_dir/hf) and the converted CKPT_DIR (out_dir/init); return CKPT_DIR.

    backbone "chameleon" builds a tiny Chameleon (`vision` then overrides the VQ tokenizer's sizes).
    """
    from ivtlr_jax.convert import convert_hf_to_checkpoint, export_checkpoint_to_hf, save_checkpoint
    from ivtlr_jax.models import backbone_for

    if backbone == "chameleon":
        tok, cfg = _tiny_chameleon(corpus, vocab_size, model, vision)
    elif backbone == "qwen2_vl":
        tok, cfg = _tiny_qwen2vl(corpus, vocab_size, model, vision)
    else:
        raise ValueError(f"backbone={backbone!r} is not valid; use qwen2_vl or chameleon")
    hf_dir, init_dir = os.path.join(out_dir, "hf"), os.path.join(out_dir, "init")
    for d in (hf_dir, init_dir):
        shutil.rmtree(d, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, cfg, backbone_for(cfg).random_params(seed), overwrite=True)
        tok.save_pretrained(tmp)
        export_checkpoint_to_hf(tmp, hf_dir, verbose=False)
    convert_hf_to_checkpoint(hf_dir, init_dir, dtype="float32", add_latent_tokens=True)
    return init_dir


def config_path(name: str) -> str:
    """A YAML path, or a config NAME under experiments/configs/."""
    if os.path.exists(name):
        return name
    path = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    if not os.path.exists(path):
        names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
        raise SystemExit(f"--config {name!r}: no such file, and no experiments/configs/{name}.yaml; "
                         f"available: {', '.join(names)}")
    return path


def prepare_auto_tiny(tcfg, model: dict | None = None) -> None:
    """Build the tiny random model into RUN_DIR/init (once) when the config says `init: auto-tiny`.

    A YAML `model:` section overrides the tiny model's sizes (`vision:` inside it the vision tower's, or the
    VQ tokenizer's for Chameleon); `model: {backbone: chameleon}` builds a tiny Chameleon.
    """
    if tcfg.init != AUTO_TINY:
        return
    from ivtlr_jax.data import load_split

    init = os.path.join(tcfg.out, "init")
    if not os.path.exists(os.path.join(init, "ivtlr_config.json")):
        rows = load_split(tcfg.data, tcfg.train_split, source=tcfg.data_source)
        rows = rows.select(range(min(len(rows), 2000)))
        corpus = [f"{r['question']} {' '.join(r['choices'])} {r['rationale']}" for r in rows]
        model = dict(model or {})
        vision = model.pop("vision", None)
        backbone = model.pop("backbone", "qwen2_vl")
        make_tiny_checkpoint(tcfg.out, corpus=corpus, model=model, vision=vision, seed=tcfg.seed, backbone=backbone)
    tcfg.init = init

"""The embedded defaults' tiny models: Qwen2-VL- or Chameleon-architecture, random weights, no torch needed.

Tokenizer: a byte-level BPE trained on the synthetic training texts. Weights: drawn in our layout,
exported as a Hugging Face folder (safetensors + config.json + tokenizer), then converted back with
`--add-latent-tokens` by the same converter a user runs on a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(HERE, "configs")
AUTO_TINY = "auto-tiny"  # `init:` value that builds the tiny random model into RUN_DIR/init

TINY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=(4, 6, 6), rope_theta=10000.0)
TINY_VISION = dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2)
# Qwen2.5-VL: the same widths, 56 px windows (2 x 2 merged units) in block 0, full attention in block 1
TINY_VISION_25 = dict(depth=2, embed_dim=64, intermediate_size=128, num_heads=2, window_size=56,
                      fullatt_block_indexes=(1,))
# Qwen3-VL: the same widths, patch 16 (320 px images: 100 tokens), an 8 x 8 learned position table, DeepStack
# after both blocks (into decoder layers 0 and 1); its LLM has head_dim 32 and interleaved M-RoPE (6, 5, 5)
TINY_VISION_3 = dict(depth=2, embed_dim=64, intermediate_size=128, num_heads=2, num_position_embeddings=64,
                     deepstack_visual_indexes=(0, 1))
# Chameleon: a 64x64 VQ tokenizer with 4 levels (8x8 = 64 codes per image, about the 100 image tokens of the
# tiny Qwen2-VL) and a 256-entry codebook, fitted to the training pictures by `tiny_vq_tokenizer`.
TINY_CHAMELEON = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)
TINY_VQ = dict(embed_dim=16, num_embeddings=256, latent_channels=16, resolution=64, base_channels=32,
               channel_multiplier=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=())


def _tiny_qwen2vl(corpus, vocab_size, model, vision):
    from experiments.tiny_tokenizer import build_tiny_tokenizer
    from ivtlr_jax.models.qwen2_vl import ModelConfig, VisionConfig

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


def _tiny_qwen25vl(corpus, vocab_size, model, vision):
    """The tiny Qwen2-VL's tokenizer and LLM with a Qwen2.5-VL (windowed) vision tower."""
    from ivtlr_jax.models.qwen2_5_vl import Qwen25VisionConfig, Qwen25VLConfig

    tok, base = _tiny_qwen2vl(corpus, vocab_size, model, None)
    v = {**TINY_VISION_25, **(vision or {})}
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__ if f != "vision"}
    return tok, Qwen25VLConfig(**fields, vision=Qwen25VisionConfig(**v, out_hidden_size=base.hidden_size))


def _tiny_qwen3vl(corpus, vocab_size, model, vision):
    """The tiny Qwen2-VL's tokenizer and LLM widths as a Qwen3-VL (Qwen3 decoder, DeepStack vision tower)."""
    from ivtlr_jax.models.qwen3_vl import Qwen3VisionConfig, Qwen3VLConfig

    model = {"mrope_section": (6, 5, 5), **(model or {})}
    tok, base = _tiny_qwen2vl(corpus, vocab_size, model, None)
    v = {**TINY_VISION_3, **(vision or {})}
    v["deepstack_visual_indexes"] = tuple(v["deepstack_visual_indexes"])
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__ if f != "vision"}
    return tok, Qwen3VLConfig(**fields, head_dim=base.hidden_size // base.num_attention_heads,
                              vision=Qwen3VisionConfig(**v, out_hidden_size=base.hidden_size))


def _tiny_chameleon(corpus, vocab_size, model, vq):
    from experiments.tiny_tokenizer import build_tiny_chameleon_tokenizer
    from ivtlr_jax.models.chameleon import ChameleonConfig, VQConfig, image_code_name

    v = {**TINY_VQ, **(vq or {})}
    tok = build_tiny_chameleon_tokenizer(v["num_embeddings"], corpus, vocab_size=vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<racm3:break>", "<eoss>", "<s>", "</s>", "<pad>")}
    codes = tuple(tok.convert_tokens_to_ids(image_code_name(c)) for c in range(v["num_embeddings"]))
    cfg = ChameleonConfig(vocab_size=len(tok), **{**TINY_CHAMELEON, **(model or {})},
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


def tiny_vq_tokenizer(params, cfg, images=(), seed: int = 0, iters: int = 15):
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
    - the codebook is the k-means of the encoder's outputs over `images` (the training split's
      pictures), as VQ-VAE codebooks are often initialised from data. Without images it stays random.
    """
    import jax

    from ivtlr_jax.data.images import decode_image
    from ivtlr_jax.models.chameleon import encode_latents
    from ivtlr_jax.models.chameleon.images import pixels as chameleon_pixels

    def identity_branch(block):
        c = block.conv2
        return block.replace(conv2=c.replace(kernel=np.zeros_like(c.kernel), bias=np.zeros_like(c.bias)))

    enc = params.vq.encoder
    enc = enc.replace(down=tuple(lv.replace(blocks=tuple(identity_branch(b) for b in lv.blocks)) for lv in enc.down),
                      mid_block_1=identity_branch(enc.mid_block_1), mid_block_2=identity_branch(enc.mid_block_2))
    vq = params.vq.replace(encoder=enc)
    if len(images):
        r = cfg.vq.resolution
        pixels = np.stack([chameleon_pixels(decode_image(im), r) for im in images])
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


# backbone -> its tiny (tokenizer, config) builder: (corpus, vocab_size, model overrides, vision overrides)
TINY_BUILDERS = {"qwen2_vl": _tiny_qwen2vl, "qwen2_5_vl": _tiny_qwen25vl, "chameleon": _tiny_chameleon,
                 "qwen3_vl": _tiny_qwen3vl}


def tiny_builder(backbone: str):
    if backbone not in TINY_BUILDERS:
        raise ValueError(f"backbone={backbone!r} is not valid; use one of {', '.join(TINY_BUILDERS)}")
    return TINY_BUILDERS[backbone]


def make_tiny_checkpoint(out_dir: str, corpus: list[str] | None = None, vocab_size: int = 768, seed: int = 0,
                         model: dict | None = None, vision: dict | None = None, backbone: str = "qwen2_vl",
                         images=()) -> str:
    """Write HF_DIR (out_dir/hf) and the converted CKPT_DIR (out_dir/init); return CKPT_DIR.

    backbone "chameleon" builds a tiny Chameleon (`vision` then overrides the VQ tokenizer's sizes); its VQ
    codebook is fitted to `images` (see `tiny_vq_tokenizer`).
    """
    from ivtlr_jax.convert import convert_hf_to_checkpoint, export_checkpoint_to_hf, save_checkpoint
    from ivtlr_jax.models import backbone_for

    tok, cfg = tiny_builder(backbone)(corpus, vocab_size, model, vision)
    os.makedirs(out_dir, exist_ok=True)
    build = tempfile.mkdtemp(prefix=".tiny-build-", dir=out_dir)  # renamed into place when complete
    try:
        with tempfile.TemporaryDirectory() as tmp:
            params = backbone_for(cfg).random_params(seed)
            if backbone == "chameleon":
                params = tiny_vq_tokenizer(params, cfg, images, seed)
            save_checkpoint(tmp, cfg, params, overwrite=True)
            tok.save_pretrained(tmp)
            export_checkpoint_to_hf(tmp, os.path.join(build, "hf"), verbose=False)
        convert_hf_to_checkpoint(os.path.join(build, "hf"), os.path.join(build, "init"), dtype="float32",
                                 add_latent_tokens=True)
        for name in ("hf", "init"):  # init last: an out_dir/init that exists is complete
            final = os.path.join(out_dir, name)
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(os.path.join(build, name), final)
            except OSError:
                if not os.path.isdir(final):  # else a concurrent builder (same seed, same files) got there first
                    raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return os.path.join(out_dir, "init")


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
        images = rows["image"] if backbone == "chameleon" else ()
        make_tiny_checkpoint(tcfg.out, corpus=corpus, model=model, vision=vision, seed=tcfg.seed, backbone=backbone,
                             images=images)
    tcfg.init = init


def _tiny_corpus(tcfg) -> list[str]:
    """The texts the tiny tokenizer is trained on: the first 2000 training rows."""
    from ivtlr_jax.data import load_split

    rows = load_split(tcfg.data, tcfg.train_split, source=tcfg.data_source)
    rows = rows.select(range(min(len(rows), 2000)))
    return [f"{r['question']} {' '.join(r['choices'])} {r['rationale']}" for r in rows]


def tiny_model_config(tcfg, model: dict | None = None):
    """The config `init: auto-tiny` gives the run, latent tokens included, without drawing weights (--dry-run).
    An already built RUN_DIR/init is read instead."""
    from ivtlr_jax.convert.hf_to_jax import add_latent_tokens_to, with_latent_ids

    init = os.path.join(tcfg.out, "init")
    if os.path.exists(os.path.join(init, "ivtlr_config.json")):
        from ivtlr_jax.convert.checkpoint import load_config

        return load_config(init)
    model = dict(model or {})
    vision = model.pop("vision", None)
    backbone = model.pop("backbone", "qwen2_vl")
    tok, cfg = tiny_builder(backbone)(_tiny_corpus(tcfg), 768, model, vision)
    ids, _, vocab = add_latent_tokens_to(tok, cfg.vocab_size)
    return with_latent_ids(cfg, ids, vocab)


def build_auto_tiny_in_subprocess(tcfg, model: dict | None = None) -> str:
    """`prepare_auto_tiny` in a child process on CPU, so that this process's JAX stays unstarted (a multi-process
    run builds its model before `jax.distributed.initialize`, where no peer waits on a collective); returns
    RUN_DIR/init. Raises ValueError with the child's last line when it fails."""
    init = os.path.join(tcfg.out, "init")
    if os.path.exists(os.path.join(init, "ivtlr_config.json")):
        return init
    cmd = [sys.executable, "-m", "experiments.tiny_setup", "--out", tcfg.out, "--data", tcfg.data,
           "--train-split", tcfg.train_split, "--seed", str(tcfg.seed), "--model", json.dumps(model or {})]
    if tcfg.data_source:
        cmd += ["--data-source", tcfg.data_source]
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # a tiny model: no accelerator to hold or release
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise ValueError(f"building the tiny model into {init} failed (exit {proc.returncode}): "
                         f"{lines[-1].strip() if lines else 'no output'}")
    return init


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.tiny_setup",
                                 description="Build the tiny random model of `init: auto-tiny` into OUT/init "
                                 "(OUT/hf: the same model as a Hugging Face folder); nothing happens when OUT/init "
                                 "exists.")
    ap.add_argument("--out", required=True, help="run folder (RUN_DIR)")
    ap.add_argument("--data", default="synthetic", help="dataset whose training texts train the tokenizer")
    ap.add_argument("--data-source", default=None, help="its local folder (default: the dataset's own source)")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="{}", help="JSON of the YAML's `model:` section (sizes, vision, backbone)")
    args = ap.parse_args(argv)
    from ivtlr_jax.train.config import TrainConfig

    tcfg = TrainConfig(init=AUTO_TINY, out=args.out, data=args.data, data_source=args.data_source,
                       train_split=args.train_split, seed=args.seed)
    try:
        prepare_auto_tiny(tcfg, json.loads(args.model))
    except Exception as e:
        raise SystemExit(f"error: {' '.join(str(e).split()) or type(e).__name__}") from None
    print(tcfg.init, flush=True)


if __name__ == "__main__":
    main()

"""The embedded defaults' tiny models: any backbone with small models in the registry, random weights, no torch.

Tokenizer and config: the backbone's `tiny_model` (`ivtlr_jax.models.small_models`), a byte-level BPE trained on
the synthetic training texts. Weights: drawn in our layout (fitted to the training pictures where the backbone
has a `fit_tiny`), exported as a Hugging Face folder (safetensors + config.json + tokenizer), then converted back
with `--add-latent-tokens` by the same converter a user runs on a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from ivtlr_jax.models import DEFAULT_MODEL_TYPE, small_models

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(HERE, "configs")
AUTO_TINY = "auto-tiny"  # `init:` value that builds the tiny random model into RUN_DIR/init

def make_tiny_checkpoint(out_dir: str, corpus: list[str] | None = None, vocab_size: int = 768, seed: int = 0,
                         model: dict | None = None, vision: dict | None = None, backbone: str = DEFAULT_MODEL_TYPE,
                         images=()) -> str:
    """Write HF_DIR (out_dir/hf) and the converted CKPT_DIR (out_dir/init); return CKPT_DIR.

    `vision` overrides the sizes of the backbone's image encoder (Chameleon: its VQ tokenizer). A backbone with a
    `fit_tiny` (Chameleon: its VQ codebook) fits its random weights to `images` (the training pictures).
    """
    from ivtlr_jax.convert import convert_hf_to_checkpoint, export_checkpoint_to_hf, save_checkpoint
    from ivtlr_jax.data.images import decode_image
    from ivtlr_jax.models import backbone_for

    small = small_models(backbone)
    tok, cfg = small.tiny_model(corpus, vocab_size, model, vision)
    os.makedirs(out_dir, exist_ok=True)
    build = tempfile.mkdtemp(prefix=".tiny-build-", dir=out_dir)  # renamed into place when complete
    try:
        with tempfile.TemporaryDirectory() as tmp:
            params = backbone_for(cfg).random_params(seed)
            if hasattr(small, "fit_tiny"):
                params = small.fit_tiny(params, cfg, [decode_image(im) for im in images], seed)
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
    VQ tokenizer's for Chameleon); `model: {backbone: chameleon}` builds a tiny Chameleon (any backbone of
    `ivtlr_jax.models.with_small_models()`).
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
        backbone = model.pop("backbone", DEFAULT_MODEL_TYPE)
        images = rows["image"] if hasattr(small_models(backbone), "fit_tiny") else ()
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
    backbone = model.pop("backbone", DEFAULT_MODEL_TYPE)
    tok, cfg = small_models(backbone).tiny_model(_tiny_corpus(tcfg), 768, model, vision)
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

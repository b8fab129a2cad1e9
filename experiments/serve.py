"""Serve a latent-reasoning checkpoint over HTTP: OpenAI-compatible chat completions with continuous batching.

  python -m experiments.serve --ckpt CKPT [--mesh auto] [--dtype auto] [--host 127.0.0.1] [--port 8000]
      [--max-batch 16] [--max-len N]
  python -m experiments.serve            # the embedded default's final model (python -m experiments.train makes it)

Then: curl http://127.0.0.1:8000/v1/models, the `openai` client with base_url http://127.0.0.1:8000/v1, or the
page at http://127.0.0.1:8000/ (upload an image, ask, see which patches each latent step chose).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ivtlr_jax.eval.config import METHODS


def default_ckpt() -> tuple[str, int]:
    """(the embedded default's final merged model, the K it was trained with)."""
    import yaml

    from experiments.embedded_default import DEFAULT_OUT
    from experiments.tiny_setup import CONFIG_DIR

    with open(os.path.join(CONFIG_DIR, "tiny.yaml")) as f:
        values = yaml.safe_load(f)
    out = DEFAULT_OUT or "runs/tiny_default"
    return os.path.join(out, "merged", f"stage{values['max_latent_stage']}"), int(values["k"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve an IVT-LR checkpoint: POST /v1/chat/completions (OpenAI's API; stream as server-sent "
                    "events; extensions n_latent, k, method, return_selections), GET /v1/models, /health, /metrics "
                    "(Prometheus) and a page at / that shows which image patches each latent step chose. Requests "
                    "share a fixed set of decode slots (continuous batching); a greedy answer equals "
                    "IVTLRModel.generate's on the same inputs.",
        epilog="examples:\n"
               "  python -m experiments.serve                      # the embedded default's final model\n"
               "  python -m experiments.serve --ckpt ckpt/ivtlr --max-batch 32 --max-len 4096\n"
               "  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d "
               "'{\"model\": \"stage3\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"n_latent\": 0}'")
    p.add_argument("--ckpt", default=None,
                   help="converted or trained checkpoint folder (default: the embedded default's final model, "
                        "runs/tiny_default/merged/stage3, made by `python -m experiments.train`)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's own)")
    p.add_argument("--mesh", default="auto", help="device mesh preset (ivtlr_jax.sharding.PRESETS; auto: every "
                   "local device; 'none': one device)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="parameter dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=16, help="decode slots: requests generating at once")
    p.add_argument("--max-len", type=int, default=2048,
                   help="cache slots per request: prompt (in its length bucket) + latent chunks + answer tokens")
    p.add_argument("--prefill-batch", type=int, default=4,
                   help="requests prefilled together (G; at most --max-batch): queued requests of one prompt length "
                        "bucket and method share a prefill, filled up to G rows so its shape never depends on the "
                        "group")
    p.add_argument("--decode-steps", type=int, default=4,
                   help="tokens each slot advances per decode call (fewer host round trips; a finished request's "
                        "surplus tokens are dropped, and answers stream in groups of this many)")
    p.add_argument("--method", default="ivtlr", choices=list(METHODS),
                   help="default method of a request (a request's `method` overrides it)")
    p.add_argument("--n-latent", type=int, default=3, help="default latent steps of a request")
    p.add_argument("--k", type=int, default=None,
                   help="default image embeddings per latent step (default: the backbone's; with no --ckpt the "
                        "embedded default's training K)")
    p.add_argument("--max-latent", type=int, default=16, help="largest n_latent a request may ask for")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="default max_tokens of a request (default: the method's evaluation default, 64; cot 512)")
    p.add_argument("--allow-dir", default=None,
                   help="folder whose images requests may name as file:// URLs (default: none; data: URLs only)")
    p.add_argument("--served-model-name", default=None, help="the model's id in the API (default: the "
                   "checkpoint folder's name)")
    p.add_argument("--resize-mode", default="reference", choices=["reference", "native"],
                   help="image resizing, as experiments.evaluate's --resize-mode")
    p.add_argument("--warmup", default="default",
                   help="latent-step counts whose prefill programs are compiled for every length bucket before "
                        "serving (comma list; 'default': --n-latent; 'none': compile on first use)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def load(args):
    """(engine, ServeOptions) from the parsed flags; SystemExit with the fix when the checkpoint is missing."""
    from transformers import AutoTokenizer

    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.serve.app import ServeOptions
    from ivtlr_jax.serve.engine import Engine

    k = args.k
    if args.ckpt is None:
        ckpt, trained_k = default_ckpt()
        k = trained_k if k is None else k
        if not os.path.isfile(os.path.join(ckpt, "ivtlr_config.json")):
            raise SystemExit(f"error: no --ckpt given and the embedded default's final model {ckpt} is not there yet; "
                             "make it with `python -m experiments.train` (the tiny default: a few minutes on a "
                             "CPU), or pass --ckpt CKPT")
    else:
        ckpt = args.ckpt
        if not os.path.isdir(ckpt):
            raise SystemExit(f"error: --ckpt {ckpt!r} is not a folder; convert a checkpoint with "
                             "tools/convert_weights.py or train one with experiments.train")
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-len", args.max_len, 32),
                             ("--prefill-batch", args.prefill_batch, 1), ("--decode-steps", args.decode_steps, 1),
                             ("--n-latent", args.n_latent, 0), ("--max-latent", args.max_latent, 0)):
        if value < low:
            raise SystemExit(f"error: {flag} must be >= {low}, got {value}")
    if args.allow_dir is not None and not os.path.isdir(args.allow_dir):
        raise SystemExit(f"error: --allow-dir {args.allow_dir!r} is not a folder")
    model = IVTLRModel.from_pretrained(ckpt, dtype=args.dtype, mesh=None if args.mesh == "none" else args.mesh)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or ckpt)
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len, prefill_batch=args.prefill_batch,
                    decode_steps=args.decode_steps)
    name = args.served_model_name or os.path.basename(os.path.normpath(ckpt))
    opts = ServeOptions(model_name=name, allow_dir=args.allow_dir, method=args.method, n_latent=args.n_latent,
                        k=k, max_latent=args.max_latent, max_tokens=args.max_tokens, resize_mode=args.resize_mode)
    return engine, opts


def warm(engine, opts, spec: str) -> int:
    """Compile the programs `--warmup` names; returns how many exist."""
    from types import SimpleNamespace

    from ivtlr_jax.eval.config import method_settings

    if spec == "none":
        return 0
    counts = [opts.n_latent] if spec == "default" else [int(x) for x in spec.split(",") if x.strip()]
    methods = []
    for n in counts:
        if n == 0:
            methods.append((0, engine.model.latent_config(k=opts.k)))
            continue
        n, k, latent_text = method_settings(SimpleNamespace(method=opts.method, n_latent=n, k=opts.k))
        methods.append((n, engine.model.latent_config(k=k, latent_text=latent_text)))
    from ivtlr_jax.serve.prompt import shortest_prompt

    shortest = shortest_prompt(engine.tok, engine.bb, engine.bb.image_options(opts.resize_mode))
    return engine.warmup(methods, min_prompt=shortest)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from ivtlr_jax.serve.app import create_app

    engine, opts = load(args)
    t0 = time.perf_counter()
    programs = warm(engine, opts, args.warmup)
    print(f"model {opts.model_name!r} ({engine.bb.model_type}, {engine.model.dtype}); {engine.max_batch} slots of "
          f"{engine.max_len}; {programs} programs compiled in {time.perf_counter() - t0:.1f} s; "
          f"serving on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, opts), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()

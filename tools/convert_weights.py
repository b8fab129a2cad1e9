"""Convert Qwen2-VL weights between a Hugging Face folder and an ivtlr_jax checkpoint folder.

  python tools/convert_weights.py --src HF_DIR --dst CKPT_DIR [--dtype float32|bfloat16] [--add-latent-tokens]
  python tools/convert_weights.py --to-hf --src CKPT_DIR --dst HF_DIR
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import ivtlr_jax  # noqa: F401
except ImportError:  # run as a script from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Hugging Face Qwen2-VL (safetensors, single or sharded, old hub or transformers-5 key layout) "
            "-> self-contained ivtlr_jax checkpoint folder (orbax params/, ivtlr_config.json, hf_config.json, "
            "tokenizer and processor files); with --to-hf the reverse."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python tools/convert_weights.py --src Qwen2-VL-2B-Instruct --dst ckpt/qwen2vl2b --add-latent-tokens\n"
            "  python tools/convert_weights.py --to-hf --src ckpt/qwen2vl2b --dst export/qwen2vl2b\n"
            "  python tools/convert_weights.py --merge-lora runs/m3cot/stage_ends/3 --dst ckpt/ivtlr-m3cot"
        ),
    )
    parser.add_argument("--src",
                        help="source folder: a Hugging Face model folder (config.json + *.safetensors), "
                             "or with --to-hf an ivtlr_jax checkpoint folder; with --merge-lora an optional "
                             "base checkpoint (default: the run's --init)")
    parser.add_argument("--dst", required=True,
                        help="destination folder: the ivtlr_jax checkpoint, or with --to-hf the Hugging Face folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the stored parameters (default: float32; ignored with --to-hf, "
                             "which keeps the checkpoint's dtype)")
    parser.add_argument("--add-latent-tokens", action="store_true",
                        help="add <|start-latent|>, <|end-latent|>, <|latent|> to the tokenizer saved in --dst and "
                             "grow the embedding (and untied head) with rows initialised from the token '<<'")
    parser.add_argument("--to-hf", action="store_true",
                        help="export an ivtlr_jax checkpoint (--src) to a Hugging Face folder (--dst) that "
                             "Qwen2VLForConditionalGeneration.from_pretrained loads")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="with --to-hf: largest safetensors file in GiB before sharding with an index (default 5)")
    parser.add_argument("--merge-lora", metavar="RUN_DIR/CKPT",
                        help="a training checkpoint (RUN_DIR/checkpoints/<step> or RUN_DIR/stage_ends/<stage>): "
                             "fold its LoRA adapters (or trained LLM) into the base weights and write a full "
                             "checkpoint to --dst that IVTLRModel.from_pretrained loads and --to-hf exports")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint or weights already in --dst")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from ivtlr_jax.convert import convert_hf_to_checkpoint, export_checkpoint_to_hf

    if args.merge_lora:
        from ivtlr_jax.train.export import export_trained_checkpoint

        return export_trained_checkpoint(args.merge_lora, args.dst, base=args.src, overwrite=args.overwrite,
                                         verbose=not args.quiet)
    if args.src is None:
        raise SystemExit("--src is required (a Hugging Face folder, or with --to-hf a checkpoint folder)")
    if args.to_hf:
        if args.add_latent_tokens:
            raise SystemExit("--add-latent-tokens applies to HF -> ivtlr_jax only; convert first, then --to-hf")
        return export_checkpoint_to_hf(args.src, args.dst, max_shard_bytes=int(args.max_shard_gb * 2**30),
                                       overwrite=args.overwrite, verbose=not args.quiet)
    return convert_hf_to_checkpoint(args.src, args.dst, dtype=args.dtype, add_latent_tokens=args.add_latent_tokens,
                                    overwrite=args.overwrite, verbose=not args.quiet)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

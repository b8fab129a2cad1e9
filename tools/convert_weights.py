"""Convert weights between a Hugging Face folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Chameleon) and an ivtlr_jax checkpoint
folder,
or import the authors' released IVT-LR checkpoint.

  python tools/convert_weights.py --src HF_DIR --dst CKPT_DIR [--dtype float32|bfloat16] [--add-latent-tokens]
  python tools/convert_weights.py --to-hf --src CKPT_DIR --dst HF_DIR
  python tools/convert_weights.py --merge-lora RUN_DIR/stage_ends/<stage> --dst CKPT_DIR   (no optimiser state read)
  python tools/convert_weights.py --from-release FILE.pth --base HF_BASE_DIR --dst CKPT_DIR [--keep-lora]
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
            "Hugging Face Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Chameleon (safetensors, single or sharded, old hub or "
            "transformers-5 key layout) -> self-contained ivtlr_jax checkpoint folder (orbax params/, "
            "ivtlr_config.json, hf_config.json, tokenizer and processor files); with --to-hf the reverse; with "
            "--from-release the authors' trained IVT-LR state dict (.pth or safetensors, PEFT LoRA merged or kept)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python tools/convert_weights.py --src Qwen2-VL-2B-Instruct --dst ckpt/qwen2vl2b --add-latent-tokens\n"
            "  python tools/convert_weights.py --to-hf --src ckpt/qwen2vl2b --dst export/qwen2vl2b\n"
            "  python tools/convert_weights.py --merge-lora runs/m3cot/stage_ends/3 --dst ckpt/ivtlr-m3cot\n"
            "  python tools/convert_weights.py --from-release epoch_16_full_model_fp32.pth --base Qwen2-VL-7B-Instruct "
            "--dst ckpt/ivtlr-release --dtype bfloat16"
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
                             "transformers loads (Qwen2VLForConditionalGeneration, "
                             "Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration or "
                             "ChameleonForConditionalGeneration)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="with --to-hf: largest safetensors file in GiB before sharding with an index (default 5)")
    parser.add_argument("--merge-lora", metavar="RUN_DIR/CKPT",
                        help="a training checkpoint (RUN_DIR/checkpoints/<step> or RUN_DIR/stage_ends/<stage>): "
                             "fold its LoRA adapters (or trained LLM) into the base weights and write a full "
                             "checkpoint to --dst that IVTLRModel.from_pretrained loads and --to-hf exports")
    release = parser.add_argument_group("the authors' release (--from-release)")
    release.add_argument("--from-release", metavar="FILE",
                         help="the authors' trained state dict (epoch_N_full_model_fp32.pth, read with "
                              "torch.load(weights_only=True, mmap=True); needs the extra ivtlr_jax[torch]) or a "
                              "safetensors file holding the same dict; keys with or without `module.`, transformers "
                              "4.51 or >= 4.52 names")
    release.add_argument("--base", metavar="HF_BASE_DIR",
                         help="with --from-release: the Hugging Face folder of the model it was trained from "
                              "(config.json, tokenizer, processor files; its weights are not read)")
    release.add_argument("--keep-lora", action="store_true",
                         help="with --from-release: keep the base weights unmerged and write the adapters as a LoRA "
                              "training state (python -m experiments.train --init CKPT --finetune lora continues "
                              "them); IVTLRModel.from_pretrained folds them in on load")
    release.add_argument("--lora-alpha", type=float, default=16.0,
                         help="with --from-release: LoRA alpha (scale = alpha / r, r read from the file; default 16, "
                              "the release's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint or weights already in --dst")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from ivtlr_jax.convert import convert_hf_to_checkpoint, export_checkpoint_to_hf

    if args.from_release:
        from ivtlr_jax.convert import convert_release_to_checkpoint

        clash = [flag for flag, on in (("--src", args.src), ("--to-hf", args.to_hf), ("--merge-lora", args.merge_lora),
                                       ("--add-latent-tokens", args.add_latent_tokens)) if on]
        if clash:
            raise SystemExit(f"--from-release takes --base and --dst, not {', '.join(clash)} (the latent tokens are "
                             "added from the base tokenizer anyway)")
        if not args.base:
            raise SystemExit("--from-release needs --base HF_BASE_DIR: the Hugging Face folder of the model the "
                             "release was trained from (Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B-Instruct, chameleon-7b)")
        return convert_release_to_checkpoint(args.from_release, args.base, args.dst, dtype=args.dtype,
                                             keep_lora=args.keep_lora, lora_alpha=args.lora_alpha,
                                             overwrite=args.overwrite, verbose=not args.quiet)
    if args.base or args.keep_lora:
        raise SystemExit("--base and --keep-lora go with --from-release FILE")
    if args.merge_lora:
        from ivtlr_jax.convert import export_run_checkpoint

        return export_run_checkpoint(args.merge_lora, args.dst, base=args.src, overwrite=args.overwrite,
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

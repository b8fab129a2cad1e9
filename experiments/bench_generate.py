"""Generation speed: IVT-LR against No-CoT, against reference-style PyTorch generation, and over batch sizes.

Small Qwen2-VL (hidden 512, 8 layers, vision 4 blocks of width 256) with random weights built by
transformers, saved and converted by ivtlr_jax.convert; `--backbone qwen2_5_vl` the same LLM with a windowed
vision tower, `--backbone chameleon` the same LLM shape with a small VQ tokenizer (experiments/small_model.py).
One prompt = text + one 280x280 image (100 image tokens) + text; n=3 latent steps of k=32; a fixed number of
new tokens (EOS never stops a row).

  (a) IVT-LR generation / No-CoT generation of the same number of answer tokens   goal <= 1.3
  (b) reference-style PyTorch at batch 1 / ours at batch 1                          goal >= 4 (CPU)
      (every latent step re-runs the whole sequence with eager attention and its attention maps, the
      first answer token is a full pass without the latent cache, then HF cached decoding)
  (c) our samples/s at batch 1, 8, 32 against the reference's (batch 1 only)         goal >= 10 at 32

Usage: python -m experiments.bench_generate [--backbone B] [--batch-sizes 1,8,32] [--new-tokens 12] [--out bench.json]
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file (python experiments/bench_x.py): make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import inspect
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch


from experiments.small_model import BENCH_CHOICES, bench_backbone  # noqa: E402
from ivtlr_jax.models import DEFAULT_MODEL_TYPE, small_models  # noqa: E402

IMAGE_GRID = (1, 20, 20)  # 280x280 pixels: 400 patches, 100 image tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_generate",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backbone", default=DEFAULT_MODEL_TYPE, choices=BENCH_CHOICES,
                   help="whose small model (ivtlr_jax.models.small_models): qwen2_vl or qwen2_5_vl (windowed vision "
                        "tower; one 280x280 image, 100 tokens) or chameleon (one 64x64 image through a small VQ "
                        "tokenizer, 1024 tokens; k defaults to 64)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default: 1,8,32)")
    p.add_argument("--new-tokens", type=int, default=12, help="answer tokens generated per row (default: 12)")
    p.add_argument("--n-latent", type=int, default=3, help="latent steps (default: 3)")
    p.add_argument("--k", type=int, default=None,
                   help="image embeddings per latent step (default: the backbone's, 32; chameleon 64)")
    p.add_argument("--hidden", type=int, default=512, help="LLM hidden size (default: 512)")
    p.add_argument("--layers", type=int, default=8, help="LLM layers (default: 8)")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary size (default: 16384)")
    p.add_argument("--text-tokens", type=int, default=60, help="text tokens around the image (default: 60)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds per batch size, calls interleaved; the median counts (default: 3)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    p.add_argument("--torch-device", default=None, help="device for the PyTorch reference (default: cuda if "
                                                          "available, else cpu)")
    p.add_argument("--out", default=None,
                   help="JSON results (default: bench_generate.json; bench_generate_BACKBONE.json for the others)")
    return p


def build_models(args, root: str):
    """The backbone's small random HF model, saved + converted (experiments.small_model); returns (hf eager,
    hf sdpa, IVTLRModel that knows <|latent|>, torch device)."""
    import torch

    hf_e, m = bench_backbone(args.backbone).models(root, attn="eager", vocab=args.vocab, hidden=args.hidden,
                                                   layers=args.layers, dtype=args.dtype)
    tdtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    dev = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    load = type(hf_e).from_pretrained
    models = [load(os.path.join(root, "hf"), attn_implementation=impl, dtype=tdtype).eval().to(dev)
              for impl in ("eager", "sdpa")]
    return models[0], models[1], m, dev


def make_batch(cfg, batch: int, n: int, text_tokens: int, seed: int = 0):
    """Same-length prompts (random text, one image each) ending with n latent tokens; pixel values, grid (the
    backbone's `generation_prompts`)."""
    return small_models(cfg.model_type).generation_prompts(cfg, batch, n, text_tokens, seed)


def _cache_kwarg(lm) -> str:
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def reference_generate(hf_eager, hf_sdpa, ids, pv, grid, latent_id: int, k: int, new_tokens: int, dev: str,
                       backbone: str):
    """Reference-style IVT-LR generation at batch 1 (the release's inference, written fairly in PyTorch).

    Each latent step re-runs the whole growing sequence from position 0 with eager attention and all
    attention maps; the first answer token is one more full pass (no cache from the latent steps); the
    rest is HF cached decoding. Returns the generated ids (new_tokens,).
    """
    import torch

    lm_e, lm_s, image_features, model_positions, head = small_models(backbone).hf_reference(hf_eager, hf_sdpa)
    cache_kw = _cache_kwarg(lm_s)
    with torch.no_grad():
        ids_t = torch.as_tensor(ids, device=dev).long()
        n = int((ids_t[0] == latent_id).sum())
        p = ids.shape[1] - n
        emb = hf_eager.model.get_input_embeddings()(ids_t[:, :p])
        got = image_features(pv, grid, emb.dtype, dev)
        # (features, DeepStack features per layer) from a backbone with DeepStack (Qwen3-VL)
        feats, deep = got if isinstance(got, tuple) else (got, None)
        img = ids_t[:, :p] == hf_eager.config.image_token_id
        emb = emb.masked_scatter(img.unsqueeze(-1).expand_as(emb), feats.to(emb.dtype))
        image_pos = torch.nonzero(img[0])[:, 0]
        used = torch.zeros(len(image_pos), dtype=torch.bool, device=dev)
        seq = emb
        places = [(int(at), j) for j, at in enumerate(image_pos.tolist())]  # (sequence index, image token)

        def deepstack(length):
            """Qwen3-VL: DeepStack features at the prompt's image tokens and at every re-fed one."""
            if deep is None:
                return {}
            order = sorted(places)
            mask = torch.zeros(1, length, dtype=torch.bool, device=dev)
            mask[0, [at for at, _ in order]] = True
            return {"visual_pos_masks": mask, "deepstack_visual_embeds": [f[[j for _, j in order]] for f in deep]}

        def positions(length, start=0):
            return model_positions((torch.arange(length, device=dev) + start).view(1, 1, -1))

        for _ in range(n):
            out = lm_e(inputs_embeds=seq, position_ids=positions(seq.shape[1]), output_attentions=True,
                       **deepstack(seq.shape[1]))
            attn = torch.stack(out.attentions).float().mean((0, 2))[0, -1]  # (L,) layers and heads averaged
            scores = attn[image_pos].masked_fill(used, -float("inf"))
            pick = torch.sort(torch.topk(scores, k).indices).values
            used[pick] = True
            places += [(seq.shape[1] + i, int(j)) for i, j in enumerate(pick.tolist())]
            seq = torch.cat([seq, emb[:, image_pos[pick]], out.last_hidden_state[:, -1:]], 1)
        out = lm_s(inputs_embeds=seq, position_ids=positions(seq.shape[1]), use_cache=True,
                   **deepstack(seq.shape[1]))
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        tok = head(out.last_hidden_state[:, -1]).argmax(-1)
        generated = [tok]
        length = seq.shape[1]
        for t in range(new_tokens - 1):
            e = hf_sdpa.model.get_input_embeddings()(tok[:, None])
            out = lm_s(inputs_embeds=e, position_ids=positions(1, length + t), use_cache=True, **{cache_kw: cache})
            cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
            tok = head(out.last_hidden_state[:, -1]).argmax(-1)
            generated.append(tok)
        return torch.cat(generated).cpu().numpy()


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import jax
    import torch

    from experiments.small_model import timeit_interleaved

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    t_start = time.perf_counter()
    if args.k is None:
        args.k = bench_backbone(args.backbone).default_k
    if args.out is None:
        args.out = ("bench_generate.json" if args.backbone == DEFAULT_MODEL_TYPE else
                    f"bench_generate_{args.backbone}.json")
    with tempfile.TemporaryDirectory() as root:
        hf_e, hf_s, m, dev = build_models(args, root)
    cfg = m.config
    gen_kw = dict(max_new_tokens=args.new_tokens, k=args.k, eos_token_ids=[-1])  # no EOS: fixed length
    results: dict = {"ours": {}, "ours_no_cot": {}}

    def ours(batch, n):
        ids, mask, pv, grid = make_batch(cfg, batch, n, args.text_tokens)
        return lambda: m.generate(ids, mask, pv, grid, **gen_kw)

    # The reference runs first, on its own: interleaved right after XLA's CPU work, PyTorch's threads
    # compete with XLA's still-spinning pool on a small machine and the reference looks far slower than it is.
    ids, mask, pv, grid = make_batch(cfg, 1, args.n_latent, args.text_tokens)
    ref = lambda: reference_generate(hf_e, hf_s, ids, pv, grid, cfg.latent_token_id, args.k, args.new_tokens, dev,
                                     args.backbone)
    stats, last = timeit_interleaved({"reference": ref}, args.repeats)
    first, ref_s, best, ref_tokens = (stats["reference"]["first_s"], stats["reference"]["median_s"],
                                      stats["reference"]["min_s"], last["reference"])
    results["reference"] = {"batch": 1, "seconds": ref_s, "best_seconds": best, "samples_per_s": 1 / ref_s}
    print(f"{'reference':<12} batch   1: median {ref_s:.4f} s, best {best:.4f} s ({1 / ref_s:.2f} samples/s); "
          f"first call {first:.1f} s", flush=True)
    for b in batch_sizes:
        fns = {"ours": ours(b, args.n_latent)}
        if b in (batch_sizes[0], max(batch_sizes)):
            fns["ours_no_cot"] = ours(b, 0)
        stats, last = timeit_interleaved(fns, args.repeats)
        for name, st in stats.items():
            first, med, best, res = st["first_s"], st["median_s"], st["min_s"], last[name]
            assert res.tokens.shape == (b, args.new_tokens) and (res.lengths == args.new_tokens).all()
            results[name][b] = {"seconds": med, "best_seconds": best, "first_call_seconds": first,
                                "samples_per_s": b / med}
            print(f"{name:<12} batch {b:>3}: median {med:.4f} s, best {best:.4f} s ({b / med:.2f} samples/s); "
                  f"first call {first:.1f} s", flush=True)
    ours_tokens = m.generate(ids, mask, pv, grid, **gen_kw).tokens[0]

    b1, bmax = batch_sizes[0], max(batch_sizes)
    summary = {
        "config": {**vars(args), "image_grid": IMAGE_GRID, "prompt_tokens": int(ids.shape[1] - args.n_latent),
                   "final_prompt_tokens": int(ids.shape[1] - args.n_latent + args.n_latent * (args.k + 1))},
        "device": {"jax": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}", "torch": dev,
                   "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "jax_version": jax.__version__,
                   "torch_version": torch.__version__},
        "ours": results["ours"], "ours_no_cot": results["ours_no_cot"],
        "reference": results["reference"],
        "tokens_match_reference": bool((ours_tokens == ref_tokens).all()),
        "a_ivtlr_over_no_cot": {str(b): results["ours"][b]["seconds"] / results["ours_no_cot"][b]["seconds"]
                                for b in results["ours_no_cot"]},
        "b_reference_over_ours_batch1": ref_s / results["ours"][b1]["seconds"] if b1 == 1 else None,
        "c_samples_per_s_over_reference": {str(b): results["ours"][b]["samples_per_s"] * ref_s
                                           for b in results["ours"]},
        "goals": {"a": "<= 1.3", "b": ">= 4 at batch 1 (CPU)", "c": f">= 10 at batch {bmax}"},
        "total_seconds": time.perf_counter() - t_start,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print()
    print(f"| measurement | value | goal |  (jax {summary['device']['jax']}, torch {dev})")
    print("|---|---|---|")
    for b, r in summary["a_ivtlr_over_no_cot"].items():
        print(f"| (a) IVT-LR / No-CoT time, batch {b} | {r:.2f} | <= 1.3 |")
    if summary["b_reference_over_ours_batch1"] is not None:
        print(f"| (b) reference / ours, batch 1 | {summary['b_reference_over_ours_batch1']:.2f}x | >= 4x |")
    for b, r in summary["c_samples_per_s_over_reference"].items():
        print(f"| (c) samples/s, batch {b}: {results['ours'][int(b)]['samples_per_s']:.2f} vs reference "
              f"{1 / ref_s:.2f} | {r:.2f}x | >= 10x at {bmax} |")
    print(f"| greedy tokens equal to the reference's | {summary['tokens_match_reference']} | True |")
    print(f"wrote {args.out} ({summary['total_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")

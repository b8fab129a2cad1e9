"""Peak host memory of the HF -> ivtlr_jax conversion on a random Qwen2-VL-2B-shaped checkpoint.

Makes the checkpoint with transformers (model built on the meta device for names, shapes and config;
random bfloat16 data streamed into sharded safetensors), converts it in a fresh subprocess per dtype
(and optionally exports it back with --to-hf), and reports peak RSS next to the output size and the
largest tensor. JSON goes to --out.

With --release it measures `--from-release` instead: a random 2B-shaped file in the authors' release
format (`base_causallm.base_model.model.*`, PEFT LoRA r=64 in float32 on q,k,v,o,gate,up,down, frozen
weights bf16, the `embedding.weight` alias, vocabulary len(tokenizer) = 151,660) and a base folder
(config + a 151,657-token tokenizer), as .pth and/or safetensors, merged and/or --keep-lora.

  python experiments/bench_convert_memory.py [--export] [--out RESULT.json]
  python experiments/bench_convert_memory.py --release [--formats pth,safetensors] [--keep-lora]
"""

from __future__ import annotations

import os as _os
import sys as _sys

if __package__ in (None, ""):  # run as a file (python experiments/bench_x.py): make the repository importable
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Qwen2-VL-2B: text 1536 x 28 layers, vocab 151936, tied head; vision 32 blocks of 1280.
TEXT_2B = {
    "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    "bos_token_id": 151643, "eos_token_id": 151645,
}
VISION_2B = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}

# Runs in the child: imports, conversion, peak RSS from the kernel (VmHWM) before and after.
CHILD = r"""
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
mode, src, dst, dtype = sys.argv[1:5]
from ivtlr_jax.convert import convert_hf_to_checkpoint, convert_release_to_checkpoint, export_checkpoint_to_hf
import orbax.checkpoint, jax  # noqa: F401  (counted in the import baseline)
if mode.startswith("release"):
    import torch, transformers  # noqa: F401  (counted in the import baseline)
base = hwm()
t = time.time()
if mode == "to_jax":
    summary = convert_hf_to_checkpoint(src, dst, dtype=dtype, verbose=False)
elif mode.startswith("release"):
    release, base_dir = src.split("::")
    summary = convert_release_to_checkpoint(release, base_dir, dst, dtype=dtype, keep_lora=mode == "release_keep",
                                            verbose=False)
else:
    summary = export_checkpoint_to_hf(src, dst, verbose=False)
print(json.dumps({"import_peak_rss": base, "peak_rss": hwm(), "seconds": time.time() - t,
                  "output_bytes": summary["bytes"] + summary.get("lora_bytes", 0),
                  "largest_tensor_bytes": summary.get("largest_tensor_bytes")}))
"""


def make_checkpoint(folder: str, seed: int = 0, max_shard_bytes: int = 2 * 2**30) -> dict:
    """A random bf16 Qwen2-VL-2B-shaped HF folder: config from transformers, tensors streamed to disk."""
    import ml_dtypes
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from ivtlr_jax.convert.safetensors_io import TensorSpec, write_sharded

    cfg = Qwen2VLConfig(text_config=TEXT_2B, vision_config=VISION_2B, tie_word_embeddings=True,
                        bos_token_id=151643, eos_token_id=151645)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    os.makedirs(folder, exist_ok=True)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(folder)
    rng = np.random.default_rng(seed)

    def produce(name):
        return (rng.standard_normal(shapes[name], dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    specs = [TensorSpec(k, np.dtype(ml_dtypes.bfloat16), s) for k, s in shapes.items()]
    write_sharded(folder, specs, produce, max_shard_bytes)
    return {
        "tensors": len(specs),
        "parameters": int(sum(int(np.prod(s)) for s in shapes.values())),
        "bytes": int(sum(s.nbytes for s in specs)),
        "largest_tensor_bytes": int(max(s.nbytes for s in specs)),
    }


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def make_base_folder(folder: str) -> int:
    """config.json of the 2B model (hub vocabulary 151,936) and a 151,657-token tokenizer (as Qwen2-VL's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig

    cfg = Qwen2VLConfig(text_config=TEXT_2B, vision_config=VISION_2B, tie_word_embeddings=True,
                        bos_token_id=151643, eos_token_id=151645, image_token_id=151655, video_token_id=151656,
                        vision_start_token_id=151652, vision_end_token_id=151653)
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(151643)}
    del vocab["t2442"]
    vocab["<<"] = 2442
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(QWEN_SPECIALS, special_tokens=True)
    tok.save_pretrained(folder)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655, tok.convert_tokens_to_ids("<|image_pad|>")
    return len(tok)


def make_release(path: str, n_tok: int, fmt: str, seed: int = 0, rank: int = 64) -> dict:
    """A random 2B-shaped state dict in the release's layout (4.51 names), saved as .pth or safetensors."""
    import ml_dtypes
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vocab = n_tok + 3  # the three latent tokens: resize_token_embeddings(len(tokenizer))
    cfg = Qwen2VLConfig(text_config={**TEXT_2B, "vocab_size": vocab}, vision_config=VISION_2B,
                        tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    rng = np.random.default_rng(seed)
    prefix = "base_causallm.base_model.model."
    sd, embed = {}, None

    def bf16(shape):
        return torch.from_numpy((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                                .view(np.int16)).view(torch.bfloat16)

    for name, t in model.state_dict().items():
        old = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        shape = tuple(t.shape)
        module, leaf = old.rsplit(".", 1)
        if name == "lm_head.weight":
            continue  # tied: the same tensor as the embedding, added below
        if module.rsplit(".", 1)[-1] in LORA_TARGETS:
            sd[f"{prefix}{module}.base_layer.{leaf}"] = bf16(shape)
            if leaf == "weight":
                out_dim, in_dim = shape
                sd[f"{prefix}{module}.lora_A.default.weight"] = torch.from_numpy(
                    rng.standard_normal((rank, in_dim), dtype=np.float32) * in_dim**-0.5)
                sd[f"{prefix}{module}.lora_B.default.weight"] = torch.from_numpy(
                    rng.standard_normal((out_dim, rank), dtype=np.float32) * 0.01)
        else:
            sd[prefix + old] = bf16(shape)
            if old == "model.embed_tokens.weight":
                embed = sd[prefix + old]
    sd[prefix + "lm_head.weight"] = embed  # a tied model's state dict lists the head too
    sd["embedding.weight"] = embed  # the wrapper's alias
    if fmt == "safetensors":
        from safetensors.torch import save_file

        # safetensors stores no shared tensors: the alias and the tied head become copies
        save_file({k: v.clone() if v is embed and not k.endswith("embed_tokens.weight") else v
                   for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return {"file_bytes": os.path.getsize(path), "tensors": len(sd), "vocab": vocab,
            "largest_tensor_bytes": int(max(v.numel() * v.element_size() for v in sd.values()))}


def run_child(mode: str, src: str, dst: str, dtype: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", CHILD, mode, src, dst, dtype], env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(r: dict) -> dict:
    """Add the ratios to one run and print it."""
    r["peak_over_output_plus_largest"] = round(r["peak_rss"] / (r["output_bytes"] + r["largest_tensor_bytes"]), 3)
    r["peak_minus_import"] = r["peak_rss"] - r["import_peak_rss"]
    r["peak_minus_import_over_output_plus_largest"] = round(
        r["peak_minus_import"] / (r["output_bytes"] + r["largest_tensor_bytes"]), 3)
    gib = {k: round(r[k] / 2**30, 2) for k in ("output_bytes", "largest_tensor_bytes", "peak_rss", "import_peak_rss")}
    print(f"{r['mode']} {r['dtype']}: {gib} GiB, {r['seconds']:.0f} s", flush=True)
    return r


def bench_release(work: str, args) -> dict:
    """--from-release on a 2B-shaped random release file, per format, dtype and merged / --keep-lora."""
    base = os.path.join(work, "base")
    result = {"shape": {"text": TEXT_2B, "vision": VISION_2B, "tie_word_embeddings": True, "lora_r": 64},
              "runs": []}
    n_tok = make_base_folder(base)
    result["base_tokenizer_len"] = n_tok
    for fmt in args.formats.split(","):
        path = os.path.join(work, f"release.{'pth' if fmt == 'pth' else 'safetensors'}")
        t = time.time()
        result[f"release_{fmt}"] = {**make_release(path, n_tok, fmt), "seconds": round(time.time() - t, 1)}
        print(f"release {fmt}: {json.dumps(result[f'release_{fmt}'])}", flush=True)
        for dtype in args.dtypes.split(","):
            for keep in ((False, True) if args.keep_lora else (False,)):
                dst = os.path.join(work, f"ckpt_{fmt}_{dtype}_{keep}")
                mode = "release_keep" if keep else "release"
                run = {"mode": f"{mode}_{fmt}", "dtype": dtype, **run_child(mode, f"{path}::{base}", dst, dtype)}
                result["runs"].append(report(run))
                shutil.rmtree(dst)
        os.remove(path)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new folder in /tmp)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated target dtypes")
    parser.add_argument("--export", action="store_true", help="also measure --to-hf on the bfloat16 checkpoint")
    parser.add_argument("--release", action="store_true",
                        help="measure --from-release on a 2B-shaped file in the authors' release format instead")
    parser.add_argument("--formats", default="pth", help="with --release: comma-separated pth, safetensors")
    parser.add_argument("--keep-lora", action="store_true", help="with --release: also measure --keep-lora")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_convert_memory.json"),
                        help="where to write the JSON result (default: %(default)s)")
    args = parser.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_", dir="/tmp")
    src = os.path.join(work, "hf")
    result = {"shape": {"text": TEXT_2B, "vision": VISION_2B, "tie_word_embeddings": True}, "runs": []}
    try:
        if args.release:
            result = bench_release(work, args)
        else:
            t = time.time()
            result["source"] = make_checkpoint(src)
            result["source"]["seconds"] = round(time.time() - t, 1)
            print(f"source: {json.dumps(result['source'])}", flush=True)
        for dtype in ([] if args.release else args.dtypes.split(",")):
            dst = os.path.join(work, f"ckpt_{dtype}")
            runs = [{"mode": "hf_to_jax", "dtype": dtype, **run_child("to_jax", src, dst, dtype)}]
            if args.export and dtype == "bfloat16":
                out = os.path.join(work, "out")
                runs.append({"mode": "jax_to_hf", "dtype": dtype, **run_child("to_hf", dst, out, dtype),
                             "largest_tensor_bytes": result["source"]["largest_tensor_bytes"]})
                shutil.rmtree(out)
            shutil.rmtree(dst)
            result["runs"] += [report(r) for r in runs]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["runs"], indent=2))


if __name__ == "__main__":
    main()

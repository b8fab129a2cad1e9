"""Answer extraction and the evaluation CLI end to end on a tiny synthetic split."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.evaluate import extract_answer, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text,fmt,want", [
    ("Therefore, the answer is (B).", "auto", "B"),
    ("the answer is (B).", "auto", "B"),
    ("therefore, the answer is c", "auto", "C"),
    ("THE ANSWER IS d.", "auto", "D"),
    ("Answer: (C)", "auto", "C"),
    ("answer:a", "auto", "A"),
    ("Therefore, the answer is 2", "auto", "C"),  # index-trained: 0-based option index
    ("Therefore, the answer is 2", "index", "C"),
    ("Therefore, the answer is 2", "letter", None),
    ("Therefore, the answer is B", "index", None),
    ("the answer is 12 apples", "auto", "M"),
    ("the answer is 31", "auto", None),  # no such option
    ("Step one. the answer is A? No: the answer is [D]", "auto", "D"),  # the last one counts
    ("the answer is a red square, so the answer is B.", "auto", "B"),  # "a" followed by a word is an article
    ("the answer is Apple", "auto", None),
    ("I think it is blue.", "auto", None),
    ("", "auto", None),
    ("(B).", "auto", "B"),
    (" b ", "auto", "B"),
    ("Therefore, the answer is\nE", "auto", "E"),
])
def test_extract_answer(text, fmt, want):
    assert extract_answer(text, fmt) == want


def test_extract_answer_bad_format():
    with pytest.raises(ValueError, match="answer_format"):
        extract_answer("the answer is A", "roman")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny tokenizer + Qwen2-VL saved with save_pretrained, converted with and without latent tokens,
    and a synthetic split written by the synthetic CLI."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from ivtlr_jax.convert import convert_hf_to_checkpoint
    from ivtlr_jax.models.qwen2_vl.small import tiny_tokenizer as build_tiny_tokenizer

    root = tmp_path_factory.mktemp("eval")
    tok = build_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    convert_hf_to_checkpoint(str(root / "hf"), str(root / "ckpt"), "float32", True, verbose=False)
    convert_hf_to_checkpoint(str(root / "hf"), str(root / "plain"), "float32", False, verbose=False)
    subprocess.run([sys.executable, "-m", "ivtlr_jax.data.synthetic", "--out", str(root / "data"), "--n", "2",
                    "--n-eval", "6"], check=True, cwd=ROOT, capture_output=True)
    return root, tok


def _read(out):
    with open(out / "predictions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(out / "summary.json") as f:
        return rows, json.load(f)


def _common(root, out, *extra):
    return ["--ckpt", str(root / "ckpt"), "--data", "synthetic", "--data-source", str(root / "data"),
            "--split", "test", "--batch-size", "4", "--max-new-tokens", "6", "--k", "8", "--no-progress",
            "--out", str(out), *extra]


def test_cli_end_to_end(workspace):
    root, _ = workspace
    out, sel = root / "out", root / "sel"
    summary = main(_common(root, out, "--save-selections", str(sel), "--num-selections", "2"))
    for name in ("predictions.jsonl", "summary.json", "summary.md", "accuracy_by_domain.png"):
        assert (out / name).is_file(), name
    rows, saved = _read(out)
    assert len(rows) == saved["examples"] == 6  # 6 rows in two batches, the second filled up
    assert saved["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert saved["accuracy"] == summary["accuracy"]
    assert all(r["ar_steps"] == r["generated_tokens"] + 3 for r in rows)
    assert all(1 <= r["generated_tokens"] <= 6 and len(r["selected"]) == 3 for r in rows)
    assert sum(d["examples"] for d in saved["by_domain"].values()) == 6
    assert sorted(os.listdir(sel)) == sorted(f"{r['id']}.png" for r in rows[:2])
    assert "| accuracy |" in (out / "summary.md").read_text()


def test_cli_accuracy_counts_extracted_answers(workspace, monkeypatch):
    """With generation fixed to "Therefore, the answer is A", accuracy is the share of gold A rows."""
    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.generate import GenerateOutput

    root, tok = workspace
    answer = tok("Therefore, the answer is A", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def fake_generate(self, input_ids, *args, max_new_tokens=64, k=32, **kwargs):
        b = len(input_ids)
        tokens = np.full((b, max_new_tokens), tok.pad_token_id, np.int32)
        tokens[:, : len(answer)] = answer
        return GenerateOutput(tokens, np.full(b, len(answer), np.int32), np.zeros((0, b, k), np.int32), 1)

    monkeypatch.setattr(IVTLRModel, "generate", fake_generate)
    out = root / "fixed"
    main(_common(root, out, "--method", "no-cot", "--max-new-tokens", "16"))
    rows, saved = _read(out)
    assert all(r["extracted"] == "A" and r["generated"] == "Therefore, the answer is A" for r in rows)
    assert [r["correct"] for r in rows] == [r["gold"] == "A" for r in rows]
    assert saved["accuracy"] == pytest.approx(np.mean([r["gold"] == "A" for r in rows]))
    assert 0 < saved["accuracy"] < 1
    assert saved["n_latent"] == 0 and saved["mean_ar_steps"] == len(answer)


def test_cli_bad_inputs(workspace):
    root, _ = workspace
    plain = ["--ckpt", str(root / "plain"), "--data", "synthetic", "--data-source", str(root / "data"),
             "--split", "test", "--no-progress", "--out", str(root / "bad")]
    with pytest.raises(ValueError, match="--add-latent-tokens"):
        main(plain + ["--n-latent", "3"])
    out = root / "short"
    summary = main(_common(root, out, "--max-cache-len", "64"))
    assert summary["examples"] == 0 and summary["skipped_eval"] == {"too_long": 6}
    help_text = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    assert "--save-selections" in help_text and "no-latent-text" in help_text


def _cli(args, devices=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return subprocess.run([sys.executable, "-m", "experiments.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_on_a_mesh_equals_one_device(workspace):
    """--mesh tpu_v4_8 on 4 simulated devices: the same predictions as one device; the summary names the mesh and
    the parameter bytes (each device holds about a quarter)."""
    root, _ = workspace
    one, four = root / "mesh_one", root / "mesh_four"
    main(_common(root, one, "--mesh", "cpu", "--dtype", "float32"))
    proc = _cli(_common(root, four, "--mesh", "tpu_v4_8", "--dtype", "auto"), devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows_one, s_one = _read(one)
    rows_four, s_four = _read(four)
    assert [r["generated"] for r in rows_four] == [r["generated"] for r in rows_one]
    assert [r["selected"] for r in rows_four] == [r["selected"] for r in rows_one]
    assert s_four["mesh"] == "tpu_v4_8" and s_four["mesh_axes"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert s_four["dtype"] == "float32"  # auto on CPU
    assert s_one["mesh"] == "cpu" and s_one["param_peak_bytes_per_device"] == s_one["param_bytes_total"]
    assert s_four["param_bytes_total"] == s_one["param_bytes_total"]
    assert s_four["param_bytes_total"] / 4 <= s_four["param_peak_bytes_per_device"] < 0.5 * s_four["param_bytes_total"]


def test_dry_run_reports_generation_memory_per_device(workspace):
    """--dry-run --compiler cpu reads only the config (params/ is emptied here) and simulates the preset's 4 devices on
    CPU (XLA:TPU's dry run: tests/test_tpu_compile.py, the one file that holds libtpu)."""
    import shutil

    root, _ = workspace
    cfg_only = root / "config_only"
    cfg_only.mkdir()
    shutil.copy(root / "ckpt" / "ivtlr_config.json", cfg_only / "ivtlr_config.json")
    (cfg_only / "params").mkdir()
    out = root / "dry.json"
    proc = _cli(["--ckpt", str(cfg_only), "--dry-run", "--mesh", "tpu_v4_8", "--compiler", "cpu", "--batch-size", "4",
                 "--max-new-tokens", "4", "--k", "4", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generation memory per device on --mesh tpu_v4_8" in proc.stdout and "KV cache" in proc.stdout
    r = json.loads(out.read_text())
    assert r["mesh_axes"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["dtype"] == "bfloat16"  # a TPU preset
    assert 0 < r["param_bytes_per_device"] < r["param_bytes_total"] / 2
    assert r["kv_cache_bytes_per_device"] * 4 == r["kv_cache_bytes_total"]  # batch 4 over the 4 data devices
    assert r["compiler_total_bytes_per_device"] >= r["param_bytes_per_device"]
    assert r["compiler_temp_size_in_bytes"] > 0
    assert r["compiler"] == "xla:cpu" and r["topology"] is None and r["hbm_bytes_per_chip"] == 32 * 2**30
    assert r["fits"] is True and proc.stdout.splitlines()[-2].startswith("fits: ")
    bad = _cli(["--ckpt", str(cfg_only), "--dry-run", "--mesh", "tpu_v9"])
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: --mesh='tpu_v9'")

"""Hugging Face <-> ivtlr_jax conversion: key layouts, tied/untied head, shards, dtypes, latent tokens, errors."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import torch
import transformers
from stored import load_checkpoint

from ivtlr_jax.convert import (
    LATENT_TOKENS,
    check_params,
    convert_hf_to_checkpoint,
    export_checkpoint_to_hf,
    save_checkpoint,
)
from ivtlr_jax.convert.safetensors_io import SafetensorsReader
from ivtlr_jax.models import backbone_for, model_config_from_hf_dir
from ivtlr_jax.models import spec as sp
from ivtlr_jax.models.qwen2_vl import Qwen2VLConfig, VisionConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
}
VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}


# ---------------------------------------------------------------- fixtures (plain functions)
def make_hf_model(folder, tie=False, vocab=300, seed=0, dtype=None, max_shard_size=None):
    """A seeded tiny Qwen2-VL saved with save_pretrained (old hub key layout); returns its state dict."""
    cfg = transformers.Qwen2VLConfig(
        text_config={**TEXT, "vocab_size": vocab}, vision_config=VISION, tie_word_embeddings=tie,
        image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(cfg)
    with torch.no_grad():  # non-trivial norms and biases so a swapped tensor cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_new_layout(name):
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def rewrite_weights(folder, rename=None, drop=(), replace=None, add=None, shards=1):
    """Rewrite a folder's safetensors: rename / drop / replace / add tensors, split into `shards` files."""
    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(safetensors_torch.load_file(path))
        os.remove(path)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    tensors.update(replace or {})
    tensors.update(add or {})
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    names = sorted(tensors)
    if shards == 1:
        safetensors_torch.save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i::shards]}
        safetensors_torch.save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def make_tokenizer(folder, with_init_token=True):
    """A byte-level BPE tokenizer (about 270 tokens) saved into `folder`; has the token '<<' if asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["a << b << c", "the cat << sat on << mat"] if with_init_token else ["the cat sat", "on the mat"]
    tk.train_from_iterator(corpus * 20, trainer=trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def reference_params(sd, tie):
    """The expected tree written out plainly from the HF state dict (either key layout), as float32 numpy."""
    sd = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v.float().numpy()
          for k, v in sd.items()}
    depth = len({k.split(".")[2] for k in sd if k.startswith("visual.blocks.")})
    layers = len({k.split(".")[2] for k in sd if k.startswith("model.layers.")})

    def stack(fmt, n, transpose=False):
        return np.stack([sd[fmt.format(i)].T if transpose else sd[fmt.format(i)] for i in range(n)])

    def vb(name, t=False):
        return stack("visual.blocks.{}." + name, depth, t)

    def ll(name, t=False):
        return stack("model.layers.{}." + name, layers, t)

    patch = sd["visual.patch_embed.proj.weight"]
    tree = {
        "vision": {
            "patch_embed": {"kernel": patch.reshape(patch.shape[0], -1).T},
            "blocks": {
                "norm1": {"scale": vb("norm1.weight"), "bias": vb("norm1.bias")},
                "norm2": {"scale": vb("norm2.weight"), "bias": vb("norm2.bias")},
                "qkv": {"kernel": vb("attn.qkv.weight", True), "bias": vb("attn.qkv.bias")},
                "proj": {"kernel": vb("attn.proj.weight", True), "bias": vb("attn.proj.bias")},
                "fc1": {"kernel": vb("mlp.fc1.weight", True), "bias": vb("mlp.fc1.bias")},
                "fc2": {"kernel": vb("mlp.fc2.weight", True), "bias": vb("mlp.fc2.bias")},
            },
            "merger": {
                "ln_q": {"scale": sd["visual.merger.ln_q.weight"], "bias": sd["visual.merger.ln_q.bias"]},
                "fc1": {"kernel": sd["visual.merger.mlp.0.weight"].T, "bias": sd["visual.merger.mlp.0.bias"]},
                "fc2": {"kernel": sd["visual.merger.mlp.2.weight"].T, "bias": sd["visual.merger.mlp.2.bias"]},
            },
        },
        "llm": {
            "embed": sd["model.embed_tokens.weight"],
            "layers": {
                "input_norm": ll("input_layernorm.weight"),
                "post_attn_norm": ll("post_attention_layernorm.weight"),
                **{n: {"kernel": ll(f"self_attn.{n}_proj.weight", True), "bias": ll(f"self_attn.{n}_proj.bias")}
                   for n in "qkv"},
                "o": {"kernel": ll("self_attn.o_proj.weight", True)},
                **{n: {"kernel": ll(f"mlp.{n}_proj.weight", True)} for n in ("gate", "up", "down")},
            },
            "norm": sd["model.norm.weight"],
        },
    }
    if not tie:
        tree["llm"]["lm_head"] = sd["lm_head.weight"].T
    return tree


def flat(tree, prefix=""):
    if not isinstance(tree, dict):  # the typed params tree
        return sp.flatten(tree)
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def assert_trees_equal(got, want):
    got, want = flat(got), flat(want)  # same "llm/layers/q/kernel" names for typed trees and nested dicts
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), err_msg=k)


def assert_hf_loads_equal(folder, sd, dtype=torch.float32):
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    got = model.state_dict()
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v.to(dtype)), k
    return model


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "layout,tie,shards",
    [("old", False, 1), ("new", False, 3), ("new", True, 1), ("old", True, "save_pretrained")],
)
def test_convert_layouts_tied_sharded(tmp_path, layout, tie, shards):
    src, dst = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    sd = make_hf_model(src, tie=tie, max_shard_size="100KB" if shards == "save_pretrained" else None)
    if shards == "save_pretrained":
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    else:
        rewrite_weights(src, rename=to_new_layout if layout == "new" else None, shards=shards)
    summary = convert_hf_to_checkpoint(src, dst, verbose=False)
    cfg, params = load_checkpoint(dst)
    assert cfg.tie_word_embeddings == tie
    assert_trees_equal(params, reference_params(sd, tie))
    assert all(v.dtype == np.float32 for v in flat(params).values())
    assert summary["tensors"] == len(SafetensorsReader(src).keys())
    assert summary["parameters"] == sum(v.size for v in flat(params).values())
    assert summary["bytes"] == 4 * summary["parameters"]
    assert Qwen2VLConfig.load(os.path.join(dst, "ivtlr_config.json")) == cfg
    with open(os.path.join(dst, "hf_config.json")) as f, open(os.path.join(src, "config.json")) as g:
        assert json.load(f)["text_config"] == json.load(g)["text_config"]
    assert os.path.exists(os.path.join(dst, "generation_config.json"))


def test_untied_without_lm_head_uses_embedding(tmp_path):
    src, dst = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    sd = make_hf_model(src, tie=False)
    rewrite_weights(src, drop=("lm_head.weight",))
    summary = convert_hf_to_checkpoint(src, dst, verbose=False)
    _, params = load_checkpoint(dst)
    assert summary["lm_head_from_embedding"]
    np.testing.assert_array_equal(params.llm.lm_head, sd["model.language_model.embed_tokens.weight"].numpy().T)


def test_bfloat16(tmp_path):
    # float32 source -> bfloat16 checkpoint: round to nearest even, as torch does.
    src, dst = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    sd = make_hf_model(src)
    convert_hf_to_checkpoint(src, dst, dtype="bfloat16", verbose=False)
    _, params = load_checkpoint(dst)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flat(params).values())
    assert_trees_equal(params, reference_params({k: v.to(torch.bfloat16) for k, v in sd.items()}, False))
    _, as_f32 = load_checkpoint(dst, dtype="float32")
    assert all(v.dtype == np.float32 for v in flat(as_f32).values())
    # bfloat16 source (BF16 in the safetensors) -> float32 checkpoint is exact; export keeps bfloat16.
    src16, dst16, out16 = str(tmp_path / "hf16"), str(tmp_path / "ckpt16"), str(tmp_path / "out16")
    sd16 = make_hf_model(src16, tie=True, dtype=torch.bfloat16)
    convert_hf_to_checkpoint(src16, dst16, dtype="bfloat16", verbose=False)
    _, params16 = load_checkpoint(dst16)
    assert_trees_equal(params16, reference_params(sd16, True))
    export_checkpoint_to_hf(dst16, out16, verbose=False)
    assert SafetensorsReader(out16).infos["model.norm.weight"].dtype == ml_dtypes.bfloat16
    assert_hf_loads_equal(out16, sd16, dtype=torch.bfloat16)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_hf_jax_hf_jax(tmp_path, tie):
    src, ckpt, out, ckpt2 = (str(tmp_path / n) for n in ("hf", "ckpt", "out", "ckpt2"))
    sd = make_hf_model(src, tie=tie, seed=1)
    make_tokenizer(src)
    convert_hf_to_checkpoint(src, ckpt, verbose=False)
    # Small shards so the export writes its own index, which the second conversion then reads.
    summary = export_checkpoint_to_hf(ckpt, out, max_shard_bytes=200_000, verbose=False)
    assert len(summary["files"]) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert ("lm_head.weight" in SafetensorsReader(out).infos) == (not tie)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
    assert_hf_loads_equal(out, sd)
    convert_hf_to_checkpoint(out, ckpt2, verbose=False)
    cfg1, p1 = load_checkpoint(ckpt)
    cfg2, p2 = load_checkpoint(ckpt2)
    assert cfg1 == cfg2
    assert_trees_equal(p2, p1)


def test_save_checkpoint_without_hf_config_exports(tmp_path):
    src, out = str(tmp_path / "hf"), str(tmp_path / "out")
    sd = make_hf_model(src)
    cfg = model_config_from_hf_dir(src)
    params = jax.tree.map(jnp.asarray, reference_params(sd, tie=False))  # as a trainer would hold them
    save_checkpoint(str(tmp_path / "ckpt"), cfg, params)
    os.remove(tmp_path / "ckpt" / "hf_config.json")  # a checkpoint from elsewhere: config synthesised
    export_checkpoint_to_hf(str(tmp_path / "ckpt"), out, verbose=False)
    assert_hf_loads_equal(out, sd)
    assert model_config_from_hf_dir(out) == cfg
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        save_checkpoint(str(tmp_path / "ckpt"), cfg, params)


@pytest.mark.parametrize("growth", [False, True])
def test_add_latent_tokens(tmp_path, growth):
    src, dst, out = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "out")
    tok = make_tokenizer(src)
    n_tok = len(tok)
    vocab = n_tok + 1 if growth else n_tok + 10  # growth: the three new ids do not all fit
    sd = make_hf_model(src, tie=False, vocab=vocab)
    init_id = tok.convert_tokens_to_ids("<<")
    assert isinstance(init_id, int)
    summary = convert_hf_to_checkpoint(src, dst, add_latent_tokens=True, verbose=False)
    cfg, params = load_checkpoint(dst)
    ids = [n_tok, n_tok + 1, n_tok + 2]
    assert (cfg.start_latent_token_id, cfg.end_latent_token_id, cfg.latent_token_id) == tuple(ids)
    assert cfg.vocab_size == (n_tok + 3 if growth else vocab)
    assert summary["latent_init"] == "<<"
    embed, head = params.llm.embed, params.llm.lm_head
    assert embed.shape == (cfg.vocab_size, 64) and head.shape == (64, cfg.vocab_size)
    for i in ids:
        np.testing.assert_array_equal(embed[i], embed[init_id])
        np.testing.assert_array_equal(head[:, i], head[:, init_id])
    want_embed = sd["model.language_model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(embed[:n_tok], want_embed[:n_tok])
    np.testing.assert_array_equal(head[:, :n_tok], sd["lm_head.weight"].numpy().T[:, :n_tok])
    saved = transformers.AutoTokenizer.from_pretrained(dst)
    assert [saved.convert_tokens_to_ids(t) for t in LATENT_TOKENS] == ids
    assert saved("a<|latent|>b").input_ids.count(ids[2]) == 1
    with open(os.path.join(dst, "hf_config.json")) as f:
        assert json.load(f)["text_config"]["vocab_size"] == cfg.vocab_size
    # The grown checkpoint leaves the project as a loadable HF model.
    export_checkpoint_to_hf(dst, out, verbose=False)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.vocab_size == cfg.vocab_size
    np.testing.assert_array_equal(model.get_input_embeddings().weight.detach().numpy(), embed)


def test_add_latent_tokens_without_init_token_uses_mean(tmp_path, caplog):
    src, dst = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    tok = make_tokenizer(src, with_init_token=False)
    assert tok.convert_tokens_to_ids("<<") is None
    n_tok = len(tok)
    sd = make_hf_model(src, tie=True, vocab=n_tok)
    with caplog.at_level("WARNING", logger="ivtlr_jax.convert"):
        summary = convert_hf_to_checkpoint(src, dst, add_latent_tokens=True, verbose=False)
    assert summary["latent_init"] == "mean"
    assert "'<<' is not in the tokenizer" in caplog.text and "mean embedding row" in caplog.text
    _, params = load_checkpoint(dst)
    embed = params.llm.embed
    mean = sd["model.language_model.embed_tokens.weight"].numpy().mean(axis=0)
    for i in range(n_tok, n_tok + 3):
        np.testing.assert_allclose(embed[i], mean, rtol=1e-6, atol=1e-7)


def to_flat_config(folder):
    """Rewrite config.json in the flat old hub layout (text keys on top, rope_scaling with mrope_section)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf = json.load(f)
    text = hf.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types"):
        text.pop(key)
    hf.update(text, rope_theta=rope["rope_theta"],
              rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    hf["vision_config"].pop("rope_parameters", None)
    with open(path, "w") as f:
        json.dump(hf, f, indent=2)


def test_flat_config_latent_tokens_round_trip(tmp_path):
    src, dst, out = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "out")
    tok = make_tokenizer(src)
    sd = make_hf_model(src, tie=True, vocab=len(tok))
    to_flat_config(src)
    convert_hf_to_checkpoint(src, dst, add_latent_tokens=True, verbose=False)
    cfg, params = load_checkpoint(dst)
    assert cfg.vocab_size == len(tok) + 3 and cfg.tie_word_embeddings
    with open(os.path.join(dst, "hf_config.json")) as f:
        hf = json.load(f)
    assert "text_config" not in hf and hf["vocab_size"] == cfg.vocab_size
    export_checkpoint_to_hf(dst, out, verbose=False)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out)
    embed = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(embed, params.llm.embed)
    np.testing.assert_array_equal(embed[: len(tok)], sd["model.language_model.embed_tokens.weight"].numpy())
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_missing_misshaped_unexpected_tensors(tmp_path):
    src = str(tmp_path / "hf")
    sd = make_hf_model(src)
    rewrite_weights(
        src,
        drop=("model.layers.1.mlp.up_proj.weight",),
        replace={"model.norm.weight": torch.zeros(65)},
        add={"model.layers.0.extra.weight": torch.zeros(3)},
    )
    with pytest.raises(ValueError) as err:
        convert_hf_to_checkpoint(src, str(tmp_path / "ckpt"), verbose=False)
    msg = str(err.value)
    assert "missing 1: [model.layers.1.mlp.up_proj.weight]" in msg
    assert "mis-shaped 1: [model.norm.weight: shape [65], expected [64]]" in msg
    assert "unexpected 1: [model.layers.0.extra.weight]" in msg
    assert not os.path.exists(tmp_path / "ckpt")  # nothing written on a failed check
    assert len(sd) > 0


def test_bad_source_folder_and_dtype(tmp_path):
    src = tmp_path / "hf"
    make_hf_model(str(src))
    with pytest.raises(ValueError, match=r"dtype='float16' is not supported; use one of \['float32', 'bfloat16'\]"):
        convert_hf_to_checkpoint(str(src), str(tmp_path / "ckpt"), dtype="float16", verbose=False)
    os.remove(src / "model.safetensors")
    with pytest.raises(ValueError, match=r"has no \*\.safetensors file"):
        convert_hf_to_checkpoint(str(src), str(tmp_path / "ckpt"), verbose=False)
    with pytest.raises(ValueError, match="no config.json"):
        convert_hf_to_checkpoint(str(tmp_path), str(tmp_path / "ckpt"), verbose=False)
    with pytest.raises(ValueError, match="has no params/"):
        load_checkpoint(str(tmp_path))


def test_check_params_lists_problems():
    cfg = Qwen2VLConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, mrope_section=(1, 1, 0),
                      tie_word_embeddings=True,
                      vision=VisionConfig(depth=1, embed_dim=4, num_heads=1, out_hidden_size=8))

    tree = sp.to_nested_dict(sp.map_spec(lambda i: np.zeros(i.shape, np.float32), backbone_for(cfg).param_spec()))
    check_params(cfg, tree)
    del tree["llm"]["norm"]
    tree["llm"]["lm_head"] = np.zeros((8, 10), np.float32)
    tree["llm"]["embed"] = np.zeros((11, 8), np.float32)
    with pytest.raises(ValueError) as err:
        check_params(cfg, tree)
    msg = str(err.value)
    assert "missing 1: [llm/norm]" in msg
    assert "unexpected 1: [llm/lm_head]" in msg
    assert "mis-shaped 1: [llm/embed: shape [11, 8], expected [10, 8]]" in msg


def test_cli_script_both_directions(tmp_path):
    src, ckpt, out = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "out")
    sd = make_hf_model(src, tie=True)
    script = os.path.join(REPO, "tools", "convert_weights.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = f"""
import runpy, sys
sys.argv = ["convert_weights.py", "--src", {src!r}, "--dst", {ckpt!r}, "--dtype", "bfloat16"]
runpy.run_path({script!r}, run_name="__main__")
sys.argv = ["convert_weights.py", "--to-hf", "--src", {ckpt!r}, "--dst", {out!r}]
runpy.run_path({script!r}, run_name="__main__")
"""
    res = subprocess.run([sys.executable, "-c", cmd], check=False, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "parameters" in res.stdout and "bfloat16" in res.stdout
    assert_hf_loads_equal(out, sd, dtype=torch.bfloat16)
    bad = subprocess.run([sys.executable, script, "--src", str(tmp_path), "--dst", str(tmp_path / "x")],
                         check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error: --src" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------ --merge-lora: parameters only
def _run_checkpoint(root, cfg, finetune, seed=0):
    """A run checkpoint (RUN_DIR/stage_ends/0) as the trainer writes it: its state (trainable + Adam moments) born
    on the mesh from a saved base, the trainable part moved away from the base so the export differs from it."""
    from ivtlr_jax import sharding as sh
    from ivtlr_jax.convert import save_checkpoint
    from ivtlr_jax.train.checkpoints import RunCheckpoints
    from ivtlr_jax.train.config import TrainConfig
    from ivtlr_jax.train.state import create_train_state
    from ivtlr_jax.train.step import make_optimizer

    bb = backbone_for(cfg)
    base = os.path.join(root, "base")
    if not os.path.isdir(base):
        save_checkpoint(base, cfg, bb.random_params(seed, "float32"))
    tcfg = TrainConfig(finetune=finetune, mesh="cpu", compute_dtype="float32", k=4, batch_size=8, lora_r=4,
                       lora_alpha=8)
    tx, _ = make_optimizer(tcfg, 10)
    state, _, _, _ = create_train_state(bb, tcfg, sh.make_mesh("cpu"), tx, "float32", base)
    state = state.replace(trainable=jax.tree.map(lambda x: x + 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                                                 state.trainable))
    run = os.path.join(root, finetune)
    ckpts = RunCheckpoints(run, asynchronous=False)
    ckpts.save_stage_end(0, state, {"stage": 0, "iterator": None, "step": 1, "init": os.path.abspath(base),
                                    "finetune": finetune, "lora_r": 4, "lora_alpha": 8})
    ckpts.close()
    return os.path.join(run, "stage_ends", "0"), base


def _small_cfg(**kw):
    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    shape.update(kw)
    half = shape["hidden_size"] // shape["num_attention_heads"] // 2
    section = (half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8)
    return Qwen2VLConfig(**shape, mrope_section=section, image_token_id=500, video_token_id=501,
                       vision_start_token_id=502, vision_end_token_id=503, eos_token_id=(511,), latent_token_id=505,
                       vision=VisionConfig(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2,
                                           out_hidden_size=shape["hidden_size"]))


def _delete_optimizer_state(run_ckpt):
    """Remove every opt_state array from the run checkpoint's OCDBT store (what a whole-state restore needs)."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": "file://" + os.path.join(run_ckpt, "state") + "/"}).result()
    assert any(k.startswith(b"opt_state.") for k in kv.list().result())
    kv.delete_range(ts.KvStore.KeyRange(b"opt_state.", b"opt_state/")).result()
    assert not any(k.startswith(b"opt_state.") for k in kv.list().result())


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_merge_lora_reads_no_optimizer_state(tmp_path, finetune):
    """--merge-lora of a run whose Adam moments were deleted works and equals the merge of the whole state."""
    from stored import load_checkpoint, read_checkpoint, trained_params

    cfg = _small_cfg()
    run_ckpt, base = _run_checkpoint(str(tmp_path), cfg, finetune)
    state, meta = read_checkpoint(run_ckpt)  # the whole state, while it is still there
    _, base_params = load_checkpoint(base)
    want = trained_params(backbone_for(cfg), state, meta, base_params)
    _delete_optimizer_state(run_ckpt)
    with pytest.raises(Exception):  # noqa: B017  (whatever orbax raises: a whole-state restore now fails)
        read_checkpoint(run_ckpt)
    dst = tmp_path / "merged"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weights.py"), "--merge-lora",
                           run_ckpt, "--dst", str(dst), "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, got = load_checkpoint(str(dst))
    for (name, a), b in zip(sp.flatten(got).items(), sp.flatten(want).values(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)
    changed = [n for n, a in sp.flatten(got).items() if not np.array_equal(a, sp.flatten(base_params)[n])]
    assert changed and all(n.startswith("llm/") for n in changed), changed


ORBAX_OCDBT_CACHE_BYTES = 100_000_000  # orbax tensorstore_utils: 'cache_pool#ocdbt' total_bytes_limit
MEMORY_CHILD = r"""
import json, sys
from ivtlr_jax.convert import export_run_checkpoint
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
small, big, dst = sys.argv[1:4]
export_run_checkpoint(small, dst + "_warm", verbose=False)  # every code path once (imports, thread pools)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
summary = export_run_checkpoint(big, dst, verbose=False)
print("RESULT " + json.dumps({"before": before, "peak": status("VmHWM"), "bytes": summary["bytes"]}))
"""


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_merge_lora_peak_host_memory(tmp_path, finetune):
    """The export's peak RSS growth stays within 1.2x the weights it writes (about 70 MB here) plus orbax's fixed
    100 MB cache of OCDBT B-tree nodes (a constant of its TensorStore context, not per weight: 0.6 % of a 7B
    checkpoint, but larger than the slack of a model this small)."""
    small, _ = _run_checkpoint(str(tmp_path / "small"), _small_cfg(), finetune)
    big_cfg = _small_cfg(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    big, _ = _run_checkpoint(str(tmp_path / "big"), big_cfg, finetune)
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, small, big, str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    print(f"--merge-lora ({finetune}): {r['bytes'] / 2**20:.1f} MiB written, peak RSS growth "
          f"{(r['peak'] - r['before']) / 2**20:.1f} MiB")
    assert r["bytes"] > 60 * 2**20
    assert r["peak"] - r["before"] <= 1.2 * r["bytes"] + ORBAX_OCDBT_CACHE_BYTES, r


def test_lora_record_has_one_schema_and_reads_the_older_one():
    """LoRAMeta is written as {"r", "alpha"} (lora_config.json, a run checkpoint's "lora"); run checkpoints written
    before it carry top-level "lora_r" / "lora_alpha" and still read; a record with neither names what it needs."""
    from ivtlr_jax.convert.merge import run_lora_meta
    from ivtlr_jax.models.adapters import LoRAMeta

    meta = LoRAMeta(4, 8)
    assert meta.to_dict() == {"r": 4, "alpha": 8.0} and meta.scale == 2.0
    assert run_lora_meta({"finetune": "lora", "lora": meta.to_dict()}, "new") == meta
    assert run_lora_meta({"finetune": "lora", "lora_r": 4, "lora_alpha": 8}, "old") == meta
    assert LoRAMeta.from_dict(json.loads(json.dumps({**meta.to_dict(), "targets": []})), "lora_config.json") == meta
    with pytest.raises(ValueError, match=r"run meta: no LoRA r and alpha in \['finetune'\]"):
        run_lora_meta({"finetune": "lora"}, "run meta")

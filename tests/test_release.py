"""The authors' release format: a peft-LoRA state dict made at test time, converted merged and with --keep-lora,
compared with peft's merge_and_unload() model; both transformers layouts, `module.`, safetensors, key errors,
the weights_only refusal, the trainer continuing the kept adapters."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from stored import load_checkpoint

from ivtlr_jax import IVTLRModel
from ivtlr_jax.convert import LATENT_TOKENS, convert_hf_to_checkpoint, convert_release_to_checkpoint
from ivtlr_jax.convert.release import RELEASE_PREFIX, name_patterns
from ivtlr_jax.models import spec as sp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 64, 16  # the release's LoRA
TOL = 1e-4
GRID = [[1, 8, 8]]  # one 112x112 image: 16 image tokens


# ----------------------------------------------------------------------------- the fixture: a release, made here
def _tiny_qwen2vl():
    """A tiny random Qwen2-VL whose config vocabulary exceeds its tokenizer (as the hub's 152,064 > 151,657)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    sys.path.insert(0, ROOT)
    from ivtlr_jax.models.qwen2_vl.small import tiny_tokenizer as build_tiny_tokenizer

    tok = build_tiny_tokenizer(vocab_size=300)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok) + 13, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return tok, model


def _tiny_chameleon():
    from tiny_chameleon import tiny_hf_chameleon, tiny_tokenizer

    tok = tiny_tokenizer()
    return tok, tiny_hf_chameleon(tok)


def to_new_layout(name: str) -> str:
    """transformers 4.51 Qwen2-VL names -> >= 4.52 names (`model.language_model.*`, `model.visual.*`)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def to_old_layout(name: str) -> str:
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


class Release:
    """A base folder, the release's state dict (4.51 names, no prefix) and the merged torch reference."""

    def __init__(self, kind: str, root: pathlib.Path):
        from peft import LoraConfig, get_peft_model

        self.kind = kind
        tok, model = _tiny_qwen2vl() if kind == "qwen2_vl" else _tiny_chameleon()
        with torch.no_grad():  # frozen weights travel as bf16: make them exact in bf16 so the reference is too
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        self.base = root / "base"
        model.save_pretrained(self.base)
        tok.save_pretrained(self.base)
        if kind == "qwen2_vl":
            from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor

            Qwen2VLImageProcessor().save_pretrained(self.base)
        self.base_vocab = model.config.get_text_config().vocab_size
        self.n_tok = len(tok)
        # The release's training setup: three tokens, embedding/head resized to len(tokenizer), rows from "<<".
        tok.add_special_tokens({"extra_special_tokens": list(LATENT_TOKENS)}, replace_extra_special_tokens=False)
        self.latent_ids = [tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS]
        self.tok = tok
        model.resize_token_embeddings(len(tok))
        init = tok.convert_tokens_to_ids("<<")
        with torch.no_grad():
            for w in (model.get_input_embeddings().weight, model.lm_head.weight):
                w[self.latent_ids] = w[init].clone()
        peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05,
                                                      target_modules=TARGETS))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero: make the update visible
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        prefix = "base_model.model."
        sd, embed = {}, None
        for k, v in peft_model.state_dict().items():
            assert k.startswith(prefix), k
            name = RELEASE_PREFIX + to_old_layout(k[len(prefix):])
            v = v.detach().clone()
            sd[name] = v.float() if ".lora_" in k else v.to(torch.bfloat16)
            if name.endswith("embed_tokens.weight"):
                embed = name
        sd["embedding.weight"] = sd[embed]  # the wrapper's alias: the same tensor
        assert any(".base_layer.bias" in k for k in sd) == (kind == "qwen2_vl")
        self.sd = sd
        self.embed_key = embed
        self.merged = peft_model.merge_and_unload().eval()
        self.merged.config._attn_implementation = "eager"
        self.root = root

    def write(self, name: str, rename=None, module=False, fmt="pth", drop=(), add=None) -> str:
        """The state dict under other names / formats, written to root/name."""
        sd = {}
        for k, v in self.sd.items():
            if k in drop:
                continue
            if rename is not None and k.startswith(RELEASE_PREFIX):
                k = RELEASE_PREFIX + rename(k[len(RELEASE_PREFIX):])
            sd[("module." if module else "") + k] = v
        sd.update(add or {})
        path = str(self.root / name)
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.clone().contiguous() for k, v in sd.items()}, path)
        else:
            torch.save(sd, path)
        return path

    def inputs(self):
        """One left-padded batch of two rows with an image each and the latent tokens; ids, mask, images."""
        lat = self.latent_ids
        if self.kind == "qwen2_vl":
            from tiny import image_batch

            pv, grid = image_batch(GRID * 2, seed=3)
            c = self.merged.config
            img = [c.vision_start_token_id] + [c.image_token_id] * 16 + [c.vision_end_token_id]
            rows = [[105, 106, 107] + img + [108, 109] + lat + [110, 111],
                    [112] + img + lat[2:] * 3 + list(range(120, 140))]
        else:
            from tiny_chameleon import image_run, pixels

            pv, grid = pixels(2, seed=3), None
            bos = self.tok.bos_token_id
            rows = [[bos, 60, 61] + image_run(self.tok) + [62] + lat + [63], [bos] + image_run(self.tok) + lat[2:] * 4]
        n = max(map(len, rows))
        ids, mask = np.zeros((2, n), np.int64), np.zeros((2, n), np.int64)
        for i, r in enumerate(rows):
            ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
        return ids, mask, pv, grid

    def reference_logits(self):
        """The merged torch model's logits with the release's 1-D sequential positions."""
        ids, mask, pv, grid = self.inputs()
        pos = torch.tensor(np.clip(np.cumsum(mask, 1) - 1, 0, None))
        kw = {}
        if self.kind == "qwen2_vl":
            kw = {"image_grid_thw": torch.tensor(grid),
                  "mm_token_type_ids": torch.tensor((ids == self.merged.config.image_token_id).astype(np.int64))}
        with torch.no_grad():
            return self.merged(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               pixel_values=torch.tensor(pv), position_ids=pos, **kw).logits.numpy()


def ours(ckpt: str, rel: Release, **kw):
    ids, mask, pv, grid = rel.inputs()
    return IVTLRModel.from_pretrained(ckpt).logits(ids, mask, pv, grid, **kw)


def max_error(got, want, mask):
    return float(np.abs(got - want)[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=["qwen2_vl", "chameleon"])
def release(request, tmp_path_factory):
    """(Release, merged checkpoint written by the CLI, --keep-lora checkpoint)."""
    rel = Release(request.param, tmp_path_factory.mktemp(request.param))
    pth = rel.write("epoch_16_full_model_fp32.pth")
    merged = str(rel.root / "ckpt")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--from-release", pth,
                           "--base", str(rel.base), "--dst", merged, "--quiet"], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = str(rel.root / "kept")
    convert_release_to_checkpoint(pth, str(rel.base), kept, keep_lora=True, verbose=False)
    return rel, merged, kept


# ----------------------------------------------------------------------------- merged and kept conversions
def test_merged_logits_equal_peft_merge_and_unload(release):
    rel, merged, _ = release
    ids, mask, _, _ = rel.inputs()
    ref = rel.reference_logits()
    got = ours(merged, rel)  # no position mode given: the recorded "sequential"
    assert got.shape == ref.shape and got.dtype == np.float32
    err = max_error(got, ref, mask)
    print(f"{rel.kind}: max |logit - peft merged| = {err:.2e}")
    assert err <= TOL
    assert np.array_equal(got, ours(merged, rel, position_mode="sequential"))


def test_the_update_matters(release):
    """Guards the parity test: the base weights alone (adapters left out) are far from the reference."""
    rel, _, kept = release
    import jax.numpy as jnp

    ids, mask, pv, grid = rel.inputs()
    cfg, base = load_checkpoint(kept, lora="base")
    m = IVTLRModel(cfg, __import__("jax").tree.map(jnp.asarray, base))
    assert max_error(m.logits(ids, mask, pv, grid), rel.reference_logits(), mask) > 1e-2


def test_checkpoint_is_self_contained(release):
    rel, merged, _ = release
    cfg, params = load_checkpoint(merged)
    assert cfg.position_mode == "sequential"
    assert cfg.vocab_size == rel.n_tok + 3 and cfg.vocab_size != rel.base_vocab  # from the file, not the config
    assert [cfg.start_latent_token_id, cfg.end_latent_token_id, cfg.latent_token_id] == rel.latent_ids
    assert params.llm.embed.shape[0] == cfg.vocab_size
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    assert [tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS] == rel.latent_ids and len(tok) == cfg.vocab_size
    with open(os.path.join(merged, "hf_config.json")) as f:
        hf = json.load(f)
    assert hf.get("text_config", hf)["vocab_size"] == cfg.vocab_size
    files = set(os.listdir(merged))
    assert {"ivtlr_config.json", "params", "tokenizer.json"} <= files and "lora" not in files
    if rel.kind == "qwen2_vl":
        assert "preprocessor_config.json" in files
        assert tok.chat_template  # the chat template came along


def test_keep_lora_logits_equal_merged(release):
    rel, merged, kept = release
    ids, mask, _, _ = rel.inputs()
    a, b = ours(merged, rel), ours(kept, rel)
    assert max_error(a, b, mask) <= 1e-6
    with open(os.path.join(kept, "lora_config.json")) as f:
        meta = json.load(f)
    assert meta["r"] == R and meta["alpha"] == ALPHA and len(meta["targets"]) == 7
    # the stored base weights are the file's, unmerged; the adapters are the file's factors transposed
    _, base = load_checkpoint(kept, lora="base")
    lay = "model.layers.1.mlp.up_proj"
    w = rel.sd[f"{RELEASE_PREFIX}{lay}.base_layer.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(base.llm.layers.up.kernel[1]), w.T)
    from ivtlr_jax.convert import load_params

    adapters = load_params(kept, lora="keep").adapters
    np.testing.assert_array_equal(adapters.llm.layers.up.a[1], rel.sd[f"{RELEASE_PREFIX}{lay}.lora_A.default.weight"]
                                  .numpy().T)
    np.testing.assert_array_equal(adapters.llm.layers.up.b[1], rel.sd[f"{RELEASE_PREFIX}{lay}.lora_B.default.weight"]
                                  .numpy().T)


# ----------------------------------------------------------------------------- the accepted forms
@pytest.mark.parametrize("layout,module,fmt", [("new", True, "safetensors"), ("new", False, "pth"),
                                               ("old", True, "pth")])
def test_layouts_prefix_and_safetensors_give_the_same_checkpoint(release, layout, module, fmt):
    rel, merged, _ = release
    if rel.kind == "chameleon" and layout == "new":
        pytest.skip("Chameleon has one transformers layout")
    path = rel.write(f"r_{layout}_{module}.{fmt}", rename=to_new_layout if layout == "new" else None, module=module,
                     fmt=fmt)
    dst = str(rel.root / f"ckpt_{layout}_{module}_{fmt}")
    summary = convert_release_to_checkpoint(path, str(rel.base), dst, verbose=False)
    assert summary["module_prefix"] == module and summary["format"] == ("safetensors" if fmt == "safetensors"
                                                                          else "torch")
    assert summary["embedding_alias"] == ("equal to the embedding" if fmt == "safetensors"
                                          else "same storage as the embedding")
    want = sp.flatten(load_checkpoint(merged)[1])
    got = sp.flatten(load_checkpoint(dst)[1])
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_bfloat16_output(release, tmp_path):
    rel, merged, _ = release
    pth = rel.write("again.pth")
    convert_release_to_checkpoint(pth, str(rel.base), str(tmp_path / "bf16"), dtype="bfloat16", verbose=False)
    _, p16 = load_checkpoint(str(tmp_path / "bf16"))
    _, p32 = load_checkpoint(merged)
    assert str(p16.llm.layers.q.kernel.dtype) == "bfloat16"
    np.testing.assert_array_equal(p16.llm.layers.q.kernel, p32.llm.layers.q.kernel.astype(p16.llm.embed.dtype))


# ----------------------------------------------------------------------------- errors
def test_missing_and_extra_keys_are_named(release):
    rel, _, _ = release
    up_a = [k for k in rel.sd if ".mlp.up_proj.lora_A." in k]
    norm = next(k for k in rel.sd if k.endswith("layers.1.post_attention_layernorm.weight"))
    extra = RELEASE_PREFIX + "model.layers.0.mlp.extra_proj.weight"
    path = rel.write("broken.pth", drop=up_a + [norm], add={extra: torch.zeros(2, 2)})
    with pytest.raises(ValueError) as e:
        convert_release_to_checkpoint(path, str(rel.base), str(rel.root / "broken"), verbose=False)
    msg = str(e.value)
    assert "missing" in msg and "unexpected" in msg
    assert RELEASE_PREFIX + "model.layers.{i}.mlp.up_proj.lora_A.default.weight (i = 0-1)" in msg
    assert RELEASE_PREFIX + "model.layers.1.post_attention_layernorm.weight" in msg
    assert extra in msg
    assert not os.path.exists(rel.root / "broken" / "params")


def test_mis_shaped_and_wrong_base(release, tmp_path):
    rel, _, _ = release
    key = next(k for k in rel.sd if k.endswith("layers.0.self_attn.q_proj.lora_B.default.weight"))
    path = rel.write("misshaped.pth", add={key: torch.zeros(rel.sd[key].shape[0], 8)})
    with pytest.raises(ValueError, match=r"mis-shaped.*q_proj.lora_B.default.weight: shape \[\d+, 8\]"):
        convert_release_to_checkpoint(path, str(rel.base), str(tmp_path / "x"), verbose=False)
    with pytest.raises(ValueError, match="no config.json"):
        convert_release_to_checkpoint(rel.write("ok.pth"), str(tmp_path), str(tmp_path / "y"), verbose=False)


def test_pickle_needing_code_is_refused(tmp_path, release):
    rel, _, _ = release
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = str(tmp_path / "evil.pth")
    torch.save({RELEASE_PREFIX + "lm_head.weight": torch.zeros(2), "x": Payload()}, path)
    with pytest.raises(ValueError, match=r"refused by torch.load\(weights_only=True\)"):
        convert_release_to_checkpoint(path, str(rel.base), str(tmp_path / "out"), verbose=False)
    assert not marker.exists()


def test_not_a_state_dict_file(tmp_path):
    from ivtlr_jax.convert.release import open_release

    path = tmp_path / "junk.pth"
    path.write_bytes(b"neither a torch zip nor safetensors")
    with pytest.raises(ValueError, match="neither a torch checkpoint nor a safetensors file"):
        open_release(str(path))
    torch.save([torch.zeros(2)], str(tmp_path / "list.pth"))
    with pytest.raises(ValueError, match="holds a list, expected a dict of tensors"):
        open_release(str(tmp_path / "list.pth"))


def test_missing_torch_says_how_to_install(tmp_path, monkeypatch):
    from ivtlr_jax.convert.release import open_release

    path = tmp_path / "r.pth"
    torch.save({"a": torch.zeros(1)}, str(path))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ValueError, match=r"needs PyTorch.*pip install 'ivtlr_jax\[torch\]'"):
        open_release(str(path))


def test_name_patterns():
    names = [f"p.model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 2, 5)] + ["p.lm_head.weight",
                                                                                "p.model.layers.3.x.weight"]
    assert name_patterns(names) == ["p.lm_head.weight", "p.model.layers.3.x.weight",
                                    "p.model.layers.{i}.mlp.up_proj.weight (i = 0-2, 5)"]


# ----------------------------------------------------------------------------- latent ids already in a HF folder
def test_hf_folder_with_latent_tokens_records_their_ids(release, tmp_path):
    """The merged torch model saved as a HF folder (tokenizer with the latent tokens) converts without
    --add-latent-tokens, its latent ids recorded, and gives the release conversion's logits."""
    rel, merged, _ = release
    hf_dir, dst = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    rel.merged.save_pretrained(hf_dir)
    rel.tok.save_pretrained(hf_dir)
    summary = convert_hf_to_checkpoint(hf_dir, dst, verbose=False)
    cfg, _ = load_checkpoint(dst)
    assert [cfg.start_latent_token_id, cfg.end_latent_token_id, cfg.latent_token_id] == rel.latent_ids
    assert summary["latent_token_ids"] == dict(zip(LATENT_TOKENS, rel.latent_ids))
    ids, mask, _, _ = rel.inputs()
    assert max_error(ours(dst, rel, position_mode="sequential"), ours(merged, rel), mask) <= 1e-5


# ----------------------------------------------------------------------------- the trainer continues the adapters
def test_trainer_starts_from_kept_adapters(release):
    rel, _, kept = release
    if rel.kind != "qwen2_vl":
        pytest.skip("one backbone is enough: the trainer is backbone-generic")
    from ivtlr_jax import sharding as sh
    from ivtlr_jax.convert import load_params
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.train.config import TrainConfig
    from ivtlr_jax.train.state import create_train_state
    from ivtlr_jax.train.step import make_optimizer

    cfg, _ = load_checkpoint(kept, lora="base")
    bb = backbone_for(cfg)
    mesh = sh.make_mesh("cpu")
    tcfg = TrainConfig(finetune="lora", mesh="cpu", compute_dtype="float32", lora_r=R, lora_alpha=ALPHA)
    tx, _ = make_optimizer(tcfg, 10)
    state, frozen, _, _ = create_train_state(bb, tcfg, mesh, tx, "float32", kept)
    want = load_params(kept, lora="keep").adapters
    for a, b in zip(sp.flatten(state.trainable).values(), sp.flatten(want).values(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    _, base = load_checkpoint(kept, lora="base")
    np.testing.assert_array_equal(np.asarray(frozen.llm.layers.q.kernel), base.llm.layers.q.kernel)
    for bad, match in ((dict(lora_r=8), "r=64, alpha=16.*--lora-r 64 --lora-alpha 16"),
                       (dict(lora_alpha=32.0), "lora_alpha=32"),
                       (dict(finetune="full"), "--finetune full trains the merged weights")):
        t = TrainConfig(**{**dict(finetune="lora", mesh="cpu", compute_dtype="float32", lora_r=R,
                                  lora_alpha=ALPHA), **bad})
        with pytest.raises(ValueError, match=match):
            create_train_state(bb, t, mesh, make_optimizer(t, 10)[0], "float32", kept)

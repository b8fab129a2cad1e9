"""Qwen2.5-VL against transformers: window layout, vision features, logits in both position modes, the latent
loop against the re-running oracle, cached generation, config I/O, both key layouts, the release import and
the CLIs (conversion both ways, evaluation)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from oracle import oracle_latent_forward, reference_greedy
from tiny_qwen25 import ROOT, convert, grow_like_converter, image_batch, image_run, tiny_hf_model, tiny_tokenizer

from ivtlr_jax import IVTLRModel
from ivtlr_jax.models.base import sequential_positions

TOL = 1e-4
GRID = [[1, 20, 20], [1, 14, 10]]  # 280x280 and 196x140: 100 and 35 image tokens, windows cut at the edges
LATENT_GRID = [[1, 20, 20], [1, 20, 24]]  # 100 and 120 image tokens: room for n*K = 3*32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(torch model grown by the latent rows, converted IVTLRModel, tokenizer with the latent tokens, folders)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("qwen25")
    tok = tiny_tokenizer()
    hf = tiny_hf_model(tok)
    hf.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    ckpt = convert(str(root / "hf"), str(root / "ckpt"), "--add-latent-tokens")
    tok = AutoTokenizer.from_pretrained(ckpt)
    grow_like_converter(hf, tok)
    return hf, IVTLRModel.from_pretrained(ckpt, dtype="float32"), tok, root


def two_row_batch(m, grid=GRID, n_latent=0, seed=1):
    """Two left-padded rows [text, image, text] (+ n latent + a labelled tail); ids, mask, labels, pv, grid."""
    ids = special_ids_of(m)
    pv, grid = image_batch(grid, seed=seed)
    prompts = [[30, 31, 32] + image_run(ids, grid[0]) + [33, 34], [40] + image_run(ids, grid[1]) + [41, 42, 43, 44]]
    tails = [list(range(50, 61)) + [ids["<|im_end|>"]], [62, 63, 64, 65, ids["<|im_end|>"]]]
    p, t = max(map(len, prompts)), max(map(len, tails))
    out = np.zeros((2, p + n_latent + t), np.int64)
    mask, labels = np.zeros_like(out), np.full_like(out, -100)
    for r, (pr, tl) in enumerate(zip(prompts, tails)):
        row = pr + [m.config.latent_token_id] * n_latent + tl
        start = p - len(pr)
        out[r, start: start + len(row)] = row
        mask[r, start: start + len(row)] = 1
        labels[r, p + n_latent: p + n_latent + len(tl)] = tl
    assert mask[:, 0].min() == 0  # a row needs left padding
    return out, mask, labels, pv, grid


def special_ids_of(m) -> dict:
    c = m.config
    return {"<|image_pad|>": c.image_token_id, "<|vision_start|>": c.vision_start_token_id,
            "<|vision_end|>": c.vision_end_token_id, "<|im_end|>": c.eos_token_id[0]}


def hf_forward(hf, ids, mask, pv, grid, position_ids=None, **kw):
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(position_ids).long()
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                  image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == hf.config.image_token_id).astype(np.int64)), **kw)


# ----------------------------------------------------------------------------- vision tower
def test_windows_partition_patches_as_transformers(pair):
    """Our window id per patch groups the patches exactly as get_vision_window_index's windows do."""
    from transformers.vision_utils import get_vision_window_index

    from ivtlr_jax.models.qwen2_5_vl.model import patch_windows

    _, m, _, _ = pair
    v = m.config.vision
    for grid in ([1, 20, 20], [1, 14, 10], [1, 24, 12], [2, 12, 16]):
        index, cu = get_vision_window_index(torch.tensor([grid]), v.spatial_merge_size, v.window_size, v.patch_size)
        unit_window = np.zeros(len(index), np.int64)  # merged unit -> its window in transformers' order
        bounds = cu.numpy() // v.spatial_merge_size**2
        for w, (a, z) in enumerate(zip(bounds[:-1], bounds[1:])):
            unit_window[index.numpy()[a:z]] = w
        ref = np.repeat(unit_window, v.spatial_merge_size**2)  # patches in merge-block order
        ours = patch_windows(v, grid)
        pairs = set(zip(ours.tolist(), ref.tolist()))
        assert len(pairs) == len(set(ours.tolist())) == len(set(ref.tolist())), grid  # the same partition
    assert len(set(patch_windows(v, [1, 20, 20]).tolist())) == 16  # 4 x 4 windows, the last row/column cut


def test_vision_features_match_transformers(pair):
    hf, m, _, _ = pair
    pv, grid = image_batch(GRID, seed=2)
    ours = np.asarray(m.image_features(pv, grid))
    with torch.no_grad():
        ref = torch.cat(hf.model.get_image_features(torch.tensor(pv), torch.tensor(grid)).pooler_output).numpy()
    assert ours.shape == ref.shape == (135, 64)
    err = float(np.abs(ours - ref).max())
    print(f"vision features: max |ours - transformers| = {err:.2e}")
    assert err <= 1e-5


def test_windows_matter(pair):
    """Guards the parity test: the same tower with full attention in every block gives other features."""
    import jax

    _, m, _, _ = pair
    pv, grid = image_batch(GRID[:1], seed=2)
    ids = np.full((1, 100), m.config.image_token_id)
    bb = m.backbone
    images = bb.prepare_images(ids, np.ones_like(ids), pv, grid)
    full = bb.replace_config(vision=dataclasses.replace(bb.config.vision, fullatt_block_indexes=(0, 1, 2)))
    a = np.asarray(jax.jit(bb.image_features)(m.params, images))
    b = np.asarray(jax.jit(full.image_features)(m.params, images))
    assert np.abs(a - b).max() > 1e-3


# ----------------------------------------------------------------------------- the LLM with images
@pytest.mark.parametrize("mode", ["mrope", "sequential"])
def test_logits_match_transformers(pair, mode):
    hf, m, _, _ = pair
    ids, mask, _, pv, grid = two_row_batch(m)
    ours = m.logits(ids, mask, pv, grid, position_mode=mode)
    pos = sequential_positions(mask)[:, 0] if mode == "sequential" else None
    ref = hf_forward(hf, ids, mask, pv, grid, position_ids=pos).logits.numpy()
    valid = mask.astype(bool)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = float(np.abs(ours - ref)[valid].max())
    print(f"logits ({mode}): max |ours - transformers| = {err:.2e}")
    assert err <= TOL
    if mode == "mrope":  # guards the test: the modes differ on images
        other = m.logits(ids, mask, pv, grid, position_mode="sequential")
        assert np.abs(ours - other)[valid].max() > 1e-2


def test_mrope_positions_match_get_rope_index(pair):
    hf, m, _, _ = pair
    ids, mask, _, _, grid = two_row_batch(m)
    ref, _ = hf.model.get_rope_index(torch.tensor(ids), torch.tensor((ids == m.config.image_token_id)
                                                                     .astype(np.int64)),
                                     image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
    ours = m.backbone.positions(ids, mask, grid, "mrope").transpose(1, 0, 2)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(ours[:, valid], ref.numpy()[:, valid])


# ----------------------------------------------------------------------------- the latent loop
ORACLE_CASES = [(n, k, "sequential") for n in (0, 1, 3) for k in (0, 8, 32)] + [(3, 8, "mrope")]


@pytest.mark.parametrize("n,k,mode", ORACLE_CASES)
def test_latent_forward_matches_oracle(pair, n, k, mode):
    hf, m, _, _ = pair
    ids, mask, labels, pv, grid = two_row_batch(m, LATENT_GRID, n_latent=n, seed=3)
    # K=32 is the release's default for Qwen2.5-VL too: those cases leave k out and get it
    kw = {} if k == 32 else {"k": k}
    out = m.latent_forward(ids, mask, labels, pv, grid, position_mode=mode, **kw)
    loss, logits, sel, valid = oracle_latent_forward(hf, m.config.latent_token_id, ids, mask, labels, pv, grid, k,
                                                     position_mode=mode)
    assert out.logits.shape == logits.shape and out.selected.shape == (n, 2, k)
    np.testing.assert_array_equal(out.selected, sel)
    err = float(np.abs(out.logits - logits)[valid].max())
    print(f"latent n={n} k={k} {mode}: max logit error {err:.2e}, loss rel error {abs(out.loss - loss) / loss:.1e}")
    assert err <= TOL
    assert abs(out.loss - loss) <= 1e-5 * abs(loss)
    if n and k:
        for b, n_img in enumerate((100, 120)):  # no image token twice, all inside the row's own image
            picks = out.selected[:, b].reshape(-1)
            assert len(set(picks.tolist())) == n * k and picks.max() < n_img


def test_cached_generation_equals_repeated_full_forwards(pair):
    _, m, _, _ = pair
    n, k, steps = 2, 8, 4
    ids, mask, _, pv, grid = two_row_batch(m, LATENT_GRID, n_latent=n, seed=5)
    ids, mask = ids[:, : ids.shape[1] - 12], mask[:, : ids.shape[1] - 12]  # prompt + latent tokens only
    assert (ids[:, -1] == m.config.latent_token_id).all()
    res = m.generate(ids, mask, pv, grid, max_new_tokens=steps, k=k, eos_token_ids=[-1])
    np.testing.assert_array_equal(res.tokens, reference_greedy(m, n, ids, mask, pv, grid, steps, k, "sequential"))


def test_videos_and_bad_inputs_raise_clear_errors(pair):
    _, m, _, _ = pair
    ids, mask, labels, pv, grid = two_row_batch(m)
    video = ids.copy()
    video[0, -1] = m.config.video_token_id
    with pytest.raises(ValueError, match="videos are out of scope"):
        m.logits(video, mask, pv, grid)
    with pytest.raises(ValueError, match="pixel_values has shape"):
        m.logits(ids, mask, pv[:-4], grid)
    with pytest.raises(ValueError, match="n\\*k"):
        m.latent_forward(*two_row_batch(m, n_latent=1)[:4], grid, k=64)  # row 1 has 35 image tokens


# ----------------------------------------------------------------------------- config and weights I/O
def test_config_reads_both_layouts_and_writes_what_transformers_reads(pair):
    from transformers import Qwen2_5_VLConfig

    from ivtlr_jax.models import model_config_from_dict
    from ivtlr_jax.models.qwen2_5_vl import Qwen25VLConfig, to_hf_dict

    hf, m, _, root = pair
    with open(root / "hf" / "config.json") as f:
        nested = json.load(f)
    cfg = Qwen25VLConfig.from_hf_dict(nested)
    v = cfg.vision
    assert (v.depth, v.embed_dim, v.intermediate_size, v.window_size, v.fullatt_block_indexes) == (3, 32, 48, 84, (1,))
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**nested, **text, "rope_theta": rope["rope_theta"],  # the 4.x hub layout
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    flat["vision_config"] = {k: val for k, val in nested["vision_config"].items() if k != "rope_parameters"}
    assert Qwen25VLConfig.from_hf_dict(flat) == cfg
    assert model_config_from_dict(cfg.to_dict()) == cfg and type(model_config_from_dict(cfg.to_dict())) is type(cfg)
    back = Qwen2_5_VLConfig(**to_hf_dict(cfg))  # what --to-hf writes for a checkpoint saved without a config
    assert Qwen25VLConfig.from_hf_dict(back.to_dict()) == cfg
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        dataclasses.replace(cfg.vision, fullatt_block_indexes=(3,))
    with pytest.raises(ValueError, match="window_size"):
        dataclasses.replace(cfg.vision, window_size=14)


def test_both_key_layouts_convert_to_the_same_checkpoint(pair, tmp_path):
    """transformers 4.x names (`model.layers.*`, `visual.*`) and >= 4.52 names (`model.language_model.*`,
    `model.visual.*`) give the same params."""
    import shutil

    from safetensors.numpy import load_file, save_file
    from stored import load_checkpoint

    from ivtlr_jax.convert import convert_hf_to_checkpoint
    from ivtlr_jax.models import spec as sp

    _, m, _, root = pair
    src = tmp_path / "old"
    shutil.copytree(root / "hf", src)
    tensors = load_file(str(src / "model.safetensors"))
    saved_new = any(k.startswith("model.language_model.") for k in tensors)
    pairs = (("model.language_model.", "model."), ("model.visual.", "visual."))
    if not saved_new:  # transformers 5 saves the 4.x names: write the >= 4.52 ones
        pairs = (("visual.", "model.visual."), ("model.", "model.language_model."))
    renamed = {}
    for k, val in tensors.items():
        for a, b in pairs:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        renamed[k] = val
    assert any(k.startswith("model.language_model.") for k in renamed) != saved_new
    save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})
    convert_hf_to_checkpoint(str(src), str(tmp_path / "a"), verbose=False)
    convert_hf_to_checkpoint(str(root / "hf"), str(tmp_path / "b"), verbose=False)
    (ca, pa), (cb, pb) = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert ca == cb
    for name, leaf in sp.flatten(pa).items():
        np.testing.assert_array_equal(leaf, sp.flatten(pb)[name], err_msg=name)


def test_to_hf_round_trip_is_byte_identical(pair, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf, m, _, _ = pair
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--to-hf", "--src",
                           m.path, "--dst", out, "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    sd, src = back.state_dict(), hf.state_dict()  # hf grew by the latent rows as the converter grows its copy
    assert sorted(sd) == sorted(src)
    for name, value in src.items():
        assert torch.equal(sd[name], value), name
    assert back.config.get_text_config().vocab_size - 1 == m.config.latent_token_id


@pytest.mark.parametrize("targets", ["llm", "names"])
def test_release_import_equals_peft_merge(pair, tmp_path, targets):
    """A Qwen2.5-VL IVT-LR release (PEFT LoRA r=64, 4.51 names, bf16 frozen weights) -> --from-release.

    "llm": LoRA on the LLM only (method page, section 2), merged. "names": the release's bare list of names, which
    also wraps the vision blocks' mlp.gate_proj/up_proj/down_proj (Qwen2.5-VL's ViT has them, Qwen2-VL's has
    not), imported with --keep-lora: the vision adapters are merged, the LLM's kept."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil  # Qwen2.5-VL uses it

    from ivtlr_jax.convert import LATENT_TOKENS
    from ivtlr_jax.convert.release import RELEASE_PREFIX

    _, _, _, root = pair
    tok = tiny_tokenizer()
    model = tiny_hf_model(tok, seed=1, vocab=len(tok) + 13)  # the hub's config vocabulary exceeds the tokenizer
    with torch.no_grad():  # the frozen weights travel as bf16: make them exact in bf16
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    Qwen2VLImageProcessorPil().save_pretrained(base)
    tok.add_special_tokens({"extra_special_tokens": list(LATENT_TOKENS)}, replace_extra_special_tokens=False)
    model.resize_token_embeddings(len(tok))
    lat = [tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS]
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.lm_head.weight):
            w[lat] = w[tok.convert_tokens_to_ids("<<")].clone()
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    target_modules = rf".*language_model.*\.({'|'.join(names)})" if targets == "llm" else names
    peft_model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05,
                                                  target_modules=target_modules))
    gen = torch.Generator().manual_seed(1)
    sd = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for k, val in peft_model.state_dict().items():
            k = k[len("base_model.model."):]
            for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
                if k.startswith(new):
                    k = old + k[len(new):]
            sd[RELEASE_PREFIX + k] = val.detach().clone().float() if ".lora_" in k else val.detach().to(torch.bfloat16)
    vision_lora = [k for k in sd if k.startswith(RELEASE_PREFIX + "visual.") and "lora_A" in k]
    assert any("lora_A" in k for k in sd) and len(vision_lora) == (0 if targets == "llm" else 3 * 3), vision_lora
    sd["embedding.weight"] = sd[RELEASE_PREFIX + "model.embed_tokens.weight"]
    pth = str(tmp_path / "epoch_16_full_model_fp32.pth")
    torch.save(sd, pth)
    merged = peft_model.merge_and_unload().eval()
    merged.config._attn_implementation = "eager"
    dst = str(tmp_path / "ckpt")
    keep = ["--keep-lora"] if targets == "names" else []
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--from-release", pth,
                           "--base", str(base), "--dst", dst, "--quiet", *keep], capture_output=True, text=True,
                          timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = IVTLRModel.from_pretrained(dst)
    assert m.config.model_type == "qwen2_5_vl" and m.config.position_mode == "sequential"
    assert m.config.vocab_size == len(tok) and m.config.latent_token_id == lat[2]
    assert [AutoTokenizer.from_pretrained(dst).convert_tokens_to_ids(t) for t in LATENT_TOKENS] == lat
    ids, mask, _, pv, grid = two_row_batch(m)
    ref = hf_forward(merged, ids, mask, pv, grid, position_ids=sequential_positions(mask)[:, 0]).logits.numpy()
    got = m.logits(ids, mask, pv, grid)  # the recorded sequential positions
    err = float(np.abs(got - ref)[mask.astype(bool)].max())
    print(f"release ({targets}): max |logit - peft merged| = {err:.2e}")
    assert err <= TOL
    if targets == "names":  # the LLM's adapters were kept, the vision tower's merged (and they matter)
        from ivtlr_jax.convert.checkpoint import LORA_DIR

        assert os.path.isdir(os.path.join(dst, LORA_DIR))
        with torch.no_grad():
            plain = type(merged).from_pretrained(base).model.get_image_features(torch.tensor(pv), torch.tensor(grid))
            lora = merged.model.get_image_features(torch.tensor(pv), torch.tensor(grid))
        ours = np.asarray(m.image_features(pv, grid))
        assert np.abs(ours - torch.cat(lora.pooler_output).numpy()).max() <= 1e-5
        assert np.abs(ours - torch.cat(plain.pooler_output).numpy()).max() > 1e-3


# ----------------------------------------------------------------------------- evaluation CLI
METHODS = ("ivtlr", "no-cot", "cot", "coconut", "no-latent-text", "no-latent")


def test_evaluation_cli_every_method(pair):
    from experiments import evaluate as ev

    _, m, _, root = pair
    data = root / "data"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "ivtlr_jax.data.synthetic", "--out", str(data), "--n", "2",
                        "--n-eval", "4"], check=True, cwd=ROOT, capture_output=True)
    for method in METHODS:
        out = root / f"eval_{method}"
        res = ev.main(["--ckpt", m.path, "--data", "synthetic", "--data-source", str(data), "--split", "test",
                       "--method", method, "--n-latent", "2", "--k", "8", "--batch-size", "4", "--max-new-tokens",
                       "4", "--out", str(out), "--no-progress"])
        rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
        assert res["examples"] == len(rows) == 4 and all(r["gold"] in "ABCD" for r in rows), method
        assert "<|vision_start|><|image_pad|>x100<|vision_end|>" in rows[0]["prompt"], method  # 280 px: 100 tokens
        steps = 2 if method in ("ivtlr", "no-latent-text") else 0  # steps with selected image embeddings
        assert all(len(r["selected"] or ()) == steps for r in rows), method

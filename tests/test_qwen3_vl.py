"""Qwen3-VL against transformers: vision and DeepStack features on resampled position tables, logits in both
position modes with DeepStack at one block and at two, the latent loop (both deepstack_latent modes) against the
re-running oracle, cached generation, the LoRA merge against PEFT's, config I/O and the conversion both ways."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from oracle import oracle_latent_forward, reference_greedy
from tiny_qwen3 import ROOT, convert, grow_like_converter, image_batch, image_run, tiny_hf_model, tiny_tokenizer

from ivtlr_jax import IVTLRModel
from ivtlr_jax.models.base import sequential_positions

TOL = 1e-4
GRID = [[1, 8, 8], [1, 6, 10]]  # 16 and 15 image tokens; neither grid is the 4 x 4 position table
LATENT_GRID = [[1, 20, 20], [1, 20, 24]]  # 100 and 120 image tokens: room for n*K = 3*32


def _pair(root, deepstack):
    from transformers import AutoTokenizer

    tok = tiny_tokenizer()
    hf = tiny_hf_model(tok, deepstack=deepstack)
    hf.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    ckpt = convert(str(root / "hf"), str(root / "ckpt"), "--add-latent-tokens")
    tok = AutoTokenizer.from_pretrained(ckpt)
    grow_like_converter(hf, tok)
    return hf, IVTLRModel.from_pretrained(ckpt, dtype="float32"), tok, root


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(torch model with DeepStack after vision blocks 0 and 2, grown by the latent rows; converted IVTLRModel;
    tokenizer with the latent tokens; folder)."""
    return _pair(tmp_path_factory.mktemp("qwen3"), (0, 2))


def two_row_batch(m, grid=GRID, n_latent=0, seed=1):
    """Two left-padded rows [text, image, text] (+ n latent + a labelled tail); ids, mask, labels, pv, grid."""
    c = m.config
    ids = {"<|image_pad|>": c.image_token_id, "<|vision_start|>": c.vision_start_token_id,
           "<|vision_end|>": c.vision_end_token_id}
    pv, grid = image_batch(grid, seed=seed)
    prompts = [[30, 31, 32] + image_run(ids, grid[0]) + [33, 34], [40] + image_run(ids, grid[1]) + [41, 42, 43, 44]]
    tails = [list(range(50, 61)) + [c.eos_token_id[0]], [62, 63, 64, 65, c.eos_token_id[0]]]
    p, t = max(map(len, prompts)), max(map(len, tails))
    out = np.zeros((2, p + n_latent + t), np.int64)
    mask, labels = np.zeros_like(out), np.full_like(out, -100)
    for r, (pr, tl) in enumerate(zip(prompts, tails)):
        row = pr + [c.latent_token_id] * n_latent + tl
        start = p - len(pr)
        out[r, start: start + len(row)] = row
        mask[r, start: start + len(row)] = 1
        labels[r, p + n_latent: p + n_latent + len(tl)] = tl
    assert mask[:, 0].min() == 0  # a row needs left padding
    return out, mask, labels, pv, grid


def hf_forward(hf, ids, mask, pv, grid, position_ids=None):
    kw = {} if position_ids is None else {"position_ids": torch.tensor(position_ids).long()}
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                  image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == hf.config.image_token_id).astype(np.int64)), **kw)


def check_logits(hf, m, mode):
    ids, mask, _, pv, grid = two_row_batch(m)
    ours = m.logits(ids, mask, pv, grid, position_mode=mode)
    pos = sequential_positions(mask)[:, 0] if mode == "sequential" else None
    ref = hf_forward(hf, ids, mask, pv, grid, position_ids=pos).logits.numpy()
    valid = mask.astype(bool)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = float(np.abs(ours - ref)[valid].max())
    deep = m.config.vision.deepstack_visual_indexes
    print(f"logits ({mode}, DeepStack blocks {deep}): max |ours - transformers| = {err:.2e}")
    assert err <= TOL
    return ours, valid


# ----------------------------------------------------------------------------- vision tower
def test_vision_and_deepstack_features_match_transformers(pair):
    """Two grids unlike the 4 x 4 position table: the bilinear resampling, the merger and each DeepStack merger."""
    hf, m, _, _ = pair
    pv, grid = image_batch(GRID, seed=2)
    bb = m.backbone
    counts = bb.image_token_counts(pv, grid)
    ids = np.zeros((2, max(counts)), np.int64)
    mask = np.zeros_like(ids)
    for r, c in enumerate(counts):  # one image per row
        ids[r, :c], mask[r, :c] = m.config.image_token_id, 1
    feats, deep = jax.jit(bb.image_outputs)(m.params, m._images(ids, mask, pv, grid))
    ours = np.concatenate([np.asarray(feats)[r, :c] for r, c in enumerate(counts)])
    ours_deep = [np.concatenate([np.asarray(d)[r, :c] for r, c in enumerate(counts)]) for d in deep]
    with torch.no_grad():
        out = hf.model.get_image_features(torch.tensor(pv), torch.tensor(grid))
    ref, ref_deep = torch.cat(out.pooler_output).numpy(), [torch.cat(f).numpy() for f in out.deepstack_features]
    assert ours.shape == ref.shape == (31, 64) and len(ours_deep) == len(ref_deep) == 2
    errs = [float(np.abs(a - b).max()) for a, b in zip([ours] + ours_deep, [ref] + ref_deep)]
    print("vision features, DeepStack 0, DeepStack 1: max |ours - transformers| = "
          + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) <= 1e-5
    assert np.abs(ours - np.asarray(m.image_features(pv, grid))).max() == 0  # the public call gives the same


# ----------------------------------------------------------------------------- the LLM with images
@pytest.mark.parametrize("mode", ["mrope", "sequential"])
def test_logits_match_transformers(pair, mode):
    hf, m, _, _ = pair
    ours, valid = check_logits(hf, m, mode)
    if mode == "mrope":  # guards the test: the modes differ on images, and DeepStack changes the logits
        ids, mask, _, pv, grid = two_row_batch(m)
        assert np.abs(ours - m.logits(ids, mask, pv, grid, position_mode="sequential"))[valid].max() > 1e-2
        bb = m.backbone
        images = m._images(ids, mask, pv, grid)
        pos = bb.positions(ids, mask, {"image_grid_thw": grid}, "mrope")

        def without_deepstack(params):
            emb = bb.embed(params, ids, images)
            cache = bb.init_cache(2, ids.shape[1], emb.embeds.dtype)
            hidden, _, _ = bb.decode(params, emb.embeds, pos, cache, 0, mask.astype(bool))
            return bb.lm_head(params, hidden)

        assert np.abs(ours - np.asarray(jax.jit(without_deepstack)(m.params)))[valid].max() > 1e-3


def test_logits_with_deepstack_at_one_block(tmp_path):
    hf, m, _, _ = _pair(tmp_path, (1,))
    assert m.config.vision.deepstack_visual_indexes == (1,)
    check_logits(hf, m, "mrope")


def test_mrope_positions_match_get_rope_index(pair):
    hf, m, _, _ = pair
    ids, mask, _, _, grid = two_row_batch(m)
    ref, _ = hf.model.get_rope_index(torch.tensor(ids), torch.tensor((ids == m.config.image_token_id)
                                                                     .astype(np.int64)),
                                     image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
    ours = m.backbone.positions(ids, mask, {"image_grid_thw": grid}, "mrope").transpose(1, 0, 2)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(ours[:, valid], ref.numpy()[:, valid])


# ----------------------------------------------------------------------------- the latent loop
ORACLE_CASES = [(n, k, True) for n in (0, 1, 3) for k in (0, 8, 32)] + [(n, k, False) for n in (1, 3) for k in (8, 32)]


@pytest.mark.parametrize("n,k,deepstack_latent", ORACLE_CASES)
def test_latent_forward_matches_oracle(pair, n, k, deepstack_latent):
    hf, m, _, _ = pair
    ids, mask, labels, pv, grid = two_row_batch(m, LATENT_GRID, n_latent=n, seed=3)
    out = m.latent_forward(ids, mask, labels, pv, grid, k=k, position_mode="sequential",
                           deepstack_latent=deepstack_latent)
    loss, logits, sel, valid = oracle_latent_forward(hf, m.config.latent_token_id, ids, mask, labels, pv, grid, k,
                                                     deepstack_latent=deepstack_latent)
    assert out.logits.shape == logits.shape and out.selected.shape == (n, 2, k)
    np.testing.assert_array_equal(out.selected, sel)
    err = float(np.abs(out.logits - logits)[valid].max())
    print(f"latent n={n} k={k} deepstack_latent={deepstack_latent}: max logit error {err:.2e}, "
          f"loss rel error {abs(out.loss - loss) / loss:.1e}")
    assert err <= TOL
    assert abs(out.loss - loss) <= 1e-5 * abs(loss)
    if n == 3 and k == 32 and deepstack_latent:  # guards the modes: the re-fed DeepStack features matter
        bare = m.latent_forward(ids, mask, labels, pv, grid, k=k, position_mode="sequential", deepstack_latent=False)
        assert np.abs(bare.logits - out.logits)[valid].max() > 1e-3


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
    ids, mask, _, pv, grid = two_row_batch(m)
    video = ids.copy()
    video[0, -1] = m.config.video_token_id
    with pytest.raises(ValueError, match="videos are out of scope"):
        m.logits(video, mask, pv, grid)
    with pytest.raises(ValueError, match="videos are out of scope"):
        m.backbone.prepare_images(ids, mask, {"pixel_values": pv, "image_grid_thw": grid, "pixel_values_videos": pv})
    with pytest.raises(ValueError, match="pixel_values has shape"):
        m.logits(ids, mask, pv[:-4], grid)
    with pytest.raises(ValueError, match="position_mode='rope' is not valid for qwen3_vl"):
        m.logits(ids, mask, pv, grid, position_mode="rope")


# ----------------------------------------------------------------------------- LoRA, config and weights I/O
def test_lora_merge_equals_peft_merge(pair):
    """PEFT LoRA on the LLM's projections (the spec's LoRA targets), merged by PEFT and by our fold."""
    import copy

    from peft import LoraConfig, get_peft_model

    from ivtlr_jax.models import spec as sp
    from ivtlr_jax.models.adapters import LoRAAdapter, adapter_spec, fold_adapters

    hf, m, _, _ = pair
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=names))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    lora = {k: v.detach().numpy() for k, v in peft_model.state_dict().items() if ".lora_" in k}
    assert not any("visual" in k for k in lora)  # the vision tower has no module of these names
    spec = adapter_spec(m.backbone.param_spec(), 4)
    assert len(sp.flatten(spec)) == 2 * len(names)  # a and b of every LLM projection, nothing in the vision tower
    layer, filled = m.backbone.param_spec().llm.layers, {}
    for field in ("q", "k", "v", "o", "gate", "up", "down"):
        module = getattr(layer, field).kernel.hf.name[: -len(".weight")]
        a, b = (np.stack([lora[f"base_model.model.{module.format(i=i)}.lora_{x}.default.weight"].T
                          for i in range(m.config.num_hidden_layers)]) for x in "AB")
        filled[field] = LoRAAdapter(a, b)
    adapters = spec.replace(llm=spec.llm.replace(layers=spec.llm.layers.replace(**filled)))
    params = fold_adapters(jax.tree.map(np.asarray, m.params), adapters, scale=8 / 4)
    merged = peft_model.merge_and_unload().eval()
    merged.config._attn_implementation = "eager"
    ids, mask, _, pv, grid = two_row_batch(m)
    ref = hf_forward(merged, ids, mask, pv, grid).logits.numpy()
    got = IVTLRModel(m.config, jax.tree.map(jax.numpy.asarray, params)).logits(ids, mask, pv, grid)
    valid = mask.astype(bool)
    err = float(np.abs(got - ref)[valid].max())
    print(f"LoRA merge: max |ours - peft merged| = {err:.2e}")
    assert err <= TOL
    assert np.abs(got - m.logits(ids, mask, pv, grid))[valid].max() > 1e-3  # the adapters matter


def test_config_reads_and_writes_what_transformers_reads(pair):
    from transformers import Qwen3VLConfig as HFConfig

    from ivtlr_jax.models import model_config_from_dict
    from ivtlr_jax.models.qwen3_vl import Qwen3VLConfig

    _, m, _, root = pair
    with open(root / "hf" / "config.json") as f:
        cfg = Qwen3VLConfig.from_hf_dict(json.load(f))
    v = cfg.vision
    assert (v.depth, v.embed_dim, v.patch_size, v.num_position_embeddings, v.deepstack_visual_indexes) == \
        (3, 32, 16, 16, (0, 2))
    assert (cfg.head_dim, cfg.mrope_section, cfg.num_hidden_layers) == (24, (6, 3, 3), 3)
    assert model_config_from_dict(cfg.to_dict()) == cfg
    assert Qwen3VLConfig.from_hf_dict(HFConfig(**cfg.to_hf_dict()).to_dict()) == cfg
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        dataclasses.replace(cfg.vision, deepstack_visual_indexes=(3,))
    with pytest.raises(ValueError, match="num_position_embeddings"):
        dataclasses.replace(cfg.vision, num_position_embeddings=15)


def test_to_hf_round_trip_is_byte_identical(pair, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    hf, m, _, _ = pair
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--to-hf", "--src",
                           m.path, "--dst", out, "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = Qwen3VLForConditionalGeneration.from_pretrained(out)
    sd, src = back.state_dict(), hf.state_dict()  # hf grew by the latent rows as the converter grows its copy
    assert sorted(sd) == sorted(src)
    for name, value in src.items():
        assert torch.equal(sd[name], value), name
    assert back.config.get_text_config().vocab_size - 1 == m.config.latent_token_id


# ----------------------------------------------------------------------------- processor and evaluation CLI
def test_processor_matches_transformers_at_patch_16(pair):
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    _, m, _, _ = pair
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    ref = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, min_pixels=65536, max_pixels=16777216)(images=[image])
    pv, grid = m.backbone.image_options("smart").process(image)
    np.testing.assert_array_equal(grid, np.asarray(ref["image_grid_thw"])[0])
    assert np.abs(pv - np.asarray(ref["pixel_values"])).max() <= 1e-5
    pv, grid = m.backbone.image_options().process(image)  # the reference size: 320 x 320, 100 image tokens
    assert grid.tolist() == [1, 20, 20] and pv.shape == (400, 3 * 2 * 16 * 16)


def test_evaluation_cli_compares_the_deepstack_modes(pair):
    from experiments import evaluate as ev

    _, m, _, root = pair
    data = root / "data"
    subprocess.run([sys.executable, "-m", "ivtlr_jax.data.synthetic", "--out", str(data), "--n", "2", "--n-eval", "4"],
                   check=True, cwd=ROOT, capture_output=True)
    out = root / "eval"
    res = ev.main(["--ckpt", m.path, "--data", "synthetic", "--data-source", str(data), "--split", "test",
                   "--n-latent", "2", "--k", "8", "--batch-size", "4", "--max-new-tokens", "4", "--out", str(out),
                   "--no-progress", "--ablate", "deepstack-bare"])
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert res["examples"] == len(rows) == 4 and res["deepstack_latent"] == "on"
    assert "<|vision_start|><|image_pad|>x100<|vision_end|>" in rows[0]["prompt"]  # 320 px at patch 16: 100 tokens
    assert "deepstack-bare" in res["ablations"]
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", m.path, "--deepstack-latent", "maybe"])


def test_spec_table_init_sharding_and_lora_targets(pair):
    """The spec table's random init has the converted checkpoint's shapes, every leaf shards on a mesh, the vision
    tower is frozen and the LoRA targets are the LLM's seven projections."""
    from ivtlr_jax import sharding as sh
    from ivtlr_jax.models import spec as sp

    _, m, _, _ = pair
    bb = m.backbone
    spec = sp.flatten(bb.param_spec())
    shapes = lambda tree: {name: np.shape(x) for name, x in sp.flatten(tree).items()}  # noqa: E731
    assert shapes(bb.random_params(0)) == shapes(m.params) == {name: info.shape for name, info in spec.items()}
    assert all(not info.trainable for name, info in spec.items() if name.startswith("vision"))
    lora = sorted(name for name, info in spec.items() if info.lora)
    assert len(lora) == 7 and all(name.startswith("llm") for name in lora), lora
    shardings = sh.param_shardings(sh.make_mesh("auto"), bb.param_spec())
    assert len(jax.tree.leaves(shardings)) == len(spec)

"""Chameleon: VQ codes, BPE ids and logits against transformers, the image processor, the latent loop against
the re-running oracle, cached generation, bad input, and the CLIs (conversion both ways, evaluation)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from oracle import oracle_latent_forward, reference_greedy
from PIL import Image
from tiny_chameleon import RESOLUTION, image_run, pixels, save_and_convert, tiny_hf_chameleon, tiny_tokenizer

from ivtlr_jax import IVTLRModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_pair(tok, tmp_path_factory, swin, kv):
    """(torch model, converted IVTLRModel with the latent tokens) for (swin_norm, kv heads)."""
    hf = tiny_hf_chameleon(tok, swin_norm=swin, kv_heads=kv)
    ckpt = save_and_convert(hf, tok, str(tmp_path_factory.mktemp("cham")), "--add-latent-tokens")
    # The torch side grows the same way, written out here: three rows copied from "<<" (embedding and head).
    v, lt = hf.config.vocab_size, tok.convert_tokens_to_ids("<<")
    hf.resize_token_embeddings(v + 3)
    with torch.no_grad():
        for w in (hf.get_input_embeddings().weight, hf.lm_head.weight):
            w[v:] = w[lt]
    return hf, IVTLRModel.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def gqa(tok, tmp_path_factory):
    return make_pair(tok, tmp_path_factory, False, 2)


@pytest.fixture(scope="module")
def swin_mha(tok, tmp_path_factory):
    return make_pair(tok, tmp_path_factory, True, 4)


@pytest.fixture(params=["gqa", "swin_mha"])
def pair(request):
    """Both layouts: pre-norm with grouped-query attention, and swin post-norm with multi-head attention."""
    return request.getfixturevalue(request.param)


def prompt_rows(tok, m, n_latent=0, tails=((30, 31, 32), (40, 41))):
    """Two left-padded rows [<s> text, image, text] + n latent + tail; labels on the tail."""
    lat = m.config.latent_token_id
    prompts = [[tok.bos_token_id, 60, 61, 62] + image_run(tok) + [63, 64],
               [tok.bos_token_id, 70] + image_run(tok) + [71, 72, 73, 74, 75]]
    p, t = max(map(len, prompts)), max(map(len, tails))
    ids = np.zeros((2, p + n_latent + t), np.int64)
    mask, labels = np.zeros_like(ids), np.full_like(ids, -100)
    for r, (pr, tl) in enumerate(zip(prompts, tails)):
        row = pr + [lat] * n_latent + list(tl)
        ids[r, p - len(pr): p - len(pr) + len(row)] = row
        mask[r, p - len(pr): p - len(pr) + len(row)] = 1
        labels[r, p + n_latent: p + n_latent + len(tl)] = tl
    assert mask[0, 0] == 0  # row 0 is left-padded
    return ids, mask, labels


# ----------------------------------------------------------------------------- model parity
def test_vq_codes_and_bpe_ids_match_transformers(pair):
    hf, m = pair
    pv = pixels(2, seed=1)
    with torch.no_grad():
        codes = hf.model.vqmodel.encode(torch.tensor(pv)).image_tokens.reshape(2, -1).numpy()
        bpe = hf.model.get_image_tokens(torch.tensor(pv)).numpy()
    ours_codes = np.asarray(m.backbone.image_codes(m.params, pv))
    assert ours_codes.shape == (2, 1024) and len(np.unique(codes)) > 8  # the codes are not all alike
    np.testing.assert_array_equal(ours_codes, codes)
    np.testing.assert_array_equal(m.image_tokens(pv), bpe)


def test_logits_match_transformers_on_left_padded_batch_with_images(pair, tok):
    hf, m = pair
    ids, mask, _ = prompt_rows(tok, m)
    pv = pixels(2, seed=2)
    pos = (np.cumsum(mask, 1) - 1).clip(0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                 position_ids=torch.tensor(pos)).logits.numpy()
    ours = m.logits(ids, mask, pv)
    valid = mask.astype(bool)
    image_cols = np.asarray(m.config.image_vocab)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours[:, :, image_cols], ref[:, :, image_cols])  # both at float32's minimum
    assert (ours[:, :, image_cols] == np.finfo(np.float32).min).all()
    assert np.abs(ours - ref)[valid].max() <= TOL


def test_image_processor_matches_transformers():
    from transformers import ChameleonImageProcessorPil

    from ivtlr_jax.data.images import process_image
    from ivtlr_jax.models.chameleon import ImageOptions

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (170, 120, 4), dtype=np.uint8), mode="RGBA")
    for size in (RESOLUTION, 512):
        hf_proc = ChameleonImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        opts = ImageOptions(resolution=size, tokens_per_image=1024)
        for image in (rgb, rgba):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            ours, grid = process_image(buf.getvalue(), opts)
            ref = hf_proc(images=image, return_tensors="np")["pixel_values"]
            assert grid is None and ours.shape == ref.shape == (1, 3, size, size)
            np.testing.assert_array_equal(ours, ref)


# ----------------------------------------------------------------------------- the latent loop
ORACLE_CASES = [("gqa", n, k) for n, k in [(0, 8), (1, 0), (1, 8), (1, 64), (3, 0), (3, 8), (3, 64)]]
ORACLE_CASES.append(("swin_mha", 3, 64))  # n in {0, 1, 3} x K in {0, 8, 64} on one layout, the other once


@pytest.mark.parametrize("layout,n,k", ORACLE_CASES)
def test_latent_forward_matches_oracle(request, tok, layout, n, k):
    hf, m = request.getfixturevalue(layout)
    ids, mask, labels = prompt_rows(tok, m, n)
    pv = pixels(2, seed=3)
    # K=64 is the release's default for Chameleon: those cases leave k out and get it
    out = m.latent_forward(ids, mask, labels, pv) if k == 64 else m.latent_forward(ids, mask, labels, pv, k=k)
    loss, logits, sel, valid = oracle_latent_forward(hf, m.config.latent_token_id, ids, mask, labels, pv, None, k)
    assert out.logits.shape == logits.shape and out.selected.shape == (n, 2, k)
    np.testing.assert_array_equal(out.selected, sel)
    assert np.abs(out.logits - logits)[valid].max() <= TOL
    assert abs(out.loss - loss) <= 1e-5 * abs(loss)
    if n and k:
        for b in range(2):  # no image token twice, all inside the row's own 1024
            picks = out.selected[:, b].reshape(-1)
            assert len(set(picks.tolist())) == n * k and picks.max() < 1024


def test_batch_rows_use_their_own_image_span(gqa, tok):
    """The release locates row 0's image span for every row; here each row selects within its own."""
    _, m = gqa
    ids, mask, labels = prompt_rows(tok, m, 2)
    pv = pixels(2, seed=4)
    both = m.latent_forward(ids, mask, labels, pv, k=8)
    valid = mask.astype(bool)
    for r in range(2):  # each row alone (with its own left padding: one compilation for both)
        one = m.latent_forward(ids[r:r + 1], mask[r:r + 1], labels[r:r + 1], pv[r:r + 1], k=8)
        np.testing.assert_array_equal(both.selected[:, r], one.selected[:, 0])
        real = valid[r, -5:]  # the real tokens after the latent chunks (the final sequence ends like the input)
        np.testing.assert_allclose(both.logits[r, -5:][real], one.logits[0, -5:][real], atol=TOL)
    assert (both.selected[:, 0] != both.selected[:, 1]).any()  # the rows' images differ, so do their picks


def test_cached_generation_equals_repeated_full_forwards(gqa, tok):
    _, m = gqa
    n, k, steps = 2, 8, 4
    ids, mask, _ = prompt_rows(tok, m, n, tails=((), ()))
    pv = pixels(2, seed=5)
    res = m.generate(ids, mask, pv, max_new_tokens=steps, k=k, eos_token_ids=[-1])
    np.testing.assert_array_equal(res.tokens, reference_greedy(m, n, ids, mask, pv, None, steps, k, None))
    assert not np.isin(res.tokens, m.config.image_vocab).any()  # image codes are never generated


def test_bad_inputs_name_the_fix(gqa, tok):
    _, m = gqa
    ids, mask, labels = prompt_rows(tok, m, 1)
    pv = pixels(2)
    with pytest.raises(ValueError, match="RGB"):
        m.latent_forward(ids, mask, labels, pv[:, :2], k=8)
    with pytest.raises(ValueError, match=f"takes {RESOLUTION}x{RESOLUTION}.*centre-crop"):
        m.latent_forward(ids, mask, labels, pv[:, :, :32, :32], k=8)
    with pytest.raises(ValueError, match="n\\*k = 1\\*2048 = 2048"):
        m.latent_forward(ids, mask, labels, pv, k=2048)
    no_image = ids.copy()
    no_image[1][no_image[1] == m.config.image_token_id] = 60  # row 1 lost its image tokens
    with pytest.raises(ValueError, match="row 1: .* has only 0 image tokens.*its image is missing"):
        m.latent_forward(no_image, mask, labels, pv[:1], k=8)
    with pytest.raises(ValueError, match="2 image\\(s\\) given but input_ids hold image tokens for only 1"):
        m.latent_forward(no_image, mask, labels, pv, k=8)
    with pytest.raises(ValueError, match="position_mode='mrope' is not valid for chameleon"):
        m.latent_forward(ids, mask, labels, pv, k=8, position_mode="mrope")


# ----------------------------------------------------------------------------- CLIs
def test_convert_back_to_hugging_face(gqa, tmp_path):
    import transformers

    hf, m = gqa
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--to-hf", "--src",
                           m.path, "--dst", out, "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = transformers.ChameleonForConditionalGeneration.from_pretrained(out)
    sd, src = back.state_dict(), hf.state_dict()  # hf grew by the latent rows as the converter grows its copy
    assert sorted(sd) == sorted(src)
    for name, value in src.items():
        assert torch.equal(sd[name], value), name  # byte-identical, the three new rows included
    assert back.config.vocab_size - 1 == m.config.latent_token_id


def test_train_then_evaluate_end_to_end(tmp_path):
    """The embedded default's tiny Chameleon: a stage-1 step through the Trainer, merged, evaluated by the CLI."""
    import json

    import yaml

    from experiments import evaluate as ev
    from experiments.tiny_setup import CONFIG_DIR, prepare_auto_tiny
    from ivtlr_jax.data.synthetic import write_synthetic
    from ivtlr_jax.train import train
    from ivtlr_jax.train.config import TrainConfig
    from ivtlr_jax.train.export import export_trained_checkpoint

    data = str(tmp_path / "data")
    write_synthetic(data, n=8, n_eval=4, seed=0, level="warmup")
    values = yaml.safe_load(open(os.path.join(CONFIG_DIR, "tiny_chameleon.yaml")))
    model = values.pop("model")
    values.update(out=str(tmp_path / "run"), data_source=data, limit=8, batch_size=4, stages=(1,), max_steps=1,
                  num_workers=0, mesh="cpu", log_every=1)
    tcfg = TrainConfig(**values)
    prepare_auto_tiny(tcfg, model)
    summary = train(tcfg)
    assert summary["step"] == 1 and summary["stages"][1]["n_latent"] == 1
    merged = str(tmp_path / "merged")
    export_trained_checkpoint(os.path.join(tcfg.out, "checkpoints", "1"), merged, verbose=False)
    for method in ("ivtlr", "no-cot"):
        out = str(tmp_path / method)
        res = ev.main(["--ckpt", merged, "--data", "synthetic", "--data-source", data, "--split", "test",
                       "--method", method, "--n-latent", "1", "--k", "8", "--batch-size", "4", "--max-new-tokens",
                       "4", "--out", out, "--no-progress", "--save-selections", str(tmp_path / "sel"),
                       "--num-selections", "1"])
        assert res["examples"] == 4 and res["n_latent"] == (1 if method == "ivtlr" else 0)
        rows = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
        assert len(rows) == 4 and all(r["gold"] in "ABCD" for r in rows)
        assert rows[0]["prompt"].startswith("<s>[Question]:{<racm3:break><image>x64<eoss>")
        assert rows[0]["prompt"].rstrip().endswith("Answer:")
    assert len(os.listdir(tmp_path / "sel")) == 1  # the chosen codes drawn over the 64x64 crop


def test_embedded_default_vq_codebook_is_fitted_to_the_pictures():
    """The tiny default's tokenizer: identity residual branches and a k-means codebook over the encoder's
    outputs, so that solid colours get different codes (a random codebook lumps most pixels together)."""
    import jax

    from ivtlr_jax.data.images import decode_image
    from ivtlr_jax.models import backbone_for
    from ivtlr_jax.models.chameleon import encode, encode_latents
    from ivtlr_jax.models.chameleon.small import fit_tiny, tiny_model

    _, cfg = tiny_model(["a red square and a blue circle"], 320, None, dict(num_embeddings=16))
    colours = [(214, 39, 40), (31, 90, 200), (44, 160, 44), (240, 140, 10)]
    images = []
    for rgb in colours:
        im = Image.new("RGB", (96, 96), (250, 250, 250))
        im.paste(rgb, (8, 8, 88, 88))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    random = backbone_for(cfg).random_params(0)
    fitted = fit_tiny(random, cfg, [decode_image(im) for im in images], seed=0)
    for lv in fitted.vq.encoder.down:
        assert all(not np.any(b.conv2.kernel) for b in lv.blocks)  # identity residual branches
    assert not np.array_equal(fitted.vq.codebook, random.vq.codebook)
    from ivtlr_jax.models.chameleon.images import pixels as chameleon_pixels

    px = np.stack([chameleon_pixels(decode_image(im), cfg.vq.resolution) for im in images])
    z = np.asarray(jax.jit(encode_latents)(fitted.vq, px)).reshape(-1, cfg.vq.embed_dim)
    codes = np.asarray(encode(fitted.vq, px))
    # a k-means fixed point: every used entry is the mean of the encoder outputs it is nearest to
    for c in np.unique(codes):
        np.testing.assert_allclose(fitted.vq.codebook[c], z[codes.reshape(-1) == c].mean(0), rtol=1e-4, atol=1e-4)
    centre = [np.bincount(row.reshape(8, 8)[2:6, 2:6].reshape(-1)).argmax() for row in codes]
    assert len(set(centre)) == 4, f"the four colours share codes: {centre}"

"""The server (ivtlr_jax.serve, experiments.serve) on a tiny local checkpoint over 127.0.0.1.

Exactness: a greedy answer equals what `experiments.evaluate`'s own generation gives for the same checkpoint,
image and question; under continuous batching (24 requests at once, different images, lengths and latent steps)
every answer equals the request's solo run, no slot leaks and nothing compiles after warm-up. Then the bad
inputs, a disconnect mid-stream, a failure inside the engine, seeded sampling, the metrics and the page.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, K, NEW = 2, 4, 8  # the exactness test's latent steps, K and answer tokens
MAX_LEN = 232


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def random_image(seed: int, size=(60, 90)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8))


def user(image_url: str | None, text: str) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []) + \
        [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny Qwen2-VL checkpoint with its tokenizer (the embedded default's builder, smaller), a synthetic split,
    and the server on 127.0.0.1 (4 slots of MAX_LEN) in this process."""
    import uvicorn
    from transformers import AutoTokenizer

    from experiments.tiny_setup import make_tiny_checkpoint
    from ivtlr_jax import IVTLRModel
    from ivtlr_jax.data.synthetic import write_synthetic
    from ivtlr_jax.serve.app import ServeOptions, create_app
    from ivtlr_jax.serve.engine import Engine

    root = tmp_path_factory.mktemp("serve")
    write_synthetic(str(root / "data"), n=8, n_eval=6, seed=0, level="warmup")
    ckpt = make_tiny_checkpoint(str(root / "tiny"), model=dict(hidden_size=64, intermediate_size=96,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               num_key_value_heads=2, mrope_section=(2, 3, 3)),
                                vision=dict(depth=1, embed_dim=32, num_heads=2))
    (root / "allowed").mkdir()
    random_image(7).save(root / "allowed" / "ok.png")
    random_image(8).save(root / "outside.png")
    model = IVTLRModel.from_pretrained(ckpt, dtype="float32", mesh="auto")
    tok = AutoTokenizer.from_pretrained(ckpt)
    engine = Engine(model, tok, max_batch=4, max_len=MAX_LEN, decode_steps=3)  # requests end inside a call too
    opts = ServeOptions(model_name="tiny", allow_dir=str(root / "allowed"), n_latent=N, k=K, max_latent=4)
    app = create_app(engine, opts)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(600):
        if srv.started:
            break
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield {"root": root, "ckpt": ckpt, "model": model, "tok": tok, "engine": engine, "url": f"http://127.0.0.1:{port}",
           "opts": opts}
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=300)


def post(server, body, **kw):
    import httpx

    return httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=300, **kw)


def metric(server, name: str) -> float:
    import httpx

    text = httpx.get(server["url"] + "/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_prompt_and_answer_equal_evaluate(server, client):
    """Each synthetic test row through the openai client: the prompt is the one evaluation encodes and the greedy
    answer (ids and text) is the one `experiments.evaluate`'s batched generation gives."""
    from ivtlr_jax.data.images import decode_image
    from ivtlr_jax.data.text import format_question
    from ivtlr_jax.eval.config import EvalConfig
    from ivtlr_jax.eval.runner import prepare
    from ivtlr_jax.serve.api import Message
    from ivtlr_jax.serve.prompt import build_prompt

    root = server["root"]
    cfg = EvalConfig(ckpt=server["ckpt"], data="synthetic", data_source=str(root / "data"), split="test", limit=4,
                     batch_size=4, n_latent=N, k=K, max_new_tokens=NEW, max_cache_len=MAX_LEN,
                     out=str(root / "eval"), no_progress=True)
    ev = prepare(cfg)
    batch = ev.make_batch(ev.rows)
    res = ev.generate(batch)
    texts = ev.decode(res, len(batch.rows))
    bb = server["model"].backbone
    for r, i in enumerate(batch.rows):
        row = ev.ds[i]
        url = data_url(decode_image(ev.split.images([i])[0]))
        messages = user(url, format_question(row["question"], row["choices"]))
        ids, *_ = build_prompt([Message(**m) for m in messages], server["tok"], bb, bb.image_options())
        assert ids == list(ev.split.encodings[i].prompt_ids)
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW, temperature=0)
        want = res.tokens[r, : res.lengths[r]].tolist()
        assert out.choices[0].token_ids == want
        assert out.choices[0].message.content == texts[r]
        assert out.choices[0].finish_reason == ("stop" if want[-1] in ev.eos_ids else "length")
        assert out.usage.completion_tokens == len(want)
        assert out.usage.prompt_tokens == len(ids) + N
        assert out.usage.model_extra["latent_steps"] == N


def test_stream_equals_non_stream(server, client):
    """Streamed through the openai client: the same text and ids as without streaming, in OpenAI's chunks, the usage
    chunk with the latent steps, and the raw event stream ending with [DONE]."""
    messages = user(data_url(random_image(1)), "Which colour dominates the picture?")
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW,
                                           extra_body={"return_selections": True})
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra.get("token_ids") or [])]
    assert text == whole.choices[0].message.content and ids == whole.choices[0].token_ids
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(ids) and chunks[-1].usage.model_extra["latent_steps"] == N
    sel = whole.model_extra["selections"]
    assert len(sel["steps"]) == N and all(len(step) == K for step in sel["steps"])
    grid = sel["images"][0]
    assert (grid["rows"], grid["cols"], grid["cell"]) == (10, 10, 28) and grid["view"].startswith("data:image/png")
    cells = {(c["row"], c["col"]) for step in sel["steps"] for c in step}
    assert len(cells) == N * K  # steps never choose a token twice
    assert all(c["token"] == c["row"] * 10 + c["col"] for step in sel["steps"] for c in step)

    import httpx

    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def _requests(count: int):
    """Varied requests: different images, question lengths, latent steps and answer lengths."""
    words = "which colour covers most of the picture and how large is the biggest shape in it".split()
    out = []
    for i in range(count):
        question = " ".join(words[: 3 + (5 * i) % len(words)]) + "?"
        out.append({"model": "tiny", "messages": user(data_url(random_image(100 + i, (40 + 7 * i, 50))), question),
                    "max_tokens": 3 + i % 6, "n_latent": (0, 2)[i % 2], "temperature": 0})
    return out


def test_continuous_batching_equals_solo(server):
    """24 requests from 24 clients at once on 4 slots: each answer equals the request run alone, every slot is free
    afterwards and no program compiles after the warm-up."""
    from ivtlr_jax.serve.prompt import shortest_prompt

    engine, model = server["engine"], server["model"]
    bb = model.backbone
    shortest = shortest_prompt(server["tok"], bb, bb.image_options())
    engine.stop()  # warm up with the engine thread stopped (the app's requests wait in its queue meanwhile)
    warmed = engine.warmup([(n, model.latent_config(k=K)) for n in (0, 2)], min_prompt=shortest)
    engine.start()
    bodies = _requests(24)
    with cf.ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda b: post(server, b), bodies))
    solo = [post(server, b) for b in bodies]
    for b, a, s in zip(bodies, together, solo):
        assert a.status_code == 200 and s.status_code == 200, (a.text, s.text)
        assert a.json()["choices"][0]["token_ids"] == s.json()["choices"][0]["token_ids"]
        assert a.json()["usage"]["latent_steps"] == b["n_latent"]
    assert {len(a.json()["choices"][0]["token_ids"]) for a in together} != {1}
    assert metric(server, "ivtlr_slots_occupied") == 0
    assert warmed >= 5 and metric(server, "ivtlr_compiled_programs") == warmed  # prefills (bucket x n), decode
    # and a solo run equals `generate` on the unpadded prompt
    from ivtlr_jax.generate import latent_prompt
    from ivtlr_jax.serve.api import Message
    from ivtlr_jax.serve.prompt import build_prompt

    for b, s in list(zip(bodies, solo))[1:2]:
        ids, pv, grid, _ = build_prompt([Message(**m) for m in b["messages"]], server["tok"], bb, bb.image_options())
        full = latent_prompt(model.config, ids, b["n_latent"])
        ref = model.generate(np.array([full]), np.ones((1, len(full))), pv, grid, max_new_tokens=b["max_tokens"],
                             k=K, eos_token_ids=engine.eos_ids, pad_token_id=engine.pad_id)
        assert s.json()["choices"][0]["token_ids"] == ref.tokens[0, : ref.lengths[0]].tolist()


def test_seeded_sampling_repeats(server):
    """A sampled request with a seed repeats exactly, and draws what `generate` draws with that seed."""
    body = {"model": "tiny", "messages": user(data_url(random_image(3)), "Which colour?"), "max_tokens": NEW,
            "temperature": 1.5, "top_p": 0.9, "seed": 11}
    a, b = post(server, body).json(), post(server, body).json()
    other = post(server, {**body, "seed": 12}).json()
    greedy = post(server, {**body, "temperature": 0}).json()
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert a["choices"][0]["token_ids"] != other["choices"][0]["token_ids"] or \
        a["choices"][0]["token_ids"] != greedy["choices"][0]["token_ids"]
    # the same draw as `generate` with that seed on the request alone
    from ivtlr_jax.generate import latent_prompt
    from ivtlr_jax.serve.api import Message
    from ivtlr_jax.serve.prompt import build_prompt

    model, engine = server["model"], server["engine"]
    bb = model.backbone
    ids, pv, grid, _ = build_prompt([Message(**m) for m in body["messages"]], server["tok"], bb, bb.image_options())
    full = latent_prompt(model.config, ids, N)
    ref = model.generate(np.array([full]), np.ones((1, len(full))), pv, grid, max_new_tokens=NEW, k=K,
                         temperature=1.5, top_p=0.9, seed=11, eos_token_ids=engine.eos_ids, pad_token_id=engine.pad_id)
    assert a["choices"][0]["token_ids"] == ref.tokens[0, : ref.lengths[0]].tolist()


BAD = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "malformed JSON"),
    ("unknown model", {"model": "gpt-9"}, 404, "model: 'gpt-9' is not served"),
    ("missing field", {"messages": None}, 400, "messages"),
    ("undecodable image", {"messages": user("data:image/png;base64," + base64.b64encode(b"not a png").decode(),
                                            "q")}, 400, "does not decode"),
    ("not base64", {"messages": user("data:image/png;base64,@@@", "q")}, 400, "not valid base64"),
    ("path outside --allow-dir", {"messages": user("file://OUTSIDE", "q")}, 403, "outside --allow-dir"),
    ("remote URL", {"messages": user("http://example.com/a.png", "q")}, 400, "fetches nothing"),
    ("prompt too long", {"messages": user(None, "word " * 400), "n_latent": 0}, 400, "--max-len 232"),
    ("n_latent out of range", {"n_latent": 9}, 400, "n_latent: 9 is out of range"),
    ("negative n_latent", {"n_latent": -1}, 400, "n_latent"),
    ("k out of range", {"k": 60}, 400, "k: 2 latent steps x k=60 = 120 image embeddings"),
    ("k without an image", {"messages": user(None, "q")}, 400, "no image"),
    ("more images than the model takes", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "IMG"}}, {"type": "image_url", "image_url": {"url": "IMG"}},
        {"type": "text", "text": "q"}]}]}, 400, "at most 1 image"),
    ("max_tokens too large", {"max_tokens": 5000}, 400, "max_tokens"),
    ("unknown method", {"method": "magic"}, 400, "method"),
]


@pytest.mark.parametrize("name,change,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_then_good(server, name, change, status, message):
    """Each bad request gets its status and a one-line message naming the problem; a good request right after it
    succeeds."""
    import httpx

    good = {"model": "tiny", "messages": user(data_url(random_image(2)), "Which colour?"), "max_tokens": 2}
    if isinstance(change, bytes):
        r = httpx.post(server["url"] + "/v1/chat/completions", content=change, timeout=60,
                       headers={"Content-Type": "application/json"})
    else:
        body = json.loads(json.dumps({**good, **change}).replace("OUTSIDE", str(server["root"] / "outside.png"))
                          .replace('"IMG"', json.dumps(data_url(random_image(2)))))
        body = {k: v for k, v in body.items() if v is not None}
        r = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and "\n" not in err["message"], err
    ok = post(server, good)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_file_url_under_allow_dir(server, client):
    path = server["root"] / "allowed" / "ok.png"
    from_file = client.chat.completions.create(model="tiny", messages=user(f"file://{path}", "Which colour?"),
                                               max_tokens=4)
    from PIL import Image

    inline = client.chat.completions.create(model="tiny", messages=user(data_url(Image.open(path)), "Which colour?"),
                                            max_tokens=4)
    assert from_file.choices[0].token_ids == inline.choices[0].token_ids


def test_disconnect_frees_slot(server):
    """A client that goes away mid-stream: its slot is freed (counted as cancelled) and the others go on."""
    import httpx

    engine = server["engine"]
    engine.step_hook = lambda: time.sleep(0.05)
    try:
        before = metric(server, 'ivtlr_requests_total{outcome="cancelled"}')
        body = {"model": "tiny", "messages": user(data_url(random_image(4)), "Which colour?"), "max_tokens": 20,
                "stream": True, "n_latent": 0}
        with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines), next(lines)  # the role chunk and a first token: it holds a slot
            assert engine.occupied == 1
        for _ in range(200):
            if engine.occupied == 0:
                break
            time.sleep(0.05)
        assert engine.occupied == 0
        assert metric(server, 'ivtlr_requests_total{outcome="cancelled"}') == before + 1
    finally:
        engine.step_hook = None
    assert post(server, {**body, "stream": False, "max_tokens": 2}).status_code == 200


def test_engine_failure_fails_alone(server):
    """A request that fails inside the engine gets a 500; the requests beside it finish."""
    engine = server["engine"]

    def fault(job):
        if job.max_tokens == 7:
            raise RuntimeError("injected fault")

    engine.fault = fault
    try:
        bodies = [{"model": "tiny", "messages": user(data_url(random_image(20 + i)), "Which colour?"),
                   "max_tokens": m} for i, m in enumerate((5, 7, 6))]
        with cf.ThreadPoolExecutor(3) as pool:
            out = list(pool.map(lambda b: post(server, b), bodies))
    finally:
        engine.fault = None
    assert [r.status_code for r in out] == [200, 500, 200]
    assert "injected fault" in out[1].json()["error"]["message"]
    assert metric(server, "ivtlr_slots_occupied") == 0


def test_models_health_metrics(server):
    import httpx

    models = httpx.get(server["url"] + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    health = httpx.get(server["url"] + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["slots"] == 4 and health["engine_alive"]
    text = httpx.get(server["url"] + "/metrics", timeout=30).text
    for name in ("ivtlr_requests_total", "ivtlr_completion_tokens_total", "ivtlr_queue_depth", "ivtlr_slots_occupied",
                 "ivtlr_time_to_first_token_seconds_bucket", "ivtlr_time_per_output_token_seconds_count",
                 "ivtlr_latent_steps_total"):
        assert name in text
    assert metric(server, "ivtlr_time_to_first_token_seconds_count") > 0
    page = httpx.get(server["url"] + "/", timeout=30)
    assert page.status_code == 200 and "<canvas" in page.text and "/v1/chat/completions" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text  # no CDN


def test_cli_help_and_missing_default(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, IVTLR_DEFAULT_OUT=str(tmp_path / "none"), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "experiments.serve", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--max-batch" in out.stdout and "continuous batching" in out.stdout
    out = subprocess.run([sys.executable, "-m", "experiments.serve"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode != 0 and "python -m experiments.train" in out.stderr and "stage3" in out.stderr


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_in_headless_chromium(server):
    """The page in a real browser: upload an image, ask, see the streamed answer and the selection overlay; the
    screenshot is saved as an artifact (IVTLR_ARTIFACTS, default the test's tmp folder)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; Debian's chromium)")
    chromium = _chromium()
    out = os.environ.get("IVTLR_ARTIFACTS") or str(server["root"])
    os.makedirs(out, exist_ok=True)
    from PIL import Image, ImageDraw

    image = server["root"] / "page.png"
    picture = Image.new("RGB", (160, 120), "white")  # a few coloured shapes: the overlay stays readable
    draw = ImageDraw.Draw(picture)
    for i, colour in enumerate(("red", "blue", "green", "orange")):
        draw.rectangle([10 + 36 * i, 20 + 18 * i, 40 + 36 * i, 50 + 18 * i], fill=colour)
    picture.save(image)
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"no Chromium can be started here: {str(e).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(server["url"] + "/")
        page.set_input_files("#image", str(image))
        page.fill("#question", "Which colour dominates the picture?")
        page.fill("#max_tokens", str(NEW))
        page.click("#ask")
        page.wait_for_function("['done', 'error'].includes(document.querySelector('#status').dataset.state) && "
                               "(window.ivtlrDrawn > 0 || document.querySelector('#status').dataset.state == 'error')",
                               timeout=120_000)
        status = page.inner_text("#status")
        answer = page.inner_text("#answer")
        drawn = page.evaluate("window.ivtlrDrawn")
        shot = os.path.join(out, "serve_page.png")
        page.screenshot(path=shot, full_page=True)
        browser.close()
    assert status.startswith("done"), status
    assert answer.strip() and drawn == N * K
    assert os.path.getsize(shot) > 10_000



MESH_SCRIPT = r"""
import sys, numpy as np, jax
from transformers import AutoTokenizer
from ivtlr_jax import IVTLRModel
from ivtlr_jax.generate import latent_prompt
from ivtlr_jax.serve.engine import Engine, Job
ckpt, = sys.argv[1:]
model = IVTLRModel.from_pretrained(ckpt, dtype="float32", mesh="auto")
engine = Engine(model, AutoTokenizer.from_pretrained(ckpt), max_batch=4, max_len=200, prefill_batch=2)
assert len(jax.devices()) == 2 and engine.cache.k.sharding.spec[1] is not None, engine.cache.k.sharding
pixels, grid, count = model.backbone.example_image()
pixels = np.random.default_rng(0).normal(size=pixels.shape).astype(np.float32)
lcfg = model.latent_config(k=4)
engine.start()
for extra in (0, 9):
    ids = [100 + extra] * (3 + extra) + engine._example_image_ids(count) + [107, 108, 109]
    job = engine.generate(Job(engine.layout(ids, 2, lcfg, pixels, grid), lcfg, len(ids) + 2, max_tokens=5))
    full = latent_prompt(model.config, ids, 2)
    ref = model.generate(np.array([full]), np.ones((1, len(full))), pixels, grid, max_new_tokens=5, k=4,
                         eos_token_ids=engine.eos_ids, pad_token_id=engine.pad_id)
    assert job.tokens == ref.tokens[0, : ref.lengths[0]].tolist(), (job.tokens, ref.tokens)
engine.stop()
print("ok", engine.cache.k.sharding.spec)
"""


def test_engine_on_a_mesh(server):
    """On a 2-device mesh the slots' cache is split over the batch (data) axes, as generate's cache is, and the
    answers equal generate's there."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, server["ckpt"]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout + out.stderr)[-3000:]

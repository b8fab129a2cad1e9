"""Requests to model inputs: OpenAI chat `messages` -> the backbone's prompt ids (as training built them) and images.

A chat-format backbone (Qwen2-VL) renders the messages with the tokenizer's chat template (else the backbone's
built-in one), an image part as the template's image placeholder, then expands each placeholder to the image's
token count: one user message [image, text] gives exactly the prompt training and `experiments.evaluate` give for
that image and text. A plain-format backbone (Chameleon) takes the messages' parts in order, text as is and an
image as image_start + placeholder + image_end, with the tokenizer's BOS (the release's prompt is
"[Question]:{" image "question}\n[Options]:..." : send those three parts).
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse

import numpy as np

from ivtlr_jax.data.images import decode_image
from ivtlr_jax.data.text import _JINJA, _token_id, expand_image_pads, tokenize_prompts


class RequestError(ValueError):
    """A bad request: HTTP `status`, the request field it concerns (`param`) and a one-line message."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def load_image_url(url: str, param: str, allow_dir: str | None):
    """A decoded RGB PIL image from a `data:` URL (base64 PNG/JPEG/...) or a `file://` path under allow_dir."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise RequestError(f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"{param}: the data: URL is not valid base64 ({e})", param) from None
        source = raw
    elif url.startswith("file://"):
        if allow_dir is None:
            raise RequestError(f"{param}: file:// images are off; start the server with --allow-dir DIR to read "
                               "images under DIR", param, status=403)
        path = os.path.realpath(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        root = os.path.realpath(allow_dir)
        if os.path.commonpath([path, root]) != root:
            raise RequestError(f"{param}: {path} is outside --allow-dir {root}", param, status=403)
        if not os.path.isfile(path):
            raise RequestError(f"{param}: no file {path}", param)
        with open(path, "rb") as f:
            source = f.read()
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise RequestError(f"{param}: image URLs must be data: (base64) or file:// under --allow-dir, got "
                           f"{scheme!r}: the server fetches nothing from the network", param)
    try:
        return decode_image(source)
    except ValueError as e:
        raise RequestError(f"{param}: the image does not decode ({e})", param) from None


def _parts(content, index: int):
    """A message's content as [(kind, value, param)] with kind "text" or "image_url"."""
    if isinstance(content, str):
        return [("text", content, f"messages[{index}].content")]
    out = []
    for j, part in enumerate(content):
        param = f"messages[{index}].content[{j}]"
        if part.type == "text":
            out.append(("text", part.text, param + ".text"))
        else:
            out.append(("image_url", part.image_url.url, param + ".image_url.url"))
    return out


def build_prompt(messages, tokenizer, bb, image_options, allow_dir: str | None = None, max_images: int = 1):
    """(prompt ids without latent tokens, pixel_values or None, image_grid_thw or None, images (PIL) in order).

    messages: the API's message models (role, content str or parts). Raises RequestError naming the field."""
    fmt = bb.prompt
    images, params = [], []
    if fmt.style == "chat":
        rendered = []
        for i, m in enumerate(messages):
            parts = []
            for kind, value, param in _parts(m.content, i):
                if kind == "text":
                    parts.append({"type": "text", "text": value})
                else:
                    images.append(load_image_url(value, param, allow_dir))
                    params.append(param)
                    parts.append({"type": "image"})
            rendered.append({"role": m.role, "content": parts})
        template = getattr(tokenizer, "chat_template", None)
        if template:
            text = tokenizer.apply_chat_template(rendered, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        elif fmt.chat_template:
            text = _JINJA.from_string(fmt.chat_template).render(messages=rendered, add_generation_prompt=True)
        else:
            raise RequestError("the tokenizer has no chat template and the backbone none built in", "messages",
                               status=500)
    else:
        pieces = []
        placeholder = (fmt.image_start or "") + fmt.image_token + (fmt.image_end or "")
        for i, m in enumerate(messages):
            for kind, value, param in _parts(m.content, i):
                if kind == "text":
                    pieces.append(value)
                else:
                    images.append(load_image_url(value, param, allow_dir))
                    params.append(param)
                    pieces.append(placeholder)
        text = "".join(pieces)
    if len(images) > max_images:
        raise RequestError(f"{params[max_images]}: {len(images)} images given; this model takes at most "
                           f"{max_images} image(s) per request", params[max_images])
    ids = tokenize_prompts(tokenizer, [text], fmt)[0]
    if not images:
        return ids, None, None, []
    pixels, grids = [], []
    for image, param in zip(images, params):
        try:
            pv, grid = image_options.process(image)
        except ValueError as e:
            raise RequestError(f"{param}: the image processor rejects it ({e})", param) from None
        pixels.append(pv)
        grids.append(grid)
    counts = [image_options.token_count(g) for g in grids]
    ids = expand_image_pads(ids, _token_id(tokenizer, fmt.image_token), counts)
    pixel_values = np.concatenate([np.asarray(p, np.float32) for p in pixels])  # as `collate` stacks them
    grid_thw = None if grids[0] is None else np.stack([np.asarray(g, np.int64).reshape(3) for g in grids])
    return ids, pixel_values, grid_thw, images


def shortest_prompt(tokenizer, bb, image_options) -> int:
    """Prompt ids of the shortest request with one image: one user message [image, empty text] (the smallest
    length bucket a warm-up needs)."""
    import io
    from types import SimpleNamespace as NS

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (280, 280), "white").save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    message = NS(role="user", content=[NS(type="image_url", image_url=NS(url=url)), NS(type="text", text="")])
    return len(build_prompt([message], tokenizer, bb, image_options)[0])

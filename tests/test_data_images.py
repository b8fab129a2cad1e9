"""Image preprocessing: parity with transformers' Qwen2-VL image processor (PIL backend)."""

import io

import numpy as np
import pytest
from PIL import Image

from ivtlr_jax.data.images import decode_image, process_image
from ivtlr_jax.models.qwen2_vl.images import ImageOptions, num_image_tokens, smart_resize


def _hf_processor(**kwargs):
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return mod.Qwen2VLImageProcessorPil(**kwargs)


def _noise(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_reference_mode_matches_hf():
    image = _noise(333, 517)
    pixels, grid = process_image(_png(image), ImageOptions())
    assert pixels.shape == (400, 1176) and pixels.dtype == np.float32
    assert grid.tolist() == [1, 20, 20] and num_image_tokens(grid) == 100
    resized = image.resize((280, 280), Image.Resampling.BICUBIC)  # what the release fed the processor
    hf = _hf_processor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)(images=[resized], return_tensors="np")
    np.testing.assert_array_equal(pixels, hf["pixel_values"])  # bit-exact
    assert hf["image_grid_thw"].tolist() == [[1, 20, 20]]


@pytest.mark.parametrize("size", [(333, 517), (60, 900), (1000, 700)])
def test_smart_mode_matches_hf(size):
    image = _noise(*size, seed=1)
    options = ImageOptions(resize_mode="smart", min_pixels=3136, max_pixels=200704)
    pixels, grid = process_image(image, options)
    hf = _hf_processor(min_pixels=3136, max_pixels=200704)(images=[image], return_tensors="np")
    assert grid.tolist() == hf["image_grid_thw"][0].tolist()
    np.testing.assert_array_equal(pixels, hf["pixel_values"])  # bit-exact


def test_smart_resize_bounds():
    assert smart_resize(280, 280) == (280, 280)
    h, w = smart_resize(4000, 3000, max_pixels=100_000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 100_000
    h, w = smart_resize(10, 10, min_pixels=56 * 56)
    assert h * w >= 56 * 56
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 5000)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_modes_become_rgb(mode):
    base = _noise(40, 50)
    image = base.convert(mode) if mode != "I;16" else base.convert("L").convert("I;16")
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    rgb = decode_image(buf.getvalue())
    assert rgb.mode == "RGB" and rgb.size == (50, 40)
    pixels, grid = process_image(buf.getvalue(), ImageOptions())
    assert pixels.shape == (400, 1176) and np.isfinite(pixels).all()


def test_rgba_composites_on_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert decode_image(image).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("value", [b"not an image", b"", None, {"bytes": None, "path": None}])
def test_undecodable_raises(value):
    with pytest.raises(ValueError):
        decode_image(value)


def test_truncated_png_raises():
    data = _png(_noise(64, 64))
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(data[: len(data) // 2])


def test_bad_options():
    with pytest.raises(ValueError, match="resize_mode"):
        ImageOptions(resize_mode="crop")
    with pytest.raises(ValueError, match="reference_size"):
        ImageOptions(reference_size=(250, 280))

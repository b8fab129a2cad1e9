"""Image preprocessing in numpy + PIL, the same output as transformers' PIL image processors.

qwen2_vl: RGB, bicubic resize, rescale, CLIP normalisation, patchify into HF-layout ``pixel_values``
rows of temporal_patch * 3 * patch * patch values (1176 for Qwen2-VL).
chameleon: transparency onto white, shortest edge to the VQ resolution (LANCZOS), centre crop,
pixel = x * 0.0078 - 1, channels first: (3, R, R).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
RESIZE_MODES = ("reference", "smart")
PROCESSORS = ("qwen2_vl", "chameleon")
CHAMELEON_RESCALE = 0.0078  # the release's (and transformers') rescale factor: not 1/127.5
# uint8 value -> Chameleon pixel, as transformers computes it: float64 rescale, cast to float32, minus mean 1.
_CHAMELEON = (np.arange(256, dtype=np.float64) * CHAMELEON_RESCALE).astype(np.float32) - np.float32(1.0)
# uint8 value -> normalised float32 per channel, computed as HF does: float64 rescale by 1/255,
# cast to float32, then (x - mean) / std in float32. Shape (3, 256).
_NORMALISED = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[None, :]
               - CLIP_MEAN[:, None]) / CLIP_STD[:, None]


@dataclass(frozen=True)
class ImageOptions:
    """How images become model inputs. qwen2_vl reference: fixed size (280x280 -> grid (1, 20, 20));
    chameleon: reference_size is the VQ tokenizer's square input and tokens_per_image its code count."""

    processor: str = "qwen2_vl"  # the model's image processor: qwen2_vl | chameleon
    resize_mode: str = "reference"
    reference_size: tuple[int, int] = (280, 280)  # (height, width)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_image: int | None = None  # chameleon: codes per image (1024 for 512x512)

    def __post_init__(self):
        if self.processor not in PROCESSORS:
            raise ValueError(f"processor must be one of {PROCESSORS}, got {self.processor!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        h, w = self.reference_size
        if self.processor == "chameleon":
            if h != w or h <= 0 or not self.tokens_per_image or self.resize_mode != "reference":
                raise ValueError(
                    f"chameleon images are square (reference_size={self.reference_size}), resized in reference "
                    f"mode (got {self.resize_mode!r}), with tokens_per_image set (got {self.tokens_per_image})"
                )
            return
        factor = self.patch_size * self.merge_size
        if h % factor or w % factor or h <= 0 or w <= 0:
            raise ValueError(
                f"reference_size must be positive multiples of patch_size*merge_size={factor}, "
                f"got {self.reference_size}"
            )
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"
            )

    @property
    def row_size(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of factor, pixel count in [min, max], aspect kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f} "
            f"for height={height}, width={width}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, RGBA/LA (composited on white) -> RGB."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(value) -> Image.Image:
    """bytes / {"bytes", "path"} / PIL image -> decoded RGB PIL image. Raises ValueError."""
    try:
        if isinstance(value, Image.Image):
            image = value
        else:
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
                if data is None and path:
                    with open(path, "rb") as f:
                        data = f.read()
            else:
                data = value
            if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
                raise ValueError(f"no image bytes (got {type(data).__name__})")
            image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(image)
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise ValueError(f"undecodable image: {type(exc).__name__}: {exc}") from exc


def target_size(height: int, width: int, options: ImageOptions) -> tuple[int, int]:
    """(height, width) the image is resized to."""
    if options.resize_mode == "reference":
        return options.reference_size
    return smart_resize(height, width, options.patch_size * options.merge_size,
                        options.min_pixels, options.max_pixels)


def resize_image(image: Image.Image, options: ImageOptions) -> np.ndarray:
    """RGB PIL image -> resized uint8 array (height, width, 3)."""
    h, w = target_size(image.height, image.width, options)
    if (image.height, image.width) != (h, w):
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def patchify(pixels: np.ndarray, options: ImageOptions) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) -> pixel_values (grid_h*grid_w, 1176) float32, grid_thw (3,) int64.

    Rows are ordered by merge window (2x2 neighbours consecutive), each row laid out as
    (channel, temporal, patch_y, patch_x), the frame repeated over the temporal axis: HF's layout.
    """
    h, w, c = pixels.shape
    p, m, tp = options.patch_size, options.merge_size, options.temporal_patch_size
    if c != 3 or h % (p * m) or w % (p * m) or pixels.dtype != np.uint8:
        raise ValueError(
            f"pixels must be uint8 (H, W, 3) with H, W multiples of {p * m}, got {pixels.dtype} {pixels.shape}"
        )
    gh, gw = h // p, w // p
    # Reorder the uint8 pixels first (cheap), then map values through the per-channel table.
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    x = x.reshape(gh * gw, 3, p * p)  # (rows, C, p*p) uint8
    rows = np.empty((gh * gw, 3, tp, p * p), dtype=np.float32)  # (rows, C, T, p*p)
    for ch in range(3):
        values = _NORMALISED[ch].take(x[:, ch])  # (rows, p*p) float32
        rows[:, ch] = values[:, None, :]
    return rows.reshape(gh * gw, 3 * tp * p * p), np.array([1, gh, gw], dtype=np.int64)


def chameleon_crop(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 (size, size, 3): shortest edge to `size` (LANCZOS), then the centre crop."""
    h, w = image.height, image.width
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    x = np.asarray(image, dtype=np.uint8)
    top, left = int((new_h - size) / 2), int((new_w - size) / 2)
    return x[top : top + size, left : left + size]


def chameleon_pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> (3, size, size) float32: shortest edge to `size` (LANCZOS), centre crop, x * 0.0078 - 1."""
    return np.ascontiguousarray(_CHAMELEON[chameleon_crop(image, size)].transpose(2, 0, 1))


def model_view(value, options: ImageOptions) -> np.ndarray:
    """uint8 (H, W, 3): the image as the model sees it (resized, and for chameleon centre-cropped)."""
    image = decode_image(value)
    if options.processor == "chameleon":
        return chameleon_crop(image, options.reference_size[0])
    return resize_image(image, options)


def process_image(value, options: ImageOptions | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Any image value -> the model's pixel inputs: qwen2_vl (pixel_values (rows, 1176) float32,
    image_grid_thw (3,) int64); chameleon ((1, 3, R, R) float32, None)."""
    options = options or ImageOptions()
    image = decode_image(value)
    if options.processor == "chameleon":
        return chameleon_pixels(image, options.reference_size[0])[None], None
    return patchify(resize_image(image, options), options)


def image_token_count(grid_thw, options: ImageOptions) -> int:
    """LLM tokens of one image under these options (grid_thw unused for chameleon)."""
    if options.processor == "chameleon":
        return int(options.tokens_per_image)
    return num_image_tokens(grid_thw, options.merge_size)


def num_image_tokens(grid_thw, merge_size: int = 2) -> int:
    """LLM tokens for one image: t * h * w / merge_size**2 (100 for grid (1, 20, 20))."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)

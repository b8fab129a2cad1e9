"""Qwen2-VL's image processor in numpy + PIL, the same output as transformers' Qwen2VLImageProcessor (PIL backend).

RGB, bicubic resize (to a fixed reference size, or Qwen2-VL's `smart_resize`), rescale, CLIP normalisation,
patchify into HF-layout ``pixel_values`` rows of temporal_patch * 3 * patch * patch values (1176). Imports no JAX.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
RESIZE_MODES = ("reference", "smart")


@functools.lru_cache(maxsize=8)
def normalised_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 value -> normalised float32 per channel, computed as HF does: float64 rescale by 1/255, cast to
    float32, then (x - mean) / std in float32. Shape (3, 256)."""
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[None, :] - m[:, None]) / s[:, None]


@dataclass(frozen=True)
class ImageOptions:
    """How images become Qwen2-VL inputs; the data layer's image processor for this backbone.

    reference: every image resized to reference_size (280x280 -> grid (1, 20, 20), 100 tokens), as the
    release does; smart: Qwen2-VL's own resize (aspect kept, pixel count in [min_pixels, max_pixels]).
    """

    resize_mode: str = "reference"
    reference_size: tuple[int, int] = (280, 280)  # (height, width)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = tuple(CLIP_MEAN.tolist())  # Qwen3-VL: (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = tuple(CLIP_STD.tolist())

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        h, w = self.reference_size
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

    # ------------------------------------------------------------------ the data layer's interface
    @property
    def same_grid(self) -> bool:
        """Every image gets the same grid (no need to read image sizes)."""
        return self.resize_mode == "reference"

    def grid(self, height: int, width: int) -> np.ndarray:
        """(3,) int64 image_grid_thw of an image of this size."""
        h, w = target_size(height, width, self)
        return np.array([1, h // self.patch_size, w // self.patch_size], dtype=np.int64)

    def token_count(self, grid_thw) -> int:
        return num_image_tokens(grid_thw, self.merge_size)

    def process(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """RGB PIL image -> pixel_values (rows, 1176) float32, image_grid_thw (3,) int64."""
        return patchify(resize_image(image, self), self)

    def view(self, image: Image.Image) -> np.ndarray:
        """uint8 (H, W, 3): the image as the model sees it (resized)."""
        return resize_image(image, self)


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
    table = normalised_table(tuple(options.image_mean), tuple(options.image_std))
    for ch in range(3):
        values = table[ch].take(x[:, ch])  # (rows, p*p) float32
        rows[:, ch] = values[:, None, :]
    return rows.reshape(gh * gw, 3 * tp * p * p), np.array([1, gh, gw], dtype=np.int64)


def num_image_tokens(grid_thw, merge_size: int = 2) -> int:
    """LLM tokens for one image: t * h * w / merge_size**2 (100 for grid (1, 20, 20))."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)

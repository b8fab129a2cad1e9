"""Chameleon's image processor in numpy + PIL, the same output as transformers' ChameleonImageProcessor (PIL).

Transparency onto white (the data layer's decoding), shortest edge to the VQ resolution (LANCZOS), centre
crop, pixel = x * 0.0078 - 1, channels first: (3, R, R). Imports no JAX.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

RESCALE = 0.0078  # the release's (and transformers') rescale factor: not 1/127.5
# uint8 value -> pixel, as transformers computes it: float64 rescale, cast to float32, minus mean 1.
_PIXEL = (np.arange(256, dtype=np.float64) * RESCALE).astype(np.float32) - np.float32(1.0)


@dataclass(frozen=True)
class ImageOptions:
    """How images become Chameleon inputs: one square of the VQ tokenizer's resolution, tokens_per_image codes."""

    resolution: int = 512
    tokens_per_image: int = 1024

    def __post_init__(self):
        if self.resolution <= 0 or self.tokens_per_image <= 0:
            raise ValueError(f"resolution={self.resolution} and tokens_per_image={self.tokens_per_image} must be "
                             "positive (the VQ tokenizer's square input and its code count)")

    # ------------------------------------------------------------------ the data layer's interface
    same_grid = True  # one fixed square per image: no grid

    def grid(self, height: int, width: int) -> np.ndarray:
        return np.zeros(3, np.int64)

    def token_count(self, grid_thw=None) -> int:
        return int(self.tokens_per_image)

    def process(self, image: Image.Image) -> tuple[np.ndarray, None]:
        """RGB PIL image -> ((1, 3, R, R) float32, no grid)."""
        return pixels(image, self.resolution)[None], None

    def view(self, image: Image.Image) -> np.ndarray:
        """uint8 (R, R, 3): the image as the model sees it (resized and centre-cropped)."""
        return crop(image, self.resolution)


def crop(image: Image.Image, size: int) -> np.ndarray:
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


def pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> (3, size, size) float32: shortest edge to `size` (LANCZOS), centre crop, x * 0.0078 - 1."""
    return np.ascontiguousarray(_PIXEL[crop(image, size)].transpose(2, 0, 1))


chameleon_crop, chameleon_pixels = crop, pixels

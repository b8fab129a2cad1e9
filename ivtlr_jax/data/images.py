"""Image decoding, and the model's image processor behind one small interface (no model code here).

A backbone's image processor (`Backbone.image_options(...)` gives one) is an object with:
  same_grid                 True when every image gets the same grid (image sizes need not be read)
  grid(height, width)       (3,) int64 image_grid_thw of an image of that size (zeros when the model has none)
  token_count(grid)         LLM image tokens of one image with that grid
  process(image)            RGB PIL image -> the model's pixel inputs (pixel_values, image_grid_thw or None)
  view(image)               RGB PIL image -> uint8 (H, W, 3), the image as the model sees it
The data layer decodes images (any mode, transparency onto white) and hands RGB images to it.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import numpy as np
from PIL import Image


class ImageProcessor(Protocol):
    """What the data layer asks of a backbone's image processor (see the module docstring)."""

    same_grid: bool

    def grid(self, height: int, width: int) -> np.ndarray: ...

    def token_count(self, grid_thw) -> int: ...

    def process(self, image: Image.Image) -> tuple[np.ndarray, Any]: ...

    def view(self, image: Image.Image) -> np.ndarray: ...


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


def model_view(value, options: ImageProcessor) -> np.ndarray:
    """uint8 (H, W, 3): the image as the model sees it (resized, cropped where the model crops)."""
    return options.view(decode_image(value))


def process_image(value, options: ImageProcessor) -> tuple[np.ndarray, np.ndarray | None]:
    """Any image value -> the model's pixel inputs (pixel_values, image_grid_thw or None)."""
    return options.process(decode_image(value))


def image_token_count(grid_thw, options: ImageProcessor) -> int:
    """LLM tokens of one image under these options."""
    return options.token_count(grid_thw)


def image_grid(image_bytes: bytes, options: ImageProcessor) -> np.ndarray:
    """(3,) int64 grid of one encoded image, from its header only (no pixel decode) unless every grid is the same."""
    if options.same_grid:
        return options.grid(0, 0)
    with Image.open(io.BytesIO(image_bytes)) as im:
        return options.grid(im.height, im.width)

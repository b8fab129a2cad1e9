"""Pictures of latent vision: the image as the model sees it with each latent step's chosen image tokens outlined."""

from __future__ import annotations

import os
import re

import numpy as np

STEP_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                (240, 50, 230), (210, 245, 60)]


def draw_selections(path: str, pixels: np.ndarray, grid, selected: np.ndarray, merge: int = 2,
                    patch: int = 14, title: str = "") -> None:
    """The resized image (H, W, 3) with each latent step's chosen image tokens outlined, plus a legend."""
    from PIL import Image, ImageDraw

    t, gh, gw = (int(v) for v in grid)
    mh, mw = gh // merge, gw // merge
    cell = merge * patch
    scale = max(1, 560 // max(pixels.shape[:2]))
    img = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST)
    legend_h = 22 * (len(selected) + 1) + 8
    canvas = Image.new("RGB", (img.width, img.height + legend_h), "white")
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    for step, idx in enumerate(selected):
        colour = STEP_COLOURS[step % len(STEP_COLOURS)]
        inset = step % 3  # steps never share a token; the inset keeps touching outlines apart
        for j in np.asarray(idx).tolist():
            r, c = (j % (mh * mw)) // mw, j % mw
            x0, y0 = c * cell * scale + inset, r * cell * scale + inset
            d.rectangle([x0, y0, x0 + cell * scale - 1 - 2 * inset, y0 + cell * scale - 1 - 2 * inset],
                        outline=colour, width=2)
    y = img.height + 6
    d.text((6, y), title[:90], fill="black")
    for step, idx in enumerate(selected):
        y += 22
        colour = STEP_COLOURS[step % len(STEP_COLOURS)]
        d.rectangle([6, y + 2, 22, y + 16], outline=colour, width=3)
        d.text((30, y + 2), f"latent step {step + 1}: {len(idx)} image tokens", fill="black")
    canvas.save(path)


def selection_picture_path(folder: str, example_id: str) -> str:
    """<folder>/<id>.png with every character outside [A-Za-z0-9_.-] of the id replaced by "_"."""
    return os.path.join(folder, re.sub(r"[^A-Za-z0-9_.-]", "_", example_id) + ".png")


def save_selection_picture(folder: str, bb, options, image, image_grid_thw, selected, example_id: str,
                           gold, predicted) -> str:
    """Draw one row's selections over its image as the model sees it; the backbone places its image tokens."""
    from ivtlr_jax.data import model_view

    grid, merge, patch = bb.image_token_layout(image_grid_thw)
    path = selection_picture_path(folder, example_id)
    draw_selections(path, model_view(image, options), grid, selected, merge=merge, patch=patch,
                    title=f"{example_id}: gold {gold}, predicted {predicted}")
    return path

"""A seeded synthetic visual-reasoning set in M3CoT's schema, drawn with PIL (no downloads).

Each image holds coloured digits and shapes on a 280x280 canvas; each question needs the
image and several steps ("what is the sum of the red numbers minus the number of blue
squares?"), with a 4-6 sentence rationale, 4 options and a ``domain`` column.

CLI: ``python -m ivtlr_jax.data.synthetic --out DIR --n 2000`` writes parquet files in the
hub's layout (``DIR/data/{split}-00000-of-00001.parquet``) that ``load_split`` reads back.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import string
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

CANVAS = 280
GRID = 4  # GRID x GRID cells, one object per used cell
COLOURS = {"red": (214, 39, 40), "blue": (31, 90, 200), "green": (44, 160, 44), "orange": (240, 140, 10)}
SHAPES = ("square", "circle", "triangle")
SPLITS = ("train", "validation", "test")
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
# M3CoT's columns, in the hub's order.
M3COT_COLUMNS = ("id", "category", "image_id", "question", "choices", "context", "answer",
                 "rationale", "split", "image", "domain", "topic")

_FONT: ImageFont.ImageFont | None = None


def _font():
    global _FONT
    if _FONT is None:
        try:
            _FONT = ImageFont.load_default(size=34)
        except (TypeError, OSError):  # Pillow without FreeType: small bitmap font
            _FONT = ImageFont.load_default()
    return _FONT


def _draw_scene(rng: np.random.Generator, colour_p: Sequence[float] | None = None) -> tuple[Image.Image, list[dict]]:
    """Random objects in distinct cells: digits {kind, colour, value} and shapes {kind, colour, shape}."""
    n_objects = int(rng.integers(6, 11))
    cells = rng.permutation(GRID * GRID)[:n_objects]
    background = tuple(int(v) for v in rng.integers(235, 256, size=3))
    image = Image.new("RGB", (CANVAS, CANVAS), background)
    draw = ImageDraw.Draw(image)
    colour_names = list(COLOURS)
    cell = CANVAS // GRID
    objects = []
    for k, c in enumerate(cells):
        if colour_p is None:
            colour = colour_names[int(rng.integers(len(colour_names)))]
        else:
            colour = colour_names[int(rng.choice(len(colour_names), p=colour_p))]
        x0 = (int(c) % GRID) * cell + int(rng.integers(4, 14))
        y0 = (int(c) // GRID) * cell + int(rng.integers(4, 14))
        size = int(rng.integers(40, 52))
        rgb = COLOURS[colour]
        if k % 2 == 0:  # about half digits, half shapes
            value = int(rng.integers(1, 10))
            draw.text((x0 + 8, y0), str(value), fill=rgb, font=_font())
            objects.append({"kind": "number", "colour": colour, "value": value})
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            box = (x0, y0, x0 + size, y0 + size)
            if shape == "square":
                draw.rectangle(box, fill=rgb)
            elif shape == "circle":
                draw.ellipse(box, fill=rgb)
            else:
                draw.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=rgb)
            objects.append({"kind": "shape", "colour": colour, "shape": shape})
    return image, objects


def _list_words(values: Sequence[int]) -> str:
    words = [str(v) for v in values]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def _numbers_sentence(colour: str, nums: Sequence[int]) -> str:
    if len(nums) == 1:
        return f"The only {colour} number in the image is {nums[0]}. "
    return f"The {colour} numbers in the image are {_list_words(nums)}. "


def _sum_sentence(nums: Sequence[int]) -> str:
    if len(nums) == 1:
        return f"So their sum is {nums[0]}. "
    return f"Their sum is {' + '.join(map(str, nums))} = {sum(nums)}. "


def _count_phrase(count: int, noun: str) -> str:
    return f"{'is' if count == 1 else 'are'} {count} {noun}{'' if count == 1 else 's'}"


def _numbers(objects, colour=None):
    return [o["value"] for o in objects if o["kind"] == "number" and (colour is None or o["colour"] == colour)]


def _count_shapes(objects, colour=None, shape=None):
    return sum(1 for o in objects if o["kind"] == "shape" and (colour is None or o["colour"] == colour)
               and (shape is None or o["shape"] == shape))


def _question(rng: np.random.Generator, objects) -> tuple[str, str, int, str, str]:
    """(question, rationale, answer value, domain, topic) for the scene; needs >= 1 number."""
    present = sorted({o["colour"] for o in objects if o["kind"] == "number"})
    colour = present[int(rng.integers(len(present)))]
    other = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    family = int(rng.integers(3))
    nums = _numbers(objects, colour)
    if family == 0:
        count = _count_shapes(objects, other, shape)
        total = sum(nums)
        value = total - count
        question = f"What is the sum of the {colour} numbers minus the number of {other} {shape}s?"
        rationale = (
            _numbers_sentence(colour, nums)
            + _sum_sentence(nums)
            + f"There {_count_phrase(count, f'{other} {shape}')} in the image. "
            f"Subtracting gives {total} - {count} = {value}. "
            f"So the result is {value}."
        )
        return question, rationale, value, "mathematics", "sum-minus-count"
    if family == 1:
        count = _count_shapes(objects, None, shape)
        largest = max(nums)
        value = largest + count
        question = f"What is the largest {colour} number plus the number of {shape}s of any colour?"
        rationale = (
            _numbers_sentence(colour, nums)
            + f"The largest of them is {largest}. "
            + f"Counting {shape}s of every colour gives {count}. "
            f"Adding them gives {largest} + {count} = {value}. "
            f"So the result is {value}."
        )
        return question, rationale, value, "mathematics", "max-plus-count"
    n_colour = sum(1 for o in objects if o["colour"] == colour)
    smallest = min(_numbers(objects))
    value = n_colour * smallest
    question = f"How many {colour} objects are there, multiplied by the smallest number in the image?"
    rationale = (
        f"The {colour} objects are the {colour} numbers and the {colour} shapes. "
        f"There {_count_phrase(len(nums), f'{colour} number')} and "
        f"{_count_shapes(objects, colour)} {colour} shape{'' if _count_shapes(objects, colour) == 1 else 's'}, "
        f"so {n_colour} {colour} object{'' if n_colour == 1 else 's'} in total. "
        f"The numbers in the image are {_list_words(_numbers(objects))}, and the smallest is {smallest}. "
        f"Multiplying gives {n_colour} x {smallest} = {value}. "
        f"So the result is {value}."
    )
    return question, rationale, value, "commonsense", "count-times-min"


def _options(rng: np.random.Generator, value: int) -> tuple[list[str], str]:
    """Four distinct options with the right value at a random letter."""
    offsets = [d for d in (-3, -2, -1, 1, 2, 3, 4, 5) if d]
    distractors = [value + int(d) for d in rng.permutation(offsets)[:3]]
    options = [value, *distractors]
    order = rng.permutation(4)
    choices = [str(options[i]) for i in order]
    letter = string.ascii_uppercase[int(np.where(order == 0)[0][0])]
    return choices, letter


def _majority_colour_example(rng: np.random.Generator):
    """Warm-up level: one colour dominates; options list the colours in a fixed order."""
    names = list(COLOURS)
    while True:
        major = int(rng.integers(len(names)))
        p = np.full(len(names), 0.3 / (len(names) - 1))
        p[major] = 0.7
        image, objects = _draw_scene(rng, p)
        counts = {c: sum(1 for o in objects if o["colour"] == c) for c in names}
        best = max(counts.values())
        if counts[names[major]] == best and sum(v == best for v in counts.values()) == 1:
            break
    colour = names[major]
    present = [c for c in names if counts[c]]
    rationale = (f"The image holds {len(objects)} objects. "
                 + " ".join(f"{counts[c]} of them {'is' if counts[c] == 1 else 'are'} {c}." for c in present)
                 + f" {colour.capitalize()} has the most objects. So the most common colour is {colour}.")
    question = "Which colour do most objects in the image have?"
    return image, question, rationale, names, string.ascii_uppercase[major], "perception", "majority-colour"


LEVELS = ("reasoning", "warmup")


def make_example(index: int, split: str = "train", seed: int = 0, level: str = "reasoning") -> dict:
    """One synthetic row in M3CoT's schema (image as {"bytes": PNG, "path": None}).

    level "reasoning": multi-step arithmetic over coloured digits and shapes (the default);
    level "warmup": which colour dominates, options in a fixed order (learnable in minutes on a CPU).
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    if level == "warmup":
        image, question, rationale, choices, letter, domain, topic = _majority_colour_example(rng)
    else:
        while True:
            image, objects = _draw_scene(rng)
            if _numbers(objects):
                break
        question, rationale, value, domain, topic = _question(rng, objects)
        choices, letter = _options(rng, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    row_id = f"synthetic-{split}-{index:06d}"
    return {
        "id": row_id, "category": "synthetic-" + topic, "image_id": row_id, "question": question,
        "choices": choices, "context": "", "answer": letter, "rationale": rationale, "split": split,
        "image": {"bytes": buf.getvalue(), "path": None}, "domain": domain, "topic": topic,
    }


def synthetic_dataset(n: int, split: str = "train", seed: int = 0, level: str = "reasoning"):
    """A datasets.Dataset of n synthetic rows with M3CoT's features (image as datasets.Image)."""
    import datasets

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = [make_example(i, split, seed, level) for i in range(n)]
    columns = {c: [r[c] for r in rows] for c in M3COT_COLUMNS}
    features = datasets.Features({
        **{c: datasets.Value("string") for c in M3COT_COLUMNS if c not in ("choices", "image")},
        "choices": datasets.List(datasets.Value("string")),
        "image": datasets.Image(),
    })
    features = datasets.Features({c: features[c] for c in M3COT_COLUMNS})
    return datasets.Dataset.from_dict(columns, features=features)


def write_synthetic(out: str, n: int = 2000, n_eval: int | None = None, seed: int = 0,
                    level: str = "reasoning") -> dict[str, str]:
    """Write train (n rows), validation and test (n_eval rows each, default n // 10) as hub-layout parquet."""
    n_eval = max(1, n // 10) if n_eval is None else n_eval
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    paths = {}
    for split in SPLITS:
        ds = synthetic_dataset(n if split == "train" else n_eval, split, seed, level)
        path = os.path.join(out, "data", f"{split}-00000-of-00001.parquet")
        ds.to_parquet(path)
        paths[split] = path
        logger.info("synthetic: wrote %d %s rows to %s", len(ds), split, path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (parquet in the hub's layout)")
    parser.add_argument("--n", type=int, default=2000, help="training rows")
    parser.add_argument("--n-eval", type=int, default=None, help="validation and test rows each (default n//10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", default="reasoning", choices=LEVELS,
                        help="reasoning: multi-step arithmetic questions (default); warmup: the dominant colour, "
                             "options in a fixed order (what the embedded default trains on)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_synthetic(args.out, args.n, args.n_eval, args.seed, args.level)


if __name__ == "__main__":
    main()

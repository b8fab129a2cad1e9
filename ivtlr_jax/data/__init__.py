"""Data pipeline for IVT-LR: loaders, steps and prompts, images, curriculum, batches, synthetic set.

Imports no model code and no JAX (host index and count are passed in as ints).
"""

from ivtlr_jax.data.collate import DEFAULT_BUCKETS, bucket_length, collate, make_buckets, repad
from ivtlr_jax.data.curriculum import (
    IGNORE_INDEX,
    CurriculumOptions,
    TextEncoding,
    build_stage_example,
    encode_row,
    encode_text,
    latent_plan,
)
from ivtlr_jax.data.images import ImageProcessor, decode_image, image_token_count, model_view, process_image, to_rgb
from ivtlr_jax.data.loaders import DATASET_NAMES, LoadSummary, load_split, load_split_with_summary, normalise_row
from ivtlr_jax.data.pipeline import BatchIterator, EncodedSplit, encode_split
from ivtlr_jax.data.text import (
    LATENT_TOKEN,
    build_prompt_ids,
    build_prompt_text,
    encode_answer,
    encode_steps,
    format_question,
    index_to_letter,
    render_chat,
    split_steps,
)

__all__ = [
    "DATASET_NAMES", "DEFAULT_BUCKETS", "IGNORE_INDEX", "LATENT_TOKEN",
    "BatchIterator", "CurriculumOptions", "EncodedSplit", "ImageProcessor", "LoadSummary", "TextEncoding",
    "bucket_length", "build_prompt_ids", "build_prompt_text", "build_stage_example", "collate",
    "decode_image", "encode_answer", "encode_row", "encode_split", "encode_steps", "encode_text",
    "format_question", "image_token_count", "index_to_letter", "latent_plan", "load_split",
    "load_split_with_summary", "make_buckets", "model_view", "normalise_row", "repad", "process_image",
    "render_chat", "split_steps", "to_rgb",
]

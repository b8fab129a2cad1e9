"""Serving a latent-reasoning checkpoint: an OpenAI-compatible HTTP server with continuous batching.

`engine.Engine` holds the decode slots and the engine thread (`programs`: its two device programs), `prompt`
turns chat messages into the prompt training built, `api` holds the request and response models, `app` the
FastAPI application (the chat completions API, /v1/models, /health, /metrics and the page at /).
"""

from ivtlr_jax.serve.engine import Engine, Job
from ivtlr_jax.serve.metrics import Metrics
from ivtlr_jax.serve.prompt import RequestError, build_prompt

__all__ = ["Engine", "Job", "Metrics", "RequestError", "build_prompt"]

"""The HTTP server: FastAPI routes over an `Engine` (run it with uvicorn; `experiments.serve` does).

  POST /v1/chat/completions   OpenAI chat completions (stream as server-sent events), IVT-LR extensions (api.py)
  GET  /v1/models             the one model served
  GET  /health                liveness, slots and queue
  GET  /metrics               Prometheus text: requests, tokens, queue depth, slots, TTFT and per-token latency
  GET  /                      the page: ask about an image, read the streamed answer, see each step's patches

Bad input gets a 4xx and a one-line OpenAI-style error ({"error": {"message", "type", "param", "code"}}) naming
the field; the engine keeps serving.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations (Request, imported in create_app)

import asyncio
import base64
import dataclasses
import io
import json
import os
import time
from types import SimpleNamespace

import numpy as np

from ivtlr_jax.eval.config import DEFAULT_MAX_NEW_TOKENS, method_settings
from ivtlr_jax.serve.api import ChatCompletion, ChatRequest, Choice, ModelCard, ModelList, ResponseMessage, Usage
from ivtlr_jax.serve.engine import Engine, Job
from ivtlr_jax.serve.prompt import RequestError, build_prompt

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


@dataclasses.dataclass
class ServeOptions:
    """The server's defaults and limits (the CLI's flags)."""

    model_name: str
    allow_dir: str | None = None
    method: str = "ivtlr"
    n_latent: int = 3
    k: int | None = None  # None: the backbone's default K
    max_latent: int = 16
    max_images: int = 1
    max_tokens: int | None = None  # None: the method's evaluation default (64; cot 512), capped by --max-len
    resize_mode: str = "reference"


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _loc(loc) -> str:
    """A pydantic error location as a field path: ('body', 'messages', 0, 'content') -> messages[0].content."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "str" or "[" in str(part):  # the union member pydantic tried (str, list[...], tagged parts)
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def selections_of(job: Job, bb, options, images) -> dict:
    """The API's `selections`: each latent step's chosen image tokens as grid cells of the request's images."""
    from PIL import Image

    counts, out_images = [], []
    for m, image in enumerate(images):
        thw = None if job.image_grid_thw is None else job.image_grid_thw[m]
        (t, gh, gw), merge, patch = bb.image_token_layout(thw)
        rows, cols = gh // merge, gw // merge
        view = options.view(image)
        buf = io.BytesIO()
        Image.fromarray(view).save(buf, "PNG")
        out_images.append({"rows": rows, "cols": cols, "cell": merge * patch, "height": int(view.shape[0]),
                           "width": int(view.shape[1]),
                           "view": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()})
        counts.append(t * rows * cols)
    starts = np.cumsum([0] + counts)
    steps = []
    for idx in np.asarray(job.selected).tolist():
        cells = []
        for j in idx:
            m = int(np.searchsorted(starts, j, side="right") - 1)
            local = j - int(starts[m])
            g = out_images[m]
            cells.append({"image": m, "row": (local % (g["rows"] * g["cols"])) // g["cols"],
                          "col": local % g["cols"], "token": int(j)})
        steps.append(cells)
    return {"images": out_images, "steps": steps}


class _Server:
    """What the routes share: the engine, the options, and a request's way to a job and back to a response."""

    def __init__(self, engine: Engine, opts: ServeOptions):
        self.engine, self.opts = engine, opts
        self.bb, self.model = engine.bb, engine.model
        self.image_options = self.bb.image_options(opts.resize_mode)
        self.created = int(time.time())
        self.metrics = engine.metrics

    def reject(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.metrics.rejected[status] += 1
        return _error(status, message, param, code)

    def prepare(self, req: ChatRequest):
        """The job of a request (host work: images, prompt, layout); raises RequestError."""
        opts, engine, model = self.opts, self.engine, self.model
        if req.model != opts.model_name:
            raise RequestError(f"model: {req.model!r} is not served here; GET /v1/models lists "
                               f"{opts.model_name!r}", "model", status=404, code="model_not_found")
        method = req.method or opts.method
        n_req = opts.n_latent if req.n_latent is None else req.n_latent
        if n_req > opts.max_latent:
            raise RequestError(f"n_latent: {n_req} is out of range; use 0..{opts.max_latent} (the server's "
                               "--max-latent)", "n_latent")
        k_req = opts.k if req.k is None else req.k
        try:
            n, k, latent_text = (0, k_req, True) if n_req == 0 else method_settings(
                SimpleNamespace(method=method, n_latent=n_req, k=k_req))
            lcfg = model.latent_config(k=k, latent_text=latent_text)
        except ValueError as e:
            raise RequestError(f"k: {e}" if "k=" in str(e) else str(e), "k" if "k=" in str(e) else "n_latent") \
                from None
        ids, pixel_values, grid, images = build_prompt(req.messages, engine.tok, self.bb, self.image_options,
                                                       opts.allow_dir, opts.max_images)
        batch = engine.layout(ids, n, lcfg, pixel_values, grid)
        room = engine.room(batch)
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is not None and wanted > room:
            raise RequestError(f"max_tokens: {wanted} answer tokens do not fit after this prompt ({room} left within "
                               f"--max-len {engine.max_len}); lower max_tokens or shorten the prompt", "max_tokens")
        default = opts.max_tokens or DEFAULT_MAX_NEW_TOKENS.get(method, 64)
        seed = req.seed if req.seed is not None else int(np.random.default_rng().integers(0, 2**31))
        job = Job(batch, lcfg, len(ids) + n, max_tokens=wanted or min(default, room), temperature=req.temperature,
                  top_p=req.top_p, seed=seed, stop=req.stops, image_grid_thw=grid)
        return job, images

    @staticmethod
    def usage(job: Job) -> dict:
        c = len(job.tokens)
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": c, "total_tokens": job.prompt_tokens + c,
                "latent_steps": job.n}

    async def selections(self, job: Job, images) -> dict:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(selections_of, job, self.bb, self.image_options, images)

    async def complete(self, req: ChatRequest, request, job: Job, events: asyncio.Queue, images):
        """The whole answer as one chat.completion (499 with the slot freed when the client goes away)."""
        from fastapi.responses import JSONResponse

        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), 0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.engine.cancel(job)
                        return JSONResponse({}, status_code=499)
                    continue
                if ev[0] == "error":
                    return _error(500, f"the request failed in the engine: {ev[1]}")
                if ev[0] == "done":
                    break
        except asyncio.CancelledError:
            self.engine.cancel(job)
            raise
        body = ChatCompletion(
            id=job.id, created=int(time.time()), model=self.opts.model_name, usage=Usage(**self.usage(job)),
            choices=[Choice(message=ResponseMessage(content=job.text), finish_reason=job.finish_reason,
                            token_ids=job.tokens)],
            selections=await self.selections(job, images) if req.return_selections else None)
        return JSONResponse(body.model_dump(exclude_none=True))

    def _chunk(self, job: Job, delta: dict, finish=None, **extra) -> str:
        data = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.opts.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                            **extra}]}
        return f"data: {json.dumps(data)}\n\n"

    async def stream(self, req: ChatRequest, job: Job, events: asyncio.Queue, images):
        """The answer as server-sent chunks in OpenAI's format, ending with [DONE]; the slot is freed if the client
        goes away first."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        finished = False
        try:
            first = {"role": "assistant", "content": ""}
            while True:
                ev = await events.get()
                if ev[0] == "selected":
                    if req.return_selections:
                        yield _with(self._chunk(job, first), "selections", await self.selections(job, images))
                    else:
                        yield self._chunk(job, first)
                elif ev[0] == "delta":
                    yield self._chunk(job, {"content": ev[1]} if ev[1] else {}, token_ids=[ev[2]])
                elif ev[0] in ("done", "error"):
                    finished = True
                    if ev[0] == "done":
                        yield self._chunk(job, {}, job.finish_reason)
                        if include_usage:
                            data = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()),
                                    "model": self.opts.model_name, "choices": [], "usage": self.usage(job)}
                            yield f"data: {json.dumps(data)}\n\n"
                    else:
                        err = {"error": {"message": f"the request failed in the engine: {ev[1]}",
                                         "type": "server_error", "param": None, "code": None}}
                        yield f"data: {json.dumps(err)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client went away: free its slot
                self.engine.cancel(job)


def _install_error_handlers(app, server: _Server) -> None:
    """Every error as one line in OpenAI's shape, naming the field where there is one."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return server.reject(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}", "body",
                                 "json_invalid")
        param = _loc(first["loc"])
        return server.reject(400, f"{param}: {first['msg']}", param, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        return server.reject(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc: RequestError):
        return server.reject(exc.status, str(exc), exc.param, exc.code)


def create_app(engine: Engine, opts: ServeOptions):
    """The FastAPI application serving `engine` (started with the app, stopped with it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    server = _Server(engine, opts)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="ivtlr_jax serve", lifespan=lifespan,
                  description="OpenAI-compatible chat completions for an IVT-LR latent-reasoning checkpoint")
    app.state.engine, app.state.options = engine, opts
    _install_error_handlers(app, server)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        job, images = await run_in_threadpool(server.prepare, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_event = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        engine.submit(job)
        server.metrics.prompt_tokens += job.prompt_tokens
        server.metrics.latent_steps += job.n
        if not req.stream:
            return await server.complete(req, request, job, events, images)
        return StreamingResponse(server.stream(req, job, events, images), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=opts.model_name, created=server.created)]).model_dump()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": opts.model_name, "slots": engine.max_batch, "slots_occupied": engine.occupied,
                "queue_depth": len(engine.queue),
                "engine_alive": engine.thread is not None and engine.thread.is_alive()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/ivtlr/defaults")
    async def defaults():
        """The page's settings: the served model and the request defaults."""
        return {"model": opts.model_name, "method": opts.method, "n_latent": opts.n_latent,
                "k": server.model.latent_config(k=opts.k).k, "max_latent": opts.max_latent}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    return app


def _with(event: str, key: str, value) -> str:
    """An SSE `data:` chunk with a top-level field added."""
    data = json.loads(event[len("data: "):])
    data[key] = value
    return f"data: {json.dumps(data)}\n\n"

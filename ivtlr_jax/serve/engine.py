"""Continuous batching for latent-reasoning generation, after JetStream: a fixed set of decode slots, each request
prefilled alone (prompt, latent chunks, first answer token) and inserted into a free slot, one jitted step
advancing every live slot, a finished or cancelled slot freed at once for the next request.

One engine thread owns the device: it admits queued requests into free slots (`programs.prefill_insert`) and runs
`programs.decode_step`, handing each request its events through the callback the request came with:
("selected", (n, k) array), ("delta", text, token ids), ("done", finish_reason), ("error", message). Prompt lengths
before the latent tokens are bucketed (`data.make_buckets`, as `experiments.evaluate` pads them), so after
`warmup` no request compiles a program anew.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from ivtlr_jax import sharding as sh
from ivtlr_jax.data.collate import bucket_length, make_buckets
from ivtlr_jax.generate import latent_prompt
from ivtlr_jax.latent import LatentBatch, LatentConfig, make_latent_batch, to_device
from ivtlr_jax.serve import programs
from ivtlr_jax.serve.metrics import Metrics
from ivtlr_jax.serve.prompt import RequestError

log = logging.getLogger("ivtlr_jax.serve")


@dataclasses.dataclass
class Job:
    """One admitted request: its laid-out prompt (a LatentBatch of one row) and generation options."""

    batch: LatentBatch
    lcfg: LatentConfig
    prompt_tokens: int  # prompt ids (image tokens and <|latent|> tokens included), without padding
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    on_event: Callable | None = None
    image_grid_thw: np.ndarray | None = None  # (images, 3) of the request's images (None: the backbone has no grid)
    id: str = ""
    cancelled: bool = False
    tokens: list = dataclasses.field(default_factory=list)
    text: str = ""  # the text sent so far
    finish_reason: str | None = None
    selected: np.ndarray | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float | None = None

    @property
    def n(self) -> int:
        return self.batch.n

    def emit(self, *event) -> None:
        if self.on_event is not None:
            self.on_event(event)


class Engine:
    """The slots, the queue and the engine thread over one model (`IVTLRModel`) and its tokenizer."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_len: int = 2048, prefill_batch: int = 4,
                 decode_steps: int = 1, eos_ids=None, pad_id=None, metrics: Metrics | None = None):
        if max_batch < 1 or prefill_batch < 1 or decode_steps < 1:
            raise ValueError(f"max_batch={max_batch}, prefill_batch={prefill_batch} and decode_steps={decode_steps} "
                             "must be >= 1")
        self.decode_steps = int(decode_steps)  # tokens per slot per decode call
        self.prefill_batch = min(int(prefill_batch), int(max_batch))  # G: requests prefilled together
        self.model, self.tok, self.bb = model, tokenizer, model.backbone
        self.mesh = model.mesh
        self.max_batch, self.max_len = int(max_batch), int(max_len)
        cfg = model.config
        eos = set(cfg.eos_token_id or ()) if eos_ids is None else set(eos_ids)
        if eos_ids is None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        if not eos:
            raise ValueError("neither the tokenizer nor the checkpoint config names an EOS token")
        self.eos_ids = tuple(sorted(int(e) for e in eos))
        pad = pad_id if pad_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(cfg.pad_token_id if pad is None and cfg.pad_token_id is not None else
                          (self.eos_ids[0] if pad is None else pad))
        self.buckets = make_buckets(max_len=max(32, -(-self.max_len // 32) * 32))
        self.metrics = metrics or Metrics()
        self.metrics.slots_total = self.max_batch
        self.cache, self.kv_valid = programs.init_slots(self.bb, self.max_batch, self.max_len, model.dtype, self.mesh)
        s = self.max_batch
        self.slot_job: list[Job | None] = [None] * s
        self.last = np.zeros(s, np.int32)
        self.index = np.zeros(s, np.int32)
        self.pos = np.zeros(s, np.int32)
        self.steps = np.zeros(s, np.int32)
        self.keys = np.zeros((s, 2), np.uint32)
        self.temperature = np.zeros(s, np.float32)
        self.top_p = np.ones(s, np.float32)
        self.queue: collections.deque[Job] = collections.deque()
        self.cv = threading.Condition()
        self.ids = itertools.count()
        self.thread: threading.Thread | None = None
        self.running = False
        self.fault: Callable | None = None  # tests: called with each job before its prefill (may raise)
        self.step_hook: Callable | None = None  # tests: called after each decode step (e.g. to slow it down)

    # ------------------------------------------------------------------ host side: requests to jobs
    def layout(self, prompt_ids, n: int, lcfg: LatentConfig, pixel_values=None, image_grid_thw=None) -> LatentBatch:
        """One request's LatentBatch: the prompt left-padded to its length bucket, then n <|latent|> tokens (the
        layout `collate` gives a batch of one in `experiments.evaluate`). Raises RequestError."""
        try:
            ids = latent_prompt(self.model.config, prompt_ids, n)
        except ValueError as e:
            raise RequestError(str(e), "n_latent") from None
        p = len(prompt_ids)
        n_img = sum(int(t) == self.model.config.image_token_id for t in prompt_ids)
        if n and n * lcfg.k > n_img:
            raise RequestError(f"k: {n} latent steps x k={lcfg.k} = {n * lcfg.k} image embeddings requested but the "
                               f"prompt has only {n_img} image tokens{' (no image)' if not n_img else ''}; lower k or "
                               "n_latent", "k")
        try:
            width = bucket_length(p, self.buckets, "prompt length")
        except ValueError:
            width = self.max_len + 1
        total = width + n * lcfg.chunk_len if n else width
        if total >= self.max_len:
            raise RequestError(f"messages: the prompt is {p} tokens ({width} in its length bucket"
                               f"{f', plus {n} latent steps of {lcfg.chunk_len}' if n else ''}), which leaves no room "
                               f"for an answer within --max-len {self.max_len}; shorten the prompt or restart the "
                               "server with a larger --max-len", "messages")
        row = np.full((1, width + n), self.pad_id, np.int32)
        mask = np.zeros((1, width + n), np.int32)
        row[0, width - p:], mask[0, width - p:] = ids, 1
        try:
            return make_latent_batch(self.bb, lcfg, row, mask, None, pixel_values, image_grid_thw,
                                     allow_no_latent_token=True)
        except ValueError as e:
            param = "k" if "lower k" in str(e) else "messages"
            raise RequestError(str(e).replace("row 0: ", ""), param) from None

    def room(self, batch: LatentBatch) -> int:
        """Answer tokens that fit the slot after this prompt and its latent chunks."""
        return self.max_len - batch.kv_valid.shape[1]

    # ------------------------------------------------------------------ the queue
    def submit(self, job: Job) -> Job:
        if job.max_tokens < 1 or job.max_tokens > self.room(job.batch):
            raise RequestError(f"max_tokens={job.max_tokens} must be in [1, {self.room(job.batch)}] for this prompt "
                               f"(--max-len {self.max_len})", "max_tokens")
        job.id = job.id or f"chatcmpl-{next(self.ids)}"
        job.t_submit = time.perf_counter()
        with self.cv:
            self.queue.append(job)
            self.metrics.queue_depth = len(self.queue)
            self.cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Free the job's slot (or drop it from the queue) at the engine's next turn."""
        job.cancelled = True
        with self.cv:
            self.cv.notify()

    def start(self) -> Engine:
        if self.thread is None:
            self.running = True
            self.thread = threading.Thread(target=self._loop, name="ivtlr-serve-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        self.running = False
        with self.cv:
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None

    def generate(self, job: Job, timeout: float = 600.0) -> Job:
        """Submit a job and wait for it (for Python callers and tests); its tokens, text and finish_reason."""
        done = threading.Event()
        events = []

        def on_event(ev):
            events.append(ev)
            if ev[0] in ("done", "error"):
                done.set()

        job.on_event = on_event
        self.submit(job)
        if not done.wait(timeout):
            self.cancel(job)
            raise TimeoutError(f"job {job.id} did not finish in {timeout} s")
        if events[-1][0] == "error":
            raise RuntimeError(events[-1][1])
        return job

    # ------------------------------------------------------------------ the engine thread
    @property
    def occupied(self) -> int:
        return sum(j is not None for j in self.slot_job)

    def _loop(self) -> None:
        while self.running:
            with self.cv:
                while self.running and not self.queue and not self.occupied:
                    self.cv.wait(timeout=0.5)
            if not self.running:
                break
            self._reap()
            self._admit()
            if self.occupied:
                self._step()

    def _reap(self) -> None:
        """Free cancelled slots and drop cancelled queued jobs."""
        for s, job in enumerate(self.slot_job):
            if job is not None and job.cancelled:
                self._finish(s, "cancelled")
        with self.cv:
            if any(j.cancelled for j in self.queue):
                kept = [j for j in self.queue if not j.cancelled]
                for j in self.queue:
                    if j.cancelled:
                        self.metrics.count_request("cancelled")
                self.queue = collections.deque(kept)
                self.metrics.queue_depth = len(self.queue)

    @staticmethod
    def _layout_key(job: Job):
        """Jobs with equal keys share a prefill program (the same shapes and latent options)."""
        shapes = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(job.batch))
        return shapes, job.batch.n, job.batch.prefix_len, job.lcfg

    def _admit(self) -> None:
        """Prefill queued jobs into free slots, G at a time: the first queued job and the next ones of its layout."""
        while True:
            free = [s for s, j in enumerate(self.slot_job) if j is None]
            with self.cv:
                while self.queue and self.queue[0].cancelled:
                    self.queue.popleft()
                    self.metrics.count_request("cancelled")
                if not free or not self.queue:
                    self.metrics.queue_depth = len(self.queue)
                    return
                head = self.queue.popleft()
                group, key, rest = [head], self._layout_key(head), collections.deque()
                while self.queue:
                    job = self.queue.popleft()
                    if len(group) < min(len(free), self.prefill_batch) and not job.cancelled and \
                            self._layout_key(job) == key:
                        group.append(job)
                    else:
                        rest.append(job)
                self.queue = rest
                self.metrics.queue_depth = len(self.queue)
            try:
                self._prefill(group, free[: len(group)])
            except Exception:  # noqa: BLE001  (retried one by one: a request that fails, fails alone)
                log.warning("a prefill of %d requests failed; retrying them one by one", len(group))
                for job, s in zip(group, free):
                    try:
                        self._prefill([job], [s])
                    except Exception as e:  # noqa: BLE001  (the engine keeps serving)
                        log.exception("request %s failed in prefill", job.id)
                        self.metrics.count_request("error")
                        job.emit("error", f"{type(e).__name__}: {e}")

    def _prefill(self, group: list[Job], slots: list[int]) -> None:
        if self.fault is not None:
            for job in group:
                self.fault(job)
        g = self.prefill_batch
        rows = group + [group[0]] * (g - len(group))  # filler rows repeat the first job, into its slot
        where = np.asarray(slots + [slots[0]] * (g - len(group)), np.int32)
        host = jax.tree.map(lambda *xs: np.concatenate(xs), *[j.batch for j in rows])
        batch = to_device(host) if self.mesh is None else sh.put_batch(self.mesh, host)
        keys = np.stack([np.asarray(jax.random.PRNGKey(j.seed), np.uint32) for j in rows])
        self.cache, self.kv_valid, first, selected, next_pos = programs.prefill_insert(
            self.bb, self.model.params, group[0].lcfg, batch, keys,
            np.asarray([j.temperature for j in rows], np.float32), np.asarray([j.top_p for j in rows], np.float32),
            self.cache, self.kv_valid, where, mesh=self.mesh)
        first, selected, next_pos = np.asarray(first), np.asarray(selected), np.asarray(next_pos)
        for r, (job, s) in enumerate(zip(group, slots)):
            job.selected = selected[:, r]
            self.slot_job[s] = job
            self.last[s], self.index[s], self.pos[s], self.steps[s] = first[r], job.batch.kv_valid.shape[1], \
                next_pos[r], 1
            self.keys[s], self.temperature[s], self.top_p[s] = keys[r], job.temperature, job.top_p
        self.metrics.slots_occupied = self.occupied
        for r, (job, s) in enumerate(zip(group, slots)):
            job.emit("selected", job.selected)
            self._token(s, job, int(first[r]))

    def _step(self) -> None:
        sample = bool(any(j is not None and j.temperature > 0 for j in self.slot_job))
        d = self.decode_steps
        try:
            self.cache, tokens = programs.decode_step(
                self.bb, self.model.params, self.cache, self.kv_valid, self.last, self.index, self.pos, self.keys,
                self.steps, self.temperature, self.top_p, mesh=self.mesh, sample=sample, steps_per_call=d)
            tokens = np.asarray(tokens)  # (d, S)
        except Exception as e:  # noqa: BLE001  (a failed step fails the requests it held)
            log.exception("decode step failed")
            for s, job in enumerate(self.slot_job):
                if job is not None:
                    self.slot_job[s] = None
                    self.metrics.count_request("error")
                    job.emit("error", f"{type(e).__name__}: {e}")
            self.metrics.slots_occupied = 0
            self.cache, self.kv_valid = programs.init_slots(self.bb, self.max_batch, self.max_len, self.model.dtype,
                                                            self.mesh)
            return
        live = [s for s, j in enumerate(self.slot_job) if j is not None]
        for i in range(d):
            for s in live:
                job = self.slot_job[s]
                if job is not None:  # else it finished earlier in this call: its surplus tokens are dropped
                    self._token(s, job, int(tokens[i, s]))
        for s in live:
            if self.slot_job[s] is not None:
                self.index[s] += d
                self.pos[s] += d
                self.steps[s] += d
                self.last[s] = tokens[d - 1, s]
        if self.step_hook is not None:
            self.step_hook()

    def _token(self, s: int, job: Job, token: int) -> None:
        """Record one generated token of the job in slot s: send the new text, finish on EOS, stop or length."""
        now = time.perf_counter()
        if job.t_first is None:
            job.t_first = now
            self.metrics.ttft.observe(now - job.t_submit)
        else:
            self.metrics.tpot.observe(now - job.t_last)
        job.t_last = now
        job.tokens.append(token)
        self.metrics.completion_tokens += 1
        eos = token in self.eos_ids
        full = self.tok.decode(job.tokens, skip_special_tokens=True)
        reason = "stop" if eos else ("length" if len(job.tokens) >= job.max_tokens else None)
        if job.stop:
            hits = [full.find(x) for x in job.stop if x and full.find(x) >= 0]
            if hits:
                full, reason = full[: min(hits)], "stop"
        if reason is None:
            hold = max((len(x) for x in job.stop), default=1) - 1  # a stop string may be starting
            ready = full[: len(full) - hold] if hold else full
            if ready.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
                ready = ready.rstrip("\ufffd")
        else:
            ready = full
        delta = ready[len(job.text):] if len(ready) > len(job.text) else ""
        job.text = job.text + delta
        job.emit("delta", delta, token)
        if reason is not None:
            self._finish(s, reason)

    def _finish(self, s: int, reason: str) -> None:
        job = self.slot_job[s]
        self.slot_job[s] = None
        self.index[s] = self.pos[s] = self.steps[s] = 0
        self.temperature[s] = 0.0
        self.metrics.slots_occupied = self.occupied
        job.finish_reason = reason
        self.metrics.count_request(reason)
        job.emit("done", reason)

    # ------------------------------------------------------------------ warm-up
    def warmup(self, methods: list[tuple[int, LatentConfig]], min_prompt: int = 1, sample: bool = False) -> int:
        """Compile the decode step and the prefill of every length bucket that fits --max-len, for each (n, lcfg),
        with a prompt holding one example image; returns the programs compiled (`programs.compiled_programs`)."""
        if self.occupied or self.queue:
            raise RuntimeError("warm up before serving: slots are in use")
        pixel_values, grid, count = self.bb.example_image()
        image_run = self._example_image_ids(count)
        for n, lcfg in methods:
            for width in self.buckets:
                if width < max(min_prompt, len(image_run)) or width + n * lcfg.chunk_len >= self.max_len:
                    continue
                ids = [self.pad_id] * (width - len(image_run)) + image_run
                one = self.layout(ids, n, lcfg, pixel_values, grid)
                g = self.prefill_batch
                host = jax.tree.map(lambda *xs: np.concatenate(xs), *[one] * g)
                batch = to_device(host) if self.mesh is None else sh.put_batch(self.mesh, host)
                self.cache, self.kv_valid, first, *_ = programs.prefill_insert(
                    self.bb, self.model.params, lcfg, batch, np.zeros((g, 2), np.uint32), np.zeros(g, np.float32),
                    np.ones(g, np.float32), self.cache, self.kv_valid, np.zeros(g, np.int32), mesh=self.mesh)
                np.asarray(first)
        for flag in (False, True) if sample else (False,):
            self.cache, tokens = programs.decode_step(
                self.bb, self.model.params, self.cache, self.kv_valid, self.last, self.index, self.pos, self.keys,
                self.steps, self.temperature, self.top_p, mesh=self.mesh, sample=flag,
                steps_per_call=self.decode_steps)
            np.asarray(tokens)
        return programs.compiled_programs()

    def _example_image_ids(self, count: int) -> list[int]:
        cfg = self.model.config
        start = getattr(cfg, "vision_start_token_id", None) or getattr(cfg, "image_start_token_id", None)
        end = getattr(cfg, "vision_end_token_id", None) or getattr(cfg, "image_end_token_id", None)
        return [t for t in (start,) if t is not None] + [cfg.image_token_id] * count + \
            [t for t in (end,) if t is not None]

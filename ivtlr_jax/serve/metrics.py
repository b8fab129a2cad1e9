"""The server's counters, gauges and latency histograms, written in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

import bisect
import collections
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram of seconds (thread-safe observe)."""

    def __init__(self, name: str, help_text: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum, self.count = 0.0, 0
        self.lock = threading.Lock()
        self.values: collections.deque = collections.deque(maxlen=100_000)  # raw values (bench_serve, tests)

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1
            self.values.append(value)

    def text(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self.lock:
            acc = 0
            for le, c in zip(self.buckets, self.counts):
                acc += c
                lines.append(f'{self.name}_bucket{{le="{le}"}} {acc}')
            lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
            lines += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """What GET /metrics reports; the engine thread and the request handlers update it."""

    def __init__(self):
        self.requests: collections.Counter = collections.Counter()  # finished requests by outcome
        self.rejected: collections.Counter = collections.Counter()  # 4xx by status code
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latent_steps = 0
        self.queue_depth = 0
        self.slots_occupied = 0
        self.slots_total = 0
        self.compiled_programs = 0
        self.ttft = Histogram("ivtlr_time_to_first_token_seconds",
                              "Seconds from a request's arrival at the engine to its first answer token.")
        self.tpot = Histogram("ivtlr_time_per_output_token_seconds",
                              "Seconds between consecutive answer tokens of a request.")
        self.lock = threading.Lock()

    def count_request(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] += 1

    def text(self) -> str:
        from ivtlr_jax.serve.programs import compiled_programs

        lines = ["# HELP ivtlr_requests_total Finished requests by outcome (stop, length, cancelled, error).",
                 "# TYPE ivtlr_requests_total counter"]
        with self.lock:
            outcomes = dict(self.requests)
        for outcome in sorted(set(outcomes) | {"stop", "length", "cancelled", "error"}):
            lines.append(f'ivtlr_requests_total{{outcome="{outcome}"}} {outcomes.get(outcome, 0)}')
        lines += ["# HELP ivtlr_rejected_requests_total Requests refused before the engine, by HTTP status.",
                  "# TYPE ivtlr_rejected_requests_total counter"]
        for status, c in sorted(self.rejected.items()):
            lines.append(f'ivtlr_rejected_requests_total{{status="{status}"}} {c}')
        for name, kind, help_text, value in (
            ("ivtlr_prompt_tokens_total", "counter", "Prompt tokens admitted (image and latent tokens included).",
             self.prompt_tokens),
            ("ivtlr_completion_tokens_total", "counter", "Answer tokens generated.", self.completion_tokens),
            ("ivtlr_latent_steps_total", "counter", "Latent reasoning steps run.", self.latent_steps),
            ("ivtlr_queue_depth", "gauge", "Requests waiting for a free slot.", self.queue_depth),
            ("ivtlr_slots_occupied", "gauge", "Decode slots holding a request.", self.slots_occupied),
            ("ivtlr_slots_total", "gauge", "Decode slots (--max-batch).", self.slots_total),
            ("ivtlr_compiled_programs", "gauge", "Device programs the engine has compiled.", compiled_programs()),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += self.ttft.text() + self.tpot.text()
        return "\n".join(lines) + "\n"

"""Batches made ahead in a background thread (collated, laid out on the host, put on the devices), so the
train step never waits on the host."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterate `prepare(item)` for the items of `source`, made by one background thread `depth` items ahead.

    Exceptions of the source or of `prepare` reach the consumer at the item where they happened.
    `close()` (also on garbage collection or a `with` block's end) stops the thread; the source is not
    consumed further.
    """

    def __init__(self, source: Iterable, prepare: Callable[[Any], Any], depth: int = 2,
                 name: str = "ivtlr-batch-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source = iter(source)
        self._prepare = prepare
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set() or not self._put(self._prepare(item)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer
            self._put(_Failure(e))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        value = self._queue.get()
        if value is _END:
            self._done = True
            raise StopIteration
        if isinstance(value, _Failure):
            self._done = True
            raise value.error
        return value

    def close(self) -> None:
        self._stop.set()
        self._done = True
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

"""The processes of a multi-process run watch each other: a heartbeat in the coordination service's
key-value store, and a clear exit when a peer is gone, instead of a collective that waits forever.

JAX's own coordination service also notices a dead process, but only after its heartbeat timeout, and
then aborts the survivors with a C++ stack trace. `PeerWatchdog` runs with a shorter timeout (JAX's
is set to at least twice it), so a survivor prints one line that says which process is gone and how
to go on, and exits with `EXIT_PEER_LOST`. A coordinator (process 0) that dies takes the service with
it: the survivors then stop at once with JAX's own message ("... another task died").
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("ivtlr_jax.train")

EXIT_PEER_LOST = 3  # exit status of a process that stopped because a peer is gone
KEY = "ivtlr_jax/heartbeat/{}"
DONE, FAILED = "done", "failed:"


def _client():
    from jax._src import distributed

    return distributed.global_state.client


class PeerWatchdog:
    """Heartbeat of this process and a watch on the others (a daemon thread); a no-op in one process."""

    def __init__(self, timeout_s: float = 60.0, interval_s: float | None = None,
                 resume_hint: Callable[[], str] | None = None):
        import jax

        self.pid, self.nproc = jax.process_index(), jax.process_count()
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or max(0.2, min(2.0, self.timeout_s / 10))
        self.resume_hint = resume_hint
        self._stop = threading.Event()
        self._thread = None
        self.client = _client() if self.nproc > 1 else None

    @property
    def active(self) -> bool:
        return self.client is not None

    def start(self) -> PeerWatchdog:
        if self.active and self._thread is None:
            self._beat(0)
            self._thread = threading.Thread(target=self._run, name="ivtlr-peer-watchdog", daemon=True)
            self._thread.start()
        return self

    def _beat(self, n: int | str) -> None:
        self.client.key_value_set(KEY.format(self.pid), str(n), allow_overwrite=True)

    def _run(self) -> None:
        peers = [p for p in range(self.nproc) if p != self.pid]
        seen = {p: (None, time.monotonic()) for p in peers}  # last value, when it last changed
        n, last_round = 0, time.monotonic()
        failed_since: dict[int, float] = {}
        while not self._stop.wait(self.interval_s):
            n += 1
            try:
                self._beat(n)
                values = {p: self._get(p) for p in peers}
            except Exception as e:  # the coordination service is gone with process 0
                if self._stop.is_set():
                    return
                self._exit(f"lost the coordinator (process 0): {str(e).splitlines()[0] if str(e) else e!r}")
                return
            now = time.monotonic()
            stalled, last_round = now - last_round, now
            if stalled > max(self.timeout_s / 4, 4 * self.interval_s):  # this thread could not run: judge nobody
                logger.warning("peer watchdog: this process could not run its heartbeat for %.1f s", stalled)
                seen = {p: (v, now) for p, (v, _) in seen.items()}
                continue
            for p, value in values.items():
                if value == DONE:
                    continue
                if value is not None and value.startswith(FAILED):
                    failed_since.setdefault(p, now)  # give this process time to meet the same error itself
                    if now - failed_since[p] > min(self.timeout_s, 10.0):
                        self._exit(f"process {p} stopped with an error: {value[len(FAILED):]}")
                        return
                    continue
                last, since = seen[p]
                if value != last:
                    seen[p] = (value, now)
                elif now - since > self.timeout_s:
                    self._exit(f"process {p} sent no heartbeat for {now - since:.0f} s (killed or hung)")
                    return

    def _get(self, p: int) -> str | None:
        try:
            return self.client.key_value_try_get(KEY.format(p))
        except Exception as e:
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def _exit(self, why: str) -> None:
        hint = ""
        if self.resume_hint is not None:
            try:
                hint = "; " + self.resume_hint()
            except Exception:
                hint = ""
        msg = (f"error: process {self.pid} of {self.nproc}: {why}; stopping instead of waiting on its "
               f"collectives{hint}")
        print(msg, file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def stop(self, failed: str | None = None) -> None:
        """Stop watching and tell the peers this process is done (or failed, with a one-line reason)."""
        if not self.active or self._stop.is_set():
            return
        self._stop.set()
        try:
            self._beat(FAILED + failed.replace("\n", " ")[:400] if failed else DONE)
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process got here (the coordination service's barrier: no device collective, no 30 s
    rendezvous limit); a no-op in one process."""
    import jax

    if jax.process_count() > 1:
        _client().wait_at_barrier(name, int(timeout_s * 1000))


def all_agree(name: str, ok: bool, timeout_s: float = 3600.0) -> bool:
    """True when `ok` holds on every process (through the coordination service's key-value store)."""
    import jax

    if jax.process_count() == 1:
        return ok
    client = _client()
    client.key_value_set(f"ivtlr_jax/agree/{name}/{jax.process_index()}", "1" if ok else "0")
    barrier(f"ivtlr_jax/agree/{name}", timeout_s)
    return all(client.key_value_try_get(f"ivtlr_jax/agree/{name}/{p}") == "1" for p in range(jax.process_count()))


def reached_preemption_point(step: int) -> bool:
    """True on every process at the same step once any of them got SIGTERM (JAX's preemption sync)."""
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)

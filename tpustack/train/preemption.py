"""Stopping early, agreed by every host: SIGTERM (a TPU VM preemption) and the time limit.

A preemption can signal one worker before another, and clocks differ between hosts. A
host that left the loop alone would hang the others in the next step's collectives, and
hosts that saved different steps could not restore. So after every step each host posts
its local reason to stop to the jax.distributed key-value store, waits at a barrier for
the others' posts, and reads them all: every host sees the same posts, so every host
decides to stop after the same step, saves it, and exits 0.

Why this cannot deadlock: the exchange for step s happens after each host has dispatched
step s and read step s-1's metrics, which needs nothing from any host beyond step s-1.
It costs three small RPCs to the coordinator per step, on the host, with no device sync;
a single process checks its own flags only.
"""

from __future__ import annotations

import os
import signal
import time

import jax
from jax._src import distributed  # the coordination-service client; jax exposes no public handle

_TIMEOUT_MS = 10 * 60 * 1000  # a host that does not post within this is gone: fail loudly
# Seconds added to the time this host believes it has run: lets a test give two hosts
# clocks that disagree about the time limit.
CLOCK_SKEW_ENV = "TPUSTACK_CLOCK_SKEW_S"


class StopSignal:
    """`with StopSignal(limit) as stop:` ... `stop.reason(done_step)` -> None or why to stop.

    The SIGTERM handler is installed on entry, so enter it before restoring or loading data:
    a signal that arrives during either is kept and honoured at the first step."""

    def __init__(self, time_limit_s: float = 0.0, clock=time.monotonic):
        self.time_limit_s = time_limit_s
        self.clock = clock
        self.start = clock() - float(os.environ.get(CLOCK_SKEW_ENV, "0") or 0)
        self.sigterm = False
        self._previous = None

    def __enter__(self) -> "StopSignal":
        def handler(signum, frame):
            self.sigterm = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def local_reason(self) -> str | None:
        if self.sigterm:
            return "SIGTERM"
        if self.time_limit_s > 0 and self.clock() - self.start > self.time_limit_s:
            return "time limit"
        return None

    def reason(self, step: int) -> str | None:
        """Why to stop after `step` (None: go on); the same answer on every host."""
        local = self.local_reason()
        if jax.process_count() == 1:
            return local
        return agree(step, local)


def agree(step: int, local: str | None) -> str | None:
    """Post this host's reason for `step`, wait for every host's, return the first one posted
    (SIGTERM before the time limit), or None when no host wants to stop."""
    client = distributed.global_state.client
    pid, n = jax.process_index(), jax.process_count()
    prefix = f"tpustack/stop/{step}/"
    client.key_value_set(f"{prefix}{pid}", local or "")
    client.wait_at_barrier(f"tpustack_stop_{step}", _TIMEOUT_MS)
    posts = dict(client.key_value_dir_get(prefix))
    if len(posts) != n:  # the barrier guarantees every post; anything else is a bug worth seeing
        raise RuntimeError(f"stop agreement at step {step}: {len(posts)} of {n} hosts posted")
    if step > 0:  # everyone has read step - 1's posts before posting this step's
        client.key_value_delete(f"tpustack/stop/{step - 1}/{pid}")
    reasons = {r for r in posts.values() if r}
    for reason in ("SIGTERM", "time limit"):
        if reason in reasons:
            return reason
    return None

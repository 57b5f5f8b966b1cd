"""Client processes that start together: each prepares, reports ready, waits for go, reports results.

Processes rather than threads, so clients do not share a GIL with each other or the bench.
Spawned rather than forked, so no child inherits onnxruntime's or the Policy's threads. A child
that dies fails the run at once instead of leaving the others waiting.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any, Callable

READY_TIMEOUT = 300.0
RESULT_TIMEOUT = 600.0


class Gate:
    """Handed to each child: ``ready()`` once prepared blocks until every child is, then returns."""

    def __init__(self, ctx: Any) -> None:
        self._ready = ctx.Queue()
        self._go = ctx.Event()

    def ready(self) -> None:
        self._ready.put(None)
        if not self._go.wait(READY_TIMEOUT):
            raise RuntimeError("the bench never said go")


def _collect(q: Any, n: int, procs: list[Any], timeout: float, what: str) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            got.append(q.get(timeout=0.1))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a client process died (exit {dead[0].exitcode}) before {what}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}") from None
    return got


def run_together(target: Callable[..., None], args_for: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Start ``target(*args, gate, results)`` per args tuple; release them together; their results."""
    ctx = mp.get_context("spawn")
    gate = Gate(ctx)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, gate, results), daemon=True) for args in args_for]
    for p in procs:
        p.start()
    try:
        _collect(gate._ready, len(procs), procs, READY_TIMEOUT, "every client was ready")
        gate._go.set()
        return _collect(results, len(procs), procs, RESULT_TIMEOUT, "every client's results")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()

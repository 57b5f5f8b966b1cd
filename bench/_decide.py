"""Deciding: in-process through ``reflexd.Policy``, and over the socket with ``Decide`` requests."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from reflexd.client import Policy
from reflexd.connection import Connection
from reflexd.protocol import Decide, Decided

from _procs import Gate, run_together
from _workload import AGENT, Workload

MODEL_WAIT = 30.0


def percentiles(ns: np.ndarray) -> dict[str, float]:
    us = ns / 1000.0
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "p999_us": float(np.percentile(us, 99.9)),
        "mean_us": float(us.mean()),
        "n": int(len(us)),
    }


def _timed(n: int, call: Callable[[int], Any]) -> np.ndarray:
    """Per-call wall time in ns; perf_counter_ns itself costs well under 0.1 µs."""
    out = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        call(i)
        out[i] = clock() - t0
    return out


def in_process(socket: str, state_dir: str, n: int, warmup: int = 1000, seed: int = 11) -> dict[str, Any]:
    """``policy.decide`` with the live model, its background sender shipping the decisions."""
    w = Workload(seed)
    contexts = [w.context() for _ in range(n + warmup)]
    actions = w.actions
    policy = Policy(AGENT, socket=socket, state_dir=state_dir, seed=seed)
    try:
        deadline = time.monotonic() + MODEL_WAIT
        while policy.model_version is None:  # the sender thread loads the model on its first refresh
            if time.monotonic() > deadline:
                raise RuntimeError(f"Policy did not load a model: {policy.stats()}")
            time.sleep(0.01)
        for ctx in contexts[n:]:
            policy.decide(ctx, actions)
        lat = _timed(n, lambda i: policy.decide(contexts[i], actions))
        flushed = policy.flush(60)
        stats = policy.stats()
    finally:
        policy.close()
    if not flushed or stats["dropped"] or stats["rejected"]:
        raise RuntimeError(f"in-process decisions were not all stored: {stats}")
    scorer = policy.models.scorer
    return {
        **percentiles(lat),
        "model_version": policy.model_version,
        "strategy": scorer.manifest.exploration.strategy,
        "parts": _parts(scorer, contexts[:n], actions),
    }


def _parts(scorer: Any, contexts: list[dict[str, Any]], actions: list[Any]) -> dict[str, dict[str, float]]:
    """Where a decision's time goes: feature hashing, and the bare ONNX model on pre-hashed inputs."""
    n = len(contexts)
    hasher = scorer.hasher
    hashing = _timed(n, lambda i: (hasher.context(contexts[i]), hasher.actions(actions)))
    ctx = [hasher.context(c)[None] for c in contexts]
    acts = hasher.actions(actions)[None]
    session = scorer.session
    for i in range(200):  # warm the session's arena
        session.run(None, {"context": ctx[i % n], "actions": acts})
    bare = _timed(n, lambda i: session.run(None, {"context": ctx[i], "actions": acts}))
    return {"hash": percentiles(hashing), "onnx_run": percentiles(bare)}


def _decide_client(socket: str, n: int, seed: int, gate: Gate, results: Any) -> None:
    """One agent asking the daemon to decide, one request at a time."""
    w = Workload(seed)
    requests = [Decide(agent=AGENT, context=w.context(), actions=w.actions, req=i) for i in range(n)]
    with Connection(socket, timeout=60) as conn:
        conn.request(requests[0])  # connection warm
        gate.ready()
        t0 = time.monotonic()
        lat = _timed(n, lambda i: conn.request(requests[i]))
        t1 = time.monotonic()
        last = conn.request(requests[0])
    assert isinstance(last, Decided)
    results.put({"t0": t0, "t1": t1, "n": n, "lat": lat, "model_version": last.model_version})


def over_socket(socket: str, clients: int, per_client: int, seed: int = 21) -> dict[str, Any]:
    """``clients`` processes each sending ``per_client`` sequential Decide requests."""
    got = run_together(_decide_client, [(socket, per_client, seed + k) for k in range(clients)])
    seconds = max(r["t1"] for r in got) - min(r["t0"] for r in got)
    total = sum(r["n"] for r in got)
    return {
        "clients": clients,
        "requests": total,
        "seconds": seconds,
        "per_s": total / seconds,
        "model_version": got[0]["model_version"],
        **percentiles(np.concatenate([r["lat"] for r in got])),
    }

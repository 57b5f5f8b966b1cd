"""Adaptation: joined experience in, a training run requested, the model promoted."""

from __future__ import annotations

import time
from typing import Any

from reflexd.connection import Connection
from reflexd.protocol import Ack, Flush, ModelsRequest, Promote, Train

from _daemon import BenchDaemon, ChildWatcher
from _workload import chunks, experience_frames

TRAIN_TIMEOUT = 900.0
MATURE_TIMEOUT = 60.0


def send_experience(daemon: BenchDaemon, n: int, seed: int = 7) -> dict[str, Any]:
    """``n`` decisions (actions with features, uniform logging policy) each with its outcome."""
    writes = chunks(experience_frames("exp", n, seed))
    with Connection(daemon.socket, timeout=TRAIN_TIMEOUT) as conn:
        t0 = time.perf_counter()
        for data in writes:
            conn.send_raw(data)
        conn.send([Flush(req="exp")])
        while not isinstance(reply := conn.receive(), Ack):
            pass
        seconds = time.perf_counter() - t0
    if reply.count != 2 * n:
        raise RuntimeError(f"experience: sent {2 * n} events, {reply.count} acknowledged")
    return {"decisions": n, "outcomes": n, "seconds": seconds}


def wait_matured(daemon: BenchDaemon) -> None:
    """Until every stored decision's reward wait window has closed, so all of it is trainable."""
    deadline = time.monotonic() + MATURE_TIMEOUT
    while True:
        exp = daemon.status().experience
        if exp["new_since_training"] >= exp["decisions"]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"experience did not mature: {exp}")
        time.sleep(0.05)


def train(daemon: BenchDaemon) -> dict[str, Any]:
    """Time a requested run: snapshot → trainer subprocess → ONNX parity → gate → promotion.

    A candidate the gate rejects is promoted explicitly, so the decide benchmarks have a model.
    """
    watcher = ChildWatcher(daemon.pid)
    watcher.start()
    try:
        t0 = time.perf_counter()
        reply = daemon.request(Train(), timeout=TRAIN_TIMEOUT)
        seconds = time.perf_counter() - t0
    finally:
        watcher.stop()
    # Done.message is "<promoted|rejected> <version>: <gate reason>"
    head, gate_reason = reply.message.split(": ", 1)
    outcome, version = head.split(" ", 1)
    promoted_by = "the gate"
    if outcome != "promoted":
        daemon.request(Promote(version=version))
        promoted_by = "an explicit Promote"
    models = daemon.request(ModelsRequest())
    manifest = next(m for m in models.models if m["version"] == version)
    training = manifest["training"]
    return {
        "version": version,
        "outcome": outcome,
        "promoted_by": promoted_by,
        "gate": gate_reason,
        "seconds": seconds,
        "train_rows": training["train_rows"],
        "holdout_rows": training["holdout_rows"],
        "fit_seconds": training["fit_seconds"],
        "export_seconds": training["export_seconds"],
        "epochs": training["epochs"],
        # the rest of ``seconds`` is the daemon's side: snapshot, gate (OPE on the holdout), registry
        "trainer_seconds": watcher.seconds_alive,
        "trainer_peak_rss": watcher.peak,
    }

"""Adaptation: joined experience in, a training run requested, every client deciding with the new model.

A run is timed from the ``Train`` request to the moment the last of several client processes
(``reflexd.Policy``, deciding as agents do) makes its first decision with the new version, and
broken down into: the daemon's snapshot, the trainer subprocess (itemised from its own report),
the gate, registry and promotion, and the clients noticing the new ``CURRENT`` and loading it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from typing import Any

from bench._daemon import BenchDaemon, ChildWatcher
from bench._workload import AGENT, Workload, chunks, experience_frames
from reflexd.client.policy import Policy
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Flush, ModelsRequest, Promote, Train

TRAIN_TIMEOUT = 900.0
MATURE_TIMEOUT = 60.0
CLIENT_TIMEOUT = 120.0
CLIENTS = 4
# each client decides about 100 times a second while a run is timed, as a busy agent would; a
# client spinning flat out would only take CPU from the trainer, which runs at SCHED_IDLE
DECIDE_INTERVAL = 0.01
# what the trainer reports of its own time; the rest of its life is Python's start, its first
# imports and writing the result
TRAINER_STEPS = ("load_seconds", "import_seconds", "fit_seconds", "export_seconds", "parity_seconds")


def send_experience(daemon: BenchDaemon, n: int, seed: int = 7, prefix: str = "exp") -> dict[str, Any]:
    """``n`` decisions (actions with features, uniform logging policy) each with its outcome, durable."""
    writes = chunks(experience_frames(prefix, n, seed))
    with Connection(daemon.socket, timeout=TRAIN_TIMEOUT) as conn:
        t0 = time.perf_counter()
        for data in writes:
            conn.send_raw(data)
        conn.send([Flush(req="exp")])
        while not isinstance(reply := conn.receive(), Ack):
            pass
        seconds = time.perf_counter() - t0
        acknowledged_at = time.time()
    if reply.count != 2 * n:
        raise RuntimeError(f"experience: sent {2 * n} events, {reply.count} acknowledged")
    return {"decisions": n, "outcomes": n, "seconds": seconds, "acknowledged_at": acknowledged_at}


def wait_matured(daemon: BenchDaemon, experience: dict[str, Any]) -> None:
    """Until the reward wait window of everything ``send_experience`` sent has closed (it is then
    trainable) and the daemon counts it as new experience."""
    matured_at = experience["acknowledged_at"] + daemon.config["rewards"]["wait_window"]
    deadline = time.monotonic() + MATURE_TIMEOUT
    while True:
        exp = daemon.status().experience
        if time.time() > matured_at and exp["new_since_training"] >= experience["decisions"]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"experience did not mature: {exp}")
        time.sleep(0.05)


def _client(index: int, socket: str, state_dir: str, active: Any, stop: Any, events: Any) -> None:
    """Decide while ``active`` is set; report the wall time of the first decision with each version."""
    w = Workload(100 + index)
    contexts = [w.context() for _ in range(1000)]
    policy = Policy(AGENT, socket=socket, state_dir=state_dir, seed=index)
    try:
        events.put((index, "ready", None, time.time()))
        version: object = object()
        i = 0
        while not stop.is_set():
            if not active.wait(0.1):
                continue
            choice = policy.decide(contexts[i % len(contexts)], w.actions)
            i += 1
            if choice.model_version != version:
                version = choice.model_version
                events.put((index, "version", version, time.time()))
            time.sleep(DECIDE_INTERVAL)
    finally:
        policy.close()


class Clients:
    """Client processes with a live ``Policy`` each (spawned, so none shares the bench's GIL).

    They decide only while a run is timed: decisions made between runs would otherwise be the
    newest experience, and take the place of the next run's in its snapshot.
    """

    def __init__(self, daemon: BenchDaemon, n: int = CLIENTS) -> None:
        ctx = mp.get_context("spawn")
        self.active = ctx.Event()
        self.stop = ctx.Event()
        self.events = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_client,
                args=(i, daemon.socket, str(daemon.state_dir), self.active, self.stop, self.events),
                daemon=True,
            )
            for i in range(n)
        ]
        self.version: list[Any] = [None] * n
        self.since: list[float] = [0.0] * n

    def __enter__(self) -> Clients:
        for p in self.procs:
            p.start()
        ready = 0
        while ready < len(self.procs):
            ready += self._next()[1] == "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()

    def _next(self) -> tuple[int, str, Any, float]:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while True:
            try:
                index, kind, version, at = self.events.get(timeout=0.1)
                break
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a client process died (exit {dead[0].exitcode})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("timed out waiting for the clients") from None
        if kind == "version":
            self.version[index], self.since[index] = version, at
        return index, kind, version, at

    def wait_all_on(self, version: str) -> list[float]:
        """Wall times at which each client first decided with ``version``."""
        while any(v != version for v in self.version):
            self._next()
        return list(self.since)


def adaptation(daemon: BenchDaemon, clients: Clients, n: int, run: int) -> dict[str, Any]:
    """Send ``n`` fresh joined experiences, then time one adaptation (see the module docstring)."""
    experience = send_experience(daemon, n, seed=7 + run, prefix=f"exp{run}")
    wait_matured(daemon, experience)
    clients.active.set()
    try:
        r = train(daemon)
        switched = clients.wait_all_on(r["version"])
    finally:
        clients.active.clear()
    promoted_at = os.stat(daemon.line_folder(AGENT) / "CURRENT").st_mtime
    t0 = r["requested_at"]
    trainer_started = t0 + r["snapshot_seconds"]
    r.update(
        experience=experience,
        clients=len(switched),
        seconds=max(switched) - t0,
        # the trainer's exit to CURRENT replaced: gate (off-policy evaluation), registry, promotion
        gate_seconds=promoted_at - (trainer_started + r["trainer_seconds"]),
        # CURRENT replaced to the last client deciding with the new version (each polls CURRENT)
        pickup_seconds=max(switched) - promoted_at,
    )
    return r


def train(daemon: BenchDaemon) -> dict[str, Any]:
    """Request a run (snapshot → trainer subprocess → ONNX parity → gate → promotion) and time it.

    A candidate the gate rejects is promoted explicitly, so the clients and the decide benchmarks
    have it.
    """
    watcher = ChildWatcher(daemon.pid)
    watcher.start()
    try:
        requested_at = time.time()
        t0 = time.perf_counter()
        reply = daemon.request(Train(agent=AGENT), timeout=TRAIN_TIMEOUT)
        reply_seconds = time.perf_counter() - t0
    finally:
        watcher.stop()
    # Done.message is "<promoted|rejected> <version>[ in <line>]: <gate reason>"
    head, _, gate_reason = reply.message.partition(": ")
    outcome, version = head.split()[:2]
    promoted_by = "the gate"
    if outcome != "promoted":
        daemon.request(Promote(version=version, agent=AGENT))
        promoted_by = "an explicit Promote"
    models = daemon.request(ModelsRequest(agent=AGENT))
    manifest = next(m for m in models.models if m["version"] == version)
    training = manifest["training"]
    return {
        "version": version,
        "outcome": outcome,
        "promoted_by": promoted_by,
        "gate": gate_reason,
        "requested_at": requested_at,
        "reply_seconds": reply_seconds,
        "train_rows": training["train_rows"],
        "holdout_rows": training["holdout_rows"],
        "epochs": training["epochs"],
        **{key: training[key] for key in TRAINER_STEPS},
        "graph_reused": training["graph_reused"],
        "trainer_cpu_seconds": training["cpu_seconds"],
        # the Train request to the trainer's start: the daemon writes the Parquet snapshot
        "snapshot_seconds": (watcher.first_seen or t0) - t0,
        "trainer_seconds": watcher.seconds_alive,
        "trainer_peak_rss": watcher.peak,
    }


def table_rows(runs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The benchmark table's rows for the runs of ``adaptation``, first run first."""
    out = []
    for label, t in zip(("adaptation, first model", "adaptation, retrained"), runs):
        made_live = "" if t["promoted_by"] == "the gate" else f", made live by {t['promoted_by']}"
        rest = t["trainer_seconds"] - sum(t[key] for key in TRAINER_STEPS)
        graph = "graph reused" if t["graph_reused"] else "graph traced by torch.export"
        out += [
            (f"{label} (Train → clients)", f"{t['seconds']:.1f} s",
             f"{t['train_rows'] + t['holdout_rows']:,} joined examples, until all {t['clients']} clients decide with "
             f"{t['version']}: snapshot {t['snapshot_seconds']:.1f} + trainer {t['trainer_seconds']:.1f} + gate and "
             f"promotion {t['gate_seconds']:.1f} + clients' pickup {t['pickup_seconds']:.1f} s; gate said "
             f"{t['outcome']}{made_live}"),
            ("  trainer subprocess", f"{t['trainer_seconds']:.1f} s",
             f"load {t['load_seconds']:.1f}, import torch {t['import_seconds']:.1f}, fit {t['fit_seconds']:.1f} "
             f"({t['epochs']} epochs of {t['train_rows']:,}), ONNX export {t['export_seconds']:.2f} ({graph}), parity "
             f"{t['parity_seconds']:.2f}, rest {rest:.1f} (start, exit); {t['trainer_cpu_seconds']:.1f} s of CPU: it "
             "runs at SCHED_IDLE, so any other load stretches it"),
        ]
    peaks = ", ".join(f"{t['trainer_peak_rss'] / 2**20:,.0f}" for t in runs)
    out.append(("  trainer peak RSS", f"{runs[-1]['trainer_peak_rss'] / 2**20:,.0f} MiB",
                f"retrained run; each run: {peaks} MiB; the trainer subprocess (torch), gone after the run"))
    return out

"""How ``reflexd fleet train`` scales with the hosts it reads: a simulated fleet of up to 100 hosts.

    python -m bench.fleet [--hosts 10 30 100] [--rows 500] [--workers 2] [--out bench/out/fleet.json]

Each simulated host's archive is written by the store's own code (``Store.write`` then
``Store.archive``, as a host's retention writes it): ``--rows`` decisions of one agent, logged by
a uniform policy over three actions, each with one outcome (reward 1 with chance 0.8 for the action
the task wants, 0.2 otherwise; each host's tasks in proportions of its own). Then, for each fleet size,
the real ``reflexd.fleet.train.train_fleet`` runs on the first N hosts on one local Ray cluster
(started once, with this machine's CPUs): Ray tasks read and join every host, Ray Train's workers
fit the default learner data-parallel, rank 0 exports ONNX with the parity check, the gate judges
the pooled holdout, and the model and manifest are written.

Prints one row per fleet size: hosts, rows, read time (the Ray tasks reading and joining every
archive), train time (from submitting the Ray Train job to rank 0's model in hand: worker start-up,
hashing, fit, export), of which the fit itself, the gate's time, the whole run, the pooled gate's
verdict, and peak memory: the proportional set size (PSS, shared pages split between the processes
sharing them) of this process and every process it started (the local cluster: GCS, raylet, Ray's
workers and Ray Train's), sampled every 0.2 s, and the driver's own peak RSS. ``--out`` keeps it as
JSON. The cluster's start-up is timed apart, once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

KINDS = ("code", "chat", "math", "search")
ACTIONS = ["small", "large", "tools"]
BEST = {"code": "large", "chat": "small", "math": "tools", "search": "tools"}


def write_host(root: Path, host: int, rows: int) -> Path:
    """One host's archive, written and archived by the store's own code."""
    from reflexd.service.store import Store
    from reflexd.wire.protocol import Decision, Outcome

    rng = random.Random(host)
    weights = [rng.random() + 0.2 for _ in KINDS]  # each host sees its own mix of tasks
    store = Store(root / "reflexd.duckdb")
    start = 1_760_000_000.0 + 600 * host
    for first in range(0, rows, 1000):
        events: list[Any] = []
        for i in range(first, min(rows, first + 1000)):
            kind, action = rng.choices(KINDS, weights)[0], rng.choice(ACTIONS)
            did = f"h{host}-{i}"
            events.append(
                Decision(id=did, agent="router", context={"task": kind, "size": rng.random(), "host": f"h{host % 7}"},
                         actions=ACTIONS, chosen=action, prob=1 / 3, ts=start + i)
            )
            p = 0.8 if BEST[kind] == action else 0.2
            events.append(Outcome(decision_id=did, reward=float(rng.random() < p), ts=start + i + 1))
        store.write(events, received_at=start + first + 1000)
    store.archive(older_than=time.time(), root=root / "archive", compression="zstd")
    store.close()
    return root / "archive"


def _children(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        found += kids
        frontier += kids
    return found


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


class PeakMemory:
    """The largest PSS of this process and all its descendants seen while running (sampled)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = sum(_pss(p) for p in [me, *_children(me)])
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[10, 30, 100], help="fleet sizes to train on")
    parser.add_argument("--rows", type=int, default=500, help="decisions per host (default 500)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--out", default="bench/out/fleet.json", help="where to keep the results as JSON")
    args = parser.parse_args(argv)

    import logging

    import ray

    from reflexd.config import Config
    from reflexd.fleet.train import train_fleet

    work = Path(tempfile.mkdtemp(prefix="reflexd-bench-fleet-"))
    results: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        archives = [str(write_host(work / f"host{h:03d}", h, args.rows)) for h in range(max(args.hosts))]
        written = time.perf_counter() - started
        size = sum(f.stat().st_size for f in work.rglob("*.parquet"))
        print(f"wrote {len(archives)} hosts' archives ({len(archives) * args.rows} decisions, "
              f"{size / 2**20:.1f} MiB of Parquet) in {written:.1f} s", flush=True)
        started = time.perf_counter()
        ray.init(num_cpus=max(args.workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        print(f"local Ray cluster started in {time.perf_counter() - started:.1f} s ({os.cpu_count()} CPUs)", flush=True)
        for n in args.hosts:
            with PeakMemory() as memory:
                run = train_fleet(archives[:n], work / f"model-{n}", Config(), workers=args.workers)
            summary = run.as_dict()
            row = {
                "hosts": n,
                "rows": run.rows,
                "read_s": run.read_seconds,
                "train_s": run.train_seconds,
                "fit_s": summary.get("fit_seconds", 0.0),
                "gate_s": run.gate_seconds,
                "total_s": run.seconds,
                "peak_pss_mib": memory.peak / 2**20,
                "driver_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "epochs": run.manifest.training.epochs,
                "model_kib": (work / f"model-{n}" / "policy.onnx").stat().st_size / 1024,
                "passed": run.verdict.passed,
                "gate": run.verdict.reason,
            }
            results.append(row)
            print(f"  {n} hosts done in {run.seconds:.1f} s", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = ["hosts", "rows", "read s", "train s", "(fit s)", "gate s", "total s", "peak MiB", "driver MiB", "gate"]
    table = [header] + [
        [str(r["hosts"]), str(r["rows"]), f"{r['read_s']:.1f}", f"{r['train_s']:.1f}", f"{r['fit_s']:.1f}",
         f"{r['gate_s']:.2f}", f"{r['total_s']:.1f}", f"{r['peak_pss_mib']:.0f}", f"{r['driver_rss_mib']:.0f}",
         "passed" if r["passed"] else "rejected"]
        for r in results
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    out.write_text(json.dumps({"rows_per_host": args.rows, "workers": args.workers, "cpus": os.cpu_count(),
                               "load_average": load, "results": results}, indent=2))
    # other work on the machine stretches every time above: say how busy it was
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"kept in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The online head's costs and how soon it adapts: one command, one table.

    python -m bench.online [--decisions N] [--seeds N] [--strategy NAME] [--costs-only] [--compare]

- per-update cost of ``OnlineHead.learn`` (p50, p99 over single calls) for contexts that touch
  few and many hashed features, and the head's memory per (agent, action) arm; with
  ``--compare``, also of the update as it was before deferred downdates (``_FullCovarianceArm``),
  timed in the same run, so that both see the same load;
- what the head adds to an in-process decision (``Chooser.choose`` with and without it, no model),
  and what exploring by the head's posterior spread adds (thompson, linucb);
- adaptation on the demo's world (``reflexd demo``): the head alone (no batch model, exploring by
  ``--strategy``) against the default policy (uniform), decisions in-process with exact
  probabilities: mean regret per range and the first decision after which the head's reward over
  the next 200 is above the default's with a 95% interval that excludes it.
Writes bench/out/online.json (online-costs.json with ``--costs-only``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from reflexd.config import ExplorationConfig, OnlineConfig
from reflexd.deciding import online as online_module
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.online import OnlineHead
from reflexd.tools.demo import World

OUT = Path(__file__).resolve().parent / "out" / "online.json"
RANGES = ((1, 100), (101, 500), (501, 2000), (2001, 5000))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _FullCovarianceArm:
    """The update before deferred downdates: the whole m×m covariance written anew by each one."""

    def __init__(self, d: int, offset: float) -> None:
        self.offset = offset
        self.row_of = np.full(d, -1, dtype=np.intp)
        self.features = np.zeros(0, dtype=np.intp)
        self.weights, self.theta, self.cov = np.zeros(d), np.zeros(0), np.zeros((0, 0))

    def update(self, x: np.ndarray, target: float, prior: float) -> None:
        row_of, theta, cov = self.row_of, self.theta, self.cov
        nz = np.flatnonzero(x)
        rows = row_of[nz]
        if rows.min() < 0:
            new = nz[rows < 0]
            m, k = len(self.features), len(new)
            row_of = self.row_of = row_of.copy()
            row_of[new] = np.arange(m, m + k)
            grown = np.zeros((m + k, m + k))
            grown[:m, :m] = cov
            grown[range(m, m + k), range(m, m + k)] = 1.0 / prior
            cov, theta = grown, np.concatenate([theta, np.zeros(k)])
            self.features = np.concatenate([self.features, new])
            rows = row_of[nz]
        xs = x[nz]
        cx = cov[:, rows] @ xs
        gain = cx / (1.0 + float(xs @ cx[rows]))
        self.theta = theta + gain * (target - float(theta[rows] @ xs))
        self.weights = self.weights.copy()
        self.weights[self.features] = self.theta
        self.cov = cov - np.outer(gain, cx)


def update_cost(keys: int, n: int = 20_000, reference: bool = False) -> dict[str, Any]:
    """Per-call cost of learn(), contexts of ``keys`` categorical keys with 10 values each;
    ``reference``: with the update as it was before (``_FullCovarianceArm``)."""
    if reference:
        with mock.patch.object(online_module, "_Arm", _FullCovarianceArm):
            return update_cost(keys, n)
    head = OnlineHead(OnlineConfig(pending=n))
    rng = random.Random(1)
    xs = [head.features({f"k{j}": f"v{rng.randrange(10)}" for j in range(keys)}) for _ in range(1000)]
    for i in range(n):
        head.remember(str(i), "a", "x", xs[i % 1000], None)
    times = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        head.learn(str(i), 1.0)
        times.append((time.perf_counter_ns() - t0) / 1000)
    arm = next(iter(head._arms.values()))
    arrays = [a for a in vars(arm).values()] if isinstance(arm, _FullCovarianceArm) else list(arm.state)
    return {
        "keys": keys,
        "reference": isinstance(arm, _FullCovarianceArm),
        "features_seen": len(arm.features),
        "p50_us": _percentile(times, 0.5),
        "p99_us": _percentile(times, 0.99),
        "mean_us": statistics.fmean(times),
        "arm_bytes": sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)),
    }


def decide_cost(online: bool, n: int = 20_000, strategy: str = "squarecb") -> dict[str, Any]:
    world = World(3)
    head = OnlineHead(OnlineConfig()) if online else None
    cfg = ExplorationConfig(strategy=strategy)
    chooser = Chooser(None, lambda agent, manifest: cfg, 1, head)
    contexts = [world.context() for _ in range(1000)]
    actions = world.actions
    for i in range(2000):  # the head learns something first, as it would have
        ctx = contexts[i % 1000]
        c = chooser.choose("a", ctx, actions)
        chooser.learn(c.id, world.reward(ctx, c.action))
    times = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        c = chooser.choose("a", contexts[i % 1000], actions)
        times.append((time.perf_counter_ns() - t0) / 1000)
        chooser.learn(c.id, 0.0)
    return {"online": online, "strategy": strategy, "p50_us": _percentile(times, 0.5), "p99_us": _percentile(times, 0.99)}


def adaptation(seed: int, decisions: int, strategy: str = "squarecb") -> dict[str, Any]:
    """Regret per decision of the head alone (exploring by ``strategy``) and of the default policy on the demo's world."""
    out: dict[str, Any] = {}
    for name, online in (("head", True), ("default", False)):
        world = World(seed)
        head = OnlineHead(OnlineConfig()) if online else None
        cfg = ExplorationConfig(strategy=strategy)
        chooser = Chooser(None, lambda agent, manifest: cfg, seed, head)
        rewards, regrets = [], []
        for _ in range(decisions):
            ctx = world.context()
            c = chooser.choose("agent", ctx, world.actions)
            r = world.reward(ctx, c.action)
            chooser.learn(c.id, r)
            rewards.append(r)
            regrets.append(world.best(ctx) - world.expected(ctx, c.action))
        out[name] = {"rewards": rewards, "regrets": regrets}
    return out


def first_adaptation(head: list[float], default: list[float], window: int = 200) -> int | None:
    """The first decision from which the head's next ``window`` rewards beat the default's, 95% interval."""
    for start in range(0, len(head) - window + 1, 50):
        a, b = head[start : start + window], default[start : start + window]
        diff = statistics.fmean(a) - statistics.fmean(b)
        se = math.sqrt(statistics.variance(a) / window + statistics.variance(b) / window)
        if diff - 1.96 * se > 0:
            return start + 1
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.online", description=__doc__.split("\n\n")[0])
    ap.add_argument("--decisions", type=int, default=5000, help="decisions per adaptation run (default 5000)")
    ap.add_argument("--seeds", type=int, default=5, help="adaptation runs, one world seed each (default 5)")
    ap.add_argument("--strategy", default="squarecb", help="the head's exploration in the adaptation runs (default squarecb)")
    ap.add_argument("--costs-only", action="store_true", help="the update and decision costs alone, no adaptation runs")
    ap.add_argument("--compare", action="store_true", help="also time the update as it was before, in the same run")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    print("[bench] update cost", file=sys.stderr)
    updates = [update_cost(k, reference=ref) for k in (3, 10, 40) for ref in ((True, False) if args.compare else (False,))]
    print("[bench] decide cost", file=sys.stderr)
    decides = [decide_cost(False), decide_cost(True), decide_cost(True, strategy="thompson"),
               decide_cost(True, strategy="linucb")]
    runs = []
    if not args.costs_only:
        print(f"[bench] adaptation, {args.seeds} seeds × {args.decisions} decisions, {args.strategy}", file=sys.stderr)
        runs = [adaptation(seed, args.decisions, args.strategy) for seed in range(args.seeds)]
    firsts = [first_adaptation(r["head"]["rewards"], r["default"]["rewards"]) for r in runs]
    ranges = []
    for lo, hi in RANGES:
        if hi > args.decisions or not runs:
            break
        head = statistics.fmean(x for r in runs for x in r["head"]["regrets"][lo - 1 : hi])
        default = statistics.fmean(x for r in runs for x in r["default"]["regrets"][lo - 1 : hi])
        ranges.append({"range": f"{lo}–{hi}", "head_regret": head, "default_regret": default})

    load = (load_before, os.getloadavg())
    lines = [
        "",
        (f"load average (1, 5, 15 min) {load[0][0]:.2f} {load[0][1]:.2f} {load[0][2]:.2f} before, "
         f"{load[1][0]:.2f} {load[1][1]:.2f} {load[1][2]:.2f} after, on {os.cpu_count()} cores"),
        f"{'what':58s} {'value':>22s}",
        "-" * 81,
    ]
    for u in updates:
        label = f"learn(), {u['keys']} keys ({u['features_seen']} features seen)" + (", before" if u["reference"] else "")
        lines.append(f"{label:58s} {u['p50_us']:>7.1f} µs p50 {u['p99_us']:>6.1f} p99 {u['mean_us']:>6.1f} mean")
        lines.append(f"{'  memory of that arm':58s} {u['arm_bytes'] / 1024:>19.1f} KiB")
    for d in decides:
        label = "Chooser.choose, no model, " + (f"with the head, {d['strategy']}" if d["online"] else "without the head")
        lines.append(f"{label:58s} {d['p50_us']:>7.1f} µs p50 {d['p99_us']:>6.1f} p99")
    for r in ranges:
        lines.append(
            f"{'demo world, ' + args.strategy + ', mean regret, decisions ' + r['range']:58s} "
            f"{r['head_regret']:>8.3f} vs {r['default_regret']:.3f} default"
        )
    found = [f for f in firsts if f is not None]
    if runs:
        lines.append(
            f"{'first adaptation (200-decision window, 95% > default)':58s} "
            + (f"{'decision ' + str(max(found)) + ' (worst seed)':>22s}" if len(found) == len(firsts) else f"{'not in every seed':>22s}")
        )
    print("\n".join(lines))
    out = OUT.with_name("online-costs.json") if args.costs_only else OUT  # a full run's results stay
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load": load, "updates": updates, "decides": decides, "ranges": ranges,
                               "first_adaptation": firsts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

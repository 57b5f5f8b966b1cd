"""The online head's costs and how soon it adapts: one command, one table.

    python -m bench.online [--decisions N] [--seeds N]

- per-update cost of ``OnlineHead.learn`` (p50, p99 over single calls) for contexts that touch
  few and many hashed features, and the head's memory per (agent, action) arm;
- what the head adds to an in-process decision (``Chooser.choose`` with and without it, no model);
- adaptation on the demo's world (``reflexd demo``): the head alone (no batch model) against the
  default policy (uniform), decisions in-process with exact probabilities: mean regret per range
  and the first decision after which the head's reward over the next 200 is above the default's
  with a 95% interval that excludes it.
Writes bench/out/online.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from reflexd.config import ExplorationConfig, OnlineConfig
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.online import OnlineHead
from reflexd.tools.demo import World

OUT = Path(__file__).resolve().parent / "out" / "online.json"
RANGES = ((1, 100), (101, 500), (501, 2000), (2001, 5000))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def update_cost(keys: int, n: int = 20_000) -> dict[str, float]:
    """Per-call cost of learn(), contexts of ``keys`` categorical keys with 10 values each."""
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
    return {
        "keys": keys,
        "features_seen": len(arm.features),
        "p50_us": _percentile(times, 0.5),
        "p99_us": _percentile(times, 0.99),
        "arm_bytes": sum(a.nbytes for a in arm.state) + arm.features.nbytes,
    }


def decide_cost(online: bool, n: int = 20_000) -> dict[str, float]:
    world = World(3)
    head = OnlineHead(OnlineConfig()) if online else None
    cfg = ExplorationConfig()
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
    return {"online": online, "p50_us": _percentile(times, 0.5), "p99_us": _percentile(times, 0.99)}


def adaptation(seed: int, decisions: int) -> dict[str, Any]:
    """Regret per decision of the head alone and of the default policy on the demo's world."""
    out: dict[str, Any] = {}
    for name, online in (("head", True), ("default", False)):
        world = World(seed)
        head = OnlineHead(OnlineConfig()) if online else None
        cfg = ExplorationConfig()
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
    args = ap.parse_args(argv)
    print("[bench] update cost", file=sys.stderr)
    updates = [update_cost(k) for k in (3, 10, 40)]
    print("[bench] decide cost", file=sys.stderr)
    decides = [decide_cost(False), decide_cost(True)]
    print(f"[bench] adaptation, {args.seeds} seeds × {args.decisions} decisions", file=sys.stderr)
    runs = [adaptation(seed, args.decisions) for seed in range(args.seeds)]
    firsts = [first_adaptation(r["head"]["rewards"], r["default"]["rewards"]) for r in runs]
    ranges = []
    for lo, hi in RANGES:
        if hi > args.decisions:
            break
        head = statistics.fmean(x for r in runs for x in r["head"]["regrets"][lo - 1 : hi])
        default = statistics.fmean(x for r in runs for x in r["default"]["regrets"][lo - 1 : hi])
        ranges.append({"range": f"{lo}–{hi}", "head_regret": head, "default_regret": default})

    lines = ["", f"{'what':58s} {'value':>22s}", "-" * 81]
    for u in updates:
        lines.append(
            f"{'learn(), ' + str(u['keys']) + ' keys (' + str(u['features_seen']) + ' features seen)':58s} "
            f"{u['p50_us']:>7.1f} µs p50 {u['p99_us']:>6.1f} p99"
        )
        lines.append(f"{'  memory of that arm':58s} {u['arm_bytes'] / 1024:>19.1f} KiB")
    for d in decides:
        label = "Chooser.choose, no model, " + ("with the head" if d["online"] else "without the head")
        lines.append(f"{label:58s} {d['p50_us']:>7.1f} µs p50 {d['p99_us']:>6.1f} p99")
    for r in ranges:
        lines.append(
            f"{'demo world, mean regret, decisions ' + r['range']:58s} "
            f"{r['head_regret']:>8.3f} vs {r['default_regret']:.3f} default"
        )
    found = [f for f in firsts if f is not None]
    lines.append(
        f"{'first adaptation (200-decision window, 95% > default)':58s} "
        + (f"{'decision ' + str(max(found)) + ' (worst seed)':>22s}" if len(found) == len(firsts) else f"{'not in every seed':>22s}")
    )
    print("\n".join(lines))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"updates": updates, "decides": decides, "ranges": ranges, "first_adaptation": firsts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The online head's costs and how soon it adapts: one command, one table.

    python -m bench.online [--decisions N] [--seeds N] [--strategy NAME] [--costs-only] [--compare]

- per-update cost of ``OnlineHead.learn`` (p50, p99, p99.9, mean over single calls) for contexts
  that touch few and many hashed features, and the head's memory per (agent, action) arm; with
  ``--compare``, also of the update as it was before deferred downdates (``_FullCovarianceArm``),
  timed just before, and as it was while a fold of the downdates was one update's work
  (``_FoldAtOnceArm``), and with numpy's step where the compiled one is used (``_NumpyStepArm``,
  what an install without a C compiler runs), taking turns call by call with the current one, so
  that all see the same load;
- per-update cost of ``apply`` (a policy's background thread learning the rewards reported since its
  last wake, with ``batch_learning``) with 4 to 32 rewards of one arm at once, and what
  ``Policy.reward`` costs the agent's thread with and without it; relearning the newest 1000
  rewards at a new model, each action's together and one by one;
- what the head adds to an in-process decision (``Chooser.choose`` with and without it, no model),
  and what exploring by the head's posterior spread adds (thompson, linucb, igw_z);
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
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from reflexd import log
from reflexd.client.policy import Policy
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

    def __init__(self, d: int) -> None:
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


class _FoldAtOnceArm(online_module._Arm):
    """The update before folds were spread: all 16 downdates folded into a new base by one update."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.state = self.state._replace(down=np.zeros((16, 0)))

    def update(self, x: np.ndarray, target: float, prior: float) -> None:
        weights, row_of, features, theta, base, down, r, _ = self.state
        new_theta, new_weights = np.empty(len(theta)), weights.copy()
        step = online_module._step_numpy
        stepped = step(x, row_of, features, theta, base, down, r, target, new_theta, new_weights)
        if stepped is None:
            row_of, features, theta, base, _, r = self._grown(np.flatnonzero(x), prior)
            down, new_theta = np.empty((16, len(features))), np.empty(len(features))  # it never keeps more than 16
            stepped = step(x, row_of, features, theta, base, down, r, target, new_theta, new_weights)
        s, error = stepped
        self.residual += error * error / s
        r += 1
        if r == 16:
            base = base - down.T @ down
            down, r = np.empty_like(down), 0
        self.n += 1
        noise = (online_module._NOISE_PRIOR + self.residual) / (online_module._NOISE_PRIOR + self.n)
        self.state = online_module._State(new_weights, row_of, features, new_theta, base, down, r, noise)


class _NumpyStepArm(online_module._Arm):
    """The head's update with its arithmetic in numpy: where the compiled one was not built."""

    _step = staticmethod(online_module._step_numpy)
    _fold_block = staticmethod(online_module._fold_numpy)
    _spread = staticmethod(online_module._spread_numpy)
    _fold_rows = 32


REFERENCES = {"before": _FullCovarianceArm, "fold at once": _FoldAtOnceArm, "numpy step": _NumpyStepArm}


def update_costs(keys: int, kinds: tuple[str | None, ...] = (None,), n: int = 20_000) -> list[dict[str, Any]]:
    """Per-call cost of learn() with each kind of arm (None: the head's own, else a key of
    ``REFERENCES``), contexts of ``keys`` categorical keys with 10 values each. The kinds take turns
    call by call, each first in turn, so that all see the same load."""
    heads = [OnlineHead(OnlineConfig(pending=n)) for _ in kinds]
    rng = random.Random(1)
    xs = [heads[0].features({f"k{j}": f"v{rng.randrange(10)}" for j in range(keys)}) for _ in range(1000)]
    for head, kind in zip(heads, kinds):
        head._arms["a", "x"] = REFERENCES.get(kind, online_module._Arm)(head._d)
        for i in range(n):
            head.remember(str(i), "a", "x", xs[i % 1000], None)
    times: list[list[float]] = [[] for _ in kinds]
    for i in range(n):
        for j in range(len(heads)):
            j = (i + j) % len(heads)
            t0 = time.perf_counter_ns()
            heads[j].learn(str(i), 1.0)
            times[j].append((time.perf_counter_ns() - t0) / 1000)
    out = []
    for head, kind, t in zip(heads, kinds, times):
        arm = head._arms["a", "x"]
        arrays = list(vars(arm).values()) if isinstance(arm, _FullCovarianceArm) else list(arm.state)
        m = len(arm.features)
        out.append({
            "keys": keys,
            "reference": kind,
            "features_seen": m,
            "p50_us": _percentile(t, 0.5),
            "p99_us": _percentile(t, 0.99),
            "p999_us": _percentile(t, 0.999),
            "mean_us": statistics.fmean(t),
            "arm_bytes": sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)),
            # a spread fold holds the next base and the rows it folds beside the state (most updates, compiled)
            "fold_bytes": 0 if kind in ("before", "fold at once") else 8 * m * (m + online_module._DEFERRED),
        })
    return out


def apply_costs(keys: int, together: int, n: int = 20_000) -> dict[str, Any]:
    """Per-update cost of ``apply()`` (what a policy's background thread does each ``send_interval``)
    with ``together`` rewards of one arm waiting each time: each apply's time over its updates."""
    head = OnlineHead(OnlineConfig(pending=n))
    rng = random.Random(1)
    xs = [head.features({f"k{j}": f"v{rng.randrange(10)}" for j in range(keys)}) for _ in range(1000)]
    for i in range(n):
        head.remember(str(i), "a", "x", xs[i % 1000], None)
    times = []
    for start in range(0, n - together + 1, together):
        for i in range(start, start + together):
            head.later(str(i), 1.0)
        t0 = time.perf_counter_ns()
        head.apply()
        times.append((time.perf_counter_ns() - t0) / 1000 / together)
    return {"keys": keys, "together": together, "features_seen": len(head._arms["a", "x"].features),
            "p50_us": _percentile(times, 0.5), "p99_us": _percentile(times, 0.99), "mean_us": statistics.fmean(times)}


def relearn_cost(keys: int, together: bool, rows: int = 1000, actions: int = 5) -> dict[str, Any]:
    """What relearning the newest ``rows`` rewards beside a new model costs (``OnlineHead.follow``,
    on the thread that loads the model), each action's rewards together or one by one (median of 7)."""
    head = OnlineHead(OnlineConfig(warm_rows=rows, pending=rows))
    rng = random.Random(1)
    for i in range(rows):
        x = head.features({f"k{j}": f"v{rng.randrange(10)}" for j in range(keys)})
        head.remember(str(i), "a", f"x{i % actions}", x, None, source=i)
        head.learn(str(i), rng.random())
    batch, online_module._BATCH = online_module._BATCH, online_module._BATCH if together else 10**9
    try:
        times = []
        for version in range(7):
            t0 = time.perf_counter_ns()
            head.follow(f"v{version}", lambda sources: [0.5] * len(sources))
            times.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        online_module._BATCH = batch
    return {"keys": keys, "together": together, "rows": head.warmed, "median_ms": statistics.median(times)}


def reward_cost(batch: bool, n: int = 20_000) -> dict[str, Any]:
    """What ``Policy.reward`` costs the agent's thread: the outcome encoded and buffered, and the
    reward learned, or with ``batch`` (``batch_learning``) handed to the background thread, which
    learns it meanwhile. No daemon, so nothing is sent."""
    with tempfile.TemporaryDirectory(prefix="reflexd-bench-online-") as tmp:
        policy = Policy("bench", socket=Path(tmp) / "none.sock", models=Path(tmp) / "models", buffer_size=2 * n,
                        online=OnlineConfig(pending=n), batch_learning=batch)
        try:
            context = {f"k{j}": f"v{j}" for j in range(10)}
            ids = [policy.decide(context, ["a", "b", "c"]).id for _ in range(n)]
            times = []
            for decision in ids:
                t0 = time.perf_counter_ns()
                policy.reward(decision, 1.0)
                times.append((time.perf_counter_ns() - t0) / 1000)
            policy.flush(timeout=0.01)
            learned = policy.stats()["online"]["updates"]
        finally:
            policy.close(timeout=0.01)
    return {"batch_learning": batch, "p50_us": _percentile(times, 0.5), "p99_us": _percentile(times, 0.99),
            "mean_us": statistics.fmean(times), "learned": learned, "rewards": n}


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


def _costs(row: dict[str, Any]) -> str:
    return f"{row['p50_us']:>7.1f} µs p50 {row['p99_us']:>6.1f} p99 {'':>12s} {row['mean_us']:>6.1f} mean"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.online", description=__doc__.split("\n\n")[0])
    ap.add_argument("--decisions", type=int, default=5000, help="decisions per adaptation run (default 5000)")
    ap.add_argument("--seeds", type=int, default=5, help="adaptation runs, one world seed each (default 5)")
    ap.add_argument("--strategy", default="squarecb", help="the head's exploration in the adaptation runs (default squarecb)")
    ap.add_argument("--costs-only", action="store_true", help="the update and decision costs alone, no adaptation runs")
    ap.add_argument("--compare", action="store_true",
                    help="also time the updates as they were, and with numpy's step instead of the compiled one, in turn")
    args = ap.parse_args(argv)
    log.configure(level="error")  # the policies timed here have no daemon: "lost reflexd" says nothing new
    load_before = os.getloadavg()
    print("[bench] update cost", file=sys.stderr)
    # the update before deferred downdates on its own: its m×m writes would crowd the others out of the cache
    kinds = (("before",), ("fold at once", "numpy step", None)) if args.compare else ((None,),)
    updates = [u for k in (3, 10, 40) for turns in kinds for u in update_costs(k, turns)]
    print("[bench] rewards learned together, and Policy.reward", file=sys.stderr)
    applies = [apply_costs(k, together) for k in (3, 10, 40) for together in (4, 8, 16, 32)]
    rewards = [reward_cost(False), reward_cost(True)]
    relearns = [relearn_cost(k, together) for k in (3, 10) for together in (True, False)]
    print("[bench] decide cost", file=sys.stderr)
    decides = [decide_cost(False), decide_cost(True), decide_cost(True, strategy="thompson"),
               decide_cost(True, strategy="linucb"), decide_cost(True, strategy="igw_z")]
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
    step, label = online_module.ARITHMETIC, "the online head's arithmetic"
    lines.append(f"{label:58s} {step}")
    for u in updates:
        label = f"learn(), {u['keys']} keys ({u['features_seen']} features seen)" + (f", {u['reference']}" * bool(u["reference"]))
        lines.append(f"{label:58s} {u['p50_us']:>7.1f} µs p50 {u['p99_us']:>6.1f} p99 {u['p999_us']:>6.1f} p99.9 "
                     f"{u['mean_us']:>6.1f} mean")
        lines.append(f"{'  memory of that arm':58s} {u['arm_bytes'] / 1024:>19.1f} KiB"
                     + (f" + {u['fold_bytes'] / 1024:.1f} KiB while a fold is under way" if u["fold_bytes"] else ""))
    for a in applies:
        label = f"apply(), {a['keys']} keys, {a['together']} rewards of the arm at once, per update"
        lines.append(f"{label:58s} {_costs(a)}")
    for r in rewards:
        label = "Policy.reward, agent's thread, 10 keys, " + ("batch_learning" if r["batch_learning"] else "at once")
        lines.append(f"{label:58s} {_costs(r)}")
    for r in relearns:
        how = "together" if r["together"] else "one by one"
        label = f"relearning {r['rows']} rewards at a new model, {r['keys']} keys, {how}"
        lines.append(f"{label:58s} {r['median_ms']:>7.1f} ms median")
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
    out.write_text(json.dumps({"load": load, "step": step, "updates": updates, "applies": applies, "rewards": rewards,
                               "relearns": relearns, "decides": decides, "ranges": ranges,
                               "first_adaptation": firsts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

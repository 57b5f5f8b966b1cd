"""Coverage of the extraction's 95% intervals where propensities are tiny, against known truth.

    python -m bench.coverage [--worlds N] [--rows N] [--seed N] [--json FILE]

Simulated worlds whose expected rewards are known: six actions, a context of a task (four kinds)
and a difficulty, Bernoulli success less a per-action cost (rewards in [−0.3, 1]). Each world
logs ``--rows`` decisions (12,000 by default, the demo's size) with the exact probability of each
chosen action, under one of five logging policies:

- ε-greedy at ε = 0.06, 0.1, 0.3 over a greedy action that is right most of the time (the
  policy's belief is the truth plus noise): every other action at ε/6, i.e. p = 0.01, 0.017, 0.05;
- softmax of the belief at temperatures 0.2 and 0.1 (the table gives the rarest action's median
  propensity: about 0.035 and 0.01).

Pseudo-outcomes are made by ``reflexd.analysis.outcomes.pseudo_outcomes`` on the newer half (the
check window, where patterns and rules are estimated), with q̂ = 0 (plain IPS, what a reward
model that knows nothing gives) and with a crude cross-fitted q̂ (each action's mean reward per
task on the other half of the decisions). For four fixed segments (everywhere; a task, 25%; a task
and difficulty > 0.6, 10%; a task and difficulty > 0.8, 5%, all at least ``min_support``
decisions), each action's value and each action's lift over the best action are estimated, and
the truth is the mean of the true expected rewards over the segment's decisions.

**old**: ``ope.estimate``'s normal interval on every segment. **new**: what the extraction does
now, ``outcomes.bounded_estimate`` where the Kish effective sample size of the actions' weights
reaches ``outcomes.MIN_ESS``, no estimate elsewhere ("estimated" is the share that reaches it;
"old, same" is the old interval on those same segments, to separate the gate from the widening).
Widths are medians. A second table gives, on the same gated segments, intervals that were tried
and not chosen: Maurer and Pontil's empirical Bernstein bound and Waudby-Smith and Ramdas's
predictable plug-in empirical Bernstein interval (both valid for any n given the terms' range,
here their observed range), and the normal interval alone. A third gives every segment's
intervals, gated or not, by the segment's ESS: where the floor comes from. Prints the tables;
``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflexd.analysis.outcomes import MIN_ESS, bounded_estimate, kish_ess, pseudo_outcomes
from reflexd.learning.ope import estimate

ACTIONS = 6
TASKS = 4
CONFIDENCE = 0.95
POLICIES: dict[str, dict[str, Any]] = {
    "ε-greedy 0.06 (p 0.010)": {"kind": "greedy", "epsilon": 0.06},
    "ε-greedy 0.1 (p 0.017)": {"kind": "greedy", "epsilon": 0.1},
    "ε-greedy 0.3 (p 0.050)": {"kind": "greedy", "epsilon": 0.3},
    "softmax τ 0.2": {"kind": "softmax", "tau": 0.2},
    "softmax τ 0.1": {"kind": "softmax", "tau": 0.1},
}
REWARD_MODELS = ("ips", "dr")


@dataclass
class World:
    task: np.ndarray
    difficulty: np.ndarray
    mu: np.ndarray  # [n, A] true expected reward
    prob: np.ndarray  # [n] propensity of the chosen action
    chosen: np.ndarray
    reward: np.ndarray
    rarest: float  # the median propensity of the action the policy least favours on average


def world(rng: np.random.Generator, n: int, policy: dict[str, Any]) -> World:
    task = rng.integers(0, TASKS, n)
    difficulty = rng.random(n)
    skill = rng.uniform(0.3, 0.9, (ACTIONS, TASKS))
    slope = rng.uniform(0.0, 0.5, ACTIONS)
    cost = rng.uniform(0.0, 0.3, ACTIONS)
    success = np.clip(skill[:, task].T - slope * difficulty[:, None], 0.02, 0.98)
    mu = success - cost
    # what a learned policy believes: the truth with an error per action and task
    belief = mu + rng.normal(0.0, 0.05, (ACTIONS, TASKS))[:, task].T
    if policy["kind"] == "greedy":
        eps = policy["epsilon"]
        p = np.full((n, ACTIONS), eps / ACTIONS)
        p[np.arange(n), belief.argmax(1)] += 1.0 - eps
    else:
        z = belief / policy["tau"]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    chosen = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1).clip(0, ACTIONS - 1)
    rows = np.arange(n)
    reward = (rng.random(n) < success[rows, chosen]).astype(float) - cost[chosen]
    rarest = float(np.median(p[:, p.mean(0).argmin()]))
    return World(task, difficulty, mu, p[rows, chosen], chosen, reward, rarest)


def crude_q(w: World, rng: np.random.Generator) -> np.ndarray:
    """Each action's mean reward per task, cross-fitted over two random halves."""
    n = len(w.task)
    q = np.zeros((n, ACTIONS))
    fold = rng.integers(0, 2, n)
    for k in (0, 1):
        train = fold != k
        for a in range(ACTIONS):
            for t in range(TASKS):
                sel = train & (w.chosen == a) & (w.task == t)
                if sel.any():
                    q[(fold == k) & (w.task == t), a] = w.reward[sel].mean()
    return q


def maurer_pontil(terms: np.ndarray, confidence: float) -> tuple[float, float]:
    """Empirical Bernstein (Maurer and Pontil 2009, Theorem 4, both sides), range observed."""
    n, spread = len(terms), float(terms.max() - terms.min())
    log = math.log(4.0 / (1.0 - confidence))
    half = float(terms.std(ddof=1)) * math.sqrt(2.0 * log / n) + 7.0 * spread * log / (3.0 * (n - 1))
    return float(terms.mean()) - half, float(terms.mean()) + half


def predictable_plugin_eb(terms: np.ndarray, confidence: float) -> tuple[float, float]:
    """Waudby-Smith and Ramdas (2023), the fixed-n predictable plug-in empirical Bernstein
    interval, on the terms mapped to [0, 1] by their observed range."""
    lo, spread = float(terms.min()), float(terms.max() - terms.min())
    if spread == 0.0:
        return lo, lo
    y = (terms - lo) / spread
    n = len(y)
    i = np.arange(1, n + 1)
    mean = (0.5 + np.cumsum(y)) / (i + 1)
    var = (0.25 + np.cumsum((y - mean) ** 2)) / (i + 1)
    mean_before = np.r_[0.5, mean[:-1]]
    var_before = np.r_[0.25, var[:-1]]
    log = math.log(2.0 / (1.0 - confidence))
    lam = np.minimum(np.sqrt(2.0 * log / (n * var_before)), 0.5)
    psi = (-np.log1p(-lam) - lam) / 4.0
    center = float((lam * y).sum() / lam.sum())
    half = float((log + (4.0 * (y - mean_before) ** 2 * psi).sum()) / lam.sum())
    return lo + spread * max(center - half, 0.0), lo + spread * min(center + half, 1.0)


TRIED = {"Maurer–Pontil EB": maurer_pontil, "WSR plug-in EB": predictable_plugin_eb}


@dataclass
class Cell:
    old: list[tuple[bool, float]] = field(default_factory=list)
    new: list[tuple[bool, float]] = field(default_factory=list)  # only where estimated
    old_same: list[tuple[bool, float]] = field(default_factory=list)  # the old interval where new estimated
    tried: dict[str, list[tuple[bool, float]]] = field(default_factory=dict)  # where new estimated
    # every segment, gated or not: (ESS, covered by normal, widened, each tried interval)
    by_ess: list[tuple[float, ...]] = field(default_factory=list)

    def add(self, terms: np.ndarray, truth: float, ess: float) -> None:
        e = estimate(terms, CONFIDENCE)
        old = (e.lower <= truth <= e.upper, e.upper - e.lower)
        self.old.append(old)
        b = bounded_estimate(terms, CONFIDENCE)
        tried = {name: interval(terms, CONFIDENCE) for name, interval in TRIED.items()}
        self.by_ess.append((ess, old[0], b.lower <= truth <= b.upper, *(lo <= truth <= hi for lo, hi in tried.values())))
        if ess >= MIN_ESS:
            self.new.append((b.lower <= truth <= b.upper, b.upper - b.lower))
            self.old_same.append(old)
            for name, (lower, upper) in tried.items():
                self.tried.setdefault(name, []).append((lower <= truth <= upper, upper - lower))


def _summary(xs: list[tuple[bool, float]]) -> dict[str, float]:
    if not xs:
        return {"n": 0, "coverage": float("nan"), "width": float("nan")}
    a = np.array(xs, dtype=float)
    return {"n": len(xs), "coverage": float(a[:, 0].mean()), "width": float(np.median(a[:, 1]))}


def run(worlds: int, rows: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    cells: dict[tuple[str, str, str], Cell] = {}
    min_probs: dict[str, list[float]] = {}
    for name, policy in POLICIES.items():
        for _ in range(worlds):
            w = world(rng, rows, policy)
            min_probs.setdefault(name, []).append(w.rarest)
            check = np.arange(rows) >= rows // 2
            segments = [
                check,
                check & (w.task == 0),
                check & (w.task == 2) & (w.difficulty > 0.6),
                check & (w.task == 1) & (w.difficulty > 0.8),
            ]
            available = np.ones((rows, ACTIONS), dtype=bool)
            weights = np.zeros((rows, ACTIONS))
            weights[np.arange(rows), w.chosen] = 1.0 / w.prob
            for model in REWARD_MODELS:
                q = np.zeros((rows, ACTIONS)) if model == "ips" else crude_q(w, rng)
                gamma = pseudo_outcomes(w.chosen, w.prob, w.reward, q, available)
                for inside in segments:
                    best = int(w.mu[inside].mean(0).argmax())
                    ess = [kish_ess(weights[inside, a]) for a in range(ACTIONS)]
                    for a in range(ACTIONS):
                        cell = cells.setdefault((name, model, "value"), Cell())
                        cell.add(gamma[inside, a], float(w.mu[inside, a].mean()), ess[a])
                        if a == best:
                            continue
                        cell = cells.setdefault((name, model, "lift"), Cell())
                        truth = float((w.mu[inside, a] - w.mu[inside, best]).mean())
                        cell.add(gamma[inside, a] - gamma[inside, best], truth, min(ess[a], ess[best]))
    out: dict[str, Any] = {"worlds": worlds, "rows": rows, "seed": seed, "min_ess": MIN_ESS, "cells": []}
    for (name, model, kind), cell in cells.items():
        out["cells"].append({
            "policy": name,
            "reward_model": model,
            "estimand": kind,
            "rarest_propensity": float(np.median(min_probs[name])),
            "old": _summary(cell.old),
            "new": _summary(cell.new),
            "old_same": _summary(cell.old_same),
            "tried": {name: _summary(xs) for name, xs in cell.tried.items()},
        })
    everything = [c for cell in cells.values() for c in cell.old]
    estimated = [c for cell in cells.values() for c in cell.new]
    bins = [0.0, 10.0, 20.0, 30.0, 50.0, 100.0, math.inf]
    methods = ["normal", "widened", *TRIED]
    out["by_ess"] = []
    for lo, hi in itertools.pairwise(bins):
        row: dict[str, Any] = {"ess": [lo, hi], "n": 0, "coverage": {}, "worst_policy": {}}
        for m, method in enumerate(methods):
            per_policy: dict[str, list[float]] = {}
            for (name, _, _), cell in cells.items():
                per_policy.setdefault(name, []).extend(float(x[1 + m]) for x in cell.by_ess if lo <= x[0] < hi)
            pooled = [c for xs in per_policy.values() for c in xs]
            row["n"] = len(pooled)
            row["coverage"][method] = float(np.mean(pooled)) if pooled else math.nan
            # the worst logging policy with enough intervals in the bin to say
            enough = [float(np.mean(xs)) for xs in per_policy.values() if len(xs) >= 50]
            row["worst_policy"][method] = min(enough) if enough else math.nan
        out["by_ess"].append(row)
    out["overall"] = {
        "old": _summary(everything),
        "new": _summary(estimated),
        "old_same": _summary([c for cell in cells.values() for c in cell.old_same]),
        "tried": {name: _summary([c for cell in cells.values() for c in cell.tried.get(name, [])]) for name in TRIED},
    }
    return out


def _pair(x: dict[str, float]) -> str:
    return f"{x['coverage']:.3f} / {x['width']:.3f}"


def table(results: dict[str, Any]) -> str:
    o = results["overall"]
    header = (
        f"{'policy':<24}{'q̂':<4}{'estimand':<9}{'old cover':>10}{'old width':>10}"
        f"{'estimated':>10}{'old, same':>10}{'(width)':>10}{'new cover':>10}{'new width':>10}"
    )
    lines = [
        (
            f"95% intervals against known truth: {results['worlds']} worlds per policy × {results['rows']:,} decisions "
            f"(seed {results['seed']}); new = bounded interval where ESS ≥ {results['min_ess']:g}"
        ),
        "",
        header,
    ]
    for c in [*results["cells"], {"policy": "all", "reward_model": "", "estimand": "", **o}]:
        old, new, same = c["old"], c["new"], c["old_same"]
        share = new["n"] / old["n"] if old["n"] else 0.0
        lines.append(
            f"{c['policy']:<24}{c['reward_model']:<4}{c['estimand']:<9}{old['coverage']:>10.3f}{old['width']:>10.3f}"
            f"{share:>10.0%}{same['coverage']:>10.3f}{same['width']:>10.3f}{new['coverage']:>10.3f}{new['width']:>10.3f}"
        )
    worst_old = min(c["old"]["coverage"] for c in results["cells"])
    worst_new = min(c["new"]["coverage"] for c in results["cells"] if c["new"]["n"])
    rarest = ", ".join(
        f"{c['policy']} {c['rarest_propensity']:.3f}"
        for c in results["cells"]
        if c["reward_model"] == "ips" and c["estimand"] == "value"
    )
    lines += [
        f"worst cell: old {worst_old:.3f}, new {worst_new:.3f}",
        f"the rarest action's median propensity: {rarest}",
        "",
        "where ESS ≥ the floor, coverage / median width of each interval:",
        f"{'policy':<24}{'q̂':<4}{'estimand':<9}{'normal':>16}{'chosen':>16}" + "".join(f"{name:>20}" for name in TRIED),
    ]
    for c in [*results["cells"], {"policy": "all", "reward_model": "", "estimand": "", **o}]:
        tried = "".join(f"{_pair(c['tried'][name]):>20}" for name in TRIED)
        lines.append(
            f"{c['policy']:<24}{c['reward_model']:<4}{c['estimand']:<9}{_pair(c['old_same']):>16}{_pair(c['new']):>16}{tried}"
        )
    methods = list(results["by_ess"][0]["coverage"])
    lines += [
        "",
        "every segment by its ESS, coverage (and of the worst logging policy with 50 or more in the bin):",
        f"{'ESS':<12}{'n':>7}" + "".join(f"{m:>24}" for m in methods),
    ]
    for row in results["by_ess"]:
        lo, hi = row["ess"]
        label = f"{lo:g}–{hi:g}" if math.isfinite(hi) else f"≥ {lo:g}"
        texts = [f"{row['coverage'][m]:.3f} ({row['worst_policy'][m]:.3f})" for m in methods]
        cells = "".join(f"{t:>24}" for t in texts)
        lines.append(f"{label:<12}{row['n']:>7}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.coverage", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--worlds", type=int, default=60, help="worlds per logging policy (default 60)")
    ap.add_argument("--rows", type=int, default=12_000, help="decisions per world (default 12,000; half are the check window)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    results = run(args.worlds, args.rows, args.seed)
    results["seconds"] = time.perf_counter() - started
    print(table(results))
    print(f"({results['seconds']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

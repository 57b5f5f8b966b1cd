"""Knowledge extraction against planted truth: rules, Simpson's paradox, change points, drift, scale.

    python -m bench.insights [--quick] [--seeds N] [--rows N] [--scale N] [--json FILE]
    python -m bench.insights --only {changes,mechanisms,calibration} [--change-seeds S ...] [--quick]

Simulated agent worlds whose true expected rewards are known, logged the way reflexd logs (each
decision with the exact probability its action was chosen with), stored through the daemon's
own store (spool segments loaded into a DuckDB file by ``reflexd.service.store.Store``, as
ingest does, one spool line per 25 decisions with its own received_at) and read back with
``Store.snapshot``, the Parquet file the daemon hands the extraction. Then:

- **rules** (``--seeds`` worlds of ``--rows`` decisions): five planted segment effects on an LLM
  router's actions, one an interaction of two features (``task = math and difficulty > 0.6``),
  Bernoulli rewards, a logging policy that sends hard tasks to the large model (so observed
  averages are confounded by difficulty), and five noise features. Precision: share of published
  rules whose segment's decisions have a true lift of the rule's sign for at least 90% of them.
  Recall: share of planted segments at least 80% covered by correct published rules. Hold: share
  of published rules whose 95% interval on a next window of fresh decisions (``--rows`` / 2, DR
  with its own cross-fitted reward model) excludes zero on the same side.
- **confounded**: the logging policy picks the large model for 90% of hard tasks and 10% of easy
  ones; the large model is better by +0.10 on both, but hard tasks earn far less, so the
  per-action average says the small model is better by about 0.3 (Simpson's paradox).
- **changes**: the detector (``reflexd.analysis.anomalies.changes``) on Bernoulli(0.5) rewards
  (σ = 0.5, the noisiest 0–1 reward) with shifts of ±0.1 every 100,000 decisions, and on
  stationary streams; and the whole extraction on the scale world below (its planted changes).
  ``--only changes`` runs just this, over ``--change-seeds`` (3 11 29); ``--only mechanisms``
  puts the candidate detectors (CUSUMs with other references, a GLR over unknown shift sizes, a
  bank of CUSUMs, a moving sum) side by side at one false-alarm rate on 1,000 shifts per seed;
  ``--only calibration`` measures the detector's false alarms on stationary streams of five shapes.
- **scale** (``--scale`` decisions, 1,000,000 by default): two agents (the router with a
  +0.1 change of its reward at 40% and a −0.1 change of one action's at 70%, a model live from
  50% whose gate predicted more than it earns, two context features drifting from 75%; and the
  confounded agent), a dead-letter burst and an error burst; ``python -m reflexd.analysis`` run as
  the subprocess the daemon starts, its wall time and peak resident memory (``wait4``) measured.

The naive baseline is what extraction without propensities does: per-segment averages of
observed rewards (the segments from the same trees, fit to rewards weighted by the inverse of each
action's overall share), a rule kept when its interval on the same window excludes zero, no
later check; for changes, a rolling window test (the newest 500 decisions against the 5,000
before them, |z| > 3, as dashboards alert). Prints one table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench._host import machine
from reflexd.analysis import anomalies, experience, outcomes, segments
from reflexd.analysis.extraction import analyse
from reflexd.analysis.findings import Condition, ExtractionInputs, Insights, ModelRecord
from reflexd.analysis.result import encode_inputs, read_insights
from reflexd.config import Config, InsightsConfig
from reflexd.learning.ope import estimate
from reflexd.manifest import MODEL_FILE
from reflexd.registry import Registry
from reflexd.service import spool
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, Outcome

ACTIONS = ("large", "small", "tools", "retry")
TASKS = ("chat", "code", "math", "search")
LANGS = ("en", "de", "fr", "es")
REGIONS = ("eu-west", "us-east", "ap-south")
CHAT, MATH = TASKS.index("chat"), TASKS.index("math")
LINE_DECISIONS = 25  # decisions per spool line: one received_at each, as one ingest batch
SEGMENT_DECISIONS = 50_000
NOW_PAD = 3600.0  # the snapshot's "now" is this far past the last decision: every one has matured


# ---- worlds --------------------------------------------------------------------------------


@dataclass
class Log:
    """One agent's generated decisions: contexts as arrays, true means, what was logged."""

    agent: str
    actions: tuple[str, ...]
    ctx: dict[str, np.ndarray]
    mu: np.ndarray  # [n, A] true expected rewards
    chosen: np.ndarray
    prob: np.ndarray
    reward: np.ndarray
    t: np.ndarray
    versions: np.ndarray | None = None  # object array of version ids or None
    render: Callable[[dict[str, np.ndarray], int], dict[str, Any]] = field(default=lambda ctx, i: {})


def router_contexts(rng: np.random.Generator, n: int, drift_from: int | None = None) -> dict[str, np.ndarray]:
    ctx = {
        "task": rng.integers(0, 4, n),
        "difficulty": rng.random(n).round(3),
        "pro": rng.random(n) < 0.3,
        "lang": rng.choice(4, n, p=[0.4, 0.3, 0.2, 0.1]),
        "region": rng.choice(3, n, p=[0.5, 0.3, 0.2]),
        "hour": rng.integers(0, 24, n),
        "tokens": np.round(rng.lognormal(6.0, 0.8, n)).astype(np.int64),
        "attachment": rng.random(n) < 0.2,
    }
    if drift_from is not None and drift_from < n:
        m = n - drift_from
        ctx["tokens"][drift_from:] = np.round(rng.lognormal(6.6, 0.8, m)).astype(np.int64)
        ctx["region"][drift_from:] = rng.choice(3, m, p=[0.2, 0.3, 0.5])
    return ctx


def router_context(ctx: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {
        "task": TASKS[ctx["task"][i]],
        "difficulty": float(ctx["difficulty"][i]),
        "tier": "pro" if ctx["pro"][i] else "free",
        "lang": LANGS[ctx["lang"][i]],
        "region": REGIONS[ctx["region"][i]],
        "hour": int(ctx["hour"][i]),
        "prompt_tokens": int(ctx["tokens"][i]),
        "has_attachment": bool(ctx["attachment"][i]),
    }


def router_mu(ctx: dict[str, np.ndarray]) -> np.ndarray:
    d, task, pro = ctx["difficulty"], ctx["task"], ctx["pro"]
    base = 0.55 - 0.3 * d + 0.1 * pro
    lift = np.zeros((len(d), 4))
    lift[:, 1] = np.where(task == CHAT, 0.15, -0.2)
    lift[:, 2] = np.where((task == MATH) & (d > 0.6), 0.25, -0.1)
    lift[:, 3] = np.where(pro, -0.15, 0.0)
    return base[:, None] + lift


# the planted rules: (action, how it reads, its rows, the sign of its lift over "large")
PLANTED: list[tuple[str, str, Callable[[dict[str, np.ndarray]], np.ndarray], int]] = [
    ("small", "task = chat", lambda c: c["task"] == CHAT, +1),
    ("small", "task != chat", lambda c: c["task"] != CHAT, -1),
    ("tools", "task = math and difficulty > 0.6", lambda c: (c["task"] == MATH) & (c["difficulty"] > 0.6), +1),
    ("tools", "otherwise", lambda c: ~((c["task"] == MATH) & (c["difficulty"] > 0.6)), -1),
    ("retry", "tier = pro", lambda c: c["pro"], -1),
]


def router_logging(ctx: dict[str, np.ndarray]) -> np.ndarray:
    """Hard tasks go to the large model, easy ones to the small one, as a learned policy would send
    them: observed averages are confounded by difficulty, which also lowers every reward."""
    d = ctx["difficulty"]
    logits = np.stack([3.0 * d, -3.0 * d + 0.5 * (ctx["task"] == CHAT), 0.3 * (ctx["task"] == MATH), 0.0 * d], 1)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return 0.8 * p + 0.05  # every action at least 5%


def confounded_contexts(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"hard": rng.random(n) < 0.5, "lang": rng.choice(4, n), "hour": rng.integers(0, 24, n)}


def confounded_context(ctx: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {"level": "hard" if ctx["hard"][i] else "easy", "lang": LANGS[ctx["lang"][i]], "hour": int(ctx["hour"][i])}


def confounded_mu(ctx: dict[str, np.ndarray]) -> np.ndarray:
    """[small, large]: large is better by 0.1 on easy and on hard tasks."""
    hard = ctx["hard"]
    small = np.where(hard, 0.2, 0.7)
    return np.stack([small, small + 0.1], 1)


def confounded_logging(ctx: dict[str, np.ndarray]) -> np.ndarray:
    large = np.where(ctx["hard"], 0.9, 0.1)
    return np.stack([1.0 - large, large], 1)


def draw(rng: np.random.Generator, p: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(p)
    chosen = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    chosen = np.minimum(chosen, p.shape[1] - 1)
    reward = (rng.random(n) < np.clip(mu[np.arange(n), chosen], 0.0, 1.0)).astype(np.float64)
    return chosen, p[np.arange(n), chosen], reward


def router_log(seed: int, n: int, t0: float = 0.0, step: float = 1.0, **changes: Any) -> Log:
    rng = np.random.default_rng(seed)
    ctx = router_contexts(rng, n, changes.get("drift_from"))
    mu = router_mu(ctx)
    if "agent_change" in changes:
        mu[changes["agent_change"] :] += 0.1
    if "action_change" in changes:
        mu[changes["action_change"] :, ACTIONS.index("small")] -= 0.1
    p = router_logging(ctx)
    chosen, prob, reward = draw(rng, p, mu)
    versions = None
    if "live_from" in changes:
        versions = np.where(np.arange(n) >= changes["live_from"], "v0001", None).astype(object)
    t = t0 + step * np.arange(n, dtype=np.float64)
    return Log("router", ACTIONS, ctx, mu, chosen, prob, reward, t, versions, router_context)


def confounded_log(seed: int, n: int, t0: float = 0.0, step: float = 1.0) -> Log:
    rng = np.random.default_rng(seed)
    ctx = confounded_contexts(rng, n)
    mu = confounded_mu(ctx)
    chosen, prob, reward = draw(rng, confounded_logging(ctx), mu)
    t = t0 + step * np.arange(n, dtype=np.float64)
    return Log("support", ("small", "large"), ctx, mu, chosen, prob, reward, t, None, confounded_context)


# ---- through the daemon's store ------------------------------------------------------------


def store_snapshot(logs: list[Log], dest: Path) -> tuple[Path, float, float]:
    """Write ``logs`` through the store (spool segments loaded by DuckDB, as ingest does) and
    snapshot them; returns the snapshot, the seconds it took, and the snapshot's ``now``."""
    started = time.perf_counter()
    merged = sorted(((float(t), k, i) for k, log in enumerate(logs) for i, t in enumerate(log.t)))
    now = max(float(log.t[-1]) for log in logs) + NOW_PAD
    db = dest.parent / (dest.stem + ".duckdb")
    with Store(db) as store:
        lines: list[bytes] = []
        line_events: list[Decision | Outcome] = []
        in_segment = 0
        seg = 0
        for n, (t, k, i) in enumerate(merged):
            log = logs[k]
            did = f"{log.agent[0]}{i:09d}"
            version = None if log.versions is None else log.versions[i]
            line_events.append(
                Decision(
                    id=did,
                    agent=log.agent,
                    context=log.render(log.ctx, i),
                    actions=list(log.actions),
                    chosen=log.actions[int(log.chosen[i])],
                    prob=float(log.prob[i]),
                    model_version=version,
                    ts=t,
                )
            )
            if log.reward[i] != 0.0:  # no outcome: the join's default reward, 0
                line_events.append(Outcome(decision_id=did, reward=float(log.reward[i]), id=f"o{did}", ts=t))
            if (n + 1) % LINE_DECISIONS == 0 or n + 1 == len(merged):
                lines.append(spool.encode_line(line_events, t, len(lines)))
                line_events = []
                in_segment += LINE_DECISIONS
            if lines and (in_segment >= SEGMENT_DECISIONS or n + 1 == len(merged)):
                segment = dest.parent / f"seg{seg:05d}{spool.SUFFIX}"
                segment.write_bytes(b"".join(lines))
                store.load(segment)
                segment.unlink()
                lines, in_segment, seg = [], 0, seg + 1
        store.snapshot(dest, now, Config(), max_rows=10**9)
    db.unlink()
    db.with_name(db.name + ".wal").unlink(missing_ok=True)
    return dest, time.perf_counter() - started, now


# ---- truth ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stated:
    """A rule as either method states it, with the decisions its segment selects."""

    action: str
    baseline: str
    lift: float
    when: list[Condition]
    rows: np.ndarray


def true_lift(log: Log, action: str, baseline: str) -> np.ndarray:
    return log.mu[:, log.actions.index(action)] - log.mu[:, log.actions.index(baseline)]


def correct(rule: Stated, log: Log) -> bool:
    """At least 90% of the segment's decisions truly gain (or lose) what the rule says."""
    if not rule.rows.any():
        return False
    truth = true_lift(log, rule.action, rule.baseline)[rule.rows]
    return float(np.mean(np.sign(truth) == np.sign(rule.lift))) >= 0.9


def recall(rules: list[Stated], log: Log) -> list[bool]:
    """For each planted rule: do correct rules with the large model on one side cover 80% of it?"""
    found = []
    for action, _, where, sign in PLANTED:
        region = where(log.ctx)
        covered = np.zeros(len(region), dtype=bool)
        for rule in rules:
            if {rule.action, rule.baseline} != {action, "large"}:
                continue
            side = np.sign(rule.lift) if rule.action == action else -np.sign(rule.lift)
            if side == sign and correct(rule, log):
                covered |= rule.rows
        found.append(bool((covered & region).sum() >= 0.8 * region.sum()))
    return found


# ---- the naive baseline ---------------------------------------------------------------------


def naive_rules(exp: experience.Experience, baseline: str, settings: InsightsConfig, seed: int) -> list[Stated]:
    """Per-segment averages of observed rewards, kept when their interval excludes zero on the
    window they were found on."""
    names = np.array(exp.actions)[exp.chosen]
    share = {a: float(np.mean(names == a)) for a in set(names.tolist())}
    rows = np.arange(len(exp))
    fit = rows if len(rows) <= segments.TREE_ROWS else np.sort(
        np.random.default_rng(seed).choice(rows, segments.TREE_ROWS, replace=False)
    )
    x, columns = segments.tree_design(exp.features, fit)
    out = []
    for a in sorted(share):
        if a == baseline:
            continue
        y = np.where(names == a, exp.reward / share[a], 0.0) - np.where(names == baseline, exp.reward / share[baseline], 0.0)
        found = segments.find_segments(
            x, columns, y[fit], max_depth=settings.max_conditions, max_leaves=settings.max_segments,
            split_z=settings.split_z, min_leaf=max(20, math.ceil(settings.min_support * len(fit) / len(rows))), seed=seed,
        )
        for when in found:
            inside = segments.mask(when, exp.features, len(exp))
            ra, rb = exp.reward[inside & (names == a)], exp.reward[inside & (names == baseline)]
            if len(ra) < 2 or len(rb) < 2 or inside.sum() < settings.min_support:
                continue
            lift = float(ra.mean() - rb.mean())
            se = math.sqrt(ra.var(ddof=1) / len(ra) + rb.var(ddof=1) / len(rb))
            if abs(lift) > 1.959963984540054 * se:
                out.append(Stated(a, baseline, lift, when, inside))
    return out


def naive_lift_everywhere(exp: experience.Experience, a: str, b: str) -> float:
    names = np.array(exp.actions)[exp.chosen]
    return float(exp.reward[names == a].mean() - exp.reward[names == b].mean())


# ---- rules and the confounded world --------------------------------------------------------


def dr_holds(rules: list[Stated], nxt: experience.Experience, seed: int) -> list[bool]:
    """Each rule's 95% DR interval on the next window excludes zero on its side."""
    data = outcomes.agent_outcomes(nxt, 0, False, seed)
    held = []
    for rule in rules:
        ia, ib = data.actions.index(rule.action), data.actions.index(rule.baseline)
        rows = segments.mask(rule.when, nxt.features, len(nxt)) & data.available[:, ia] & data.available[:, ib]
        if rows.sum() < 2:
            held.append(False)
            continue
        e = estimate(data.gamma[rows, ia] - data.gamma[rows, ib], 0.95)
        held.append(bool(e.lower > 0 if rule.lift > 0 else e.upper < 0))
    return held


def run_rules(seeds: int, rows: int, work: Path, settings: InsightsConfig) -> dict[str, Any]:
    keys = ("precision", "recall", "hold", "published", "seconds")
    tallies: dict[str, dict[str, list[float]]] = {k: {key: [] for key in keys} for k in ("reflexd", "naive")}
    per_region = {k: np.zeros(len(PLANTED)) for k in ("reflexd", "naive")}
    for seed in range(seeds):
        log = router_log(100 + seed, rows)
        nxt_log = router_log(10_000 + seed, rows // 2, t0=float(rows) + 10.0)
        path, _, now = store_snapshot([log], work / f"rules{seed}.parquet")
        nxt_path, _, _ = store_snapshot([nxt_log], work / f"next{seed}.parquet")
        exp = experience.from_parquet(str(path))
        nxt = experience.from_parquet(str(nxt_path))
        assert len(exp) == rows and len(nxt) == len(nxt_log.t), "the snapshot should hold every decision"
        started = time.perf_counter()
        insights = analyse(exp, ExtractionInputs(now=now), settings, seed=seed)
        seconds = time.perf_counter() - started
        published = [r for r in insights.rules if r.status == "published"]
        ours = [Stated(r.action, r.baseline, r.lift, r.when, segments.mask(r.when, exp.features, len(exp))) for r in published]
        started = time.perf_counter()
        theirs = naive_rules(exp, published[0].baseline if published else "large", settings, seed)
        naive_seconds = time.perf_counter() - started
        for name, found, took in (("reflexd", ours, seconds), ("naive", theirs, naive_seconds)):
            right = [correct(rule, log) for rule in found]
            got = recall(found, log)
            per_region[name] += got
            tally = tallies[name]
            tally["precision"].append(float(np.mean(right)) if right else math.nan)
            tally["recall"].append(float(np.mean(got)))
            tally["published"].append(float(len(found)))
            tally["seconds"].append(took)
            held = dr_holds(found, nxt, seed)
            tally["hold"].append(float(np.mean(held)) if held else math.nan)
        for p in (path, nxt_path):
            p.unlink()
    return {
        name: {
            "precision": float(np.nanmean(t["precision"])),
            "recall": float(np.mean(t["recall"])),
            "hold": float(np.nanmean(t["hold"])),
            "published": float(np.mean(t["published"])),
            "seconds": float(np.mean(t["seconds"])),
            "planted_found": {f"{PLANTED[k][0]}: {PLANTED[k][1]}": f"{int(per_region[name][k])}/{seeds}" for k in range(len(PLANTED))},
        }
        for name, t in tallies.items()
    }


def run_confounded(rows: int, work: Path, settings: InsightsConfig) -> dict[str, Any]:
    log = confounded_log(7, rows)
    path, _, now = store_snapshot([log], work / "confounded.parquet")
    exp = experience.from_parquet(str(path))
    insights = analyse(exp, ExtractionInputs(now=now), settings)
    path.unlink()
    ours, ci, text = None, None, None
    for r in insights.rules:
        if r.status == "published" and not r.when and {r.action, r.baseline} == {"large", "small"}:
            ours = r.lift if r.action == "large" else -r.lift
            ci = r.ci if r.action == "large" else [-r.ci[1], -r.ci[0]]
            text = r.text
    return {
        "truth": float(np.mean(true_lift(log, "large", "small"))),
        "naive": naive_lift_everywhere(exp, "large", "small"),
        "reflexd": ours,
        "reflexd_ci": ci,
        "rule": text,
    }


# ---- change detection ----------------------------------------------------------------------


def naive_alarms(x: np.ndarray, recent: int = 500, before: int = 5000, z: float = 3.0, every: int = 25) -> list[int]:
    """Rolling test: the newest ``recent`` against the ``before`` preceding them; after an alarm,
    quiet until the windows hold only new decisions."""
    c1 = np.concatenate([[0.0], np.cumsum(x)])
    c2 = np.concatenate([[0.0], np.cumsum(x * x)])
    alarms = []
    t = recent + before
    while t <= len(x):
        ends = np.arange(t, len(x) + 1, every)
        a0, a1, b0 = ends - recent, ends, ends - recent - before
        ma = (c1[a1] - c1[a0]) / recent
        mb = (c1[a0] - c1[b0]) / before
        va = (c2[a1] - c2[a0]) / recent - ma**2
        vb = (c2[a0] - c2[b0]) / before - mb**2
        zs = (ma - mb) / np.sqrt(np.maximum(va / recent + vb / before, 1e-12))
        hit = np.flatnonzero(np.abs(zs) > z)
        if len(hit) == 0:
            break
        at = int(ends[hit[0]]) - 1
        alarms.append(at)
        t = at + 1 + recent + before
    return alarms


def score_alarms(alarms: list[int], changes: list[int], n: int, horizon: int = 5000) -> tuple[list[int], int]:
    """(delays of detected changes, false alarms): an alarm within ``horizon`` after a change detects it."""
    delays, used = [], set()
    for c in changes:
        after = [a for a in alarms if c <= a < c + horizon and a not in used]
        if after:
            delays.append(after[0] - c)
            used.add(after[0])
    false = sum(1 for a in alarms if a not in used and not any(c <= a < c + horizon for c in changes))
    return delays, false


def run_changes(settings: InsightsConfig, quick: bool, seed: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    gap = 100_000
    shifts = 4 if quick else 10
    level = np.empty(gap * (shifts + 1))
    changes = []
    for k in range(shifts + 1):
        level[k * gap : (k + 1) * gap] = 0.5 if k % 2 == 0 else 0.6
        if k:
            changes.append(k * gap)
    stationary = 1_000_000 if quick else 5_000_000
    out: dict[str, Any] = {}
    for name in ("reflexd", "naive"):
        delays: list[int] = []
        false = 0
        reported = 0  # reflexd's false alarms left once practical() drops the tiny ones
        events = 0
        for rep in range(1 if quick else 3):
            x = (rng.random(len(level)) < level).astype(np.float64)
            if name == "reflexd":
                found = anomalies.changes(x, settings.change_size, settings.false_alarms_per_100k)
                alarms = [c.alarm for c in found]
                kept = [c.alarm for c in anomalies.practical(x, found, settings.change_size / 2)]
                reported += score_alarms(kept, changes, len(x))[1]
            else:
                alarms = naive_alarms(x)
            d, f = score_alarms(alarms, changes, len(x))
            delays += d
            false += f
            events += len(x) - len(changes) * 5000
        y = (rng.random(stationary) < 0.5).astype(np.float64)
        if name == "reflexd":
            found = anomalies.changes(y, settings.change_size, settings.false_alarms_per_100k)
            quiet = [c.alarm for c in found]
            reported += len(anomalies.practical(y, found, settings.change_size / 2))
        else:
            quiet = naive_alarms(y)
        false += len(quiet)
        events += stationary
        planted = len(changes) * (1 if quick else 3)
        out[name] = {
            "detected": f"{len(delays)}/{planted}",
            "delay_mean": float(np.mean(delays)) if delays else math.nan,
            "delay_median": float(np.median(delays)) if delays else math.nan,
            "delay_p90": float(np.quantile(delays, 0.9)) if delays else math.nan,
            "false_per_100k": false / events * 100_000,
            "reported_false_per_100k": reported / events * 100_000 if name == "reflexd" else None,
            "events": events,
        }
    return out


# What a detector can do at the stated rate, whatever it is: each candidate on the same streams, its
# threshold set for the same false-alarm rate on a no-change stream, the pre-change level known
# (in the streams above it is estimated from 100,000 decisions: the difference is negligible).


def _sums(z: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(z.shape[:-1] + (1,)), np.cumsum(z, axis=-1)], axis=-1)


def _cusum(z: np.ndarray, k: float) -> np.ndarray:
    w = np.cumsum(z - k, axis=-1)
    return w - np.minimum(np.minimum.accumulate(w, axis=-1), 0.0)


def _glr(z: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """max over the lags m of max(0, S_n − S_{n−m})² / 2m: the GLR for an upward shift of unknown size."""
    s, out = _sums(z), np.zeros(z.shape)
    for m in lags[lags <= z.shape[-1]]:
        d = np.maximum(s[..., m:] - s[..., :-m], 0.0)
        np.maximum(out[..., m - 1 :], d * d / (2.0 * m), out=out[..., m - 1 :])
    return out


def _geometric_lags(longest: int, ratio: float = 1.15, dense: int = 10) -> np.ndarray:
    lags = list(range(1, dense + 1))
    while lags[-1] < longest:
        lags.append(max(lags[-1] + 1, round(lags[-1] * ratio)))
    return np.array(lags)


def _moving_sum(z: np.ndarray, m: int) -> np.ndarray:
    s, out = _sums(z), np.full(z.shape, -np.inf)
    out[..., m - 1 :] = s[..., m:] - s[..., :-m]
    return out


MECHANISMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # one statistic per side (upward here; the streams are symmetric); z in standard deviations
    "CUSUM k = δ/2": lambda z: _cusum(z, 0.1),
    "CUSUM k = 0.4 δ (the detector now)": lambda z: _cusum(z, 0.08),
    "CUSUM k = 0.3 δ": lambda z: _cusum(z, 0.06),
    "GLR, unknown shift, lags ≤ 3,000": lambda z: _glr(z, _geometric_lags(3000)),
    # each CUSUM in units of its own threshold for the same run length, the bank's level set below
    "bank of CUSUMs, k = δ/4, δ/2, δ": lambda z: np.max(
        [_cusum(z, k) / anomalies.cusum_threshold(k, 200_000) for k in (0.05, 0.1, 0.2)], axis=0
    ),
    "moving sum of the last 500": lambda z: _moving_sum(z, 500),
    # each in units of its level at 0.5 false alarms per 100,000 on its own; their common level set below
    "CUSUM k = 0.4 δ or moving sum of 500": lambda z: np.maximum(_cusum(z, 0.08) / 47.4, _moving_sum(z, 500) / 78.0),
}
# the previous detector as it was set: Siegmund's threshold for twice the run length asked for
PREVIOUS = ("CUSUM k = δ/2, h by Siegmund × 2 (the previous detector)", MECHANISMS["CUSUM k = δ/2"], 43.78)


def _threshold(stat: Callable[[np.ndarray], np.ndarray], per_side_100k: float, seed: int = 1) -> float:
    """The level at which a statistic, restarted after each alarm, alarms ``per_side_100k`` times per
    100,000 no-change steps. A restart is a fresh stream, so stream after stream (rows of 20,000
    steps) are renewal cycles: the rate at a level is the rows whose running maximum passes it over
    the steps taken until they do."""
    rng = np.random.default_rng(seed)
    highs = np.concatenate([
        np.maximum.accumulate(stat(np.where(rng.random((50, 20_000)) < 0.5, 1.0, -1.0)), axis=1).astype(np.float32)
        for _ in range(16)
    ])

    def rate(h: float) -> float:
        passed = highs[:, -1] > h
        first = np.where(passed, np.argmax(highs > h, axis=1) + 1, highs.shape[1])
        return float(passed.sum() / first.sum() * 100_000)

    lo, hi = 0.0, float(highs.max())
    for _ in range(40):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if rate(mid) > per_side_100k else (lo, mid)
    return hi


def _delays(stat: Callable[[np.ndarray], np.ndarray], h: float, rng: np.random.Generator, shifts: int,
            to: float, pre: int, post: int) -> tuple[np.ndarray, int, int]:
    """Delays of ``shifts`` shifts from 0.5 to ``to`` after ``pre`` decisions without one (``post``:
    not found), and the false alarms and no-change steps before them."""
    delays: list[int] = []
    false = quiet = 0
    for _ in range(0, shifts, 250):
        z = np.where(rng.random((250, pre + post)) < np.r_[np.full(pre, 0.5), np.full(post, to)], 1.0, -1.0)
        over = stat(z) > h
        early = over[:, :pre].any(axis=1)
        false += int(early.sum())
        quiet += int(np.where(early, over[:, :pre].argmax(axis=1) + 1, pre).sum())
        late = over[~early, pre:]
        delays += np.where(late.any(axis=1), late.argmax(axis=1), post).tolist()
    return np.array(delays), false, quiet


def run_mechanisms(seeds: list[int], shifts: int = 1000, per_100k: float = 0.7) -> dict[str, Any]:
    """Each mechanism at ``per_100k`` false alarms per 100,000 decisions (what the detector raises on
    coin flips): per seed, its delays for ``shifts`` shifts of δ = 0.2 sd (0.1 at σ 0.5, Bernoulli
    0.5 → 0.6) after 5,000 decisions without one, and its false alarms on those 5,000 (both sides:
    twice the upward side's, the ±1 steps being symmetric); and, on the first seed, its delays for
    shifts of half and twice the size it is tuned for."""
    pre = 5_000
    out: dict[str, Any] = {}
    candidates: list[tuple[str, Callable[[np.ndarray], np.ndarray], float | None]] = [PREVIOUS]
    candidates += [(name, stat, None) for name, stat in MECHANISMS.items()]
    for name, stat, fixed in candidates:
        h = fixed if fixed is not None else _threshold(stat, per_100k / 2.0)
        rows = []
        for seed in seeds:
            d, false, quiet = _delays(stat, h, np.random.default_rng(seed), shifts, 0.6, pre, 3_000)
            rows.append({"seed": seed, "shifts": len(d), "delay_mean": float(d.mean()), "delay_median": float(np.median(d)),
                         "delay_p90": float(np.quantile(d, 0.9)), "within_500": float(np.mean(d < 500)),
                         "false_per_100k": 2.0 * false / quiet * 100_000})
        other = {}
        for label, to, post in (("half", 0.55, 20_000), ("double", 0.7, 2_000)):
            d, _, _ = _delays(stat, h, np.random.default_rng(seeds[0]), max(shifts // 4, 250), to, 1_000, post)
            other[label] = {"delay_mean": float(d.mean()), "delay_p90": float(np.quantile(d, 0.9)), "missed": float(np.mean(d >= post))}
        out[name] = {"threshold": h, "seeds": rows, "other_sizes": other}
    return out


def run_calibration(n: int, seeds: list[int], settings: InsightsConfig) -> dict[str, Any]:
    """False alarms per 100,000 decisions the detector raises on stationary streams of several
    shapes: the measurement ``anomalies._DESIGN_MARGIN`` is set by."""
    out: dict[str, Any] = {}
    for shape, draw_one in {
        "coin flips": lambda r: (r.random(n) < 0.5).astype(np.float64),
        "80% successes": lambda r: (r.random(n) < 0.8).astype(np.float64),
        "95% successes": lambda r: (r.random(n) < 0.95).astype(np.float64),
        "normal": lambda r: r.normal(2.0, 0.5, n),
        "exponential": lambda r: r.exponential(1.0, n),
    }.items():
        alarms = 0
        for seed in seeds:
            alarms += len(anomalies.changes(draw_one(np.random.default_rng(seed)), settings.change_size, settings.false_alarms_per_100k))
        events = n * len(seeds)
        out[shape] = {"alarms": alarms, "events": events, "per_100k": alarms / events * 100_000}
    return out


# ---- scale ---------------------------------------------------------------------------------


def train_live_model(snapshot: Path, work: Path, rows: int = 50_000) -> Path:
    """A real live model: the trainer subprocess (the MLP learner, ONNX export) fit on the oldest
    ``rows`` decisions of the snapshot, registered as the daemon registers one."""
    import pyarrow.parquet as pq

    small = work / "train.parquet"
    pq.write_table(pq.read_table(snapshot).slice(0, rows), small)
    out = work / "trainer-out"
    config = Config()
    subprocess.run(
        [sys.executable, "-m", "reflexd.trainer", str(small), str(out), "--config", msgspec.json.encode(config).decode()],
        check=True, capture_output=True,
    )
    small.unlink()
    features = config.features
    registry = Registry(work / "models")
    manifest = registry.add(
        out / MODEL_FILE,
        {"parent": None, "created": time.time(), "learner": config.trainer.learner,
         "features": {"context_dim": features.context_dim, "action_dim": features.action_dim, "seed": features.seed},
         "exploration": msgspec.to_builtins(config.exploration)},
    )
    return registry.root / manifest.version


def extract_in_subprocess(path: Path, work: Path, inputs: ExtractionInputs, settings: InsightsConfig,
                          model_dir: Path | None, name: str) -> tuple[Insights, float, float, str]:
    """``python -m reflexd.analysis`` as the daemon starts it: (insights, wall seconds, peak RSS MiB, stderr)."""
    inputs_path = work / f"inputs-{name}.json"
    inputs_path.write_bytes(encode_inputs(inputs))
    out_dir = work / f"out-{name}"
    config = work / "config.json"
    config.write_bytes(msgspec.json.encode(Config(insights=settings)))
    cmd = [sys.executable, "-m", "reflexd.analysis", str(path), str(out_dir), "--inputs", str(inputs_path), "--config", str(config)]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir)]
    started = time.perf_counter()
    with open(work / f"{name}.log", "wb") as log:
        code = subprocess.run(cmd, stderr=log, check=False).returncode
    wall = time.perf_counter() - started
    stderr = (work / f"{name}.log").read_text()
    if code != 0:
        raise RuntimeError(f"the extraction failed ({code}):\n{stderr}")
    # its own VmHWM, which it logs: wait4's ru_maxrss would count this big process's pages,
    # shared with the child between fork and exec
    peak = float(re.search(r"peak_rss_mb=([0-9.]+)", stderr).group(1))  # type: ignore[union-attr]
    return read_insights(out_dir), wall, peak, stderr


def run_scale(rows: int, work: Path, settings: InsightsConfig) -> dict[str, Any]:
    n_router = rows * 9 // 10
    n_support = rows - n_router
    changes = {"agent_change": int(n_router * 0.4), "action_change": int(n_router * 0.7),
               "drift_from": int(n_router * 0.75), "live_from": int(n_router * 0.5)}
    router = router_log(21, n_router, **changes)
    support = confounded_log(22, n_support, step=n_router / n_support)
    path, ingest_seconds, now = store_snapshot([router, support], work / "scale.parquet")
    t_live = float(router.t[changes["live_from"]])
    rng = np.random.default_rng(5)
    span = float(router.t[-1])
    dead = np.concatenate([rng.uniform(0, span, int(span / 3600)), span * 0.3 + rng.uniform(0, 120, 60)])
    errors = np.concatenate([rng.uniform(0, span, int(2 * span / 3600)), span * 0.85 + rng.uniform(0, 120, 40)])
    inputs = ExtractionInputs(
        now=now,
        # the gate predicted more than the model earns: a "below_gate" anomaly is planted
        models=[ModelRecord(version="v0001", live_from=t_live, predicted=0.62, predicted_low=0.6, predicted_high=0.64)],
        training_windows={"": [0.0, t_live]},
        dead_letters=sorted(dead.tolist()),
        errors={"router": sorted(errors.tolist())},
    )
    result: dict[str, Any] = {"rows": rows, "ingest_seconds": ingest_seconds}
    print("[bench] scale: extraction, cross-fitted reward model", file=sys.stderr)
    insights, wall, peak, stderr = extract_in_subprocess(path, work, inputs, settings, None, "cross_fit")
    result |= {"wall_seconds": wall, "peak_rss_mb": peak, "log": stderr.strip().splitlines()[-2:]}
    result |= score_scale(insights, router, changes)
    print("[bench] scale: training a live model, extraction with it", file=sys.stderr)
    model_dir = train_live_model(path, work)
    live, wall, peak, _ = extract_in_subprocess(path, work, inputs, settings, model_dir, "live")
    result |= {"live_wall_seconds": wall, "live_peak_rss_mb": peak, "live_reward_model": live.reward_model,
               "live": score_scale(live, router, changes)}
    path.unlink()
    return result


def score_scale(insights: Insights, router: Log, changes: dict[str, int]) -> dict[str, Any]:
    """Planted changes found (and their delays, in the stream's decisions), false change alarms,
    drift, the anomaly kinds seen. Every router stream (its reward; each action's pseudo-outcomes
    over all its decisions, every action being always offered) changes by 0.1 at agent_change;
    small's by −0.1 at action_change, which moves the router's own reward by only about 0.02 (small
    is chosen about a fifth of the time): an alarm for that in the router's stream is explained
    but not timed."""
    t = router.t
    at = {"agent": float(t[changes["agent_change"]]), "action": float(t[changes["action_change"]])}
    planted = [(None, "agent", True), (None, "action", False)] + [(a, "agent", True) for a in ACTIONS] + [("small", "action", True)]
    found = [a for a in insights.anomalies if a.kind == "reward_change" and a.agent == "router"]
    matched: set[int] = set()
    delays = []
    for action, which, timed in planted:
        when = at[which]
        later = [w for w in at.values() if w > when]
        until = min(later) if later else math.inf
        hits = [k for k, a in enumerate(found) if a.action == action and k not in matched
                and a.detected_at is not None and when <= a.detected_at < until]
        if not hits:
            continue
        k = min(hits, key=lambda j: found[j].detected_at)
        matched.add(k)
        if timed:  # every stream of the router has one decision per router decision
            lag = int(np.searchsorted(t, found[k].detected_at, side="right") - np.searchsorted(t, when))
            delays.append((f"{action or 'router'}@{which}", lag))
    false = [a for k, a in enumerate(found) if k not in matched]
    other = [a for a in insights.anomalies if a.kind == "reward_change" and a.agent != "router"]
    support_rows = insights.rows - len(t)
    stream_events = (1 + len(ACTIONS)) * len(t) + 3 * support_rows  # each agent's reward and each action's
    drifted = sorted({a.feature for a in insights.anomalies if a.kind == "context_drift" and a.feature})
    kinds = sorted({a.kind for a in insights.anomalies})
    support = [r.text for r in insights.rules if r.agent == "support" and r.status == "published"]
    return {
        "planted_changes": sum(timed for _, _, timed in planted),
        "changes_detected": len(delays),
        "change_delays": delays,
        "false_changes": len(false) + len(other),
        "false_per_100k": (len(false) + len(other)) / stream_events * 100_000,
        "false_per_100k_decisions": (len(false) + len(other)) / insights.rows * 100_000,
        "drifted_features": drifted,
        "anomaly_kinds": kinds,
        "rules_published": insights.counts.rules_published,
        "support_rules": support,
    }


# ---- the table -----------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def table(r: dict[str, Any]) -> str:
    rules, conf, ch, sc = r["rules"], r["confounded"], r["changes"], r.get("scale")
    rows = [
        ("rule precision (≥ 0.9)", _f(rules["reflexd"]["precision"]), _f(rules["naive"]["precision"])),
        ("rule recall (≥ 0.9)", _f(rules["reflexd"]["recall"]), _f(rules["naive"]["recall"])),
        ("published rules that hold on the next window (≥ 90%)", _f(rules["reflexd"]["hold"], "{:.0%}"), _f(rules["naive"]["hold"], "{:.0%}")),
        ("rules published per world", _f(rules["reflexd"]["published"], "{:.1f}"), _f(rules["naive"]["published"], "{:.1f}")),
        ("confounded: large − small (truth " + _f(conf["truth"], "{:+.2f}") + ")",
         _f(conf["reflexd"], "{:+.3f}") + (f" [{conf['reflexd_ci'][0]:+.3f}, {conf['reflexd_ci'][1]:+.3f}]" if conf["reflexd_ci"] else ""),
         _f(conf["naive"], "{:+.3f}")),
        ("confounded: sign right", str(conf["reflexd"] is not None and np.sign(conf["reflexd"]) == np.sign(conf["truth"])),
         str(np.sign(conf["naive"]) == np.sign(conf["truth"]))),
        ("±0.1 shifts detected (σ 0.5)", ch["reflexd"]["detected"], ch["naive"]["detected"]),
        ("detection delay, mean / median / p90 (≤ 500 events)",
         " / ".join(_f(ch["reflexd"][k], "{:.0f}") for k in ("delay_mean", "delay_median", "delay_p90")),
         " / ".join(_f(ch["naive"][k], "{:.0f}") for k in ("delay_mean", "delay_median", "delay_p90"))),
        ("false alarms per 100k events (≤ 1)", _f(ch["reflexd"]["false_per_100k"], "{:.2f}"), _f(ch["naive"]["false_per_100k"], "{:.2f}")),
        ("  of which reported (moved the stream by ≥ half the change size)", _f(ch["reflexd"]["reported_false_per_100k"], "{:.2f}"), ""),
    ]
    if sc:
        rows += [
            (f"scale: {sc['rows']:,} experiences, wall time (≤ 60 s)", _f(sc["wall_seconds"], "{:.1f} s"), ""),
            ("scale: peak memory (≤ 500 MB)", _f(sc["peak_rss_mb"], "{:.0f} MB"), ""),
            ("scale, live model as reward model: wall time", _f(sc["live_wall_seconds"], "{:.1f} s"), ""),
            ("scale, live model as reward model: peak memory", _f(sc["live_peak_rss_mb"], "{:.0f} MB"), ""),
            ("scale: planted changes detected, delays (events)", f"{sc['changes_detected']}/{sc['planted_changes']} "
             + ", ".join(f"{k} {v}" for k, v in sc["change_delays"]), ""),
            ("scale: false changes reported, per 100k decisions (all streams)", f"{sc['false_changes']} ({_f(sc['false_per_100k_decisions'], '{:.2f}')})", ""),
            ("scale: drifted features found (planted: prompt_tokens, region)", ", ".join(sc["drifted_features"]) or "none", ""),
            ("scale: anomaly kinds found", ", ".join(sc["anomaly_kinds"]), ""),
        ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{'':{width}}  {'reflexd':>28}  {'naive':>10}"]
    lines += [f"{a:{width}}  {b:>28}  {c:>10}" for a, b, c in rows]
    return "\n".join(lines)


def only(part: str, seeds: list[int], quick: bool, dest: Path | None) -> int:
    settings = InsightsConfig()
    results: dict[str, Any] = {"machine": machine(("numpy",))}
    if part == "changes":
        results["changes"] = {str(seed): run_changes(settings, quick, seed) for seed in seeds}
        print(f"{'seed':>5}  {'detected':>8}  {'mean':>5}  {'median':>6}  {'p90':>5}  {'false/100k':>10}  {'reported':>8}  {'naive p90':>9}  {'naive false':>11}")
        for seed, r in results["changes"].items():
            ours, naive = r["reflexd"], r["naive"]
            print(f"{seed:>5}  {ours['detected']:>8}  {ours['delay_mean']:5.0f}  {ours['delay_median']:6.0f}  {ours['delay_p90']:5.0f}"
                  f"  {ours['false_per_100k']:10.2f}  {ours['reported_false_per_100k']:8.2f}  {naive['delay_p90']:9.0f}  {naive['false_per_100k']:11.2f}")
    elif part == "mechanisms":
        results["mechanisms"] = run_mechanisms(seeds, 250 if quick else 1000)
        print(f"{'mechanism':<40} {'seed':>5} {'mean':>5} {'median':>6} {'p90':>5} {'≤ 500':>6} {'false/100k':>10}")
        for name, r in results["mechanisms"].items():
            for row in r["seeds"]:
                print(f"{name:<40} {row['seed']:>5} {row['delay_mean']:5.0f} {row['delay_median']:6.0f} {row['delay_p90']:5.0f}"
                      f" {row['within_500']:6.1%} {row['false_per_100k']:10.2f}")
            half, double = r["other_sizes"]["half"], r["other_sizes"]["double"]
            print(f"{name:<40} half the size: mean {half['delay_mean']:.0f}, p90 {half['delay_p90']:.0f};"
                  f" twice: mean {double['delay_mean']:.0f}, p90 {double['delay_p90']:.0f}")
    else:
        results["calibration"] = run_calibration(1_000_000 if quick else 5_000_000, seeds, settings)
        for shape, r in results["calibration"].items():
            print(f"{shape:<15} {r['alarms']:>5} alarms in {r['events']:>11,} decisions: {r['per_100k']:.2f} per 100k")
    if dest:
        dest.write_text(json.dumps(results, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.insights", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller worlds, fewer seeds, no 1M run unless --scale")
    ap.add_argument("--seeds", type=int, default=None, help="rules worlds (default 5; quick 2)")
    ap.add_argument("--rows", type=int, default=None, help="decisions per rules world (default 200,000; quick 60,000)")
    ap.add_argument("--scale", type=int, default=None, help="decisions of the scale run (default 1,000,000; quick: none)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--only", choices=("changes", "mechanisms", "calibration"), default=None,
                    help="only the change detection on the planted shifts (over --change-seeds); the candidate"
                         " mechanisms side by side; or the detector's false alarms on stationary streams")
    ap.add_argument("--change-seeds", type=int, nargs="+", default=None, help="seeds of the streams for --only (default 3 11 29)")
    args = ap.parse_args(argv)
    if args.only:
        return only(args.only, args.change_seeds or [3, 11, 29], args.quick, args.json)
    seeds = args.seeds or (2 if args.quick else 5)
    rows = args.rows or (60_000 if args.quick else 200_000)
    scale = args.scale if args.scale is not None else (0 if args.quick else 1_000_000)
    settings = InsightsConfig()
    results: dict[str, Any] = {"machine": machine(("numpy", "scikit-learn", "pyarrow", "duckdb", "msgspec"))}
    with tempfile.TemporaryDirectory(prefix="bench-insights-") as tmp:
        work = Path(tmp)
        print(f"[bench] rules: {seeds} worlds × {rows:,} decisions", file=sys.stderr)
        results["rules"] = run_rules(seeds, rows, work, settings)
        print("[bench] confounded world", file=sys.stderr)
        results["confounded"] = run_confounded(rows // 2, work, settings)
        print("[bench] change detection", file=sys.stderr)
        results["changes"] = run_changes(settings, args.quick)
        if scale:
            print(f"[bench] scale: {scale:,} experiences", file=sys.stderr)
            results["scale"] = run_scale(scale, work, settings)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

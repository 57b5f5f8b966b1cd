"""Trends: is an agent getting better, and since when?

The snapshot's span is cut into ``trend_windows`` windows of equal time. Three kinds of series
per agent, each point the mean over one window's decisions with its interval:

- ``reward``: what the agent earned (its joined rewards, exploration included);
- ``dr_value`` per action: what always taking that action would have earned (the mean of its
  pseudo-outcomes), so a change in the traffic's mix of contexts shows, while the logging policy
  moving does not;
- ``reward`` per model version: what each version earned on the decisions it made.

A window with fewer than ``MIN_POINT`` decisions is left out. A series' direction compares its
newest point with its first: their difference (independent windows, so the standard errors add
in quadrature) is improving or declining when its interval excludes zero, flat otherwise, and
``since`` is the start of the earliest window from which every point differs from the first that
way. An agent has many series, so that interval is taken at 1 − ``false_rule_rate`` / (the
agent's number of series), Bonferroni: a flat agent is called improving or declining anywhere at
most that often. Points' intervals are at ``confidence``.
"""

from __future__ import annotations

import math

import numpy as np

from reflexd.analysis.findings import Trend, TrendPoint
from reflexd.analysis.outcomes import AgentOutcomes, covered
from reflexd.config import InsightsConfig
from reflexd.learning.ope import Estimate, estimate, z_score

MIN_POINT = 30


def windows(start: float, end: float, count: int) -> list[tuple[float, float]]:
    if end <= start:
        return [(start, end)]
    edges = np.linspace(start, end, count + 1)
    return [(float(edges[k]), float(edges[k + 1])) for k in range(count)]


def _slices(t: np.ndarray, spans: list[tuple[float, float]]) -> list[np.ndarray]:
    last = len(spans) - 1
    return [np.flatnonzero((t >= lo) & ((t < hi) if k < last else (t <= hi))) for k, (lo, hi) in enumerate(spans)]


def series(
    values: np.ndarray,
    t: np.ndarray,
    spans: list[tuple[float, float]],
    confidence: float,
    *,
    decide_at: float | None = None,
    agent: str,
    metric: str,
    action: str | None = None,
    model_version: str | None = None,
) -> Trend | None:
    """One trend from per-decision ``values`` at times ``t`` (NaN values are not decisions of it)."""
    points: list[TrendPoint] = []
    estimates: list[Estimate] = []
    for (lo, hi), rows in zip(spans, _slices(t, spans)):
        v = values[rows]
        v = v[~np.isnan(v)]
        if len(v) < MIN_POINT:
            continue
        e = estimate(v, confidence)
        estimates.append(e)
        points.append(TrendPoint(start=lo, end=hi, value=e.value, ci=[e.lower, e.upper], count=len(v)))
    if not points:
        return None
    z = z_score(confidence if decide_at is None else decide_at)

    def versus_first(e: Estimate) -> tuple[float, float, float]:
        d = e.value - estimates[0].value
        half = z * math.hypot(e.stderr, estimates[0].stderr)
        return d, d - half, d + half

    change, low, high = versus_first(estimates[-1])
    direction = "improving" if low > 0 else "declining" if high < 0 else "flat"
    since = None
    if direction != "flat":
        k = len(points) - 1
        while k > 1:
            _, lo_k, hi_k = versus_first(estimates[k - 1])
            if not (lo_k > 0 if direction == "improving" else hi_k < 0):
                break
            k -= 1
        since = points[k].start
    newest = points[-1]
    return Trend(
        agent=agent,
        action=action,
        model_version=model_version,
        metric=metric,  # type: ignore[arg-type]  # "reward" or "dr_value"
        start=points[0].start,
        end=newest.end,
        value=newest.value,
        ci=newest.ci,
        count=newest.count,
        direction=direction,  # type: ignore[arg-type]
        since=since,
        change=change,
        change_ci=[low, high],
        points=points,
    )


def trends(data: AgentOutcomes, spans: list[tuple[float, float]], settings: InsightsConfig) -> list[Trend]:
    exp = data.exp
    t = exp.received_at
    c = settings.confidence
    versions = np.unique(exp.version[exp.version >= 0])
    level = 1.0 - settings.false_rule_rate / (1 + len(data.actions) + len(versions))
    out = [series(exp.reward, t, spans, c, decide_at=level, agent=data.agent, metric="reward")]
    for a, action in enumerate(data.actions):
        if not covered(data, np.flatnonzero(data.available[:, a]), a):  # its value would be the reward model's guess
            continue
        out.append(series(data.gamma[:, a], t, spans, c, decide_at=level, agent=data.agent, metric="dr_value", action=action))
    for v in versions:
        mine = np.where(exp.version == v, exp.reward, np.nan)
        out.append(
            series(mine, t, spans, c, decide_at=level, agent=data.agent, metric="reward", model_version=exp.versions[int(v)])
        )
    return [trend for trend in out if trend is not None]

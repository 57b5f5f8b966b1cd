"""Anomalies: changes in reward, bursts of failures, context drift, exploration health, a model
earning less than its gate predicted. Each says when, how big, and on what evidence.

**Change points.** Each agent's reward, and what each action would earn on each of its
decisions (the action's pseudo-outcome Γ: unbiased however the reward model misfits, and blind
to the logging policy sending the action other contexts; a change in the mix of contexts that
moves what the action earns on the traffic is a change it reports), is watched by a two-sided
self-starting CUSUM. Each decision is standardised by the mean and standard deviation of the
stream's earlier decisions since its last change, and the sums S⁺ = max(0, S⁺ + z − k) and
S⁻ = max(0, S⁻ − z − k) alarm past h. k is 0.4 of ``change_size`` in standard deviations
(``_REFERENCE``): half would minimise the mean delay for a shift of that size; 0.4 gives the same
mean and a shorter slow tail. h is set per side by Siegmund's approximation of the in-control
average run length,

    ARL(h) ≈ (e^{θb} − θb − 1) / (θk),  b = h + 1.166,

with θ the positive root of E[e^{θ(z − k)}] = 1 over the stream's own standardised values (2k
for normal noise, where this is the textbook formula; smaller on a heavy side, such as the
failures of a 0/1 reward that nearly always succeeds), and never below the normal one, to
``_DESIGN_MARGIN`` × 2 × 100,000 / ``false_alarms_per_100k`` per side. The margin (1.5) is
calibrated by simulation of stationary streams (coin flips, 80% and 95% successes, normal and
exponential noise; 15,000,000 decisions each, ``python -m bench.insights --only calibration``):
0.33–0.71 false alarms per 100,000 decisions at ``false_alarms_per_100k`` 1; the approximation
alone gave coin flips 1.02.

Why a CUSUM: at the same false-alarm rate, on shifts of 0.2 standard deviations (the benchmark's
0.1 at σ 0.5), a GLR over unknown shift sizes took a fifth longer on average and 30% longer at
the 90th percentile (it pays for not knowing the size, which ``change_size`` tells), a bank of
CUSUMs tuned to ¼, ½ and 1 of the size was slower than its middle one alone, and a moving sum of
the last 500 decisions had a shorter tail but was slower on average and on shifts of half and
twice the size. None found 90% of such shifts within 500 decisions at this rate with a margin; the
CUSUM does at about twice the rate.

A detector speaks only after ``BURN_IN`` decisions of a stream, or of the stream since its last
alarm. The change is dated at the CUSUM's own estimate (the last time the alarming sum was zero),
and the detector restarts after the alarm, on decisions it has not judged. An alarm is reported
only if the mean of the stream moved by at least half of ``change_size`` between the segments it
separates (``practical``): a false alarm is mostly a short run of luck followed by the old level,
tiny over its segments (on the benchmark's coin flips, of 0.7 false alarms per 100,000 raised,
0.00–0.02 were reported; every planted change of 0.1 moved its stream by over 0.09), so the rate
above bounds what is reported. A short segment of a very noisy stream can move by more, by luck.

**Bursts.** Dead letters and error events are counted in bins of ``burst_seconds`` over the
window. The expected count per bin is the mean over bins without the busiest 5% (so the burst
does not hide itself). A bin is a burst when it holds at least ``MIN_BURST`` events and the
Chernoff bound on the Poisson tail, P(N ≥ c) ≤ exp(c − λ − c ln(c/λ)), is below
``false_rule_rate`` / bins. Adjacent burst bins are one burst.

**Context drift.** Per agent, each feature's distribution on decisions received after the live
model's training window is compared with the one inside it: the population stability index
(PSI) over ten quantile bins of the training window (numbers) or the categories (text), plus a
bin for absent. Drift is reported when PSI ≥ ``drift_psi`` and PSI is beyond chance: under no
drift, PSI ≈ (1/n₁ + 1/n₂) χ²_{bins−1}, and the χ² quantile at 1 − ``false_rule_rate`` / features
is taken (Wilson–Hilferty).

**Exploration health.** In the newest of the trend windows: the smallest logged propensity
(below ``min_propensity`` is reported), the effective sample size of the uniform policy's
importance weights as a share of the decisions (reported when below half of the first window's:
the log is losing the variety that off-policy evaluation and learning need), and actions offered
so often without ever being chosen that a propensity of ``min_propensity`` would have been seen.

**Below the gate.** A model version's own decisions (their joined rewards, exploration
included, as the gate estimated the deployed policy) whose interval lies entirely below the
interval the gate predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reflexd.analysis.experience import Experience, Feature
from reflexd.analysis.findings import Anomaly, ModelRecord
from reflexd.analysis.outcomes import AgentOutcomes, covered
from reflexd.config import InsightsConfig
from reflexd.learning.ope import estimate, z_score

BURN_IN = 200
MIN_BURST = 5
_SIEGMUND = 1.166
# the threshold is set for a run length this many times the one asked for: the approximation is
# an approximation, and standardising by running estimates adds noise of its own. Calibrated on
# stationary streams of five shapes (``python -m bench.insights --only calibration``): 1.5 keeps
# every one at or below 0.71 false alarms per 100,000 decisions at a stated 1; 1.0 gave coin flips
# 1.02, 1.3 gave normal noise 0.82
_DESIGN_MARGIN = 1.5
# the reference k as a share of ``change_size`` (in standard deviations). Half is the textbook
# optimum for the mean delay; a smaller one needs a higher threshold for the same false-alarm rate
# but climbs faster after the change (0.6 of the shift per decision instead of 0.5), which shortens
# the slow tail: at the same rate, on shifts of 0.2 sd, the 90th percentile of the delay went from
# 570-580 to 545-558 and the mean from 347-352 to 352-354; shifts of half the size were found in
# 1,368 decisions on average instead of 1,755 (``python -m bench.insights --only mechanisms``)
_REFERENCE = 0.4
_TILT_SAMPLE = 50_000  # decisions a stream's noise shape is measured on
_DRIFT_BINS = 10


# ---- change points -------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    start: int  # index of the first decision after the change (the detector's estimate)
    alarm: int  # index of the decision at which it fired
    up: bool
    threshold: float  # h, in standard deviations
    reference: float  # k, in standard deviations


def cusum_threshold(k: float, run_length: float, theta: float | None = None) -> float:
    """h for which a one-sided CUSUM of standardised steps with reference k alarms once per
    ``run_length`` steps on average, by Siegmund's approximation

        ARL(h) ≈ (e^{θb} − θb − 1) / (θ k),  b = h + 1.166,

    where θ is the positive root of E[e^{θ(z − k)}] = 1 (``tilt``): 2k for normal steps, which
    gives the textbook (e^{2kb} − 2kb − 1) / (2k²); smaller for a heavy tail on the alarming side
    (0/1 rewards that are nearly always 1 have a long lower tail), which asks for a higher h.
    ``changes`` takes the higher of this and the normal threshold."""
    theta = 2.0 * k if theta is None else theta

    def arl(b: float) -> float:
        x = theta * b
        if x > 700.0:
            return math.inf
        return (math.exp(x) - x - 1.0) / (theta * k)

    lo, hi = 0.0, 1.0
    while arl(hi) < run_length:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if arl(mid) < run_length:
            lo = mid
        else:
            hi = mid
    return max(hi - _SIEGMUND, 0.0)


def tilt(z: np.ndarray, k: float) -> float:
    """The positive root θ of log E[e^{θ(z − k)}] = 0 over the sample ``z`` (mean 0, sd 1)."""
    if len(z) == 0 or z.max() <= k:
        return 2.0 * k  # no step ever climbs: any threshold holds; the normal's root will do
    shifted = z - k

    def log_mgf(theta: float) -> float:
        a = theta * shifted
        top = a.max()
        return float(top + np.log(np.mean(np.exp(a - top))))

    lo, hi = 1e-9, 2.0 * k
    while log_mgf(hi) < 0.0:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if log_mgf(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return hi


def _first_alarm(
    x: np.ndarray, k: float, h: dict[bool, float], begin: int, burn_in: int, block: int = 1 << 16
) -> tuple[int, int, bool] | None:
    """(change start, alarm, upward) of the first alarm at or after ``begin`` in a self-starting
    two-sided CUSUM over ``x``, each step standardised by the mean and sd of x[:t].

    Run a block at a time, carrying the sums: finding an alarm costs what lies before it, so
    restarting after each change does not rescan the rest of the stream.
    """
    n = len(x)
    if n <= begin:
        return None
    origin = float(x[:burn_in].mean())  # centring keeps the running sums' cancellation small
    before = x[:begin] - origin
    s1, s2, count = float(before.sum()), float((before * before).sum()), begin
    sums = {True: 0.0, False: 0.0}
    zero = {True: begin - 1, False: begin - 1}  # the last index at which each sum was 0
    pos = begin
    while pos < n:
        part = x[pos : pos + block] - origin
        m = len(part)
        c1 = s1 + np.concatenate(([0.0], np.cumsum(part)[:-1]))
        c2 = s2 + np.concatenate(([0.0], np.cumsum(part * part)[:-1]))
        rows = count + np.arange(m, dtype=np.float64)
        mean = c1 / rows
        sd = np.sqrt(np.maximum((c2 - c1 * c1 / rows) / (rows - 1.0), 0.0))
        z = (part - mean) / np.maximum(sd, 1e-12)
        best: tuple[int, int, bool] | None = None
        for up in (True, False):
            w = sums[up] + np.cumsum((z if up else -z) - k)
            s = w - np.minimum(np.minimum.accumulate(w), 0.0)
            zeros = np.flatnonzero(s == 0.0)
            over = np.flatnonzero(s > h[up])
            if len(over):
                alarm = int(over[0])
                before_alarm = zeros[zeros < alarm]
                start = pos + int(before_alarm[-1]) + 1 if len(before_alarm) else zero[up] + 1
                if best is None or pos + alarm < best[1]:
                    best = (start, pos + alarm, up)
            sums[up] = float(s[-1])
            if len(zeros):
                zero[up] = pos + int(zeros[-1])
        if best is not None:
            return best
        s1, s2, count = float(c1[-1] + part[-1]), float(c2[-1] + part[-1] ** 2), count + m
        pos += m
    return None


def changes(x: np.ndarray, size: float, per_100k: float, burn_in: int = BURN_IN) -> list[Change]:
    """Change points in the mean of ``x`` (in order), by the restarting self-starting CUSUM."""
    found: list[Change] = []
    # per side: the two sides together alarm at half that rate
    run_length = _DESIGN_MARGIN * 2.0 * 100_000 / per_100k
    if len(x) <= burn_in:
        return found
    # the shape of the stream's noise (its skew sets each side's threshold), measured on a sample
    sample = x if len(x) <= _TILT_SAMPLE else x[np.linspace(0, len(x) - 1, _TILT_SAMPLE).astype(np.int64)]
    spread = float(sample.std())
    shape = (sample - sample.mean()) / spread if spread > 0 else np.zeros(0)
    start, quiet = 0, 0
    while len(x) - start > burn_in:
        segment = x[start:]
        sd = float(segment[:burn_in].std(ddof=1))
        k = _REFERENCE * size / max(sd, 1e-9)
        # the normal threshold at least: a light or bounded tail (a 0/1 reward near 1, upward) tilts
        # steeply, and would be given a threshold the running estimates' own noise crosses
        normal = cusum_threshold(k, run_length)
        h = {up: max(normal, cusum_threshold(k, run_length, tilt(shape if up else -shape, k))) for up in (True, False)}
        hit = _first_alarm(segment, k, h, max(burn_in, quiet - start), burn_in)
        if hit is None:
            break
        begin, alarm, up = hit
        found.append(Change(start + begin, start + alarm, up, h[up], k))
        # the next segment starts after the alarm, not at the change's estimated start: the
        # decisions between were picked out for straying, and as the next reference they would
        # make it stray back (measured: false alarms in pairs, the second reversing the first)
        start += alarm + 1
        quiet = start
    return found


def practical(x: np.ndarray, found: list[Change], smallest: float) -> list[Change]:
    """The alarms whose stream moved by at least ``smallest`` between the segments around them.

    An alarm's size is read off the whole segments it separates, not the few decisions that
    tripped it; false alarms are mostly tiny there (a run of luck, then the old level again).
    Dropping one joins its two segments, which changes its neighbours' sizes: repeated until none
    is dropped."""
    kept = list(found)
    while True:
        bounds = [0] + [c.start for c in kept] + [len(x)]
        sizes = [x[bounds[i + 1] : bounds[i + 2]].mean() - x[bounds[i] : bounds[i + 1]].mean() for i in range(len(kept))]
        small = [i for i, size in enumerate(sizes) if abs(size) < smallest]
        if not small:
            return kept
        # the smallest first: the others' sizes may grow once its segments are joined
        del kept[min(small, key=lambda i: abs(sizes[i]))]


def _mean_ci(values: np.ndarray, confidence: float) -> tuple[float, list[float]]:
    if len(values) < 2:
        v = float(values.mean()) if len(values) else math.nan
        return v, [v, v]
    e = estimate(values, confidence)
    return e.value, [e.lower, e.upper]


def _live_around(models: list[ModelRecord], agent: str, lo: float, hi: float) -> list[str]:
    return [
        m.version for m in models if lo <= m.live_from <= hi and (m.agent is None or m.agent == agent)
    ]


def change_anomalies(
    x: np.ndarray,
    t: np.ndarray,
    settings: InsightsConfig,
    models: list[ModelRecord],
    *,
    agent: str,
    action: str | None,
) -> list[Anomaly]:
    """Change points of one stream (``x`` in time order, ``t`` its received_at) as anomalies."""
    found = practical(x, changes(x, settings.change_size, settings.false_alarms_per_100k), settings.change_size / 2.0)
    out = []
    bounds = [0] + [c.start for c in found] + [len(x)]
    for i, c in enumerate(found):
        before, before_ci = _mean_ci(x[bounds[i] : c.start], settings.confidence)
        after, after_ci = _mean_ci(x[c.start : bounds[i + 2]], settings.confidence)
        what = f"{agent}'s reward" if action is None else f"what {action} would earn for {agent}"
        size = after - before
        evidence: dict[str, float | str | bool | None | list[float | str]] = {
            "before": before,
            "before_ci": list(before_ci),
            "after": after,
            "after_ci": list(after_ci),
            "decisions_before": c.start - bounds[i],
            "decisions_after": bounds[i + 2] - c.start,
            "delay_decisions": c.alarm - c.start,
            "detector": "self-starting two-sided CUSUM",
            "threshold_sd": c.threshold,
            "reference_sd": c.reference,
            "measure": "reward" if action is None else "pseudo-outcome of always taking the action (DR)",
        }
        near = _live_around(models, agent, float(t[max(c.start - BURN_IN, 0)]), float(t[c.alarm]))
        if near:
            evidence["coincides_with"] = list(near)
        out.append(
            Anomaly(
                kind="reward_change",
                agent=agent,
                action=action,
                at=float(t[c.start]),
                detected_at=float(t[c.alarm]),
                size=size,
                summary=f"{what} {'rose' if size > 0 else 'fell'} by {abs(size):.3g} from {before:.3g} to {after:.3g}",
                evidence=evidence,
                false_alarm_rate=settings.false_alarms_per_100k,
            )
        )
    return out


def reward_changes(data: AgentOutcomes, settings: InsightsConfig, models: list[ModelRecord]) -> list[Anomaly]:
    """Changes in the agent's reward and in what each analysed action would earn (its pseudo-outcomes)."""
    t = data.exp.received_at
    out = change_anomalies(data.exp.reward, t, settings, models, agent=data.agent, action=None)
    for a, action in enumerate(data.actions):
        offered = np.flatnonzero(data.available[:, a])
        if not covered(data, offered, a):  # what it would earn is the reward model's guess where it was never tried
            continue
        out += change_anomalies(data.gamma[offered, a], t[offered], settings, models, agent=data.agent, action=action)
    return out


# ---- bursts --------------------------------------------------------------------------------


def bursts(
    times: np.ndarray, start: float, end: float, settings: InsightsConfig, *, kind: str, agent: str | None
) -> list[Anomaly]:
    times = np.asarray(times, dtype=np.float64)
    times = times[(times >= start) & (times <= end)]
    if len(times) < MIN_BURST or end <= start:
        return []
    width = settings.burst_seconds
    bins = max(1, math.ceil((end - start) / width))
    counts = np.bincount(np.minimum(((times - start) // width).astype(np.int64), bins - 1), minlength=bins)
    quiet = np.sort(counts)[: max(1, int(bins * 0.95))]
    expected = max(float(quiet.mean()), 1.0 / bins)
    limit = math.log(settings.false_rule_rate / bins)
    with np.errstate(divide="ignore"):
        log_tail = counts - expected - counts * np.log(np.maximum(counts, 1e-300) / expected)
    hot = (counts >= MIN_BURST) & (counts > expected) & (log_tail <= limit)
    out = []
    k = 0
    what = "dead letters" if kind == "dead_letter_burst" else "error events"
    while k < bins:
        if not hot[k]:
            k += 1
            continue
        j = k
        while j + 1 < bins and hot[j + 1]:
            j += 1
        total = int(counts[k : j + 1].sum())
        lo, hi = start + k * width, min(start + (j + 1) * width, end)
        # dated by its first event and said over the span its events took, not by the bins': a
        # burst late in a bin would read as starting minutes before anything happened
        inside = times[(times >= lo) & ((times < hi) if j + 1 < bins else (times <= hi))]
        first, last = float(inside.min()), float(inside.max())
        who = f" from {agent}" if agent else ""
        out.append(
            Anomaly(
                kind=kind,  # type: ignore[arg-type]  # one of the two burst kinds
                agent=agent,
                at=first,
                size=float(total),
                summary=f"{total} {what}{who} in {last - first:.0f} s, where {expected:.2g} per {width:.0f} s are usual",
                evidence={
                    "window": [lo, hi],
                    "first": first,
                    "last": last,
                    "bins": j - k + 1,
                    "peak": float(counts[k : j + 1].max()),
                    "expected_per_bin": expected,
                    "bin_seconds": width,
                },
                false_alarm_rate=settings.false_rule_rate,
            )
        )
        k = j + 1
    return out


# ---- drift ---------------------------------------------------------------------------------


def chi2_quantile(df: int, p: float) -> float:
    """The χ² quantile by Wilson–Hilferty (within a few percent from 2 degrees of freedom up)."""
    z = z_score(2.0 * p - 1.0)  # the one-sided normal quantile at p
    a = 2.0 / (9.0 * df)
    return df * max(1.0 - a + z * math.sqrt(a), 0.0) ** 3


def _bins(f: Feature, ref: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Counts per bin (last: absent) of ``ref`` and ``rows``, and the bins' names."""
    if f.numeric:
        base = f.values[ref]
        base = base[~np.isnan(base)]
        edges = np.unique(np.quantile(base, np.linspace(0, 1, _DRIFT_BINS + 1)[1:-1])) if len(base) else np.zeros(0)
        names = [f"<= {e:.4g}" for e in edges] + [f"> {edges[-1]:.4g}" if len(edges) else "any", "absent"]

        def count(r: np.ndarray) -> np.ndarray:
            v = f.values[r]
            present = ~np.isnan(v)
            c = np.bincount(np.searchsorted(edges, v[present], side="left"), minlength=len(edges) + 1)
            return np.append(c, (~present).sum())

    else:
        assert f.categories is not None
        names = list(f.categories) + ["(other)", "absent"]

        def count(r: np.ndarray) -> np.ndarray:
            v = f.values[r]
            return np.append(np.bincount(v[v >= 0], minlength=f.other + 1), (v < 0).sum())

    return count(ref), count(rows), names


def drift(
    exp: Experience, agent: str, window: list[float], settings: InsightsConfig
) -> tuple[list[Anomaly], str | None]:
    """Features of the agent's decisions after ``window`` (the live model's training window)
    distributed unlike those inside it; or a note saying why it could not be checked."""
    t = exp.received_at
    ref = np.flatnonzero((t >= window[0]) & (t <= window[1]))
    new = np.flatnonzero(t > window[1])
    if len(ref) < settings.min_support or len(new) < settings.min_support:
        return [], (
            f"context drift for {agent}: {len(ref)} decisions inside the live model's training window"
            f" and {len(new)} after it in the snapshot; {settings.min_support} of each are needed"
        )
    names = [n for n, f in exp.features.items() if f.present()[ref].any() or f.present()[new].any()]
    out = []
    for name in names:
        f = exp.features[name]
        r, c, labels = _bins(f, ref, new)
        keep = (r + c) > 0
        r, c, labels = r[keep], c[keep], [lab for lab, k in zip(labels, keep) if k]
        if len(r) < 2:
            continue
        pr = (r + 0.5) / (r.sum() + 0.5 * len(r))
        pc = (c + 0.5) / (c.sum() + 0.5 * len(c))
        psi = float(np.sum((pc - pr) * np.log(pc / pr)))
        chance = (1.0 / len(ref) + 1.0 / len(new)) * chi2_quantile(len(r) - 1, 1.0 - settings.false_rule_rate / len(names))
        if psi < settings.drift_psi or psi < chance:
            continue
        moved = int(np.argmax(np.abs(pc - pr)))
        out.append(
            Anomaly(
                kind="context_drift",
                agent=agent,
                feature=name,
                at=float(t[new[0]]),
                size=psi,
                summary=(
                    f"{name} is distributed differently for {agent} since the live model's training window"
                    f" (PSI {psi:.2f}): {labels[moved]} went from {pr[moved]:.1%} to {pc[moved]:.1%} of decisions"
                ),
                evidence={
                    "training_window": list(window),
                    "newer_window": [float(t[new[0]]), float(t[new[-1]])],
                    "training_decisions": float(len(ref)),
                    "newer_decisions": float(len(new)),
                    "psi_by_chance": chance,
                    "bins": labels,
                    "training_shares": [float(x) for x in r / r.sum()],
                    "newer_shares": [float(x) for x in c / c.sum()],
                },
                false_alarm_rate=settings.false_rule_rate,
            )
        )
    return out, None


# ---- exploration ---------------------------------------------------------------------------


def effective_share(exp: Experience, rows: np.ndarray) -> float:
    """Effective sample size of the uniform policy's importance weights, as a share of ``rows``."""
    if len(rows) == 0:
        return math.nan
    offered = exp.offered[exp.action_set[rows]].sum(axis=1)
    w = (1.0 / offered) / exp.prob[rows]
    return float(w.sum() ** 2 / (w * w).sum() / len(rows))


def exploration(
    data: AgentOutcomes, windows: list[tuple[float, float]], settings: InsightsConfig
) -> list[Anomaly]:
    exp = data.exp
    t = exp.received_at
    slices = [np.flatnonzero((t >= lo) & ((t < hi) if k < len(windows) - 1 else (t <= hi)))
              for k, (lo, hi) in enumerate(windows)]
    filled = [(w, r) for w, r in zip(windows, slices) if len(r) >= settings.min_support]
    if not filled:
        return []
    (lo, hi), newest = filled[-1]
    out = []
    low = float(exp.prob[newest].min())
    if low < settings.min_propensity:
        below = float((exp.prob[newest] < settings.min_propensity).mean())
        out.append(
            Anomaly(
                kind="exploration",
                agent=data.agent,
                at=lo,
                size=low,
                summary=(
                    f"{data.agent} logged propensities down to {low:.2g} since {lo:.0f} ({below:.1%} of decisions"
                    f" below {settings.min_propensity:g}): off-policy estimates lean on few decisions"
                ),
                evidence={"window": [lo, hi], "min_propensity": low, "share_below": below,
                          "decisions": float(len(newest))},
            )
        )
    first = effective_share(exp, filled[0][1])
    last = effective_share(exp, newest)
    if len(filled) > 1 and last < 0.5 * first:
        out.append(
            Anomaly(
                kind="exploration",
                agent=data.agent,
                at=lo,
                size=last,
                summary=(
                    f"{data.agent}'s effective sample size for evaluating other policies fell from {first:.1%}"
                    f" to {last:.1%} of its decisions: it explores less"
                ),
                evidence={"window": [lo, hi], "first_window": list(filled[0][0]), "effective_share": last,
                          "first_effective_share": first},
            )
        )
    needed = math.ceil(3.0 / settings.min_propensity)  # P(never chosen | p >= min) <= e^-3
    for a, action in enumerate(data.actions):
        offered = int(data.available[newest, a].sum())
        if offered >= needed and not (data.chosen[newest] == a).any():
            out.append(
                Anomaly(
                    kind="exploration",
                    agent=data.agent,
                    action=action,
                    at=lo,
                    size=float(offered),
                    summary=f"{action} was offered {offered:,} times since {lo:.0f} and never chosen: it is not explored",
                    evidence={"window": [lo, hi], "offered": float(offered), "chosen": 0.0},
                )
            )
    return out


# ---- below the gate ------------------------------------------------------------------------


def below_gate(exp: Experience, models: list[ModelRecord], settings: InsightsConfig) -> list[Anomaly]:
    out = []
    for m in models:
        if m.predicted_low is None or m.version not in exp.versions:
            continue
        rows = exp.version == exp.versions.index(m.version)
        if m.agent is not None:
            if m.agent not in exp.agents:
                continue
            rows &= exp.agent == exp.agents.index(m.agent)
        rewards = exp.reward[rows]
        if len(rewards) < settings.min_support:
            continue
        e = estimate(rewards, settings.confidence)
        if e.upper >= m.predicted_low:
            continue
        predicted = m.predicted if m.predicted is not None else m.predicted_low
        interval = [m.predicted_low] + ([m.predicted_high] if m.predicted_high is not None else [])
        shown = ", ".join(f"{v:.3g}" for v in interval)
        out.append(
            Anomaly(
                kind="below_gate",
                agent=m.agent,
                model_version=m.version,
                at=m.live_from,
                size=e.value - predicted,
                summary=(
                    f"{m.version} earns {e.value:.3g} live ({settings.confidence:.0%} CI [{e.lower:.3g}, {e.upper:.3g}],"
                    f" {len(rewards):,} decisions), below the gate's prediction {predicted:.3g} [{shown}]"
                ),
                evidence={
                    "live": e.value,
                    "live_ci": [e.lower, e.upper],
                    "decisions": float(len(rewards)),
                    "predicted": predicted,
                    "predicted_ci": list(interval),
                    "note": "the gate judged it on its holdout's contexts; drift since then can explain part of a gap",
                },
            )
        )
    return out

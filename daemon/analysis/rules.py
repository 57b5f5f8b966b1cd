"""Patterns and rules: found on one window of experience, checked on a later one.

A run splits its snapshot in time at ``find_fraction`` of its decisions: the older part (the
*find window*) is where trees look for segments, the newer part (the *check window*) is where
what they found is checked.

**Patterns** say what one action earns in each segment of one agent's context: a tree per
action is fit to that action's pseudo-outcomes on the find window, and each leaf's value is the
mean of the pseudo-outcomes on the check window (honest estimation: the rows that chose a
segment never estimate it, so its value is not flattered by the choice).

**Rules** compare an action with the agent's *baseline*: the action that earns most over the
find window's decisions, by DR (the previous run's baseline is kept while it is not
significantly beaten, so rule ids stay stable). For every other action a tree is fit to Γ(a) − Γ(baseline) on the find window; a leaf
whose interval there excludes zero is a *candidate*. Then each rule is checked on decisions it
was not found on:

- a new candidate on the run's check window;
- every earlier rule (from ``ExtractionInputs.rules``) on the decisions newer than both its
  finding window and its last check (``checked_until``), so no decision is ever used twice to
  check the same rule; a candidate found again, or a retired rule found again, likewise.

Every estimate (a pattern's value, a candidate's lift, a check) needs the actions' importance
weights in its segment to be worth ``outcomes.MIN_ESS`` effective decisions, and its interval is
``outcomes.bounded_estimate``'s (the normal one widened for heavy weights). A rule's condition is
kept only if it carries lift on the find window (``essential``): dropping it must move the lift
out of the rule's interval there, the decisions it cuts must differ from the segment's by
``split_z`` standard errors, and it must leave out at least ``min_support`` decisions.

A check needs ``min_support`` decisions in the segment. With m checks in a run, each is tested at
confidence 1 − ``false_rule_rate`` / m (Bonferroni): the chance that any rule that does not hold
passes its check in a run is at most ``false_rule_rate``. A check *holds* when that interval
excludes zero on the rule's side; then a candidate is published, or a published rule confirmed
(its lift, interval and support become the check's). A check that does not hold decides
something only if it had the power to: if the interval excludes zero on the other side, or the
rule's lift exceeds the interval's half-width by 0.84 standard errors (80% power to have seen
it), a published rule is retired (``retired_why`` gives the check's numbers) and a candidate
dropped; otherwise nothing changes but ``checked_until``. A check with the decisions but too
few effective ones (the action rarely taken there) is not made and does not move
``checked_until``: whether it is made depends only on who chose what, never on rewards, so the
decisions can wait for more of their kind.

Retired rules and candidates never confirmed are forgotten ``keep_days`` after they were last
found or retired.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import msgspec
import numpy as np

from reflexd.analysis.findings import Condition, Pattern, Rule
from reflexd.analysis.outcomes import MIN_ESS, AgentOutcomes, bounded_estimate, covered, effective_size
from reflexd.analysis.segments import (
    TREE_ROWS,
    describe,
    find_segments,
    mask,
    rule_id,
    segment_key,
    tree_design,
)
from reflexd.config import InsightsConfig
from reflexd.learning.ope import Estimate

POWER_Z = 0.8416  # one-sided normal quantile of 80%: the power a check needs to refute a rule
_DAY = 86_400.0


@dataclass(frozen=True)
class Split:
    """A run's two windows: decisions at or before ``cut`` find, later ones check."""

    cut: float
    find: list[float]
    check: list[float]


def split_time(received_at: np.ndarray, fraction: float) -> Split:
    """The cut after the oldest ``fraction`` of decisions, moved past ties so no time is on both sides."""
    n = len(received_at)
    if n == 0:
        return Split(0.0, [0.0, 0.0], [0.0, 0.0])
    k = min(max(int(n * fraction), 1), n) - 1
    cut = float(received_at[k])
    later = received_at > cut
    check = [float(received_at[later].min()), float(received_at[later].max())] if later.any() else [cut, cut]
    return Split(cut, [float(received_at[0]), cut], check)


def _interval(e: Estimate) -> list[float]:
    return [e.lower, e.upper]


def _fit_rows(rows: np.ndarray, seed: int) -> np.ndarray:
    if len(rows) <= TREE_ROWS:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, TREE_ROWS, replace=False))


def _segments(data: AgentOutcomes, rows: np.ndarray, y: np.ndarray, settings: InsightsConfig, seed: int) -> list[list[Condition]]:
    """Segments a tree finds for target ``y`` (aligned with ``rows``), leaves of at least
    ``min_support`` decisions among ``rows``."""
    fit = _fit_rows(np.arange(len(rows)), seed)
    x, columns = tree_design(data.exp.features, rows[fit])
    min_leaf = max(20, math.ceil(settings.min_support * len(fit) / max(len(rows), 1)))
    return find_segments(
        x,
        columns,
        y[fit],
        max_depth=settings.max_conditions,
        max_leaves=settings.max_segments,
        split_z=settings.split_z,
        min_leaf=min_leaf,
        seed=seed,
    )


# ---- patterns ------------------------------------------------------------------------------


def patterns(data: AgentOutcomes, split: Split, settings: InsightsConfig, seed: int) -> list[Pattern]:
    """Each action's value everywhere and in the segments its tree finds, estimated on the check window."""
    t = data.exp.received_at
    find, check = t <= split.cut, t > split.cut
    out: list[Pattern] = []
    n = len(t)
    for a, action in enumerate(data.actions):
        offered = data.available[:, a]
        rows = np.flatnonzero(find & offered)
        found = [[]] + [s for s in _segments(data, rows, data.gamma[rows, a], settings, seed + a) if s] if len(rows) else [[]]
        for when in found:
            in_check = check & offered & mask(when, data.exp.features, n)
            terms = data.gamma[in_check, a]
            if len(terms) < max(2, settings.min_support if when else 2):
                continue
            ess = effective_size(data, in_check, a)
            if ess < MIN_ESS or not covered(data, in_check, a):
                continue
            e = bounded_estimate(terms, settings.confidence)
            out.append(
                Pattern(
                    agent=data.agent,
                    action=action,
                    when=when,
                    value=e.value,
                    ci=_interval(e),
                    support=len(terms),
                    window=split.check,
                    found_window=split.find,
                    ess=round(ess, 1),
                )
            )
    return out


# ---- rules: finding ------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    agent: str
    action: str
    baseline: str
    when: list[Condition]
    estimate: Estimate
    support: int
    window: list[float]
    ess: float | None = None


def baseline(data: AgentOutcomes, rows: np.ndarray, previous: str | None, confidence: float) -> int | None:
    """The action the agent's rules compare with: the best on ``rows`` by DR, unless the previous
    baseline is still offered and not significantly beaten by it (stable ids across runs)."""
    values = []
    for a in range(len(data.actions)):
        g = data.gamma[rows, a]
        g = g[~np.isnan(g)]
        values.append(g.mean() if len(g) >= 2 else -math.inf)
    if not values or max(values) == -math.inf:
        return None
    best = int(np.argmax(values))
    if previous in data.actions:
        keep = data.actions.index(previous)
        both = rows[data.available[rows, best] & data.available[rows, keep]]
        if keep == best:
            return best
        if len(both) >= 2:
            e = bounded_estimate(data.gamma[both, best] - data.gamma[both, keep], confidence)
            if e.lower <= 0.0:
                return keep
    return best


def essential(
    when: list[Condition],
    rows: np.ndarray,
    features: dict,
    n: int,
    least: int,
    terms: np.ndarray | None = None,
    confidence: float = 0.95,
    z: float = 4.0,
) -> list[Condition]:
    """``when`` without the conditions that carry no lift.

    A condition goes if it leaves out fewer than ``least`` of ``rows`` beside the others. Given
    ``terms`` (the rule's per-decision differences, aligned with ``rows``), it also goes if the
    lift without it lies inside the interval of the lift with it (it changes nothing a reader
    would act on), or if the segment's decisions and those it cuts differ by fewer than ``z``
    standard errors (the bar the tree's split had to clear, now in the segment as it ended up).
    A tree keeps a split at the edge of a noise feature's range (``prompt_tokens > 94.5``, 3% of
    the decisions) when those few happen to differ by ``split_z`` standard errors, the best of
    thousands of thresholds tried; on the side that keeps most decisions it moves the lift by a
    fraction of its standard error, and on the other it stands alone, measured on the decisions
    that chose it, at or below the bar. What is kept is the largest subset of the conditions that
    all pass together (of several, the one whose lift is nearest the leaf's). ``rows`` are the
    window the rule was found on: a check's decisions must never choose its conditions.
    """
    each = [mask([c], features, n)[rows] for c in when]
    kept = list(range(len(when)))

    def rows_of(indices: list[int]) -> np.ndarray:
        out = np.ones(len(rows), dtype=bool)
        for i in indices:
            out &= each[i]
        return out

    for i in list(kept):
        others = [o for o in kept if o != i]
        if int(rows_of(others).sum()) - int(rows_of(kept).sum()) < least:
            kept = others
    if terms is None:
        return [when[i] for i in kept]

    whole = rows_of(kept)
    leaf = float(terms[whole].mean()) if whole.any() else 0.0

    def departure(subset: tuple[int, ...]) -> float | None:
        """How far ``subset``'s lift is from the leaf's; None if one of its conditions fails."""
        inside = rows_of(list(subset))
        if inside.sum() < 2:
            return None
        e = bounded_estimate(terms[inside], confidence)
        for i in subset:
            wider = rows_of([o for o in subset if o != i])
            cut = wider & ~inside
            if cut.sum() < 2:
                continue
            if e.lower <= float(terms[wider].mean()) <= e.upper:
                return None
            a, b = terms[inside], terms[cut]
            spread = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
            contrast = abs(float(a.mean() - b.mean())) / spread if spread > 0 else math.inf
            if contrast < z:
                return None
        return abs(e.value - leaf)

    # the most conditions that all carry lift together: dropping the failing ones one at a time
    # misleads where a noise condition picked out an unlucky few, whose real conditions then look
    # weak beside it too
    for size in range(len(kept), 0, -1):
        judged = [(d, subset) for subset in combinations(kept, size) if (d := departure(subset)) is not None]
        if judged:
            return [when[i] for i in min(judged)[1]]
    return []


def find_rules(
    data: AgentOutcomes, split: Split, settings: InsightsConfig, previous_baseline: str | None, seed: int
) -> list[Found]:
    """Candidates on the find window: tree leaves of Γ(a) − Γ(baseline) whose interval excludes zero."""
    t = data.exp.received_at
    find = np.flatnonzero(t <= split.cut)
    b = baseline(data, find, previous_baseline, settings.confidence)
    if b is None:
        return []
    n = len(t)
    out: list[Found] = []
    for a, action in enumerate(data.actions):
        if a == b:
            continue
        rows = find[data.available[find, a] & data.available[find, b]]
        if len(rows) < settings.min_support:
            continue
        diff = data.gamma[rows, a] - data.gamma[rows, b]
        seen: set[str] = set()
        for when in _segments(data, rows, diff, settings, seed + 1000 + a):
            when = essential(when, rows, data.exp.features, n, settings.min_support, diff, settings.confidence,
                             settings.split_z)
            if segment_key(when) in seen:  # two leaves that differ only by conditions that carry no lift
                continue
            seen.add(segment_key(when))
            inside = rows[mask(when, data.exp.features, n)[rows]]
            if len(inside) < settings.min_support:
                continue
            ess = effective_size(data, inside, a, b)
            if ess < MIN_ESS or not covered(data, inside, a, b):
                continue
            e = bounded_estimate(data.gamma[inside, a] - data.gamma[inside, b], settings.confidence)
            if e.lower > 0.0 or e.upper < 0.0:
                out.append(Found(data.agent, action, data.actions[b], when, e, len(inside), split.find, round(ess, 1)))
    return out


# ---- rules: checking and history -----------------------------------------------------------


def rule_text(agent: str, action: str, baseline: str, when: list[Condition], lift: float, ci: list[float],
              support: int, confidence: float) -> str:
    where = "everywhere" if not when else f"when {describe(when)}"
    return (
        f"{where}, {action} earns {lift:+.3g} over {baseline} for {agent} "
        f"({confidence:.0%} CI [{ci[0]:+.3g}, {ci[1]:+.3g}], {support:,} decisions)"
    )


@dataclass(frozen=True)
class _Check:
    rule: Rule
    terms: np.ndarray
    window: list[float]
    ess: float


def _check_terms(data: AgentOutcomes, rule: Rule, after: float) -> tuple[np.ndarray, list[float], float] | None:
    """Γ(action) − Γ(baseline) on the rule's segment, decisions received after ``after``, and the
    effective sample size behind them."""
    if rule.action not in data.actions or rule.baseline not in data.actions:
        return None
    a, b = data.actions.index(rule.action), data.actions.index(rule.baseline)
    t = data.exp.received_at
    rows = np.flatnonzero(t > after)
    rows = rows[data.available[rows, a] & data.available[rows, b]]
    rows = rows[mask(rule.when, data.exp.features, len(t))[rows]]
    if len(rows) == 0:
        return None
    window = [float(t[rows].min()), float(t[rows].max())]
    # a check on decisions where the log cannot account for both actions rests on no effective
    # decision: none is made on them (-1)
    ess = effective_size(data, rows, a, b) if covered(data, rows, a, b) else -1.0
    return data.gamma[rows, a] - data.gamma[rows, b], window, ess


class RuleBook:
    """The rules of one run: earlier ones and new candidates, their checks gathered agent by agent
    (so one agent's pseudo-outcomes at a time are in memory), then decided together."""

    def __init__(self, previous: Iterable[Rule], now: float, settings: InsightsConfig) -> None:
        self.now = now
        self.settings = settings
        self.rules: dict[str, Rule] = {}
        self.checks: list[_Check] = []
        forget_before = now - settings.keep_days * _DAY
        for rule in previous:
            if rule.status == "retired" and (rule.retired_at or 0.0) < forget_before:
                continue
            if rule.status == "candidate" and rule.found_window[1] < forget_before:
                continue
            self.rules[rule.id] = rule

    def add_found(self, found: Iterable[Found]) -> None:
        for f in found:
            rid = rule_id(f.agent, f.action, f.baseline, f.when)
            old = self.rules.get(rid)
            if old is not None and old.status == "published":
                continue  # found again: its checks go on as before
            ci = _interval(f.estimate)
            fields: dict[str, Any] = {
                "lift": f.estimate.value,
                "ci": ci,
                "support": f.support,
                "status": "candidate",
                "text": rule_text(f.agent, f.action, f.baseline, f.when, f.estimate.value, ci, f.support,
                                  self.settings.confidence),
                "found_window": f.window,
                "found_lift": f.estimate.value,
                "found_ci": ci,
                "found_support": f.support,
                "checked_until": f.window[1],
                "ess": f.ess,
            }
            if old is None:
                self.rules[rid] = Rule(id=rid, agent=f.agent, action=f.action, baseline=f.baseline, when=f.when,
                                       first_seen=self.now, **fields)
            else:  # a candidate found again, or a retired rule back: it is judged afresh, on
                # decisions no earlier check of it used
                fields["checked_until"] = max(old.checked_until, f.window[1])
                self.rules[rid] = msgspec.structs.replace(old, confirmed_window=None, check_confidence=None, **fields)

    def gather(self, data: AgentOutcomes) -> None:
        """The checks of ``data``'s agent's rules on the decisions each has not been checked on."""
        for rule in list(self.rules.values()):
            if rule.agent != data.agent or rule.status == "retired":
                continue
            after = max(rule.found_window[1], rule.checked_until)
            got = _check_terms(data, rule, after)
            if got is None:
                gone = _not_offered(data, rule, after)
                if rule.status == "published" and gone is not None and gone[1] >= self.settings.min_support:
                    self.rules[rule.id] = _retire(rule, self.now, f"{gone[0]} was not offered in {gone[1]:,} newer decisions")
                continue
            terms, window, ess = got
            if len(terms) >= self.settings.min_support and ess >= MIN_ESS:
                self.checks.append(_Check(rule, terms, window, ess))
            elif len(terms) >= self.settings.min_support and ess >= 0.0:
                continue  # the action too rarely taken there: the decisions wait for more of their kind
            else:  # too few to tell, or a log that cannot tell (``covered``); the next check starts after them all the same
                self.rules[rule.id] = msgspec.structs.replace(rule, checked_until=max(rule.checked_until, window[1]))

    def decide(self) -> tuple[list[Rule], int]:
        """Every rule after this run (published, candidates, retired) and the number of checks made."""
        settings, now, confidence = self.settings, self.now, self.settings.confidence
        level = 1.0 - settings.false_rule_rate / max(len(self.checks), 1)
        for check in self.checks:
            rule = check.rule
            strict = bounded_estimate(check.terms, level)
            shown = bounded_estimate(check.terms, confidence)
            reference = rule.lift if rule.status == "published" else rule.found_lift
            holds = strict.lower > 0.0 if reference > 0 else strict.upper < 0.0
            against = strict.upper < 0.0 if reference > 0 else strict.lower > 0.0
            # the interval's half-width in place of z standard errors: it is wider than the normal one
            powered = abs(reference) >= (strict.upper - strict.lower) / 2.0 + POWER_Z * strict.stderr
            ci = _interval(shown)
            support = len(check.terms)
            if holds:
                self.rules[rule.id] = msgspec.structs.replace(
                    rule,
                    status="published",
                    lift=shown.value,
                    ci=ci,
                    support=support,
                    text=rule_text(rule.agent, rule.action, rule.baseline, rule.when, shown.value, ci, support, confidence),
                    last_confirmed=now,
                    retired_at=None,
                    retired_why=None,
                    confirmed_window=check.window,
                    check_confidence=level,
                    checked_until=check.window[1],
                    ess=round(check.ess, 1),
                )
            elif against or powered:
                if rule.status == "published":
                    how = "reversed" if against else "no longer holds"
                    why = (
                        f"{how}: on {support:,} decisions from {check.window[0]:.0f} to {check.window[1]:.0f}"
                        f" the lift was {shown.value:+.3g} ({confidence:.0%} CI [{ci[0]:+.3g}, {ci[1]:+.3g}]),"
                        f" published as {rule.lift:+.3g}"
                    )
                    self.rules[rule.id] = msgspec.structs.replace(_retire(rule, now, why), checked_until=check.window[1])
                else:
                    del self.rules[rule.id]  # refuted before it was ever published
            else:
                self.rules[rule.id] = msgspec.structs.replace(rule, checked_until=check.window[1])
        order = {"published": 0, "candidate": 1, "retired": 2}
        ranked = sorted(self.rules.values(), key=lambda r: (order[r.status], r.agent, -abs(r.lift), r.id))
        return ranked, len(self.checks)


def update_rules(
    previous: Iterable[Rule],
    found: Iterable[Found],
    data: dict[str, AgentOutcomes],
    now: float,
    settings: InsightsConfig,
) -> tuple[list[Rule], int]:
    """``RuleBook`` in one call: every rule after the run and the number of checks made."""
    book = RuleBook(previous, now, settings)
    book.add_found(found)
    for agent in data.values():
        book.gather(agent)
    return book.decide()


def _not_offered(data: AgentOutcomes, rule: Rule, after: float) -> tuple[str, int] | None:
    """(the rule's action or baseline, newer decisions) when one of them was offered in none of
    the agent's decisions after ``after``; None when both were (or none came)."""
    exp = data.exp
    newer = np.flatnonzero(exp.received_at > after)
    for action in (rule.action, rule.baseline):
        offered = action in exp.actions and bool(exp.offered[exp.action_set[newer], exp.actions.index(action)].any())
        if len(newer) and not offered:
            return action, len(newer)
    return None


def _retire(rule: Rule, now: float, why: str) -> Rule:
    return msgspec.structs.replace(rule, status="retired", retired_at=now, retired_why=why)


def previous_baselines(rules: Iterable[Rule]) -> dict[str, str]:
    """Each agent's baseline in its published rules (the most common), to keep it across runs."""
    counts: dict[str, dict[str, int]] = {}
    for rule in rules:
        if rule.status == "published":
            per = counts.setdefault(rule.agent, {})
            per[rule.baseline] = per.get(rule.baseline, 0) + 1
    return {agent: max(per, key=lambda b: (per[b], b)) for agent, per in counts.items()}

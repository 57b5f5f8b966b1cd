"""Rule validation as properties: whatever the data and whatever earlier runs left, no rule is
published from the decisions it was found on, and a rule published (or confirmed) in a run has a
later window of decisions whose interval, at the run's Bonferroni level, excludes zero on its side."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reflexd.analysis import extract, segments
from reflexd.analysis.experience import Experience, Feature, from_table
from reflexd.analysis.findings import Condition, ExtractionInputs, Rule
from reflexd.analysis.outcomes import AgentOutcomes, agent_outcomes
from reflexd.analysis.rules import Found, RuleBook, split_time
from reflexd.config import InsightsConfig
from reflexd.learning.ope import Estimate, estimate

ACTIONS = ["p", "q", "r"]
SEGMENTS = [
    [],
    [Condition("seg", "==", "a")],
    [Condition("seg", "!=", "b")],
    [Condition("x", "<=", 0.5)],
    [Condition("seg", "in", ["a", "c"]), Condition("x", ">", 0.3)],
]
NOW = 1e6
LIFTS = st.floats(0.05, 1.0) | st.floats(-1.0, -0.05)


@st.composite
def agent_data(draw: st.DrawFn) -> AgentOutcomes:
    n = draw(st.integers(30, 600))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.integers(0, 3, n)).astype(np.float64)  # ties, as ingest batches make them
    seg = rng.integers(0, 3, n).astype(np.int16)
    x = rng.random(n).astype(np.float32)
    effect = np.array(draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9))).reshape(3, 3)
    noise = draw(st.floats(0.05, 1.0))
    gamma = effect[seg] + rng.normal(0, noise, (n, 3))
    available = np.ones((n, 3), dtype=bool)
    if draw(st.booleans()):
        available[rng.random(n) < 0.3, 2] = False
    gamma[~available] = np.nan
    exp = Experience(
        agents=["ag"],
        agent=np.zeros(n, np.int32),
        actions=list(ACTIONS),
        chosen=rng.integers(0, 2, n).astype(np.int32),
        offered=np.ones((1, 3), dtype=bool),
        action_set=np.zeros(n, np.int32),
        versions=[],
        version=np.full(n, -1, np.int32),
        received_at=t,
        prob=np.full(n, 0.5),
        reward=rng.random(n),
        features={"seg": Feature("seg", seg, ("a", "b", "c")), "x": Feature("x", x)},
    )
    return AgentOutcomes("ag", exp, list(ACTIONS), exp.chosen.astype(np.int64), available, gamma,
                         np.zeros(n), [])


def _window(draw: st.DrawFn, t: np.ndarray) -> list[float]:
    lo = draw(st.floats(float(t[0]) - 5, float(t[-1]) + 5))
    hi = draw(st.floats(lo, float(t[-1]) + 10))
    return [lo, hi]


@st.composite
def previous_rules(draw: st.DrawFn, t: np.ndarray) -> list[Rule]:
    rules = []
    for _ in range(draw(st.integers(0, 6))):
        action, baseline = draw(st.sampled_from([("q", "p"), ("r", "p"), ("p", "q"), ("gone", "p")]))
        when = draw(st.sampled_from(SEGMENTS))
        status = draw(st.sampled_from(["published", "candidate", "retired"]))
        found = _window(draw, t)
        lift = draw(LIFTS)
        checked = draw(st.floats(found[1] + 1, found[1] + 50))
        # as an earlier run left it: confirmed (if ever) after it was found
        confirmed = [found[1] + 0.5, checked] if status != "candidate" else None
        rules.append(
            Rule(
                id=segments.rule_id("ag", action, baseline, when), agent="ag", action=action, baseline=baseline,
                when=when, lift=lift, ci=[lift - 0.1, lift + 0.1], support=100, status=status, text="",
                first_seen=NOW - 10, last_confirmed=NOW - 5 if status != "candidate" else None,
                retired_at=NOW - 1 if status == "retired" else None,
                retired_why="earlier" if status == "retired" else None,
                found_window=found, found_lift=lift, found_ci=[lift - 0.1, lift + 0.1], found_support=100,
                confirmed_window=confirmed, check_confidence=0.99 if confirmed else None, checked_until=checked,
            )
        )
    return list({r.id: r for r in rules}.values())


def _rows(data: AgentOutcomes, rule: Rule, window: list[float]) -> np.ndarray:
    t = data.exp.received_at
    a, b = ACTIONS.index(rule.action), ACTIONS.index(rule.baseline)
    rows = (t >= window[0]) & (t <= window[1]) & data.available[:, a] & data.available[:, b]
    rows &= segments.mask(rule.when, data.exp.features, len(t))
    return data.gamma[rows, a] - data.gamma[rows, b]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_a_rule_is_published_only_on_decisions_after_those_it_was_found_on(data: st.DataObject) -> None:
    agent = data.draw(agent_data())
    t = agent.exp.received_at
    fraction = data.draw(st.floats(0.05, 0.95))
    split = split_time(t, fraction)
    config = InsightsConfig(
        min_support=data.draw(st.integers(10, 60)), false_rule_rate=data.draw(st.floats(0.001, 0.5))
    )
    previous = data.draw(previous_rules(t))
    found = []
    for action, baseline in data.draw(st.lists(st.sampled_from([("q", "p"), ("r", "p"), ("p", "r")]), min_size=1, max_size=4)):
        when = data.draw(st.sampled_from(SEGMENTS))
        value = data.draw(LIFTS)
        found.append(Found("ag", action, baseline, when, Estimate(value, 0.1, value - 0.2, value + 0.2), 50, split.find))
    book = RuleBook(previous, NOW, config)
    book.add_found(found)
    book.gather(agent)
    rules, checks = book.decide()
    level = 1.0 - config.false_rule_rate / max(checks, 1)
    before = {r.id: r for r in previous}
    new_ids = {segments.rule_id(f.agent, f.action, f.baseline, f.when) for f in found}
    assert len({r.id for r in rules}) == len(rules)
    event(f"rules published or confirmed by this run: {min(sum(r.last_confirmed == NOW for r in rules), 2)}+")
    for rule in rules:
        old = before.get(rule.id)
        if old is not None:
            assert rule.checked_until >= old.checked_until
            assert rule.first_seen == old.first_seen
        if rule.status == "retired" and (old is None or old.status != "retired"):
            assert rule.retired_at == NOW and rule.retired_why
        if rule.status != "published":
            continue
        # never from the window it was found on
        assert rule.confirmed_window is not None and rule.confirmed_window[0] > rule.found_window[1]
        if rule.last_confirmed == NOW:  # published or confirmed by this run: its window says why
            assert rule.check_confidence == level
            terms = _rows(agent, rule, rule.confirmed_window)
            assert len(terms) == rule.support >= config.min_support
            e = estimate(terms, level)
            assert (e.lower > 0) if rule.lift > 0 else (e.upper < 0)
            if rule.id in new_ids and (old is None or old.status != "published"):
                assert rule.confirmed_window[0] > split.cut
        else:  # not confirmed now: exactly as it came
            assert old is not None and old.status == "published"
            assert (rule.lift, rule.ci, rule.confirmed_window) == (old.lift, old.ci, old.confirmed_window)


def _random_world(n: int, seed: int, effect: float) -> pa.Table:
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, 2, n)
    p = np.where(seg == 1, 0.7, 0.3)
    took = rng.random(n) < p
    reward = rng.normal(0, 1, n) + np.where(took & (seg == 1), effect, 0.0)
    return pa.table(
        {
            "id": [str(i) for i in range(n)],
            "agent": ["ag"] * n,
            "received_at": np.sort(rng.integers(0, n // 3, n)).astype(float),
            "context": [json.dumps({"seg": "ab"[s], "x": float(v)}) for s, v in zip(seg, rng.random(n))],
            "actions": ['["p", "q"]'] * n,
            "chosen": np.where(took, "q", "p").tolist(),
            "prob": np.where(took, p, 1 - p),
            "reward": reward,
            "model_version": pa.nulls(n, pa.string()),
            "outcomes": [1] * n,
            "slot": pa.nulls(n, pa.int32()),
            "slate": pa.nulls(n, pa.string()),
        }
    )


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(400, 2000),
    seed=st.integers(0, 10_000),
    effect=st.sampled_from([0.0, 1.0, 2.0]),
    fraction=st.floats(0.2, 0.8),
)
def test_extraction_publishes_no_rule_on_the_decisions_it_found_it_on(n: int, seed: int, effect: float, fraction: float) -> None:
    table = _random_world(n, seed, effect)
    config = InsightsConfig(min_support=20, find_fraction=fraction)
    insights = extract(table, ExtractionInputs(now=NOW), config)
    exp = from_table(table)
    data = agent_outcomes(exp, 0, False, 0)
    event(f"published: {min(insights.counts.rules_published, 1)}+")
    for rule in insights.rules:
        assert rule.found_window == insights.find_window
        if rule.status == "published":
            assert rule.confirmed_window is not None
            assert rule.confirmed_window[0] > rule.found_window[1] == insights.find_window[1]
            assert rule.check_confidence is not None
            a, b = data.actions.index(rule.action), data.actions.index(rule.baseline)
            t = data.exp.received_at
            rows = (t >= rule.confirmed_window[0]) & (t <= rule.confirmed_window[1])
            rows &= segments.mask(rule.when, data.exp.features, len(t))
            e = estimate(data.gamma[rows, a] - data.gamma[rows, b], rule.check_confidence)
            assert (e.lower > 0) if rule.lift > 0 else (e.upper < 0)
    assert msgspec.json.decode(msgspec.json.encode(insights), type=type(insights)) == insights

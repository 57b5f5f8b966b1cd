"""Intervals where propensities are tiny, and conditions that carry no lift.

Known truth throughout: a rare action's value estimated by IPS over many seeded replications (the
normal interval undercovers, the gated and widened one does not); patterns and rule checks not
made where the action was too rarely taken; a noise condition dropped from a rule on the window
it was found on, a real one kept; findings stored before ``ess`` existed still decode.
"""

from __future__ import annotations

import json
import math

import msgspec
import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reflexd.analysis.experience import Experience, Feature, from_table
from reflexd.analysis.findings import Condition, Pattern, Rule
from reflexd.analysis.outcomes import (
    MIN_ESS,
    AgentOutcomes,
    agent_outcomes,
    bounded_estimate,
    effective_size,
    kish_ess,
)
from reflexd.analysis.rules import RuleBook, essential, patterns, split_time
from reflexd.analysis.segments import rule_id
from reflexd.config import InsightsConfig
from reflexd.learning.ope import estimate


def test_kish_ess_counts_equally_weighted_decisions() -> None:
    assert kish_ess(np.full(40, 50.0)) == 40.0
    assert kish_ess(np.r_[np.zeros(999), 50.0]) == 1.0
    assert kish_ess(np.zeros(10)) == 0.0
    # one decision at weight 50 among 100 at weight 1: worth about eight
    assert 7.0 < kish_ess(np.r_[np.ones(100), 50.0]) < 9.0


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(2, 300), elements=st.floats(-100, 100)), st.sampled_from([0.8, 0.95, 0.999]))
def test_the_bounded_interval_always_contains_the_normal_one(terms: np.ndarray, confidence: float) -> None:
    normal, bounded = estimate(terms, confidence), bounded_estimate(terms, confidence)
    assert bounded.value == normal.value and bounded.stderr == normal.stderr
    assert bounded.lower <= normal.lower and bounded.upper >= normal.upper


def test_its_widening_vanishes_as_decisions_grow() -> None:
    rng = np.random.default_rng(0)
    for n in (1_000, 100_000):
        terms = np.where(rng.random(n) < 0.02, 50.0 * rng.random(n), 0.0)
        normal, bounded = estimate(terms), bounded_estimate(terms, 0.95)
        extra = (bounded.upper - bounded.lower) / (normal.upper - normal.lower) - 1.0
        assert extra < (0.6 if n == 1_000 else 0.05)


def test_a_rare_actions_value_is_covered_once_it_is_estimated_only_with_enough_effective_decisions() -> None:
    """IPS of an action taken with p = 0.02 (ε-greedy at 0.12 over six actions), Bernoulli rewards
    of mean 0.3, segments of 500 to 6,000 decisions: the truth is 0.3 in every replication."""
    rng = np.random.default_rng(21)
    p, truth = 0.02, 0.3
    normal_hits, gated_hits, gated, small_hits, small = 0, 0, 0, 0, 0
    replications = 600
    for i in range(replications):
        n = [500, 1_500, 3_000, 6_000][i % 4]
        took = rng.random(n) < p
        reward = (rng.random(n) < truth).astype(float)
        weights = np.where(took, 1.0 / p, 0.0)
        terms = weights * reward
        normal = estimate(terms)
        normal_hits += normal.lower <= truth <= normal.upper
        if kish_ess(weights) >= MIN_ESS:
            b = bounded_estimate(terms, 0.95)
            gated += 1
            gated_hits += b.lower <= truth <= b.upper
        else:
            small += 1
            small_hits += normal.lower <= truth <= normal.upper
    assert normal_hits / replications < 0.92  # the normal interval on every segment: too narrow
    assert small_hits / small < 0.9  # above all where the action was taken a few times
    assert gated >= replications // 3
    assert gated_hits / gated >= 0.93


def _epsilon_greedy_table(n: int, seed: int) -> tuple[pa.Table, float]:
    """Two actions: ``main`` chosen with p = 0.99, ``rare`` with 0.01; rewards 0/1."""
    rng = np.random.default_rng(seed)
    rare = rng.random(n) < 0.01
    reward = (rng.random(n) < np.where(rare, 0.6, 0.5)).astype(float)
    task = rng.integers(0, 2, n)
    table = pa.table(
        {
            "id": [str(i) for i in range(n)],
            "agent": ["ag"] * n,
            "received_at": np.arange(n, dtype=float),
            "context": [json.dumps({"task": "ab"[t]}) for t in task],
            "actions": ['["main", "rare"]'] * n,
            "chosen": np.where(rare, "rare", "main").tolist(),
            "prob": np.where(rare, 0.01, 0.99),
            "reward": reward,
            "model_version": pa.nulls(n, pa.string()),
            "outcomes": [1] * n,
            "slot": pa.nulls(n, pa.int32()),
            "slate": pa.nulls(n, pa.string()),
        }
    )
    return table, float(n)


def test_no_pattern_is_estimated_for_an_action_taken_too_rarely_and_each_reports_its_ess() -> None:
    table, _ = _epsilon_greedy_table(4_000, seed=3)  # about 20 decisions of ``rare`` in the check window
    data = agent_outcomes(from_table(table), 0, False, 0)
    split = split_time(data.exp.received_at, 0.5)
    found = patterns(data, split, InsightsConfig(min_support=100), seed=0)
    assert {p.action for p in found} == {"main"}
    check = data.exp.received_at > split.cut
    for p in found:
        assert p.ess is not None and p.ess >= MIN_ESS
        if not p.when:
            assert abs(p.ess - effective_size(data, np.flatnonzero(check), 0)) < 0.1


def _outcomes(n: int, rare_p: float, seed: int) -> AgentOutcomes:
    """Handmade pseudo-outcomes: ``q`` beats ``p`` by 0.5 everywhere; ``q`` taken with ``rare_p``."""
    rng = np.random.default_rng(seed)
    took_q = rng.random(n) < rare_p
    chosen = took_q.astype(np.int64)
    prob = np.where(took_q, rare_p, 1.0 - rare_p)
    gamma = np.column_stack([rng.normal(0.0, 0.1, n), rng.normal(0.5, 0.1, n)])
    exp = Experience(
        agents=["ag"], agent=np.zeros(n, np.int32), actions=["p", "q"], chosen=chosen.astype(np.int32),
        offered=np.ones((1, 2), dtype=bool), action_set=np.zeros(n, np.int32), versions=[],
        version=np.full(n, -1, np.int32), received_at=np.arange(n, dtype=float), prob=prob,
        reward=rng.random(n), features={"x": Feature("x", rng.random(n).astype(np.float32))},
    )
    return AgentOutcomes("ag", exp, ["p", "q"], chosen, np.ones((n, 2), dtype=bool), gamma, np.zeros(n), [])


def _candidate(found_until: float) -> Rule:
    return Rule(
        id=rule_id("ag", "q", "p", []), agent="ag", action="q", baseline="p", when=[], lift=0.5, ci=[0.4, 0.6],
        support=100, status="candidate", text="", first_seen=0.0, found_window=[0.0, found_until], found_lift=0.5,
        found_ci=[0.4, 0.6], found_support=100, checked_until=found_until,
    )


def test_a_check_with_too_few_effective_decisions_is_not_made_and_its_decisions_wait() -> None:
    config = InsightsConfig(min_support=100)
    thin = _outcomes(2_000, rare_p=0.005, seed=1)  # ~10 decisions of q after the find window
    assert effective_size(thin, np.arange(1_000, 2_000), 0, 1) < MIN_ESS
    book = RuleBook([_candidate(999.0)], now=1e6, settings=config)
    book.gather(thin)
    rules, checks = book.decide()
    assert checks == 0 and rules[0].status == "candidate" and rules[0].checked_until == 999.0

    rich = _outcomes(2_000, rare_p=0.2, seed=2)
    book = RuleBook([_candidate(999.0)], now=1e6, settings=config)
    book.gather(rich)
    rules, checks = book.decide()
    assert checks == 1 and rules[0].status == "published"
    assert rules[0].ess is not None and rules[0].ess >= MIN_ESS and rules[0].ci[0] <= 0.5 <= rules[0].ci[1]


def test_a_noise_condition_that_cuts_more_than_min_support_but_carries_no_lift_is_dropped() -> None:
    rng = np.random.default_rng(8)
    n = 20_000
    tokens = rng.lognormal(6.0, 0.8, n).astype(np.float32)  # about 3.5% at or below 94.5
    task = rng.integers(0, 2, n).astype(np.int16)
    hard = rng.random(n).astype(np.float32)
    features = {
        "prompt_tokens": Feature("prompt_tokens", tokens),
        "task": Feature("task", task, ("chat", "code")),
        "difficulty": Feature("difficulty", hard),
    }
    # a lift of +0.3 on hard code, -0.1 elsewhere; prompt tokens change nothing
    lift = np.where((task == 1) & (hard > 0.6), 0.3, -0.1)
    terms = lift + rng.normal(0.0, 1.0, n)
    noise = Condition("prompt_tokens", ">", 94.5)
    code, hard_cut = Condition("task", "==", "code"), Condition("difficulty", ">", 0.6)
    rows = np.arange(n)
    cut = int(((task == 1) & (hard > 0.6) & (tokens <= 94.5)).sum())
    assert cut > 100  # more than the support the rule needs: the old check kept it
    assert essential([hard_cut, noise, code], rows, features, n, least=100) == [hard_cut, noise, code]
    kept = essential([hard_cut, noise, code], rows, features, n, least=100, terms=terms)
    assert kept == [hard_cut, code]
    # with the noise condition's rows made to differ a lot, it carries lift and stays
    carried = np.where(tokens <= 94.5, terms - 2.0, terms)
    assert noise in essential([hard_cut, noise, code], rows, features, n, least=100, terms=carried)


def test_findings_stored_before_ess_was_kept_still_decode() -> None:
    rule = _candidate(10.0)
    raw = msgspec.json.decode(msgspec.json.encode(rule))
    del raw["ess"]
    assert msgspec.convert(raw, Rule) == rule
    pattern = {"agent": "ag", "action": "q", "when": [], "value": 0.5, "ci": [0.4, 0.6], "support": 10,
               "window": [0.0, 1.0], "found_window": [0.0, 1.0]}
    assert msgspec.convert(pattern, Pattern).ess is None


def _noise_world(seed: int) -> tuple[dict[str, Feature], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 40_000
    tokens = rng.lognormal(6.0, 0.8, n).astype(np.float32)
    task = rng.integers(0, 2, n).astype(np.int16)
    hard = rng.random(n).astype(np.float32)
    features = {
        "prompt_tokens": Feature("prompt_tokens", tokens),
        "task": Feature("task", task, ("chat", "code")),
        "difficulty": Feature("difficulty", hard),
    }
    lift = np.where((task == 1) & (hard > 0.6), 0.3, -0.1)
    return features, tokens, task, hard, lift + rng.normal(0.0, 1.0, n)


def test_the_few_decisions_a_noise_split_picked_out_lose_the_condition_unless_they_differ_beyond_the_bar() -> None:
    """The small side of a noise split (the 4% with the most tokens): a tree kept it because those
    few differed by about 3.5 standard errors of their own mean, the best of many thresholds."""
    features, tokens, task, hard, terms = _noise_world(9)
    n = len(terms)
    rows = np.arange(n)
    noise = Condition("prompt_tokens", ">", 1590.0)
    code, hard_cut = Condition("task", "==", "code"), Condition("difficulty", ">", 0.6)
    few = tokens > 1590.0
    inside = (task == 1) & (hard > 0.6)

    def shifted(z: float) -> np.ndarray:
        """``terms`` with the few moved so they differ from the rest of the segment by ``z`` SE."""
        a, b = terms[inside & few], terms[inside & ~few]
        se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        return np.where(inside & few, terms + (z * se - (a.mean() - b.mean())), terms)

    when = [hard_cut, noise, code]
    assert essential(when, rows, features, n, least=100) == when  # cuts far more than the support
    assert essential(when, rows, features, n, least=100, terms=shifted(3.5), z=4.0) == [hard_cut, code]
    assert essential(when, rows, features, n, least=100, terms=shifted(9.0), z=4.0) == when


def test_of_the_conditions_left_the_ones_that_keep_the_leafs_lift_are_kept() -> None:
    """``difficulty <= 0.6 and task = code``, a lift of -0.1: ``task`` carries nothing there (the
    easy chat decisions lose as much), and the rule becomes ``difficulty <= 0.6``, not ``task =
    code`` (+0.06 on average, which no decision has)."""
    features, _, _, _, terms = _noise_world(10)
    n = len(terms)
    easy, code = Condition("difficulty", "<=", 0.6), Condition("task", "==", "code")
    assert essential([easy, code], np.arange(n), features, n, least=100, terms=terms) == [easy]

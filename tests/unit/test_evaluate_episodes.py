"""``reflexd evaluate`` judges by episode when rewards are episode returns, on known truth.

Episodes of four decisions whose rewards are their episode's return: the whole return comes at the
end, one point per decision that matched its context plus an effect of the episode's own (a random
level every decision of it shares). Judged as independent rows, the decisions of one episode look
like four pieces of evidence where there is one, and the intervals are too narrow; judged by
episode (``reflexd.learning.episodes``), as the gate judges, they cover the truth.
"""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import numpy as np
import pytest

from reflexd.config import parse_config
from reflexd.learning import episodes as ep
from reflexd.learning import evaluate as ev
from reflexd.learning import gate, ope
from reflexd.tools.cli import render_evaluation
from reflexd.wire.protocol import Evaluation

STEPS = 4
MATCH = 0.8  # the target policy's chance of matching the context at each step
TRUTH = STEPS * MATCH  # its expected return (the episode effect has mean 0)
LOGGED_TRUTH = STEPS * 0.5  # the logging policy's: uniform over two actions
CONFIG = parse_config(
    "rewards: {episode_return: true, discount: 1.0}\n"
    "agents:\n  plain:\n    rewards: {episode_return: false}\n  farsighted:\n    rewards: {episode_return: true, discount: 0.9}\n"
)


def rewards_for(agent: str):  # type: ignore[no-untyped-def]
    return CONFIG.for_agent(agent).rewards


def simulate(episodes: int, seed: int, effect: float = 1.5) -> SimpleNamespace:
    """Rows as a snapshot holds them: episodes interleaved, each in step order; rewards the returns the
    join credits (gamma 1, nothing before the end: every decision of an episode carries its return)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, (episodes, STEPS))
    a = rng.integers(0, 2, (episodes, STEPS))
    final = (a == x).sum(axis=1) + rng.normal(0.0, effect, episodes)
    # step-major: every episode's first decision, then every second one, ...
    x, a = x.T.ravel(), a.T.ravel()
    names = [f"e{i}" for i in range(episodes)] * STEPS
    n = episodes * STEPS
    return SimpleNamespace(
        agents=["bot"] * n,
        episodes=names,
        chosen=a,
        prob=np.full(n, 0.5),
        reward=np.tile(final, STEPS),
        mask=np.ones((n, 2), dtype=bool),
        x=x,
    )


def target(rows: SimpleNamespace, match: float = MATCH) -> np.ndarray:
    return np.where(rows.x[:, None] == np.arange(2), match, 1.0 - match)


def q_model(rows: SimpleNamespace) -> np.ndarray:
    """A rough reward model of the return from a step on (any q_hat leaves DR unbiased)."""
    return np.where(rows.x[:, None] == np.arange(2), 2.6, 1.9)


def judge(rows: SimpleNamespace, by_episode: bool) -> list:  # type: ignore[type-arg]
    episodes = ep.credited_episodes(rows, rewards_for) if by_episode else None
    return ev.evaluate(rows, [("target", "file", target(rows))], q_model(rows), 0.95, "dr", episodes=episodes)


def test_the_episode_interval_covers_the_truth_and_is_wider_than_row_by_row() -> None:
    rows = simulate(400, seed=1)
    logging, policy = judge(rows, by_episode=True)
    old_logging, old_policy = judge(rows, by_episode=False)  # the rows as independent decisions, as before

    for name in ("ips", "snips", "dr"):
        found = getattr(policy, name)
        assert found.lower <= TRUTH <= found.upper, (name, found)
        assert found.stderr > getattr(old_policy, name).stderr, name
    assert logging.value.lower <= LOGGED_TRUTH <= logging.value.upper
    # four rows of one return each: row by row the logging policy's interval is half as wide
    assert logging.value.stderr == pytest.approx(2 * old_logging.value.stderr, rel=0.05)
    assert logging.ess == 400 and old_logging.ess == 1600
    assert 0 < policy.ess < 400  # episodes' weights, products over four decisions
    assert policy.versus_logging.lower <= TRUTH - LOGGED_TRUTH <= policy.versus_logging.upper
    # row by row, DR values a policy that follows the target at one decision of four: far from the truth
    assert old_policy.dr.upper < TRUTH - 0.5


def test_by_episode_the_intervals_keep_their_confidence_and_row_by_row_they_do_not() -> None:
    covered = {"episode": 0, "row": 0, "target": 0}
    trials = 200
    for seed in range(trials):
        rows = simulate(100, seed=100 + seed)
        logging, policy = judge(rows, by_episode=True)
        old_logging, _ = judge(rows, by_episode=False)
        covered["episode"] += logging.value.lower <= LOGGED_TRUTH <= logging.value.upper
        covered["row"] += old_logging.value.lower <= LOGGED_TRUTH <= old_logging.value.upper
        covered["target"] += policy.dr.lower <= TRUTH <= policy.dr.upper
    # nominal 95%; four correlated rows counted as four leave a z of 0.98, about 67%
    assert covered["episode"] / trials >= 0.9, covered
    assert covered["row"] / trials <= 0.75, covered
    # a normal interval on products of four weights (heavy-tailed) falls a little short of 95%
    assert covered["target"] / trials >= 0.83, covered


def mixed(seed: int = 7) -> SimpleNamespace:
    """Episodes of uneven length and discount, decisions without an episode and an agent that credits
    decisions alone, interleaved; any credited returns will do for comparing the arithmetic."""
    rng = np.random.default_rng(seed)
    kinds = [
        lambda: ("bot", None),
        lambda: ("plain", f"p{rng.integers(0, 20)}"),
        lambda: ("farsighted", f"f{rng.integers(0, 30)}"),
        lambda: ("bot", f"e{rng.integers(0, 40)}"),
    ]
    agents, names = zip(*(kinds[rng.integers(0, 4)]() for _ in range(300)))
    n = len(agents)
    probs = rng.dirichlet([2, 2, 2], n)
    chosen = np.array([rng.choice(3, p=p) for p in probs])
    return SimpleNamespace(
        agents=list(agents),
        episodes=list(names),
        chosen=chosen,
        prob=probs[np.arange(n), chosen],
        reward=rng.normal(1.0, 2.0, n),
        mask=np.ones((n, 3), dtype=bool),
        pi=rng.dirichlet([1, 1, 1], n),
        q_hat=rng.normal(1.0, 1.0, (n, 3)),
    )


def test_evaluate_reports_exactly_the_episode_estimators() -> None:
    rows = mixed()
    episodes = ep.credited_episodes(rows, rewards_for)
    assert episodes is not None
    logging, policy = ev.evaluate(rows, [("p", "file", rows.pi)], rows.q_hat, 0.9, "dr", episodes=episodes)

    number, gamma = episodes
    order = ep.grouped(number)
    number, gamma = number[order], gamma[order]
    pi, chosen, prob, q_hat = rows.pi[order], rows.chosen[order], rows.prob[order], rows.q_hat[order]
    step = ep.step_rewards(rows.reward[order], number, gamma)
    observed = ep.observed(step, number, gamma)
    expected = {
        "ips": ep.pdis(pi, chosen, prob, step, number, gamma, 0.9),
        "snips": ep.wpdis(pi, chosen, prob, step, number, gamma, 0.9),
        "dr": ep.pddr(pi, chosen, prob, step, q_hat, number, gamma, 0.9),
    }
    first = np.r_[True, number[1:] != number[:-1]]
    expected["dm"] = ope.estimate((pi * q_hat).sum(axis=1)[first], 0.9)
    for name, want in expected.items():
        got = getattr(policy, name)
        for field in ("value", "stderr", "lower", "upper"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), abs=1e-12, rel=0), (name, field)
    assert (logging.policy, policy.policy, policy.kind) == (ev.LOGGING, "p", "file") and policy.value == policy.dr
    versus = ope.estimate(ep.pddr_terms(pi, chosen, prob, step, q_hat, number, gamma) - observed, 0.9)
    assert policy.versus_logging.value == pytest.approx(versus.value, abs=1e-12, rel=0)
    assert policy.versus_logging.stderr == pytest.approx(versus.stderr, abs=1e-12, rel=0)
    base = ope.estimate(observed, 0.9)
    assert (logging.value.value, logging.value.stderr) == pytest.approx((base.value, base.stderr), abs=1e-12, rel=0)
    assert logging.ess == observed.shape[0] == int(first.sum())
    w = pi[np.arange(len(chosen)), chosen] / prob
    whole = np.array([w[number == e].prod() for e in np.unique(number)])
    assert policy.ess == pytest.approx(ev.effective_sample_size(whole), abs=1e-12)
    # the same per-episode terms the gate pairs a candidate with the logging policy on
    verdict = gate.compare(rows.pi, None, rows.chosen, rows.prob, rows.reward, rows.q_hat, parse_config("").gate,
                           gate.LOGGED_POLICY, episodes)
    assert verdict.candidate_value == pytest.approx(policy.dr.value, abs=1e-12)
    assert verdict.difference == pytest.approx(versus.value, abs=1e-12)


def test_decisions_without_episode_returns_are_rows_as_before() -> None:
    rows = mixed()
    alone = SimpleNamespace(**{**vars(rows), "agents": ["plain"] * len(rows.agents)})
    assert ep.credited_episodes(alone, rewards_for) is None
    before = ev.evaluate(alone, [("p", "file", alone.pi)], alone.q_hat)
    assert before[1].dr.value == pytest.approx(ope.dr(alone.pi, alone.chosen, alone.prob, alone.reward, alone.q_hat).value)
    assert before[0].ess == len(alone.agents)


def test_a_policy_that_takes_no_logged_first_step_has_no_weighted_estimate() -> None:
    rows = simulate(50, seed=3)
    never = np.where(rows.chosen[:, None] == np.arange(2), 0.0, 1.0)  # never the logged action
    _, policy = ev.evaluate(rows, [("never", "file", never)], None, episodes=ep.credited_episodes(rows, rewards_for))
    assert policy.snips is None and policy.ips.value == 0.0 and policy.value == policy.ips  # SNIPS: none, IPS then
    assert policy.ess == 0.0


def test_one_episode_is_too_few_for_an_interval() -> None:
    rows = simulate(1, seed=4)
    with pytest.raises(ev.EvaluationError, match="one episode.*at least 2 episodes"):
        ev.evaluate(rows, [], episodes=ep.credited_episodes(rows, rewards_for))


def test_the_table_and_the_json_say_the_unit_is_the_episode() -> None:
    rows = simulate(40, seed=5)
    found = ev.run(
        ["file:p"], lambda spec: SimpleNamespace(**vars(rows), ids=[f"d{i}" for i in range(len(rows.agents))],
                                                action_ids=[["a", "b"]] * len(rows.agents)),
        lambda v: pytest.fail("no model to load"), None,
        tables={"file:p": {f"d{i}": {"a": float(p[0]), "b": float(p[1])} for i, p in enumerate(target(rows))}},
        rewards_for=rewards_for,
    )
    assert (found.unit, found.episodes, found.decisions) == ("episode", 40, 160)
    assert found.rows[0].ess == 40
    as_json = msgspec.json.decode(msgspec.json.encode(found))
    assert as_json["unit"] == "episode" and as_json["episodes"] == 40
    table = render_evaluation(found)
    assert "unit: episode (40 episodes)" in table and "ESS of 40 episodes" in table
    assert msgspec.json.decode(msgspec.json.encode(found), type=Evaluation) == found

    plain = ev.run(["file:p"], lambda spec: SimpleNamespace(**vars(rows), ids=[f"d{i}" for i in range(len(rows.agents))],
                                                            action_ids=[["a", "b"]] * len(rows.agents)),
                   lambda v: pytest.fail("no model to load"), None,
                   tables={"file:p": {f"d{i}": {"a": 0.5, "b": 0.5} for i in range(len(rows.agents))}})
    assert (plain.unit, plain.episodes) == ("decision", None)
    assert "unit: episode" not in render_evaluation(plain) and "ESS of" not in render_evaluation(plain)

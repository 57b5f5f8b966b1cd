"""The gate judges by episode when rewards are episode returns (gate.credited_episodes)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from reflexd.config import parse_config
from reflexd.learning import episodes as ep
from reflexd.learning import gate

CONFIG = parse_config(
    "rewards: {episode_return: true, discount: 1.0}\nagents:\n  plain:\n    rewards: {episode_return: false}\n"
)


def rewards_for(agent: str):  # type: ignore[no-untyped-def]
    return CONFIG.agents[agent].rewards if agent in CONFIG.agents else CONFIG.rewards


def _logged(n: int, seed: int = 5) -> SimpleNamespace:
    """Two-step episodes, interleaved as a snapshot holds them; the first step's choice pays only at
    the end (1 if it matched x0), the second earns 0.5 for action 1. Rewards are the returns the
    join credits: G_0 = G_1 = the final reward (gamma 1, no reward at the first step)."""
    rng = np.random.default_rng(seed)
    x0 = rng.integers(0, 2, n)
    a0, a1 = rng.integers(0, 2, n), rng.integers(0, 2, n)
    final = (a0 == x0) + 0.5 * (a1 == 1)
    # rows: every first step, then every second step (episodes interleaved, each in step order)
    return SimpleNamespace(
        agents=["bot"] * (2 * n),
        episodes=[f"e{i}" for i in range(n)] * 2,
        chosen=np.r_[a0, a1],
        prob=np.full(2 * n, 0.5),
        reward=np.r_[final, final].astype(float),
        x0=x0,
    )


def _policy(rows: SimpleNamespace, first_right: float) -> np.ndarray:
    n = len(rows.x0)
    pi0 = np.where(rows.x0[:, None] == np.arange(2), first_right, 1 - first_right)
    pi1 = np.tile([0.2, 0.8], (n, 1))
    return np.r_[pi0, pi1]


def test_rows_are_independent_unless_some_reward_is_an_episode_return() -> None:
    rows = _logged(4)
    assert gate.credited_episodes(rows, None) is None
    plain = SimpleNamespace(**{**vars(rows), "agents": ["plain"] * 8})
    assert gate.credited_episodes(plain, rewards_for) is None
    no_names = SimpleNamespace(**{**vars(rows), "episodes": None})
    assert gate.credited_episodes(no_names, rewards_for) is None
    number, gamma = gate.credited_episodes(rows, rewards_for)
    assert number.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and gamma.tolist() == [1.0] * 8
    # a decision without an episode is one of its own, beside the episodes
    mixed = SimpleNamespace(**{**vars(rows), "episodes": [*rows.episodes[:7], None]})
    assert gate.credited_episodes(mixed, rewards_for)[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 4]


def test_a_first_model_is_judged_over_episodes_by_per_decision_dr() -> None:
    rows = _logged(400)
    pi = _policy(rows, 0.9)
    q_hat = np.full(pi.shape, 1.0)
    settings = parse_config("").gate
    episodes = gate.credited_episodes(rows, rewards_for)
    found = gate.compare(pi, None, rows.chosen, rows.prob, rows.reward, q_hat, settings, gate.LOGGED_POLICY, episodes)
    assert found.passed and "over 400 episodes" in found.reason
    # the value is per-decision DR on the steps' own rewards (0, then the final one), episode by episode
    order = ep.grouped(episodes[0])
    number = episodes[0][order]
    step = ep.step_rewards(rows.reward[order], number, 1.0)
    assert step[::2] == pytest.approx(0.0)
    dr = ep.pddr_terms(pi[order], rows.chosen[order], rows.prob[order], step, q_hat[order], number)
    assert found.candidate_value == pytest.approx(dr.mean())
    assert found.candidate_value == pytest.approx(0.9 + 0.5 * 0.8, abs=0.12)  # the policy's true value
    assert found.baseline_value == pytest.approx(0.5 + 0.25, abs=0.1)  # the logging policy's
    assert found.estimates["baseline_observed"] == pytest.approx(found.baseline_value)


def test_an_incumbent_is_compared_episode_by_episode() -> None:
    rows = _logged(400)
    good, bad = _policy(rows, 0.9), _policy(rows, 0.1)
    q_hat = np.full(good.shape, 1.0)
    settings = parse_config("").gate
    episodes = gate.credited_episodes(rows, rewards_for)
    better = gate.compare(good, bad, rows.chosen, rows.prob, rows.reward, q_hat, settings, "incumbent v1", episodes)
    worse = gate.compare(bad, good, rows.chosen, rows.prob, rows.reward, q_hat, settings, "incumbent v1", episodes)
    assert better.passed and not worse.passed
    assert better.difference == pytest.approx(0.8, abs=0.15)


def test_without_episodes_the_verdict_is_as_before() -> None:
    rows = _logged(50)
    pi = _policy(rows, 0.9)
    q_hat = np.full(pi.shape, 1.0)
    settings = parse_config("").gate
    before = gate.compare(pi, None, rows.chosen, rows.prob, rows.reward, q_hat, settings, gate.LOGGED_POLICY)
    now = gate.compare(
        pi, None, rows.chosen, rows.prob, rows.reward, q_hat, settings, gate.LOGGED_POLICY,
        gate.credited_episodes(rows, None),
    )
    assert before == now and "episodes" not in now.reason

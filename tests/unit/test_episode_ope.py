"""Episode estimators (reflexd.learning.episodes) against hand computation and a simulated truth."""

from __future__ import annotations

import numpy as np
import pytest

from reflexd.learning import episodes as ep
from reflexd.learning import ope

# two episodes: A (two steps) and B (one step); gamma 0.5
PI = np.array([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5]])
CHOSEN = np.array([0, 1, 1])
PROB = np.array([0.5, 0.5, 0.25])
REWARD = np.array([1.0, 2.0, 4.0])
Q_HAT = np.array([[1.0, 0.5], [1.0, 2.0], [3.0, 3.0]])
EPISODE = np.array([0, 0, 1])
GAMMA = 0.5


def test_pdis_by_hand() -> None:
    w_a0, w_a01, w_b = 0.8 / 0.5, (0.8 / 0.5) * (0.4 / 0.5), 0.5 / 0.25
    a = w_a0 * 1.0 + GAMMA * w_a01 * 2.0
    b = w_b * 4.0
    terms = ep.pdis_terms(PI, CHOSEN, PROB, REWARD, EPISODE, GAMMA)
    assert terms == pytest.approx([a, b])
    found = ep.pdis(PI, CHOSEN, PROB, REWARD, EPISODE, GAMMA)
    assert found.value == pytest.approx((a + b) / 2)
    assert found.stderr == pytest.approx(np.std([a, b], ddof=1) / np.sqrt(2))


def test_wpdis_by_hand() -> None:
    w_a0, w_a01, w_b = 1.6, 1.28, 2.0
    step0 = (w_a0 * 1.0 + w_b * 4.0) / (w_a0 + w_b)
    step1 = (w_a01 * GAMMA * 2.0 + w_b * 0.0) / (w_a01 + w_b)  # B has ended: its weight carries, earning 0
    terms = ep.wpdis_terms(PI, CHOSEN, PROB, REWARD, EPISODE, GAMMA)
    assert terms.mean() == pytest.approx(step0 + step1)
    assert terms.shape == (2,)


def test_pddr_by_hand() -> None:
    v = (PI * Q_HAT).sum(axis=1)  # 0.9, 1.4, 3.0
    a = (1.6 * (1.0 - 1.0) + 1.0 * v[0]) + GAMMA * (1.28 * (2.0 - 2.0) + 1.6 * v[1])
    b = 2.0 * (4.0 - 3.0) + v[2]
    assert ep.pddr_terms(PI, CHOSEN, PROB, REWARD, Q_HAT, EPISODE, GAMMA) == pytest.approx([a, b])


def test_one_step_episodes_are_the_bandit_estimators() -> None:
    rng = np.random.default_rng(3)
    n = 50
    pi = rng.dirichlet([1, 1, 1], n)
    prob = rng.uniform(0.2, 1.0, n)
    chosen = rng.integers(0, 3, n)
    reward = rng.normal(size=n)
    q_hat = rng.normal(size=(n, 3))
    alone = np.arange(n)
    assert ep.pdis_terms(pi, chosen, prob, reward, alone, 0.7) == pytest.approx(ope.ips_terms(pi, chosen, prob, reward))
    assert ep.wpdis_terms(pi, chosen, prob, reward, alone) == pytest.approx(ope.snips_terms(pi, chosen, prob, reward))
    assert ep.pddr_terms(pi, chosen, prob, reward, q_hat, alone) == pytest.approx(
        ope.dr_terms(pi, chosen, prob, reward, q_hat)
    )


def test_step_rewards_undo_the_discounted_return() -> None:
    episode = np.array([0, 0, 0, 1, 2, 2])
    r = np.array([1.0, 0.0, 5.0, 2.0, -1.0, 3.0])
    g = np.array([1.0 + 0.5 * 0.0 + 0.25 * 5.0, 0.0 + 0.5 * 5.0, 5.0, 2.0, -1.0 + 0.5 * 3.0, 3.0])
    assert ep.step_rewards(g, episode, 0.5) == pytest.approx(r)


def test_rows_of_an_episode_must_be_together() -> None:
    with pytest.raises(ValueError, match="together"):
        ep.pdis_terms(PI, CHOSEN, PROB, REWARD, np.array([0, 1, 0]))
    keys = ["b", "a", "b", "c", "a"]
    numbers = ep.episode_numbers(keys)
    assert numbers.tolist() == [0, 1, 0, 2, 1]
    assert numbers[ep.grouped(numbers)].tolist() == [0, 0, 1, 1, 2]
    assert ep.grouped(numbers).tolist() == [0, 2, 1, 4, 3]  # each episode's rows keep their order


def _simulate(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Two-step episodes whose good first step pays only at the end, logged uniformly at random.

    x0 in {0, 1}; the first action pays nothing at once, the second earns 1 if the first matched
    x0, plus 0.5 if the second is action 1. The target policy matches x0 with 0.9 and takes
    action 1 at the second step with 0.8: its true value is 0.9 + 0.5 * 0.8 = 1.3 (gamma 1).
    """
    x0 = rng.integers(0, 2, n)
    a0 = rng.integers(0, 2, n)
    a1 = rng.integers(0, 2, n)
    r1 = (a0 == x0) + 0.5 * (a1 == 1) + rng.normal(0, 0.1, n)
    pi0 = np.where(x0[:, None] == np.arange(2), 0.9, 0.1)
    pi1 = np.tile([0.2, 0.8], (n, 1))
    pi = np.stack([pi0, pi1], axis=1).reshape(2 * n, 2)
    chosen = np.stack([a0, a1], axis=1).reshape(-1)
    reward = np.stack([np.zeros(n), r1], axis=1).reshape(-1)
    episode = np.repeat(np.arange(n), 2)
    prob = np.full(2 * n, 0.5)
    # a rough q_hat: the second step's mean right, the first step's off by 0.3
    q1 = np.tile([0.5, 1.0], (n, 1))
    q0 = np.where(x0[:, None] == np.arange(2), 1.55, 0.25) - 0.3
    q_hat = np.stack([q0, q1], axis=1).reshape(2 * n, 2)
    return pi, chosen, prob, reward, q_hat, episode


def test_estimators_find_the_simulated_truth() -> None:
    rng = np.random.default_rng(11)
    pi, chosen, prob, reward, q_hat, episode = _simulate(rng, 20_000)
    truth = 1.3
    found = {
        "pdis": ep.pdis(pi, chosen, prob, reward, episode),
        "wpdis": ep.wpdis(pi, chosen, prob, reward, episode),
        "pddr": ep.pddr(pi, chosen, prob, reward, q_hat, episode),
    }
    for name, e in found.items():
        assert e.lower <= truth <= e.upper, (name, e)
        assert abs(e.value - truth) < 0.05, (name, e)
    # the doubly robust form is the steadiest of the three; the logging policy's value is 0.5 + 0.25
    assert found["pddr"].stderr < found["pdis"].stderr
    assert ep.observed(reward, episode).mean() == pytest.approx(0.75, abs=0.02)
    # and decisions taken as independent rows (a one-step weight on the episode's return) miss it:
    # they credit the first step's choice, and the second step as the logging policy made it
    returns = np.repeat(reward.reshape(-1, 2).sum(axis=1), 2)
    first = np.arange(0, len(reward), 2)
    naive = ope.ips_terms(pi[first], chosen[first], prob[first], returns[first]).mean()
    assert naive == pytest.approx(0.9 + 0.5 * 0.5, abs=0.05)


def _wpdis_dense(pi, chosen, prob, reward, episode, gamma):  # type: ignore[no-untyped-def]
    """WPDIS on an [episodes, steps] table, weights carried past each end: the definition, spelled out."""
    w = pi[np.arange(len(chosen)), chosen] / prob
    starts = np.r_[0, np.flatnonzero(np.diff(episode)) + 1, len(episode)]
    runs = [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]
    horizon = max(r.stop - r.start for r in runs)
    weights, rewards = np.zeros((len(runs), horizon)), np.zeros((len(runs), horizon))
    for i, r in enumerate(runs):
        n = r.stop - r.start
        weights[i, :n] = np.cumprod(w[r])
        weights[i, n:] = weights[i, n - 1]
        rewards[i, :n] = gamma ** np.arange(n) * reward[r]
    mean_w = weights.mean(axis=0)
    per_step = (weights * rewards).mean(axis=0) / mean_w
    return per_step.sum() + (weights * (rewards - per_step) / mean_w).sum(axis=1)


def test_wpdis_is_its_definition_on_episodes_of_many_lengths() -> None:
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 9, 40)
    episode = np.repeat(np.arange(40), lengths)
    n = len(episode)
    pi = rng.dirichlet([1, 1], n)
    chosen, prob, reward = rng.integers(0, 2, n), rng.uniform(0.3, 0.9, n), rng.normal(size=n)
    found = ep.wpdis_terms(pi, chosen, prob, reward, episode, 0.9)
    assert found == pytest.approx(_wpdis_dense(pi, chosen, prob, reward, episode, 0.9))

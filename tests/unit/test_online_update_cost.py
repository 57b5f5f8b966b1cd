"""The online head's update with deferred downdates (``_Arm``) gives the full-covariance update's
results to float tolerance, and a state once read is never changed by later updates. (Its cost is
measured by ``python -m bench.online``, not asserted here.)"""

from __future__ import annotations

import numpy as np
import pytest

from reflexd.config import OnlineConfig
from reflexd.deciding import online
from reflexd.deciding.online import OnlineHead, _Arm


class FullCovariance:
    """The update as it was: the whole covariance rewritten by each rank-one step, in float64."""

    def __init__(self, d: int) -> None:
        self.row_of = np.full(d, -1, dtype=np.intp)
        self.features = np.zeros(0, dtype=np.intp)
        self.theta, self.cov = np.zeros(0), np.zeros((0, 0))

    def update(self, x: np.ndarray, target: float, prior: float) -> None:
        nz = np.flatnonzero(x)
        rows = self.row_of[nz]
        if rows.min() < 0:
            new = nz[rows < 0]
            m, k = len(self.features), len(new)
            self.row_of[new] = np.arange(m, m + k)
            grown = np.zeros((m + k, m + k))
            grown[:m, :m] = self.cov
            grown[range(m, m + k), range(m, m + k)] = 1.0 / prior
            self.cov, self.theta = grown, np.concatenate([self.theta, np.zeros(k)])
            self.features = np.concatenate([self.features, new])
            rows = self.row_of[nz]
        xs = x[nz]
        cx = self.cov[:, rows] @ xs
        gain = cx / (1.0 + float(xs @ cx[rows]))
        self.theta = self.theta + gain * (target - float(self.theta[rows] @ xs))
        self.cov = self.cov - np.outer(gain, cx)


def sparse_contexts(n: int, d: int, keys: int, seed: int) -> np.ndarray:
    """Hashed-context-like rows: ``keys`` inputs of ±1 or a number, a bias; new inputs keep coming."""
    rng = np.random.default_rng(seed)
    xs = np.zeros((n, d))
    for i in range(n):
        width = min(d - 2, 4 + i // 4)  # the inputs seen so far grow, then every one is seen
        at = rng.choice(width, size=min(keys, width), replace=False)
        xs[i, at] = rng.choice([-1.0, 1.0, 0.5, 2.3], size=len(at))
        xs[i, -2] = 1.0
    return xs


@pytest.mark.parametrize(("keys", "prior", "n"), [(3, 1.0, 400), (10, 2.0, 600), (40, 0.5, 700), (40, 1.0, 3000)])
def test_the_update_equals_the_full_covariance_update(keys: int, prior: float, n: int) -> None:
    d = 130
    xs = sparse_contexts(n, d, keys, seed=keys)
    targets = np.random.default_rng(1).normal(0.4, 1.0, size=n)
    arm, reference = _Arm(d), FullCovariance(d)
    for i, (x, y) in enumerate(zip(xs, targets)):
        arm.update(x, float(y), prior)
        reference.update(x, float(y), prior)
        if i % 97 == 0 or i == n - 1:  # before, at and after folds of the downdates
            assert arm.features.tolist() == reference.features.tolist()
            np.testing.assert_allclose(arm.state.theta, reference.theta, rtol=1e-9, atol=1e-11)
            np.testing.assert_allclose(arm.covariance(), reference.cov, rtol=1e-9, atol=1e-11)
            weights = np.zeros(d)
            weights[reference.features] = reference.theta
            np.testing.assert_allclose(arm.state.weights, weights, rtol=1e-9, atol=1e-11)
    # and both are the closed-form ridge regression
    precision = xs.T @ xs + prior * np.eye(d)
    theta = np.linalg.solve(precision, xs.T @ targets)
    np.testing.assert_allclose(arm.state.weights, theta, rtol=1e-7, atol=1e-9)


def test_the_spread_beside_a_model_counts_the_models_score_as_an_input() -> None:
    head = OnlineHead(OnlineConfig(prior=1.0, model_prior=1.5))  # beside a model: model_prior
    rng = np.random.default_rng(5)
    rows, targets = [], []
    for i in range(300):
        x = head.features({"task": ["code", "chat"][i % 2], "user": f"u{rng.integers(30)}"})
        score = float(rng.normal(0.5, 0.2))
        head.remember(f"d{i}", "a", "left", x, score)
        reward = float(rng.normal(0.5, 0.3))
        head.learn(f"d{i}", reward)
        x = x.copy()
        x[-1] = score
        rows.append(x)
        targets.append(reward)  # the score is one more input, its weight learned from a prior of 0
    X = np.array(rows)
    precision = X.T @ X + 1.5 * np.eye(X.shape[1])
    probe = head.features({"task": "chat", "user": "u3", "unseen": "key"})
    with_score = probe.copy()
    with_score[-1] = 0.8
    (spread,) = head.spread("a", probe, ["left"], [0.8])
    assert spread == pytest.approx(float(np.sqrt(with_score @ np.linalg.solve(precision, with_score))), rel=1e-9)
    (mean,) = head.means("a", probe, ["left"], [0.8])
    assert mean == pytest.approx(float(np.linalg.solve(precision, X.T @ np.array(targets)) @ with_score), abs=1e-9)
    # an arm never rewarded: its prior, with the score as one more input
    assert head.spread("a", probe, ["right"], [0.8]) == pytest.approx([float(np.sqrt(with_score @ with_score / 1.5))])


def test_a_state_once_read_is_not_changed_by_later_updates() -> None:
    """Decisions read an arm's state without the lock: what they read must stay as it was."""
    d = 40
    xs = sparse_contexts(3 * online._DEFERRED + 5, d, 6, seed=9)
    arm = _Arm(d)
    for x in xs[:20]:
        arm.update(x, 1.0, 1.0)
    state = arm.state
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in state]
    visible = state.down[: state.r].copy()
    for x in xs[20:]:  # through at least two folds and the rows past this state's r
        arm.update(x, 0.0, 1.0)
    for kept, now in zip(before, state):
        if isinstance(kept, np.ndarray) and now is not state.down:
            np.testing.assert_array_equal(kept, now)
    np.testing.assert_array_equal(state.down[: state.r], visible)
    assert arm.state is not state


def test_the_noise_estimate_is_the_residuals_and_the_penalty_over_the_rewards() -> None:
    d, prior = 30, 2.0
    xs = sparse_contexts(2000, d, 4, seed=3)
    rng = np.random.default_rng(2)
    truth = rng.normal(0.0, 0.5, size=d)
    targets = xs @ truth + rng.normal(0.0, 0.3, size=len(xs))
    arm = _Arm(d)
    for x, y in zip(xs, targets):
        arm.update(x, float(y), prior)
    theta = np.linalg.solve(xs.T @ xs + prior * np.eye(d), xs.T @ targets)
    assert arm.residual == pytest.approx(float(((targets - xs @ theta) ** 2).sum() + prior * theta @ theta), rel=1e-8)
    assert arm.state.noise == pytest.approx(0.09, rel=0.15)
    head = OnlineHead(OnlineConfig(prior=prior))
    head._arms["a", "x"] = arm
    probe = xs[7]
    (unit,) = head.spread("a", probe, ["x"])
    assert head.spread("a", probe, ["x"], noise=True) == pytest.approx([unit * np.sqrt(arm.state.noise)], rel=1e-12)
    # an action with no rewards has no estimate: a noise of 1
    assert head.spread("a", probe, ["y"], noise=True) == head.spread("a", probe, ["y"])

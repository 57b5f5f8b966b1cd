"""Exploration strategies: valid distributions, the formulas by hand, and exact sampling."""

from __future__ import annotations

import numpy as np
import pytest

from reflexd.config import ExplorationConfig
from reflexd.deciding import exploring as X

SCORES = np.array([0.2, 1.0, -0.5, 0.9, 0.0])
SPREAD = np.array([0.1, 0.0, 0.3, 0.05, 2.0])


def cfg(**kw: object) -> ExplorationConfig:
    return ExplorationConfig(**kw)  # type: ignore[arg-type]


def assert_distribution(p: np.ndarray, n: int, strictly_positive: bool = True) -> None:
    assert p.shape == (n,)
    assert np.isfinite(p).all()
    assert (p >= 0).all()
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    if strictly_positive:
        assert (p > 0).all(), p


# ---- valid distributions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        cfg(strategy="epsilon_greedy", epsilon=0.2, epsilon_min=0.01, decay=0.5),
        cfg(strategy="softmax", temperature=0.1, epsilon_min=0.01),
        cfg(strategy="softmax", temperature=1e-6, epsilon_min=0.01),  # exp underflows; the floor remains
        cfg(strategy="ucb", epsilon=0.1, epsilon_min=0.01, ucb_c=1.0),
        cfg(strategy="squarecb", gamma=10.0, gamma_exponent=0.5),
        cfg(strategy="squarecb", gamma=1e6, gamma_exponent=1.0),
    ],
    ids=lambda c: f"{c.strategy}-{c.temperature}-{c.gamma}",
)
@pytest.mark.parametrize("t", [0, 1, 100, 10**6])
def test_every_strategy_gives_a_valid_positive_distribution(config: ExplorationConfig, t: int) -> None:
    p = X.probabilities(config, SCORES, SPREAD, t)
    assert_distribution(p, len(SCORES))
    # the best-scoring action (plus bonus, for ucb) is the most likely
    best = int(np.argmax(SCORES + (config.ucb_c * SPREAD if config.strategy == "ucb" else 0)))
    assert int(np.argmax(p)) == best


@pytest.mark.parametrize("strategy", ["epsilon_greedy", "softmax", "ucb", "squarecb"])
def test_single_action_is_certain(strategy: str) -> None:
    p = X.probabilities(cfg(strategy=strategy), np.array([3.0]), np.array([1.0]))
    assert p.tolist() == [1.0]


def test_unknown_strategy_raises() -> None:
    class Bad:
        strategy = "boltzmann"

    with pytest.raises(ValueError, match="boltzmann"):
        X.probabilities(Bad(), SCORES)  # type: ignore[arg-type]


def test_zero_epsilon_is_greedy() -> None:
    p = X.probabilities(cfg(strategy="epsilon_greedy", epsilon=0.0, epsilon_min=0.0), SCORES)
    assert_distribution(p, 5, strictly_positive=False)
    assert p.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


# ---- epsilon-greedy and its decay -------------------------------------------------------------


def test_epsilon_greedy_by_hand() -> None:
    p = X.probabilities(cfg(strategy="epsilon_greedy", epsilon=0.2, epsilon_min=0.0), SCORES)
    np.testing.assert_allclose(p, [0.04, 0.84, 0.04, 0.04, 0.04], rtol=1e-12)


def test_epsilon_decay_formula_and_floor() -> None:
    c = cfg(epsilon=0.5, epsilon_min=0.05, decay=0.1)
    assert X.epsilon_at(c, 0) == 0.5
    assert X.epsilon_at(c, 10) == pytest.approx(0.5 / 2.0)
    assert X.epsilon_at(c, 30) == pytest.approx(0.5 / 4.0)
    # 0.5 / (1 + 0.1 t) < 0.05 once t > 90: the floor takes over
    assert X.epsilon_at(c, 90) == pytest.approx(0.05)
    assert X.epsilon_at(c, 1000) == 0.05
    assert X.epsilon_at(cfg(epsilon=0.3, epsilon_min=0.0, decay=0.0), 10**9) == 0.3
    # the decayed epsilon is what the distribution uses
    p = X.probabilities(cfg(strategy="epsilon_greedy", epsilon=0.5, epsilon_min=0.05, decay=0.1), SCORES, t=10)
    np.testing.assert_allclose(p, [0.05, 0.8, 0.05, 0.05, 0.05], rtol=1e-12)
    p = X.probabilities(cfg(strategy="epsilon_greedy", epsilon=0.5, epsilon_min=0.05, decay=0.1), SCORES, t=10**6)
    np.testing.assert_allclose(p, [0.01, 0.96, 0.01, 0.01, 0.01], rtol=1e-12)


# ---- softmax ------------------------------------------------------------------------------------


def test_softmax_by_hand() -> None:
    s = np.array([0.0, 1.0, 2.0])
    p = X.probabilities(cfg(strategy="softmax", temperature=0.5, epsilon_min=0.03), s)
    e = np.exp(s / 0.5)
    np.testing.assert_allclose(p, 0.97 * e / e.sum() + 0.01, rtol=1e-12)
    # lower temperature is greedier
    cold = X.probabilities(cfg(strategy="softmax", temperature=0.05, epsilon_min=0.03), s)
    assert cold[2] > p[2]
    # huge scores do not overflow
    big = X.probabilities(cfg(strategy="softmax", temperature=0.01, epsilon_min=0.03), s * 1e6)
    assert_distribution(big, 3)


# ---- ucb ----------------------------------------------------------------------------------------


def test_ucb_prefers_large_spread() -> None:
    scores = np.array([1.0, 0.8])
    spread = np.array([0.0, 0.5])
    c = cfg(strategy="ucb", epsilon=0.1, epsilon_min=0.1, ucb_c=1.0)
    p = X.probabilities(c, scores, spread)
    np.testing.assert_allclose(p, [0.05, 0.95], rtol=1e-12)  # 0.8 + 0.5 beats 1.0
    # without the bonus weight, the higher mean wins
    p0 = X.probabilities(cfg(strategy="ucb", epsilon=0.1, epsilon_min=0.1, ucb_c=0.0), scores, spread)
    np.testing.assert_allclose(p0, [0.95, 0.05], rtol=1e-12)
    # with no spread at all, ucb is epsilon-greedy on the scores
    np.testing.assert_allclose(X.probabilities(c, scores, None), p0, rtol=1e-12)


# ---- squarecb -----------------------------------------------------------------------------------


def test_squarecb_by_hand() -> None:
    # 3 actions, gamma_t = 10 * (3 + 1) ** 0.5 = 20
    scores = np.array([0.5, 1.0, 0.0])
    p = X.probabilities(cfg(strategy="squarecb", gamma=10.0, gamma_exponent=0.5), scores, t=3)
    p0 = 1.0 / (3 + 20 * 0.5)  # 1/13
    p2 = 1.0 / (3 + 20 * 1.0)  # 1/23
    np.testing.assert_allclose(p, [p0, 1.0 - p0 - p2, p2], rtol=1e-12)
    assert p[1] == pytest.approx(1 - 1 / 13 - 1 / 23)


def test_squarecb_gamma_grows_with_t() -> None:
    c = cfg(strategy="squarecb", gamma=10.0, gamma_exponent=0.5)
    early = X.probabilities(c, SCORES, t=0)
    late = X.probabilities(c, SCORES, t=10_000)
    assert late[1] > early[1]
    # with gamma_exponent 0, t does not matter
    c0 = cfg(strategy="squarecb", gamma=10.0, gamma_exponent=0.0)
    np.testing.assert_array_equal(X.probabilities(c0, SCORES, t=0), X.probabilities(c0, SCORES, t=10_000))


def test_squarecb_ties_share_fairly() -> None:
    p = X.probabilities(cfg(strategy="squarecb", gamma=10.0), np.array([1.0, 1.0, 0.0]))
    assert_distribution(p, 3)
    assert p[0] >= p[2] and p[1] >= p[2]


# ---- fallback -----------------------------------------------------------------------------------


def test_fallback_default_action_with_epsilon() -> None:
    c = cfg(epsilon=0.2, epsilon_min=0.01)
    p = X.fallback(c, 4, default_index=2)
    assert_distribution(p, 4)
    np.testing.assert_allclose(p, [0.05, 0.05, 0.85, 0.05], rtol=1e-12)
    # decays like epsilon-greedy
    p = X.fallback(cfg(epsilon=0.2, epsilon_min=0.01, decay=1.0), 4, default_index=0, t=1)
    np.testing.assert_allclose(p, [0.925, 0.025, 0.025, 0.025], rtol=1e-12)


def test_fallback_without_default_is_uniform() -> None:
    p = X.fallback(cfg(), 5, default_index=None)
    np.testing.assert_allclose(p, [0.2] * 5, rtol=1e-12)
    assert X.fallback(cfg(), 1, default_index=0).tolist() == [1.0]


# ---- sampling -----------------------------------------------------------------------------------

# chi-square critical values at the 0.999 quantile
CHI2_999 = {2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


def test_sample_frequencies_match_p() -> None:
    p = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
    rng = np.random.default_rng(20240601)
    draws = 200_000
    counts = np.zeros(len(p))
    for u in rng.random(draws):
        counts[X.sample(p, float(u))] += 1
    stat = chi_square(counts, p)
    assert stat < CHI2_999[len(p) - 1], (stat, counts / draws)
    # and a wrong distribution is clearly rejected by the same statistic
    assert chi_square(counts, np.array([0.45, 0.35, 0.15, 0.04, 0.01])) > CHI2_999[len(p) - 1]


@pytest.mark.parametrize(
    "c",
    [
        cfg(strategy="epsilon_greedy", epsilon=0.3, decay=0.01, epsilon_min=0.05),
        cfg(strategy="softmax", temperature=0.5),
        cfg(strategy="ucb", epsilon=0.2, ucb_c=1.0),
        cfg(strategy="squarecb", gamma=10.0, gamma_exponent=0.5),
    ],
    ids=lambda c: c.strategy,
)
def test_sample_from_strategy_distribution_matches_logged_probability(c: ExplorationConfig) -> None:
    """The probability logged with a choice is the one it was drawn with: frequencies agree."""
    p = X.probabilities(c, np.array([0.5, 1.0, 0.0, 0.9]), np.array([0.1, 0.0, 0.9, 0.2]), t=3)
    rng = np.random.default_rng(7)
    counts = np.zeros(4)
    logged = {}
    for u in rng.random(50_000):
        i = X.sample(p, float(u))
        counts[i] += 1
        logged[i] = float(p[i])
    assert sorted(logged) == [0, 1, 2, 3]
    assert chi_square(counts, np.array([logged[i] for i in range(4)])) < CHI2_999[3]


def test_sample_is_inverse_cdf() -> None:
    p = np.array([0.25, 0.5, 0.25])
    assert X.sample(p, 0.0) == 0
    assert X.sample(p, 0.2499) == 0
    assert X.sample(p, 0.25) == 1
    assert X.sample(p, 0.7499) == 1
    assert X.sample(p, 0.75) == 2
    assert X.sample(p, float(np.nextafter(1.0, 0.0))) == 2


def test_sample_never_picks_a_zero_probability_action() -> None:
    # zero-probability actions at the edges and in the middle
    p = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    for u in [0.0, 1e-300, 0.4999999, 0.5, 0.9999999, float(np.nextafter(1.0, 0.0))]:
        assert p[X.sample(p, u)] > 0, u


def test_sample_never_picks_zero_probability_action_under_rounding() -> None:
    # np.cumsum of ten 0.1s ends just below 1.0 while p.sum() is 1.0: a u just under 1 must
    # still land on a real action, never on the trailing zero-probability one.
    p = np.array([0.1] * 10 + [0.0])
    u = float(np.nextafter(1.0, 0.0))
    i = X.sample(p, u)
    assert p[i] > 0, (i, np.cumsum(p)[-2:], p.sum())


# ---- plain floats (the decision path) -----------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        cfg(strategy="epsilon_greedy", epsilon=0.2, decay=0.5),
        cfg(strategy="softmax", temperature=0.3, epsilon_min=0.02),
        cfg(strategy="ucb", epsilon=0.1, ucb_c=2.0),
        cfg(strategy="squarecb", gamma=10.0, gamma_exponent=0.5),
    ],
    ids=lambda c: c.strategy,
)
def test_distribution_is_probabilities_as_floats(config: ExplorationConfig) -> None:
    p = X.distribution(config, SCORES.tolist(), SPREAD.tolist(), 7)
    assert type(p) is list and all(type(x) is float for x in p)
    assert p == X.probabilities(config, SCORES, SPREAD, 7).tolist()
    # a float32 model output is widened first, not explored in float32
    s32, u32 = SCORES.astype(np.float32), SPREAD.astype(np.float32)
    assert X.distribution(config, s32, u32, 7) == X.distribution(config, s32.tolist(), u32.tolist(), 7)


def test_default_distribution_is_fallback_as_floats() -> None:
    c = cfg(epsilon=0.2, epsilon_min=0.01)
    assert X.default_distribution(c, 4, 2) == X.fallback(c, 4, 2).tolist() == pytest.approx([0.05, 0.05, 0.85, 0.05])
    assert X.default_distribution(c, 3, None) == [1 / 3] * 3


def test_sample_takes_lists_and_arrays_alike() -> None:
    p = [0.1] * 10 + [0.0]
    for u in np.random.default_rng(3).random(2000).tolist() + [0.0, float(np.nextafter(1.0, 0.0))]:
        assert X.sample(p, u) == X.sample(np.array(p), u) == int(np.searchsorted(np.cumsum(p), u * np.cumsum(p)[-1], side="right"))

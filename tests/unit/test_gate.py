"""The gate's off-policy estimators and decisions, checked against arithmetic and known truths."""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import msgspec
import numpy as np
import pytest

from reflexd.config import ExplorationConfig, GateConfig
from reflexd.deciding import exploring
from reflexd.features import FeatureSpec
from reflexd.learning import gate, ope
from reflexd.manifest import GateResult, Training

Z95 = 1.959963984540054

# ---- a hand-computed 4-row log -------------------------------------------------------------
# Row 0 has only two real actions (slot 2 is padding, with a junk q_hat that pi must cancel).
PI = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
CHOSEN = np.array([0, 1, 2, 1])
PROB = np.array([0.5, 0.25, 0.25, 0.5])
REWARD = np.array([1.0, 0.0, 2.0, 1.0])
QHAT = np.array([[0.8, 0.0, 9.0], [0.5, 0.5, 0.5], [0.0, 1.0, 1.5], [1.0, 0.5, 0.0]])
# w = pi(chosen)/prob = [0.5/0.5, 0/0.25, 0.5/0.25, 1/0.5] = [1, 0, 2, 2]


def _check(est: ope.Estimate, value: float, stderr: float) -> None:
    assert est.value == pytest.approx(value, abs=1e-12)
    assert est.stderr == pytest.approx(stderr, abs=1e-6)
    assert est.lower == pytest.approx(value - Z95 * stderr, abs=1e-6)
    assert est.upper == pytest.approx(value + Z95 * stderr, abs=1e-6)


def test_ips_by_hand() -> None:
    # terms w·r = [1, 0, 4, 2], mean 7/4 = 1.75
    # deviations [-0.75, -1.75, 2.25, 0.25], squares sum 8.75, s² = 8.75/3, se = sqrt(8.75/3/4)
    _check(ope.ips(PI, CHOSEN, PROB, REWARD), 1.75, 0.853913)


def test_snips_by_hand() -> None:
    # sum(w·r) / sum(w) = 7 / 5 = 1.4; mean(w) = 1.25
    # linearised terms 1.4 + w(r - 1.4)/1.25 = [1.08, 1.4, 2.36, 0.76] (mean 1.4)
    # deviations [-0.32, 0, 0.96, -0.64], squares sum 1.4336, se = sqrt(1.4336/3/4)
    np.testing.assert_allclose(ope.snips_terms(PI, CHOSEN, PROB, REWARD), [1.08, 1.4, 2.36, 0.76])
    _check(ope.snips(PI, CHOSEN, PROB, REWARD), 1.4, 0.345640)


def test_dm_by_hand() -> None:
    # sum_a pi·q = [0.5·0.8 + 0.5·0 + 0·9, 0.5, 0.3·1 + 0.5·1.5, 1·0.5] = [0.4, 0.5, 1.05, 0.5]
    # mean 2.45/4 = 0.6125; deviations [-0.2125, -0.1125, 0.4375, -0.1125], squares sum 0.261875
    _check(ope.dm(PI, QHAT), 0.6125, 0.147726)


def test_dr_by_hand() -> None:
    # dm + w(r - q(chosen)) = [0.4 + 1(1 - 0.8), 0.5 + 0, 1.05 + 2(2 - 1.5), 0.5 + 2(1 - 0.5)]
    #                       = [0.6, 0.5, 2.05, 1.5], mean 4.65/4 = 1.1625
    # deviations [-0.5625, -0.6625, 0.8875, 0.3375], squares sum 1.656875, se = sqrt(1.656875/12)
    _check(ope.dr(PI, CHOSEN, PROB, REWARD, QHAT), 1.1625, 0.371582)


def test_interval_width_follows_confidence() -> None:
    est = ope.ips(PI, CHOSEN, PROB, REWARD, confidence=0.90)
    # z at 90% two-sided is 1.644854
    assert est.upper - est.value == pytest.approx(1.644854 * est.stderr, abs=1e-6)


def test_a_log_without_positive_propensities_is_refused() -> None:
    with pytest.raises(ValueError, match="propensity"):
        ope.ips(PI, CHOSEN, np.array([0.5, 0.0, 0.25, 0.5]), REWARD)
    with pytest.raises(ValueError, match="propensity"):
        ope.dr(PI, CHOSEN, np.array([0.5, np.nan, 0.25, 0.5]), REWARD, QHAT)


def test_an_interval_needs_two_rows() -> None:
    with pytest.raises(ValueError, match="2 rows"):
        ope.ips(PI[:1], CHOSEN[:1], PROB[:1], REWARD[:1])


# ---- a simulated contextual problem with known truth ---------------------------------------
# Six context types (uniform), three actions, Bernoulli rewards with these means.
MU = np.array(
    [
        [0.2, 0.5, 0.8],
        [0.9, 0.3, 0.1],
        [0.4, 0.6, 0.5],
        [0.7, 0.2, 0.3],
        [0.1, 0.1, 0.9],
        [0.5, 0.8, 0.2],
    ]
)
K, A = MU.shape


def eps_greedy(table: np.ndarray, eps: float) -> np.ndarray:
    p = np.full(table.shape, eps / table.shape[1])
    p[np.arange(table.shape[0]), table.argmax(axis=1)] += 1.0 - eps
    return p


LOGGING = eps_greedy(np.tile([1.0, 0.0, 0.0], (K, 1)), 0.3)  # prefers action 0 everywhere
GOOD = eps_greedy(MU, 0.1)
BAD = eps_greedy(-MU, 0.1)
MIXED = 0.85 * GOOD + 0.15 * BAD  # a little worse than GOOD
Q_BIASED = MU + np.array([0.2, 0.1, 0.15])  # a reward model whose errors DM cannot see


def true_value(policy: np.ndarray) -> float:
    return float((policy * MU).sum(axis=1).mean())


class Log(NamedTuple):
    x: np.ndarray
    chosen: np.ndarray
    prob: np.ndarray
    reward: np.ndarray


def simulate(rng: np.random.Generator, n: int) -> Log:
    x = rng.integers(K, size=n)
    cdf = LOGGING[x].cumsum(axis=1)
    chosen = np.minimum((rng.random(n)[:, None] > cdf).sum(axis=1), A - 1)
    reward = (rng.random(n) < MU[x, chosen]).astype(np.float64)
    return Log(x, chosen, LOGGING[x, chosen], reward)


def estimate_all(log: Log, policy: np.ndarray, confidence: float = 0.95) -> dict[str, ope.Estimate]:
    pi, q_hat = policy[log.x], Q_BIASED[log.x]
    return {
        "ips": ope.ips(pi, log.chosen, log.prob, log.reward, confidence),
        "snips": ope.snips(pi, log.chosen, log.prob, log.reward, confidence),
        "dm": ope.dm(pi, q_hat, confidence),
        "dr": ope.dr(pi, log.chosen, log.prob, log.reward, q_hat, confidence),
    }


def test_simulated_logging_propensities_are_what_was_sampled() -> None:
    log = simulate(np.random.default_rng(0), 300_000)
    freq = np.bincount(log.x * A + log.chosen, minlength=K * A).reshape(K, A)
    np.testing.assert_allclose(freq / freq.sum(axis=1, keepdims=True), LOGGING, atol=0.01)


def test_estimates_converge_to_the_true_value_on_a_large_log() -> None:
    truth = true_value(GOOD)
    est = estimate_all(simulate(np.random.default_rng(1), 200_000), GOOD)
    for name in ("ips", "snips", "dr"):
        assert abs(est[name].value - truth) < 0.01, name
        assert est[name].lower <= truth <= est[name].upper, name
    # DM inherits the reward model's bias (0.1 to 0.2 per action), which is what DR corrects
    dm_bias = float((GOOD * (Q_BIASED - MU)).sum(axis=1).mean())
    assert abs(dm_bias) > 0.03
    assert est["dm"].value - truth == pytest.approx(dm_bias, abs=0.005)


def test_ips_and_dr_are_unbiased_over_many_small_logs() -> None:
    rng = np.random.default_rng(2)
    truth = true_value(GOOD)
    runs = [estimate_all(simulate(rng, 200), GOOD) for _ in range(400)]
    for name in ("ips", "dr"):
        values = np.array([r[name].value for r in runs])
        se_of_mean = values.std(ddof=1) / np.sqrt(len(values))
        assert abs(values.mean() - truth) < 4 * se_of_mean, name
        assert abs(values.mean() - truth) < 0.01, name
    dm_values = np.array([r["dm"].value for r in runs])
    assert abs(dm_values.mean() - truth) > 0.03  # the biased model stays biased however many runs


@pytest.mark.parametrize(("confidence", "low", "high"), [(0.90, 0.84, 0.96), (0.95, 0.90, 0.99)])
def test_intervals_cover_the_truth_at_the_nominal_rate(confidence: float, low: float, high: float) -> None:
    rng = np.random.default_rng(3)
    truth = true_value(GOOD)
    covered = {"ips": 0, "snips": 0, "dr": 0}
    runs = 300
    for _ in range(runs):
        est = estimate_all(simulate(rng, 1000), GOOD, confidence)
        for name in covered:
            covered[name] += est[name].lower <= truth <= est[name].upper
    for name, hits in covered.items():
        assert low <= hits / runs <= high, (name, hits / runs)


@pytest.mark.parametrize("estimator", ["ips", "snips", "dr"])
def test_paired_difference_interval_covers_the_true_difference(estimator: str) -> None:
    rng = np.random.default_rng(4)
    truth = true_value(MIXED) - true_value(GOOD)
    cfg = GateConfig(estimator=estimator, confidence=0.95, min_holdout=100)
    runs, hits = 300, 0
    for _ in range(runs):
        log = simulate(rng, 1000)
        res = gate.compare(
            MIXED[log.x], GOOD[log.x], log.chosen, log.prob, log.reward, Q_BIASED[log.x], cfg, "incumbent v0001"
        )
        hits += res.lower <= truth <= res.upper
    assert 0.90 <= hits / runs <= 0.99


# ---- the gate's decisions -------------------------------------------------------------------


def run(
    candidate: np.ndarray, baseline: np.ndarray | None, log: Log, cfg: GateConfig, name: str = "incumbent v0003"
) -> GateResult:
    baseline_pi = None if baseline is None else baseline[log.x]
    return gate.compare(candidate[log.x], baseline_pi, log.chosen, log.prob, log.reward, Q_BIASED[log.x], cfg, name)


@pytest.fixture(scope="module")
def holdout() -> Log:
    return simulate(np.random.default_rng(5), 5000)


@pytest.mark.parametrize("estimator", ["ips", "snips", "dr"])
def test_better_candidate_promoted_and_worse_rejected(holdout: Log, estimator: str) -> None:
    cfg = GateConfig(estimator=estimator)
    better = run(GOOD, BAD, holdout, cfg)
    assert better.passed and better.lower > 0
    assert better.lower <= true_value(GOOD) - true_value(BAD) <= better.upper
    worse = run(BAD, GOOD, holdout, cfg)
    assert not worse.passed and worse.upper < 0
    assert worse.reason.endswith("rejected") and better.reason.endswith("promoted")


def test_reason_states_the_numbers(holdout: Log) -> None:
    res = run(GOOD, BAD, holdout, GateConfig(estimator="dr", confidence=0.95, margin=0.0))
    assert res.reason == (
        f"candidate {res.candidate_value:.3f} vs incumbent v0003 {res.baseline_value:.3f} (dr), "
        f"difference {res.difference:+.3f} [{res.lower:+.3f}, {res.upper:+.3f}] at 95% ≥ -0.000: promoted"
    )
    assert (res.estimator, res.baseline, res.holdout_rows, res.confidence) == ("dr", "incumbent v0003", 5000, 0.95)


def test_difference_is_the_difference_of_the_estimates(holdout: Log) -> None:
    for estimator in ("ips", "snips", "dr"):
        res = run(MIXED, GOOD, holdout, GateConfig(estimator=estimator))
        assert res.candidate_value == pytest.approx(res.estimates[f"candidate_{estimator}"])
        assert res.baseline_value == pytest.approx(res.estimates[f"baseline_{estimator}"])
        assert res.difference == pytest.approx(res.candidate_value - res.baseline_value)
    est = estimate_all(holdout, MIXED)
    assert res.estimates["candidate_snips"] == pytest.approx(est["snips"].value)
    assert res.estimates["candidate_dm"] == pytest.approx(est["dm"].value)
    sides, names = ("candidate", "baseline"), ("ips", "snips", "dm", "dr")
    assert set(res.estimates) == {f"{side}_{name}" for side in sides for name in names}


def test_pairing_tightens_the_interval(holdout: Log) -> None:
    res = run(MIXED, GOOD, holdout, GateConfig(estimator="dr"))
    unpaired = np.hypot(estimate_all(holdout, MIXED)["dr"].stderr, estimate_all(holdout, GOOD)["dr"].stderr)
    assert (res.upper - res.lower) / (2 * Z95) < 0.5 * unpaired


def test_margin_is_respected_at_its_boundary(holdout: Log) -> None:
    strict = run(MIXED, GOOD, holdout, GateConfig(estimator="dr", margin=0.0))
    assert true_value(MIXED) < true_value(GOOD)
    assert not strict.passed and strict.lower < 0
    assert "< -0.000: rejected" in strict.reason
    allowed = -strict.lower
    assert run(MIXED, GOOD, holdout, GateConfig(estimator="dr", margin=allowed + 1e-9)).passed
    assert not run(MIXED, GOOD, holdout, GateConfig(estimator="dr", margin=allowed - 1e-9)).passed
    lenient = run(MIXED, GOOD, holdout, GateConfig(estimator="dr", margin=0.2))
    assert lenient.passed and lenient.margin == 0.2 and "≥ -0.200: promoted" in lenient.reason


@pytest.mark.parametrize("estimator", ["ips", "snips", "dr"])
def test_a_candidate_identical_to_the_incumbent_is_not_rejected_by_rounding(holdout: Log, estimator: str) -> None:
    # the same policy computed along another float path: differences of ±1e-15, not exactly zero
    wobble = np.random.default_rng(3).choice([-1e-15, 1e-15], size=len(MIXED))
    recomputed = MIXED.copy()
    recomputed[:, 0] += wobble
    recomputed[:, 1] -= wobble
    same = run(recomputed, MIXED, holdout, GateConfig(estimator=estimator, margin=0.0))
    assert same.lower < 0 and same.difference == pytest.approx(0.0, abs=1e-12)
    assert same.passed, same.reason


def test_too_small_holdout_is_rejected_even_for_a_better_candidate(holdout: Log) -> None:
    small = Log(*(a[:50] for a in holdout))
    res = run(GOOD, BAD, small, GateConfig(min_holdout=100))
    assert not res.passed
    assert res.holdout_rows == 50
    assert res.reason == "holdout has 50 rows, fewer than the 100 required: rejected"
    assert run(GOOD, BAD, small, GateConfig(min_holdout=50)).passed


def test_one_row_is_too_few_whatever_min_holdout_says(holdout: Log) -> None:
    res = run(GOOD, BAD, Log(*(a[:1] for a in holdout)), GateConfig(min_holdout=1))
    assert not res.passed and "fewer than the 2 required" in res.reason


# four rows, two actions, each logged with probability 1/2: the candidate always takes action 0,
# the incumbent action 1, so their IPS terms are 2·reward on the rows that logged their action
FEW_CHOSEN = np.array([0, 0, 1, 1])
FEW_PROB = np.full(4, 0.5)
TAKES_0, TAKES_1 = np.tile([1.0, 0.0], (4, 1)), np.tile([0.0, 1.0], (4, 1))


def compare_on_four_rows(
    candidate: np.ndarray, baseline: np.ndarray | None, reward: list[float], cfg: GateConfig
) -> GateResult:
    rewards, q_hat = np.array(reward), np.zeros((4, 2))
    return gate.compare(candidate, baseline, FEW_CHOSEN, FEW_PROB, rewards, q_hat, cfg, "incumbent v0001")


def test_on_few_rows_a_replacement_is_judged_on_its_point_estimate() -> None:
    # differences (2, 0, -2, 0): a point estimate of 0, an interval of about ±1.6
    cfg = GateConfig(estimator="ips", margin=0.02, point_estimate_below=10)
    even = compare_on_four_rows(TAKES_0, TAKES_1, [1, 0, 1, 0], cfg)
    assert even.difference == 0.0 and even.lower < -1.0
    assert even.passed, even.reason
    assert even.reason == (
        "candidate 0.500 vs incumbent v0001 0.500 (ips), difference +0.000 ≥ -0.020 on its point estimate "
        f"(4 holdout rows, under gate.point_estimate_below 10; interval [{even.lower:+.3f}, {even.upper:+.3f}] "
        "at 95%): promoted"
    )
    # the interval decides when told to, and from point_estimate_below rows on
    for below in (0, 4):
        strict = msgspec.structs.replace(cfg, point_estimate_below=below)
        interval = compare_on_four_rows(TAKES_0, TAKES_1, [1, 0, 1, 0], strict)
        assert not interval.passed and "point estimate" not in interval.reason
        assert interval.reason.endswith("at 95% < -0.020: rejected")
    # differences (0, 0, -2, 0): a point estimate of -0.5 is below the margin
    worse = compare_on_four_rows(TAKES_0, TAKES_1, [0, 0, 1, 0], cfg)
    assert worse.difference == -0.5 and not worse.passed
    assert "difference -0.500 < -0.020 on its point estimate" in worse.reason
    assert worse.reason.endswith("at 95%): rejected")
    # min_holdout still comes first
    five_needed = msgspec.structs.replace(cfg, min_holdout=5)
    assert not compare_on_four_rows(TAKES_0, TAKES_1, [1, 0, 1, 0], five_needed).passed
    # a propensity so small that its weight overflows makes the point estimate infinite: rejected
    tiny = np.array([0.5, 5e-324, 0.5, 0.5])
    q_hat = np.zeros((4, 2))
    with np.errstate(over="ignore", invalid="ignore"):
        overflow = gate.compare(TAKES_0, TAKES_1, FEW_CHOSEN, tiny, np.ones(4), q_hat, cfg, "incumbent v0001")
    assert overflow.difference == np.inf and not overflow.passed and "< -0.020" in overflow.reason


def test_a_first_model_the_holdout_cannot_tell_from_the_logging_policy_is_rejected() -> None:
    # a model fit on rewards all 0 scores every action alike and explores uniformly, as the
    # logging policy did: on rows whose rewards are all 0 each difference is exactly 0, and so is
    # the interval, which must not count as likely better
    cfg = GateConfig(estimator="dr", first_min_holdout=3, first_confidence=0.8)
    uniform = np.full((4, 2), 0.5)
    same = gate.compare(uniform, None, FEW_CHOSEN, FEW_PROB, np.zeros(4), np.zeros((4, 2)), cfg, "logged policy")
    assert (same.lower, same.difference, same.upper) == (0.0, 0.0, 0.0)
    assert not same.passed and same.reason.endswith("at 80% ≤ +0.000: rejected")
    # one that takes the rewarded action where the logging policy earned nothing still passes
    rewards = np.array([1.0, 1.0, 0.0, 0.0])
    better = gate.compare(TAKES_0, None, FEW_CHOSEN, FEW_PROB, rewards, np.zeros((4, 2)), cfg, "logged policy")
    assert better.lower > 0 and better.passed and better.reason.endswith("> +0.000: promoted")


def test_a_first_model_on_few_rows_is_still_judged_by_its_interval() -> None:
    # against the observed rewards (1, 0, 0, 0) its IPS terms (2, 0, 0, 0): better by 0.25 on
    # the point estimate, but not at 80% on four rows
    cfg = GateConfig(estimator="ips", point_estimate_below=100, first_min_holdout=3, first_confidence=0.8)
    first = compare_on_four_rows(TAKES_0, None, [1, 0, 0, 0], cfg)
    assert first.difference == 0.25 and first.lower < 0.0
    assert not first.passed and "point estimate" not in first.reason


def test_without_incumbent_the_baseline_is_the_logged_reward(holdout: Log) -> None:
    cfg = GateConfig(estimator="dr")
    res = run(GOOD, None, holdout, cfg, name="logged policy")
    assert res.baseline == "logged policy"
    assert res.baseline_value == pytest.approx(holdout.reward.mean(), abs=1e-12)
    assert res.estimates["baseline_observed"] == res.baseline_value
    assert not any(k.startswith("baseline_") and k != "baseline_observed" for k in res.estimates)
    assert res.difference == pytest.approx(res.estimates["candidate_dr"] - holdout.reward.mean())
    # paired row by row with the reward the logging policy actually got
    dr_rows = ope.dr_terms(GOOD[holdout.x], holdout.chosen, holdout.prob, holdout.reward, Q_BIASED[holdout.x])
    paired = ope.estimate(dr_rows - holdout.reward, cfg.first_confidence)
    assert (res.lower, res.upper) == pytest.approx((paired.lower, paired.upper), abs=1e-12)
    assert res.confidence == cfg.first_confidence
    assert true_value(GOOD) > true_value(LOGGING) > true_value(BAD)
    assert res.passed and "vs logged policy" in res.reason
    assert not run(BAD, None, holdout, cfg, name="logged policy").passed


def test_a_first_model_is_judged_on_its_own_smaller_holdout_and_confidence(holdout: Log) -> None:
    cfg = GateConfig(estimator="dr", min_holdout=100, confidence=0.95, first_min_holdout=10, first_confidence=0.8)
    # the smallest prefix of the log on which the better policy beats the logging one at 80% but not at 95%
    for n in range(10, 100):
        small = Log(*(a[:n] for a in holdout))
        first = run(GOOD, None, small, cfg, name="logged policy")
        strict = run(GOOD, None, small, msgspec.structs.replace(cfg, first_confidence=0.95), name="logged policy")
        if first.passed and not strict.passed:
            break
    else:
        pytest.fail("no holdout size separates the two confidences")
    assert "at 80%" in first.reason and first.confidence == 0.8 and first.holdout_rows == n
    # an incumbent is still judged on the strict rule: the same rows are too few
    assert run(GOOD, BAD, small, cfg).reason == f"holdout has {n} rows, fewer than the 100 required: rejected"
    # a clearly worse first candidate is still rejected on the same rows, and a holdout under
    # first_min_holdout judges nothing
    assert not run(BAD, None, small, cfg, name="logged policy").passed
    tiny = run(GOOD, None, Log(*(a[:9] for a in holdout)), cfg, name="logged policy")
    assert tiny.reason == "holdout has 9 rows, fewer than the 10 required: rejected" and tiny.confidence == 0.8


def test_the_margin_lets_a_replacement_through_but_never_a_first_model(holdout: Log) -> None:
    # a candidate a little worse than its baseline: within a generous margin of an incumbent,
    # yet a first model must beat the logging policy outright, margin or not
    cfg = GateConfig(estimator="dr", margin=0.5, first_min_holdout=10, first_confidence=0.8)
    assert run(LOGGING, GOOD, holdout, cfg).passed
    first = run(BAD, None, holdout, cfg, name="logged policy")
    assert first.difference > -0.5 and not first.passed and first.margin == 0.0
    assert "≤ +0.000: rejected" in first.reason


def test_the_gentle_first_rule_rarely_promotes_a_policy_no_better_than_the_logging_one() -> None:
    # its risk, measured by simulation. On 5 rows a policy exactly as good as the logging one
    # passes about as often as the one-sided (1 - 0.8) / 2 = 10% allows, a worse one less often
    # still, and a better one far more often. On the 3 rows of the first run with a holdout (the
    # fewest the defaults judge) the normal interval is rougher: no better passes about 1 time in 7, and a
    # better one still three times as often; docs/learning.md and the config state these rates.
    cfg = GateConfig()
    rng = np.random.default_rng(11)

    def rate(policy: np.ndarray, rows: int) -> float:
        logs = [simulate(rng, rows) for _ in range(2000)]
        return float(np.mean([run(policy, None, log, cfg, name="logged policy").passed for log in logs]))

    assert true_value(BAD) < true_value(LOGGING) < true_value(GOOD)
    assert rate(LOGGING, 5) <= 0.15
    assert rate(BAD, 5) <= 0.07
    assert rate(GOOD, 5) >= 0.4
    assert cfg.first_min_holdout == 3
    assert rate(BAD, 3) <= 0.09
    assert rate(LOGGING, 3) <= 0.2
    assert rate(GOOD, 3) >= 0.38


def test_non_finite_candidate_is_rejected_and_the_result_stays_storable(holdout: Log) -> None:
    q_hat = Q_BIASED[holdout.x].copy()
    q_hat[7, 1] = np.nan
    res = gate.compare(
        GOOD[holdout.x], BAD[holdout.x], holdout.chosen, holdout.prob, holdout.reward, q_hat, GateConfig(), "v0003"
    )
    assert not res.passed and "not finite on 1 of 5000 rows" in res.reason
    # a GateResult goes into a JSON manifest: it must decode back to the same value
    assert msgspec.json.decode(msgspec.json.encode(res), type=GateResult) == res


def unseen_rows(training: dict, received_at: np.ndarray) -> np.ndarray | None:
    return gate.unseen_rows(msgspec.convert(training, Training), received_at)


def test_a_refit_incumbent_is_judged_only_on_rows_newer_than_its_snapshot() -> None:
    received_at = np.array([98.0, 99.0, 100.0, 100.0, 101.0, 102.5])
    # fit without its holdout, an incumbent has seen none of a later holdout
    assert unseen_rows({"train_rows": 80, "holdout_rows": 20, "window_end": 100.0}, received_at) is None
    assert unseen_rows({}, received_at) is None  # a manifest from before refits
    refit = {"train_rows": 80, "holdout_rows": 20, "refit": True, "window_end": 100.0}
    assert unseen_rows(refit, received_at).tolist() == [4, 5]
    assert unseen_rows({**refit, "window_end": 103.0}, received_at).tolist() == []


# ---- target probabilities --------------------------------------------------------------------

STRATEGIES = [
    ExplorationConfig(strategy="epsilon_greedy", epsilon=0.3),
    ExplorationConfig(strategy="softmax", temperature=0.5, epsilon_min=0.05),
    ExplorationConfig(strategy="ucb", epsilon=0.2, ucb_c=2.0),
    ExplorationConfig(strategy="squarecb", gamma=5.0),
]


@pytest.mark.parametrize("cfg", STRATEGIES, ids=lambda c: c.strategy)
def test_target_probs_explore_over_valid_actions_only(cfg: ExplorationConfig) -> None:
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(50, 5))
    spread = rng.random((50, 5))
    mask = rng.random((50, 5)) < 0.7
    mask[:, 0] = True
    mask[0] = [True, False, False, False, False]
    scores[~mask] = 100.0  # padding that would win every argmax if it were let in
    p = gate.target_probs(cfg, scores, spread, mask, t=3)
    assert p.shape == (50, 5)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert (p[~mask] == 0).all()
    assert (p[mask] > 0).all()
    np.testing.assert_array_equal(p[0], [1.0, 0, 0, 0, 0])
    for i in range(50):
        expected = exploring.probabilities(cfg, scores[i, mask[i]], spread[i, mask[i]], 3)
        np.testing.assert_allclose(p[i, mask[i]], expected)


def test_target_probs_epsilon_greedy_by_hand() -> None:
    cfg = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.3)
    scores = np.array([[0.1, 0.9, 5.0], [0.7, 0.2, 0.4]])
    mask = np.array([[True, True, False], [True, True, True]])
    p = gate.target_probs(cfg, scores, None, mask)
    # row 0: two valid actions, 0.3/2 each, best (index 1) gets +0.7; row 1: 0.1 each, index 0 +0.7
    np.testing.assert_allclose(p, [[0.15, 0.85, 0.0], [0.8, 0.1, 0.1]])


def test_target_probs_refuses_a_row_without_actions() -> None:
    with pytest.raises(ValueError, match="at least one valid action"):
        gate.target_probs(ExplorationConfig(), np.zeros((2, 2)), None, np.array([[True, False], [False, False]]))


# ---- evaluate: the glue over scorers and a holdout batch -------------------------------------


class FakeScorer:
    """Scores a one-hot context against one-hot actions through a [K, A] table, like a trained model would."""

    def __init__(
        self,
        version: str,
        table: np.ndarray,
        spec: FeatureSpec,
        train_rows: int = 0,
        context_order: np.ndarray | None = None,
    ) -> None:
        self.version = version
        self.table = table if context_order is None else table[context_order]
        self.manifest = SimpleNamespace(features=spec, training=Training(train_rows=train_rows))

    def score_batch(self, context: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = np.einsum("nk,ka,nja->nj", context, self.table, actions).astype(np.float32)
        # whatever a model makes of a padded (all-zero) action, even NaN, must not reach the estimate
        scores[~actions.any(axis=2)] = np.nan
        return scores, np.zeros_like(scores)


SPEC = FeatureSpec(context_dim=K, action_dim=A)


def as_batch(log: Log, context_order: np.ndarray | None = None) -> SimpleNamespace:
    """The log as a dataset.Batch would hold it: one-hot contexts, one-hot actions plus a padded slot."""
    n = len(log.x)
    columns = log.x if context_order is None else np.argsort(context_order)[log.x]
    context = np.zeros((n, K), dtype=np.float32)
    context[np.arange(n), columns] = 1.0
    actions = np.zeros((n, A + 1, A), dtype=np.float32)
    actions[:, np.arange(A), np.arange(A)] = 1.0
    mask = np.zeros((n, A + 1), dtype=bool)
    mask[:, :A] = True
    ids = [f"d{i}" for i in range(n)]
    return SimpleNamespace(
        ids=ids, context=context, actions=actions, mask=mask, chosen=log.chosen, prob=log.prob, reward=log.reward
    )


def test_evaluate_promotes_the_better_model(holdout: Log) -> None:
    explore = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.1)
    good, bad = FakeScorer("v0004", MU, SPEC), FakeScorer("v0003", -MU, SPEC)
    batch = as_batch(holdout)
    res = gate.evaluate(good, bad, batch, explore, GateConfig(estimator="dr"))
    assert res.passed and res.baseline == "incumbent v0003"
    # the fakes' epsilon-greedy policies are GOOD and BAD; q_hat is the candidate's scores (MU)
    assert res.difference == pytest.approx(true_value(GOOD) - true_value(BAD), abs=0.05)
    assert res.estimates["candidate_dm"] == pytest.approx(true_value(GOOD), abs=0.02)
    assert not gate.evaluate(bad, good, batch, explore, GateConfig(estimator="dr")).passed
    alone = gate.evaluate(good, None, batch, explore, GateConfig(estimator="dr"))
    assert alone.passed and alone.baseline == "logged policy"
    assert alone.baseline_value == pytest.approx(holdout.reward.mean())


def test_a_cross_fitted_learner_is_judged_on_its_out_of_fold_scores_by_the_first_model_rule() -> None:
    log = simulate(np.random.default_rng(9), 400)
    explore = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.1)

    def judged(table: np.ndarray, log: Log = log, cfg: GateConfig = GateConfig()) -> GateResult:
        rows = as_batch(log)
        scores = np.full(rows.mask.shape, 99.0)  # a padded slot that would win if it were not left out
        scores[:, :A] = table[log.x]
        return gate.evaluate_cross_fit(rows, scores, np.zeros_like(scores), explore, cfg)

    good = judged(MU)
    assert good.passed and good.baseline == "logged policy" and good.holdout_rows == 400
    assert good.estimates["candidate_dm"] == pytest.approx(true_value(GOOD), abs=0.02)  # MU's own epsilon-greedy
    assert good.confidence == GateConfig().first_confidence and good.margin == 0.0
    assert good.reason.endswith("(cross-fitted: each of the 400 rows scored by the learner fit without it)")
    assert good.refit_rows == 400  # what goes live is the learner fit on every row
    bad = judged(-MU)
    assert not bad.passed and bad.refit_rows == 0
    # the rows are few by design, but never fewer than a first model's holdout
    few = Log(*(column[:3] for column in log))
    assert "fewer than the 4 required" in judged(MU, few, GateConfig(first_min_holdout=4)).reason


def test_a_cross_fitted_policy_is_judged_as_deployed_at_its_rows_on_the_clock() -> None:
    # SquareCB sharpens with t: the policy judged is the one a client starts at t = the rows
    log = simulate(np.random.default_rng(4), 300)
    rows = as_batch(log)
    explore = ExplorationConfig(strategy="squarecb", gamma=2.0)
    scores = np.zeros(rows.mask.shape)
    scores[:, :A] = MU[log.x]
    found = gate.evaluate_cross_fit(rows, scores, np.zeros_like(scores), explore, GateConfig())

    def dr_value(t: int) -> float:
        pi = gate.target_probs(explore, scores, None, rows.mask, t)
        return float(ope.dr_terms(pi, log.chosen, log.prob, log.reward, scores).mean())

    assert found.candidate_value == pytest.approx(dr_value(300), abs=1e-12)
    assert abs(dr_value(300) - dr_value(0)) > 0.05


def test_a_cross_fitted_run_replaces_only_a_model_cross_fitted_on_no_more_rows() -> None:
    log = simulate(np.random.default_rng(9), 8)
    rows = as_batch(log)
    scores = np.zeros(rows.mask.shape)
    scores[:, :A] = MU[log.x]

    def judged(training: dict) -> GateResult:
        incumbent = SimpleNamespace(version="v0003", manifest=SimpleNamespace(training=msgspec.convert(training, Training)))
        return gate.evaluate_cross_fit(rows, scores, np.zeros_like(scores), ExplorationConfig(), GateConfig(), incumbent)

    fresh = gate.evaluate_cross_fit(rows, scores, np.zeros_like(scores), ExplorationConfig(), GateConfig())
    earlier = judged({"train_rows": 6, "holdout_rows": 0, "refit": True, "cross_fitted": True})
    # the same verdict as with no model live: against the logging policy, on all 8 rows
    assert earlier.baseline == "logged policy" and earlier.reason == fresh.reason
    for training, what in [
        ({"train_rows": 4000, "holdout_rows": 1000, "refit": False}, "came from a run with a holdout"),
        ({"train_rows": 10, "holdout_rows": 0, "refit": True, "cross_fitted": True}, "was cross-fitted on 10"),
    ]:
        kept = judged(training)
        assert not kept.passed and kept.baseline == "incumbent v0003", kept
        assert kept.reason.endswith(f"incumbent v0003 {what}: rejected"), kept.reason


def test_evaluate_judges_each_policy_as_deployed_after_its_training(holdout: Log) -> None:
    # SquareCB sharpens with t, and a freshly loaded model starts at t = its training rows
    explore = ExplorationConfig(strategy="squarecb", gamma=2.0)
    incumbent = FakeScorer("v0003", MU[:, ::-1].copy(), SPEC, train_rows=50)
    batch = as_batch(holdout)
    res = gate.evaluate(FakeScorer("v0004", MU, SPEC, train_rows=10_000), incumbent, batch, explore, GateConfig())
    valid = np.ones((len(holdout.x), A), dtype=bool)
    pad = np.zeros((len(holdout.x), 1))
    expected = gate.compare(
        np.hstack([gate.target_probs(explore, MU[holdout.x], None, valid, t=10_000), pad]),
        np.hstack([gate.target_probs(explore, MU[:, ::-1][holdout.x], None, valid, t=50), pad]),
        holdout.chosen,
        holdout.prob,
        holdout.reward,
        np.hstack([MU[holdout.x], pad]),
        GateConfig(),
        "incumbent v0003",
    )
    for field in ("candidate_value", "baseline_value", "lower", "upper"):
        assert getattr(res, field) == pytest.approx(getattr(expected, field), rel=1e-6), field
    untrained = gate.evaluate(FakeScorer("v0004", MU, SPEC, train_rows=0), incumbent, batch, explore, GateConfig())
    assert res.candidate_value - untrained.candidate_value > 0.1


def test_evaluate_needs_the_incumbents_own_features_when_specs_differ(holdout: Log) -> None:
    explore = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.1)
    other = FeatureSpec(context_dim=K, action_dim=A, seed=7)
    order = np.array([3, 0, 5, 1, 4, 2])  # the incumbent's hashing puts each context type in another column
    candidate = FakeScorer("v0004", MU, SPEC)
    incumbent = FakeScorer("v0003", -MU, other, context_order=order)
    batch = as_batch(holdout)
    with pytest.raises(ValueError, match="incumbent_holdout"):
        gate.evaluate(candidate, incumbent, batch, explore, GateConfig())
    rehashed = as_batch(holdout, context_order=order)
    res = gate.evaluate(candidate, incumbent, batch, explore, GateConfig(), incumbent_holdout=rehashed)
    same_spec = gate.evaluate(candidate, FakeScorer("v0003", -MU, SPEC), batch, explore, GateConfig())
    assert res == same_spec
    shuffled = SimpleNamespace(**{**vars(rehashed), "ids": rehashed.ids[::-1]})
    with pytest.raises(ValueError, match="same order"):
        gate.evaluate(candidate, incumbent, batch, explore, GateConfig(), incumbent_holdout=shuffled)


def test_a_refit_goes_live_unless_it_does_worse_than_its_candidate_on_the_holdout(holdout: Log) -> None:
    explore, cfg = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.1), GateConfig()
    batch = as_batch(holdout)
    candidate = FakeScorer("candidate", MU, SPEC)
    verdict = gate.evaluate(candidate, FakeScorer("v0003", -MU, SPEC), batch, explore, cfg)
    assert verdict.passed

    # as good as its candidate (the same policy): no interval is asked for, the point estimate will do
    same = gate.check_refit(FakeScorer("refit", MU, SPEC), candidate, batch, explore, cfg)
    assert same.passed and same.difference == 0.0 and "difference +0.000 ≥ -0.020" in same.reason
    kept = gate.with_refit(verdict, same, 25_000)
    assert kept.passed and kept.refit_rows == 25_000 and kept.difference == verdict.difference
    assert kept.reason.startswith(verdict.reason) and "; went live refit on all 25000 rows (refit " in kept.reason

    # a refit that does worse than the candidate on rows it was fit on went wrong: the candidate goes live
    worse = gate.check_refit(FakeScorer("refit", -MU, SPEC), candidate, batch, explore, cfg)
    assert not worse.passed and worse.difference < -cfg.margin
    dropped = gate.with_refit(verdict, worse, 25_000)
    assert dropped.passed and dropped.refit_rows == 0 and dropped.reason.endswith("so the candidate went live")

    # so does one whose output is not finite
    broken = gate.check_refit(FakeScorer("refit", MU * np.nan, SPEC), candidate, batch, explore, cfg)
    assert not broken.passed and "not finite" in broken.reason
    assert msgspec.json.decode(msgspec.json.encode(kept), type=GateResult) == kept


def test_the_incumbent_is_judged_with_its_own_exploration(holdout: Log) -> None:
    batch = as_batch(holdout)
    explore = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.1, epsilon_min=0.0)
    candidate = FakeScorer("v0004", MU, SPEC)
    incumbent = FakeScorer("v0003", MU, SPEC)  # the same model...
    same = gate.evaluate(candidate, incumbent, batch, explore, GateConfig())
    # ...but deployed exploring uniformly, which the gate must charge it for
    uniform = ExplorationConfig(strategy="epsilon_greedy", epsilon=1.0, epsilon_min=0.0)
    judged = gate.evaluate(candidate, incumbent, batch, explore, GateConfig(), incumbent_exploration=uniform)
    assert same.difference == pytest.approx(0.0, abs=1e-12)
    assert judged.baseline_value < same.baseline_value and judged.difference > 0


def test_in_a_shared_line_the_served_spread_leaves_out_the_agents_id_as_the_head_does() -> None:
    """A shared line's models read the agent's id as one more context key; the online head beside
    them reads the context alone, so the spread it hands exploration is that of the context alone."""
    from reflexd.config import OnlineConfig
    from reflexd.deciding.online import OnlineHead
    from reflexd.features import Hasher, with_agent

    shared = FeatureSpec(context_dim=16, action_dim=8, agent=True)
    online, cfg = OnlineConfig(model_prior=40.0), ExplorationConfig(strategy="linucb")
    head = OnlineHead(online, FeatureSpec(context_dim=16, action_dim=8))
    head.follow("v0001")
    rng = np.random.default_rng(5)
    contexts = [{"task": str(rng.choice(["x", "y"])), "size": float(rng.integers(1, 500))} for _ in range(12)]
    agents = ["router" if i % 2 else "coder" for i in range(12)]
    hasher = Hasher(shared)
    context = np.stack([hasher.context(with_agent(shared, a, c)) for a, c in zip(agents, contexts)])
    scores = rng.normal(0.5, 0.3, (12, 2))
    served = gate.served_spread(cfg, online, context, scores, np.zeros((12, 2)), shared, agents)
    for i, (a, c) in enumerate(zip(agents, contexts)):
        want = head.spread(a, head.features(c), ["p", "q"], scores[i].tolist(), noise=True)
        np.testing.assert_allclose(served[i], want, rtol=1e-6)
    assert not np.allclose(gate.served_spread(cfg, online, context, scores, np.zeros((12, 2))), served)


def test_each_agents_rows_are_judged_as_its_own_clients_explore(holdout: Log) -> None:
    """An agent with exploration settings of its own (``agents:`` in the config, the manifest's
    ``agent_exploration``) is served by them: the gate judges its rows by them, the others' rows
    by the global settings, for the candidate and for the incumbent."""
    batch = as_batch(holdout)
    batch.agents = ["cautious" if i % 3 == 0 else "router" for i in range(len(batch.ids))]
    greedy = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.05, epsilon_min=0.0)
    uniform = ExplorationConfig(strategy="epsilon_greedy", epsilon=1.0, epsilon_min=0.0)
    own = {"cautious": uniform}

    def exploration_for(agent: str) -> ExplorationConfig:
        return own.get(agent, greedy)

    candidate, incumbent = FakeScorer("v0004", MU, SPEC), FakeScorer("v0003", -MU, SPEC)
    judged = gate.evaluate(candidate, incumbent, batch, exploration_for, GateConfig(), incumbent_exploration=exploration_for)
    scores = {name: s.score_batch(batch.context, batch.actions)[0] for name, s in (("c", candidate), ("i", incumbent))}
    pi = {
        name: np.stack([
            np.append(exploring.probabilities(exploration_for(agent), scores[name][i, :A], None, 0), 0.0)
            for i, agent in enumerate(batch.agents)
        ])
        for name in scores
    }
    q_hat = np.where(batch.mask, scores["c"], 0.0)
    want = gate.compare(pi["c"], pi["i"], batch.chosen, batch.prob, batch.reward, q_hat, GateConfig(), "incumbent v0003")
    assert judged.difference == pytest.approx(want.difference, abs=1e-12)
    assert judged.candidate_value == pytest.approx(want.candidate_value, abs=1e-12)
    # judged with the global settings for every row, the cautious agent's exploring is not charged
    everyone = gate.evaluate(candidate, incumbent, batch, greedy, GateConfig(), incumbent_exploration=greedy)
    assert everyone.candidate_value > judged.candidate_value + 0.01
    with pytest.raises(ValueError, match="each row's agent"):
        gate.deployed_probs(exploration_for, [], batch.context, scores["c"], scores["c"], batch.mask, 0)


@pytest.mark.parametrize("strategy", ["thompson", "linucb", "squarecb"])
def test_the_gate_judges_a_model_with_the_spread_its_clients_explore_by(strategy):
    """Beside a model just promoted, a client exploring by the online head's posterior hands the
    strategy the spread of a head started afresh beside it; the gate judges that policy."""
    from reflexd.config import OnlineConfig
    from reflexd.deciding.online import OnlineHead

    cfg, online = ExplorationConfig(strategy=strategy), OnlineConfig(model_prior=40.0)
    spec = FeatureSpec(context_dim=16, action_dim=8)
    rng = np.random.default_rng(4)
    head = OnlineHead(online, spec)
    head.follow("v0001")
    ids = ["a", "b", "c"]
    contexts = [{"task": str(rng.choice(["x", "y"])), "size": float(rng.integers(1, 500))} for _ in range(20)]
    context = np.stack([head.features(c)[:-2] for c in contexts]).astype(np.float32)
    scores = rng.normal(0.5, 0.3, (20, 3))
    model_spread = rng.uniform(0.01, 0.2, (20, 3))
    mask = np.ones((20, 3), dtype=bool)
    served = gate.served_spread(cfg, online, context, scores, model_spread)
    got = gate.target_probs(cfg, scores, served, mask, 500)
    for i, c in enumerate(contexts):
        x = head.features(c)
        model = scores[i].tolist()
        spread = head.spread("agent", x, ids, model, noise=True) if strategy != "squarecb" else model_spread[i]
        want = exploring.distribution(cfg, head.means("agent", x, ids, model), spread, 500)
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12)
    # without the head, clients explore by the model's own spread
    assert gate.served_spread(cfg, OnlineConfig(enabled=False), context, scores, model_spread) is model_spread
    # reflexd evaluate and the rollback monitor judge it the same way, agent by agent
    from reflexd.learning import evaluate as ev

    agents = ["agent"] * 10 + ["other"] * 10
    own = {"other": ExplorationConfig(strategy="epsilon_greedy", epsilon=0.2)}
    probs = ev.model_probs(scores, model_spread, mask, agents, lambda a: own.get(a, cfg), 500, context, online)
    np.testing.assert_allclose(probs[:10], got[:10], rtol=1e-9, atol=1e-12)
    other = gate.target_probs(own["other"], scores[10:], model_spread[10:], mask[10:], 500)
    np.testing.assert_allclose(probs[10:], other, rtol=1e-9, atol=1e-12)
    if strategy == "thompson":  # without the rows' context, the model's spread, as before
        alone = ev.model_probs(scores, model_spread, mask, agents, lambda a: cfg, 500)
        assert not np.allclose(alone[:10], got[:10])

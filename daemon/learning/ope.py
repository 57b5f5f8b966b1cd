"""Off-policy estimators: the value of any policy on rows another policy logged.

Every logged decision carries the exact probability its action was chosen with, so the value of
any other policy can be estimated on the same rows without deploying it:

- IPS weighs each observed reward by w = pi(chosen | x) / prob: unbiased, high variance.
- SNIPS divides by the sum of the weights instead of N: slightly biased, much steadier when the
  weights are heavy; its interval comes from the delta method (the linearised per-row terms).
- DM trusts a reward model q_hat: sum_a pi(a | x) q_hat(x, a). Low variance, biased by q_hat's errors.
- DR is DM plus the IPS-weighted residual of q_hat on the chosen action: unbiased whenever the
  propensities are right, and as steady as q_hat is good.

Each estimator is the mean of per-row terms, so its standard error and normal interval come from
those terms, and comparing two policies on the same rows is the mean of per-row differences
(a paired comparison, far tighter than two independent intervals).

Arrays throughout: ``pi`` and ``q_hat`` are float [N, A] with ``pi`` zero on padded actions,
``chosen`` int [N] indexes the logged action, ``prob`` float [N] is its logged propensity and
``reward`` float [N] its reward.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable

import msgspec
import numpy as np


class Estimate(msgspec.Struct, frozen=True):
    """A policy value with its standard error and two-sided normal interval."""

    value: float
    stderr: float
    lower: float
    upper: float


# An identical candidate's differences are all zero, yet their interval's lower bound can come
# out as -1e-17; what is below this is rounding, not evidence.
ROUNDING = 1e-12


def z_score(confidence: float) -> float:
    """The normal quantile of a two-sided interval at ``confidence``."""
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def estimate(terms: np.ndarray, confidence: float = 0.95) -> Estimate:
    """The mean of per-row terms with a normal interval at ``confidence`` (two-sided)."""
    n = terms.shape[0]
    if n < 2:
        raise ValueError(f"an interval needs at least 2 rows, got {n}")
    value = float(terms.mean())
    stderr = float(terms.std(ddof=1)) / math.sqrt(n)
    half = z_score(confidence) * stderr
    return Estimate(value=value, stderr=stderr, lower=value - half, upper=value + half)


def _weights(pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray) -> np.ndarray:
    if not (pi.ndim == 2 and chosen.shape == prob.shape == (pi.shape[0],)):
        raise ValueError(f"shapes disagree: pi {pi.shape}, chosen {chosen.shape}, prob {prob.shape}")
    if not np.all(prob > 0.0):  # also false for NaN
        raise ValueError("every logged propensity must be positive: the action was sampled with it")
    return pi[np.arange(pi.shape[0]), chosen] / prob


def ips_terms(pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray) -> np.ndarray:
    return _weights(pi, chosen, prob) * reward


def snips_terms(pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """Linearised SNIPS: V + w (r - V) / mean(w); their mean is exactly V = sum(w r) / sum(w).

    The spread of these terms is the delta-method variance of the ratio estimator.
    """
    w = _weights(pi, chosen, prob)
    mean_w = w.mean()
    if mean_w == 0.0:
        raise ValueError("SNIPS is undefined: the target policy puts no weight on any logged action")
    value = (w * reward).sum() / w.sum()
    return value + w * (reward - value) / mean_w


def dm_terms(pi: np.ndarray, q_hat: np.ndarray) -> np.ndarray:
    if q_hat.shape != pi.shape:
        raise ValueError(f"q_hat {q_hat.shape} and pi {pi.shape} disagree")
    return (pi * q_hat).sum(axis=1)


def dr_terms(
    pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray, q_hat: np.ndarray
) -> np.ndarray:
    w = _weights(pi, chosen, prob)
    return dm_terms(pi, q_hat) + w * (reward - q_hat[np.arange(pi.shape[0]), chosen])


def ips(pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray, confidence: float = 0.95) -> Estimate:
    return estimate(ips_terms(pi, chosen, prob, reward), confidence)


def snips(
    pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray, confidence: float = 0.95
) -> Estimate:
    return estimate(snips_terms(pi, chosen, prob, reward), confidence)


def dm(pi: np.ndarray, q_hat: np.ndarray, confidence: float = 0.95) -> Estimate:
    """The direct method's interval reflects only the spread over contexts, never q_hat's bias."""
    return estimate(dm_terms(pi, q_hat), confidence)


def dr(
    pi: np.ndarray,
    chosen: np.ndarray,
    prob: np.ndarray,
    reward: np.ndarray,
    q_hat: np.ndarray,
    confidence: float = 0.95,
) -> Estimate:
    return estimate(dr_terms(pi, chosen, prob, reward, q_hat), confidence)


_Terms = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# every estimator as per-row terms of one signature (pi, chosen, prob, reward, q_hat)
ESTIMATORS: dict[str, _Terms] = {
    "ips": lambda pi, chosen, prob, reward, q_hat: ips_terms(pi, chosen, prob, reward),
    "snips": lambda pi, chosen, prob, reward, q_hat: snips_terms(pi, chosen, prob, reward),
    "dm": lambda pi, chosen, prob, reward, q_hat: dm_terms(pi, q_hat),
    "dr": dr_terms,
}

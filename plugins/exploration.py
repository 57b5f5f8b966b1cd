"""Exploration strategies: turn a model's scores into the probabilities an agent samples from.

Exploration runs in the client on the model's scores, so the probability logged with each
decision is exactly the one used to sample. Every strategy keeps each action's probability
above zero where it can, because off-policy evaluation divides by it.

The strategies work on plain float sequences: one decision offers a handful of actions, for
which Python floats cost a fraction of numpy's per-call overhead (``distribution`` is on every
decision's path). ``probabilities`` and ``fallback`` give the same numbers as arrays.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from math import exp
from typing import Protocol, Sequence

import numpy as np


class ExplorationSettings(Protocol):
    strategy: str
    epsilon: float
    epsilon_min: float
    decay: float
    temperature: float
    ucb_c: float
    gamma: float
    gamma_exponent: float


def epsilon_at(cfg: ExplorationSettings, t: int) -> float:
    """Epsilon after ``t`` decisions: epsilon / (1 + decay·t), floored at epsilon_min."""
    return max(cfg.epsilon_min, cfg.epsilon / (1.0 + cfg.decay * t))


def _floats(values: Sequence[float]) -> list[float]:
    # Python floats whatever came in: a float32 array's own scalars would do float32 math
    return values if type(values) is list else np.asarray(values).tolist()


def _argmax(values: list[float]) -> int:
    return values.index(max(values))  # the first of ties, as numpy's argmax


def _greedy(n: int, best: int, eps: float) -> list[float]:
    p = [eps / n] * n
    p[best] += 1.0 - eps
    return p


def distribution(
    cfg: ExplorationSettings, scores: Sequence[float], spread: Sequence[float] | None = None, t: int = 0
) -> list[float]:
    """The distribution over actions for one decision, given the model's scores (higher is better)."""
    scores = _floats(scores)
    n = len(scores)
    if n == 1:
        return [1.0]
    strategy = cfg.strategy
    if strategy == "epsilon_greedy":
        return _greedy(n, _argmax(scores), epsilon_at(cfg, t))
    if strategy == "ucb":
        if spread is not None:
            c = cfg.ucb_c
            scores = [s + c * u for s, u in zip(scores, _floats(spread))]
        return _greedy(n, _argmax(scores), epsilon_at(cfg, t))
    if strategy == "softmax":
        top = max(scores)
        temperature = cfg.temperature
        e = [exp((s - top) / temperature) for s in scores]
        total = sum(e)
        floor = cfg.epsilon_min
        return [(1.0 - floor) * x / total + floor / n for x in e]
    if strategy == "squarecb":
        gamma = cfg.gamma * (t + 1) ** cfg.gamma_exponent
        best = _argmax(scores)
        top = scores[best]
        p = [1.0 / (n + gamma * (top - s)) for s in scores]
        p[best] = 0.0
        p[best] = 1.0 - sum(p)
        return p
    raise ValueError(f"unknown exploration strategy {strategy!r}")


def probabilities(
    cfg: ExplorationSettings, scores: np.ndarray, spread: np.ndarray | None = None, t: int = 0
) -> np.ndarray:
    """``distribution`` as an array."""
    return np.array(distribution(cfg, scores, spread, t))


def default_distribution(cfg: ExplorationSettings, n: int, default_index: int | None, t: int = 0) -> list[float]:
    """No model yet: the configured default action with epsilon exploration, else uniform."""
    if default_index is None or n == 1:
        return [1.0 / n] * n
    return _greedy(n, default_index, epsilon_at(cfg, t))


def fallback(cfg: ExplorationSettings, n: int, default_index: int | None, t: int = 0) -> np.ndarray:
    """``default_distribution`` as an array."""
    return np.array(default_distribution(cfg, n, default_index, t))


def sample(p: Sequence[float], u: float) -> int:
    """Index drawn from ``p`` by inverse CDF at uniform ``u`` in [0, 1)."""
    cdf = list(accumulate(p))
    # scaling u by the cdf's own last value keeps rounding from landing past the last p > 0
    return bisect_right(cdf, u * cdf[-1])

"""Exploration strategies: turn a model's scores into the probabilities an agent samples from.

Exploration runs in the client on the model's scores, so the probability logged with each
decision is exactly the one used to sample. Every strategy keeps each action's probability
above zero where it can, because off-policy evaluation divides by it.
"""

from __future__ import annotations

from typing import Protocol

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


def _greedy(values: np.ndarray, eps: float) -> np.ndarray:
    n = values.shape[0]
    p = np.full(n, eps / n)
    p[int(np.argmax(values))] += 1.0 - eps
    return p


def probabilities(
    cfg: ExplorationSettings, scores: np.ndarray, spread: np.ndarray | None = None, t: int = 0
) -> np.ndarray:
    """The distribution over actions for one decision, given the model's scores (higher is better)."""
    n = scores.shape[0]
    if n == 1:
        return np.ones(1)
    strategy = cfg.strategy
    if strategy == "epsilon_greedy":
        return _greedy(scores, epsilon_at(cfg, t))
    if strategy == "ucb":
        bonus = cfg.ucb_c * spread if spread is not None else 0.0
        return _greedy(scores + bonus, epsilon_at(cfg, t))
    if strategy == "softmax":
        z = (scores - scores.max()) / cfg.temperature
        e = np.exp(z)
        floor = cfg.epsilon_min
        return (1.0 - floor) * e / e.sum() + floor / n
    if strategy == "squarecb":
        gamma = cfg.gamma * (t + 1) ** cfg.gamma_exponent
        best = int(np.argmax(scores))
        p = 1.0 / (n + gamma * (scores[best] - scores))
        p[best] = 0.0
        p[best] = 1.0 - p.sum()
        return p
    raise ValueError(f"unknown exploration strategy {strategy!r}")


def fallback(cfg: ExplorationSettings, n: int, default_index: int | None, t: int = 0) -> np.ndarray:
    """No model yet: the configured default action with epsilon exploration, else uniform."""
    if default_index is None or n == 1:
        return np.full(n, 1.0 / n)
    eps = epsilon_at(cfg, t)
    p = np.full(n, eps / n)
    p[default_index] += 1.0 - eps
    return p


def sample(p: np.ndarray, u: float) -> int:
    """Index drawn from ``p`` by inverse CDF at uniform ``u`` in [0, 1)."""
    cdf = np.cumsum(p)
    # scaling u by the cdf's own last value keeps rounding from landing past the last p > 0
    return int(np.searchsorted(cdf, u * cdf[-1], side="right"))

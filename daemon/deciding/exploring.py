"""Exploration: from a model's scores to the probabilities a decision samples from.

The strategies themselves are plugins (entry-point group ``reflexd.exploration``), looked up by
the name in the model's manifest and kept once loaded. What is common to them all lives here: the
no-model fallback, epsilon's decay and the draw.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from typing import Protocol, Sequence

import numpy as np

from reflexd.extensions import load_explorer


class ExplorationSettings(Protocol):
    strategy: str
    epsilon: float
    epsilon_min: float
    decay: float
    temperature: float
    ucb_c: float
    gamma: float
    gamma_exponent: float


# Strategies handed the online head's posterior spread in reward units, beside a live model too
# (whose own spread is its ensemble's disagreement): the head's stays wide where it has seen few
# rewards, and falls as they come. Before any model, ``ucb`` is handed the head's spread at a noise
# of 1, as it always was; other strategies none, which spares computing it on every decision.
# Without a head, the model's.
HEAD_SPREAD = frozenset({"igw_z", "linucb", "thompson"})


def spread_from(strategy: str, model: bool) -> str | None:
    """Whose spread exploration by ``strategy`` is handed: "head" (the online head's posterior,
    times each action's estimated reward noise), "head at unit noise", "model" (the live model's),
    or None; ``model``: whether a live model scored the decision."""
    if strategy in HEAD_SPREAD:
        return "head"
    if model:
        return "model"
    return "head at unit noise" if strategy == "ucb" else None


def epsilon_at(cfg: ExplorationSettings, t: int) -> float:
    """Epsilon after ``t`` decisions: epsilon / (1 + decay·t), floored at epsilon_min."""
    return max(cfg.epsilon_min, cfg.epsilon / (1.0 + cfg.decay * t))


def floats(values: Sequence[float]) -> list[float]:
    # Python floats whatever came in: a float32 array's own scalars would do float32 math
    return values if type(values) is list else np.asarray(values).tolist()


def argmax(values: list[float]) -> int:
    return values.index(max(values))  # the first of ties, as numpy's argmax


def greedy(n: int, best: int, eps: float) -> list[float]:
    p = [eps / n] * n
    p[best] += 1.0 - eps
    return p


def distribution(
    cfg: ExplorationSettings, scores: Sequence[float], spread: Sequence[float] | None = None, t: int = 0
) -> list[float]:
    """The distribution over actions for one decision, given the model's scores (higher is better)."""
    scores = floats(scores)
    if len(scores) == 1:
        return [1.0]
    return load_explorer(cfg.strategy)(cfg, scores, None if spread is None else floats(spread), t)


def probabilities(
    cfg: ExplorationSettings, scores: np.ndarray, spread: np.ndarray | None = None, t: int = 0
) -> np.ndarray:
    """``distribution`` as an array."""
    return np.array(distribution(cfg, scores, spread, t))


def default_distribution(cfg: ExplorationSettings, n: int, default_index: int | None, t: int = 0) -> list[float]:
    """No model yet: the configured default action with epsilon exploration, else uniform."""
    if default_index is None or n == 1:
        return [1.0 / n] * n
    return greedy(n, default_index, epsilon_at(cfg, t))


def fallback(cfg: ExplorationSettings, n: int, default_index: int | None, t: int = 0) -> np.ndarray:
    """``default_distribution`` as an array."""
    return np.array(default_distribution(cfg, n, default_index, t))


def sample(p: Sequence[float], u: float) -> int:
    """Index drawn from ``p`` by inverse CDF at uniform ``u`` in [0, 1)."""
    cdf = list(accumulate(p))
    # scaling u by the cdf's own last value keeps rounding from landing past the last p > 0
    return bisect_right(cdf, u * cdf[-1])

"""Built-in exploration strategies, registered in the ``reflexd.exploration`` entry-point group.

Each turns one decision's scores (higher is better) into the distribution the client samples
from, so the probability logged with a decision is exactly the one used. They work on plain
float lists: one decision offers a handful of actions, for which Python floats cost a fraction of
numpy's per-call overhead, and a strategy runs on every decision. The contract they meet is
``reflexd.extensions.Explorer``.
"""

from __future__ import annotations

from math import exp
from typing import Sequence

from reflexd.deciding.exploring import ExplorationSettings, argmax, epsilon_at, greedy


def epsilon_greedy(cfg: ExplorationSettings, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]:
    """The best action with 1 - ε, every action with ε / n; ε decays with ``t``."""
    return greedy(len(scores), argmax(scores), epsilon_at(cfg, t))


def ucb(cfg: ExplorationSettings, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]:
    """Epsilon-greedy on optimistic scores: each score plus ``ucb_c`` times the model's spread."""
    if spread is not None:
        c = cfg.ucb_c
        scores = [s + c * u for s, u in zip(scores, spread)]
    return greedy(len(scores), argmax(scores), epsilon_at(cfg, t))


def softmax(cfg: ExplorationSettings, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]:
    """Boltzmann exploration at ``temperature``, with ``epsilon_min`` spread uniformly as a floor."""
    top = max(scores)
    temperature = cfg.temperature
    e = [exp((s - top) / temperature) for s in scores]
    total = sum(e)
    floor = cfg.epsilon_min
    n = len(scores)
    return [(1.0 - floor) * x / total + floor / n for x in e]


def squarecb(cfg: ExplorationSettings, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]:
    """Inverse gap weighting (Foster & Rakhlin): 1 / (n + γ·gap) each, the rest to the best."""
    n = len(scores)
    gamma = cfg.gamma * (t + 1) ** cfg.gamma_exponent
    best = argmax(scores)
    top = scores[best]
    p = [1.0 / (n + gamma * (top - s)) for s in scores]
    p[best] = 0.0
    p[best] = 1.0 - sum(p)
    return p

"""Built-in exploration strategies, registered in the ``reflexd.exploration`` entry-point group.

Each turns one decision's scores (higher is better) into the distribution the client samples
from, so the probability logged with a decision is exactly the one used. They work on plain
float lists: one decision offers a handful of actions, for which Python floats cost a fraction of
numpy's per-call overhead, and a strategy runs on every decision (``thompson`` alone integrates,
in numpy). The contract they meet is ``reflexd.extensions.Explorer``. ``linucb`` is ``ucb``
registered under a second name: the chooser hands it, as ``thompson`` and ``igw_z``, the online
head's posterior spread (``reflexd.deciding.exploring.HEAD_SPREAD``).
"""

from __future__ import annotations

from functools import cache
from math import erfc, exp, hypot, isfinite, sqrt
from typing import Sequence

import numpy as np

from reflexd.deciding.exploring import ExplorationSettings, argmax, epsilon_at, greedy


def epsilon_greedy(cfg: ExplorationSettings, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]:
    """The best action with 1 - ε, every action with ε / n; ε decays with ``t``."""
    return greedy(len(scores), argmax(scores), epsilon_at(cfg, t))


def ucb(cfg: ExplorationSettings, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]:
    """Epsilon-greedy on optimistic scores: each score plus ``ucb_c`` times its spread (the live
    model's, or the online head's posterior before any model; as ``linucb``, the head's always)."""
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


def igw_z(cfg: ExplorationSettings, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]:
    """Inverse gap weighting on gaps in standard errors: 1 / (n + γ·z) each, z an action's gap to
    the best over √(its spread² + the best's spread²) (the online head's posterior, in reward
    units), the rest to the best; γ as ``squarecb``'s. A gap whose standard error is below 1 is
    acted on sooner than by ``squarecb``, a less certain one later; being in standard errors, it
    does not depend on the rewards' scale. Where both spreads are 0 (a model's
    ensemble of one), or without a spread, ``squarecb``'s gap: every action keeps a probability."""
    if spread is None:
        return squarecb(cfg, scores, spread, t)
    n = len(scores)
    if len(spread) != n:
        raise ValueError(f"{len(spread)} spreads for {n} scores")
    if not all(isfinite(s) for s in scores) or not all(isfinite(u) and u >= 0.0 for u in spread):
        raise ValueError("igw_z needs finite scores and finite spreads of at least 0")
    gamma = cfg.gamma * (t + 1) ** cfg.gamma_exponent
    best = argmax(scores)
    top, known = scores[best], spread[best]
    p = []
    for s, u in zip(scores, spread):
        se = hypot(u, known)
        p.append(1.0 / (n + gamma * (top - s) / (se if se > 0.0 else 1.0)))
    p[best] = 0.0
    p[best] = 1.0 - sum(p)
    return p


def thompson(cfg: ExplorationSettings, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]:
    """Thompson sampling with its probabilities computed rather than drawn: each action with the
    probability that its value, drawn from N(score, spread²), is the largest (``win_probabilities``),
    and ``epsilon_min`` spread uniformly as a floor. Greedy with that floor when no spread is given
    or every spread is 0."""
    n = len(scores)
    spread = [0.0] * n if spread is None else spread
    if len(spread) != n:
        raise ValueError(f"{len(spread)} spreads for {n} scores")
    if not all(isfinite(s) for s in scores) or not all(isfinite(u) and u >= 0.0 for u in spread):
        raise ValueError("thompson needs finite scores and finite spreads of at least 0")
    floor = cfg.epsilon_min
    if max(spread) == 0.0:
        return greedy(n, argmax(scores), floor)
    return [(1.0 - floor) * w + floor / n for w in win_probabilities(scores, spread)]


# The normal CDF by linear interpolation in a table: one lookup per point where erfc would be a
# Python call per point, and within 5e-7 of it. Past ±8.5 it is 0 or 1 to within 1e-17.
_STEPS = 256  # table points per unit
_TOP = 8.5
# where each action's own distribution is resolved, in its standard deviations: its mass past ±6
# is 2e-9, and 33 points put the integral within 1e-3 of a far finer grid's
_NODES = np.linspace(-6.0, 6.0, 33)


@cache
def _cdf_table() -> tuple[np.ndarray, np.ndarray]:
    z = (np.arange(-_TOP * _STEPS, _TOP * _STEPS + 1) / _STEPS).tolist()
    cdf = np.array([0.5 * erfc(-v / sqrt(2.0)) for v in z])
    return cdf, np.append(np.diff(cdf), 0.0)


# The settings each strategy reads (``Explorer.reads``), so that an evaluation that sets another
# one is told it changes nothing (``reflexd.learning.evaluate.apply_settings``)
epsilon_greedy.reads = ("epsilon", "epsilon_min", "decay")  # type: ignore[attr-defined]
ucb.reads = ("ucb_c", "epsilon", "epsilon_min", "decay")  # type: ignore[attr-defined]
softmax.reads = ("temperature", "epsilon_min")  # type: ignore[attr-defined]
squarecb.reads = ("gamma", "gamma_exponent")  # type: ignore[attr-defined]
igw_z.reads = ("gamma", "gamma_exponent")  # type: ignore[attr-defined]
thompson.reads = ("epsilon_min",)  # type: ignore[attr-defined]


def win_probabilities(means: Sequence[float], spreads: Sequence[float]) -> list[float]:
    """P(action i's draw is the largest) for independent draws from N(means[i], spreads[i]²),
    normalised to sum to 1. Deterministic: a 1-D integral, P_i = ∫ Π_{j≠i} F_j dF_i (F: the
    normal CDFs), summed over the union of every action's own grid (``_NODES`` standard deviations
    about its mean), so that a narrow action is resolved beside a wide one. A spread of 0 is a
    point mass; point masses that tie share their wins equally."""
    n = len(means)
    if n == 2 and (spreads[0] > 0.0 or spreads[1] > 0.0):  # in closed form
        first = 0.5 * erfc((means[1] - means[0]) / sqrt(2.0 * (spreads[0] ** 2 + spreads[1] ** 2)))
        return [first, 1.0 - first]
    # columns, one row per action: broadcasting, as ufunc.outer costs a few times more per call
    mu = np.array(means, dtype=float)[:, None]
    sd = np.array(spreads, dtype=float)[:, None]
    # a point mass as a normal a billionth as wide as the scale: a step to the grid's resolution
    np.maximum(sd, 1e-9 * (max(map(abs, means)) + max(spreads)), out=sd)
    grid = np.sort(sd * _NODES + mu, axis=None)
    cdf, slope = _cdf_table()
    u = grid - mu  # each action's z on the grid, in table steps from -_TOP
    u *= _STEPS / sd
    u += _TOP * _STEPS
    np.maximum(u, 0.0, out=u)
    np.minimum(u, len(cdf) - 1.0, out=u)
    at = u.astype(np.intp)
    u -= at
    f = slope.take(at)
    f *= u
    f += cdf.take(at)  # at least the table's first value, 1e-17: its log is finite
    # Π_{j≠i} F_j on the grid, through logs: the products to rounding, in four calls whatever n
    logs = np.log(f)
    others = np.exp(np.add.reduce(logs, axis=0) - logs)
    step = others[:, 1:] + others[:, :-1]  # twice the mean of the two ends of each interval
    step *= f[:, 1:] - f[:, :-1]
    wins = np.add.reduce(step, axis=1).tolist()
    total = sum(wins)
    if not (isfinite(total) and total > 0.0):
        raise ValueError("thompson could not integrate these scores and spreads")
    return [w / total for w in wins]

"""Off-policy estimators over episodes: the value of a policy when decisions come in sequences.

When a decision is credited with its episode's return (``rewards.episode_return``), the rows of an
episode are not independent: a policy's choice at one step changes what the later steps see, so
the evidence for a policy is the whole episode, reweighted by the product of the importance
weights of every decision up to each reward (per-decision importance sampling, Precup et al. 2000):

- PDIS: sum_t gamma^t w_{0:t} r_t per episode, w_{0:t} = prod_{k<=t} pi(a_k | x_k) / prob_k;
  unbiased, with a variance that grows with the episode's length.
- WPDIS (weighted per-decision IS, Thomas & Brunskill 2016): at each step t, the weights
  w_{0:t} are normalised over the episodes instead of divided by their count; slightly biased,
  much steadier. An episode that has ended keeps its last weight and earns nothing after.
  Its interval comes from the delta method, the linearised per-episode terms (as SNIPS's).
- PDDR (per-decision doubly robust, Jiang & Li 2016): sum_t gamma^t [w_{0:t} (r_t - q_hat(x_t, a_t))
  + w_{0:t-1} v_hat(x_t)] with v_hat(x) = sum_a pi(a | x) q_hat(x, a), where q_hat estimates the
  return from a step on (a model trained on episode returns is one); unbiased whenever the
  propensities are right, as steady as q_hat is good.

Each estimator is the mean of per-episode terms, so intervals (``reflexd.learning.ope.estimate``)
take the episode as the unit, and two policies compared on the same episodes are paired.

Every judge of logged decisions (the gate, ``reflexd evaluate``, the rollback monitor) decides the
same way whether to judge by episode (``credited_episodes``) and judges the same way then
(``ByEpisode``), so a policy is worth the same wherever it is judged.

Arrays as in ``reflexd.learning.ope``: ``pi``/``q_hat`` float [N, A], ``chosen`` int [N], ``prob``
float [N], ``reward`` float [N] the step's own reward r_t; ``episode`` int [N] numbers each row's
episode, whose rows come in step order (``grouped`` sorts rows that way); ``gamma`` is a number, or
one per row (the same for every row of an episode).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from reflexd.learning.ope import Estimate, _weights, estimate

if TYPE_CHECKING:
    from reflexd.config import RewardConfig

__all__ = [
    "ByEpisode", "Episodes", "RewardsFor", "credited_episodes", "episode_numbers", "grouped", "observed", "pddr",
    "pddr_terms", "pdis", "pdis_terms", "step_rewards", "wpdis", "wpdis_terms",
]

# Each row's episode number and discount (``credited_episodes``): an episode's rows in step order.
Episodes = tuple[np.ndarray, np.ndarray]
RewardsFor = Callable[[str], "RewardConfig"]


def episode_numbers(keys: Sequence[Hashable]) -> np.ndarray:
    """Each row's episode as a number, from any keys (equal keys: one episode), in first-seen order."""
    seen: dict[Hashable, int] = {}
    return np.fromiter((seen.setdefault(k, len(seen)) for k in keys), dtype=np.int64, count=len(keys))


def grouped(episode: np.ndarray) -> np.ndarray:
    """The row order that brings each episode's rows together, keeping their order within it
    (a stable sort by episode number)."""
    return np.argsort(np.asarray(episode, dtype=np.int64), kind="stable")


class _Layout:
    """Where each row sits: its episode (0..E-1, in order of appearance) and its step in it."""

    def __init__(self, episode: np.ndarray, gamma: float | np.ndarray) -> None:
        episode = np.asarray(episode, dtype=np.int64)
        n = episode.shape[0]
        if n == 0:
            raise ValueError("no rows")
        starts = np.r_[True, episode[1:] != episode[:-1]]
        number = np.cumsum(starts) - 1  # episodes renumbered 0.. in the order their runs come
        if np.unique(episode[starts]).shape[0] != int(starts.sum()):
            raise ValueError("each episode's rows must be together, in step order (see grouped)")
        first = np.flatnonzero(starts)
        self.n, self.episodes = n, first.shape[0]
        self.number = number
        self.step = np.arange(n) - first[number]
        self.first = first
        gamma = np.broadcast_to(np.asarray(gamma, dtype=np.float64), (n,))
        if not np.all((gamma > 0.0) & (gamma <= 1.0)):
            raise ValueError("the discount must be in (0, 1]")
        self.discount = gamma ** self.step  # gamma^t of each row

    def cumulative(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """w_{0:t} and w_{0:t-1} (1 at an episode's first step) for each row."""
        # a product within each episode, episode by episode: a zero weight (a step the policy
        # never takes) stays exact, as dividing a running product would not keep it
        out = np.empty_like(w)
        for e0, e1 in zip(self.first, np.r_[self.first[1:], self.n]):
            out[e0:e1] = np.cumprod(w[e0:e1])
        before = np.ones_like(w)
        inner = self.step > 0
        before[inner] = out[np.flatnonzero(inner) - 1]
        return out, before

    def per_episode(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.number, weights=values, minlength=self.episodes)


def step_rewards(returns: np.ndarray, episode: np.ndarray, gamma: float | np.ndarray) -> np.ndarray:
    """Each step's own reward r_t = G_t - gamma G_{t+1} from the returns G the reward join credits
    (the last step of an episode keeps its return: its own reward and the episode's final one)."""
    returns = np.asarray(returns, dtype=np.float64)
    layout = _Layout(episode, gamma)
    g = np.broadcast_to(np.asarray(gamma, dtype=np.float64), returns.shape)
    nxt = np.zeros_like(returns)
    follows = np.r_[layout.number[1:] == layout.number[:-1], False]  # the next row is the same episode's
    nxt[follows] = returns[1:][follows[:-1]]
    return returns - g * nxt


def pdis_terms(
    pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray, episode: np.ndarray,
    gamma: float | np.ndarray = 1.0,
) -> np.ndarray:
    """Per-decision importance sampling, one term per episode."""
    layout = _Layout(episode, gamma)
    w, _ = layout.cumulative(_weights(pi, chosen, prob))
    return layout.per_episode(layout.discount * w * np.asarray(reward, dtype=np.float64))


def wpdis_terms(
    pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray, episode: np.ndarray,
    gamma: float | np.ndarray = 1.0,
) -> np.ndarray:
    """Weighted per-decision importance sampling, linearised: one term per episode, whose mean is
    exactly the estimate V = sum_t sum_i w^i_{0:t} gamma^t r^i_t / sum_i w^i_{0:t} (an episode past
    its end keeping its last weight), and whose spread is the delta method's."""
    layout = _Layout(episode, gamma)
    rd = layout.discount * np.asarray(reward, dtype=np.float64)  # gamma^t r_t
    w, _ = layout.cumulative(_weights(pi, chosen, prob))
    step, horizon, e = layout.step, int(layout.step.max()) + 1, layout.episodes
    # an episode of length L keeps its last weight W at every step t >= L, earning nothing there:
    # summed per step without a dense [episodes, steps] table (one long episode among many short)
    lengths = np.bincount(layout.number, minlength=e)
    last_w = w[np.r_[layout.first[1:], layout.n] - 1]
    carried = np.cumsum(np.bincount(lengths, weights=last_w, minlength=horizon + 1))[:horizon]
    mean_w = (np.bincount(step, weights=w, minlength=horizon) + carried) / e  # [T]
    if mean_w[0] == 0.0:
        raise ValueError("WPDIS is undefined: the target policy puts no weight on any logged first step")
    # a later step no weighted episode reaches (the policy never gets there) adds nothing
    reached = mean_w > 0.0
    safe = np.where(reached, mean_w, 1.0)
    per_step = np.where(reached, np.bincount(step, weights=w * rd, minlength=horizon) / (safe * e), 0.0)  # [T]
    value = float(per_step.sum())
    # each episode's term: its steps' w (r - m_t) / mean_w_t, then its carried weight's -m_t / mean_w_t
    own = layout.per_episode(w * (rd - per_step[step]) / safe[step])
    after = np.r_[np.cumsum((-per_step / safe)[::-1])[::-1], 0.0]  # [T + 1]: the sum over t >= k
    return value + own + last_w * after[lengths]


def pddr_terms(
    pi: np.ndarray, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray, q_hat: np.ndarray, episode: np.ndarray,
    gamma: float | np.ndarray = 1.0,
) -> np.ndarray:
    """Per-decision doubly robust, one term per episode; ``q_hat`` [N, A] estimates each action's
    return from the row's step on."""
    q_hat = np.asarray(q_hat, dtype=np.float64)
    if q_hat.shape != np.shape(pi):
        raise ValueError(f"q_hat {q_hat.shape} and pi {np.shape(pi)} disagree")
    layout = _Layout(episode, gamma)
    w, before = layout.cumulative(_weights(pi, chosen, prob))
    rows = np.arange(layout.n)
    v_hat = (np.asarray(pi, dtype=np.float64) * q_hat).sum(axis=1)
    terms = w * (np.asarray(reward, dtype=np.float64) - q_hat[rows, chosen]) + before * v_hat
    return layout.per_episode(layout.discount * terms)


def pdis(pi, chosen, prob, reward, episode, gamma=1.0, confidence: float = 0.95) -> Estimate:  # type: ignore[no-untyped-def]
    return estimate(pdis_terms(pi, chosen, prob, reward, episode, gamma), confidence)


def wpdis(pi, chosen, prob, reward, episode, gamma=1.0, confidence: float = 0.95) -> Estimate:  # type: ignore[no-untyped-def]
    return estimate(wpdis_terms(pi, chosen, prob, reward, episode, gamma), confidence)


def pddr(pi, chosen, prob, reward, q_hat, episode, gamma=1.0, confidence: float = 0.95) -> Estimate:  # type: ignore[no-untyped-def]
    return estimate(pddr_terms(pi, chosen, prob, reward, q_hat, episode, gamma), confidence)


def observed(reward: np.ndarray, episode: np.ndarray, gamma: float | np.ndarray = 1.0) -> np.ndarray:
    """The logging policy's own value per episode: its discounted return sum_t gamma^t r_t."""
    layout = _Layout(episode, gamma)
    return layout.per_episode(layout.discount * np.asarray(reward, dtype=np.float64))


def credited_episodes(rows: Any, rewards_for: RewardsFor | None) -> Episodes | None:
    """(episode number, discount) per row when some row's reward is an episode return (its agent's
    ``rewards.episode_return`` on and an episode named), else None: the rows are then judged as
    independent decisions, as always. A row not credited so is an episode of its own.

    ``rows`` has ``agents`` and ``episodes`` (a ``reflexd.learning.dataset.Batch``)."""
    names = getattr(rows, "episodes", None)
    if names is None or rewards_for is None:
        return None
    keys: list[Any] = []
    gamma = np.ones(len(names))
    for i, (agent, name) in enumerate(zip(rows.agents, names)):
        rule = rewards_for(agent)
        if name is not None and rule.episode_return:
            keys.append((agent, name))
            gamma[i] = rule.discount
        else:
            keys.append(i)
    if len(set(keys)) == len(keys):
        return None  # every row an episode of its own: the per-row estimators are these
    return episode_numbers(keys), gamma


class ByEpisode:
    """Logged rows judged by episode, for any policy: the estimators of ``reflexd.learning.ope``
    by name (``ips``, ``snips``, ``dm``, ``dr``), each in its episode form.

    The rows are brought together by episode in their order (a snapshot's: the order they were
    made in), and each step's own reward is recovered from the returns the join credited
    (``step_rewards``). ``q_hat`` [N, A] (rows in their given order, as every ``pi``) estimates
    each action's return from a step on; without it there is no ``dm`` or ``dr``.
    """

    def __init__(
        self, episodes: Episodes, chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray, q_hat: np.ndarray | None = None
    ) -> None:
        number, gamma = episodes
        self._order = order = grouped(number)
        self._number, self._gamma = np.asarray(number)[order], np.asarray(gamma, dtype=np.float64)[order]
        self._chosen = np.asarray(chosen, dtype=np.int64)[order]
        self._prob = np.asarray(prob, dtype=np.float64)[order]
        self._q_hat = None if q_hat is None else np.asarray(q_hat, dtype=np.float64)[order]
        self._step = step_rewards(np.asarray(reward, dtype=np.float64)[order], self._number, self._gamma)
        self._first = np.flatnonzero(np.r_[True, self._number[1:] != self._number[:-1]])
        # the logging policy's own value per episode: what every other policy is measured against
        self.observed = observed(self._step, self._number, self._gamma)
        self.count = int(self._first.shape[0])

    def names(self) -> tuple[str, ...]:
        return ("ips", "snips") if self._q_hat is None else ("ips", "snips", "dm", "dr")

    def term(self, name: str, pi: np.ndarray) -> np.ndarray:
        """One estimator's per-episode terms for the policy ``pi`` [N, A]; ValueError as the
        estimator raises it (weighted PDIS of a policy that takes no logged first step)."""
        pi = np.asarray(pi, dtype=np.float64)[self._order]
        args = (pi, self._chosen, self._prob, self._step)
        if name == "ips":
            return pdis_terms(*args, self._number, self._gamma)
        if name == "snips":
            return wpdis_terms(*args, self._number, self._gamma)
        if name not in ("dm", "dr"):
            raise ValueError(f"no estimator {name!r}")
        if self._q_hat is None:
            raise ValueError(f"{name} needs a reward model")
        if name == "dm":
            return (pi * self._q_hat).sum(axis=1)[self._first]  # q_hat of the first step: the return it expects
        return pddr_terms(*args, self._q_hat, self._number, self._gamma)

    def terms(self, pi: np.ndarray) -> dict[str, np.ndarray]:
        return {name: self.term(name, pi) for name in self.names()}

    def weights(self, pi: np.ndarray) -> np.ndarray:
        """Each episode's whole importance weight, the product of its decisions' (its effective
        sample size counts episodes, as the intervals do)."""
        pi = np.asarray(pi, dtype=np.float64)[self._order]
        return np.multiply.reduceat(_weights(pi, self._chosen, self._prob), self._first)

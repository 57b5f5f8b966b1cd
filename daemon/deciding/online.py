"""Learning between retrains: a Bayesian linear head that each reward updates at once.

A batch model needs a snapshot, a trainer subprocess and the gate: seconds at best, and nothing
before the first run. The head closes that gap. It is one ridge regression per (agent, action
id) of the reward on the hashed context, a bias, and the live model's score of that action
(0 while there is none), updated by recursive least squares (Sherman-Morrison) in O(m²) per
reward for the m features the action has seen (see ``_Arm``). Its means are the scores the
exploration strategy turns into probabilities:

- before any model, it is the policy, so the first decisions already learn;
- beside a live model, the model's score is one more input, with a prior weight of 1: the head
  starts from the model's scores and learns what the model misses (and how far to trust it);
- each new live model starts the head afresh beside it: the gate passed the model against the
  policy that logged its holdout (this head, before any model), and the head's corrections were
  for the last model's scores.

Whoever made a decision learns from its reward: the in-process client for its own decisions,
the daemon for decisions made over the socket. The head learns a decision's first outcome at
once, and the agent's ``rewards.default`` for a decision with no outcome within its
``rewards.wait_window`` (``expire``), so that, like the reward join, it counts what did not
happen as well as what did. Later outcomes of a decision reach the store and the batch model
only.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from math import sqrt
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from reflexd.features import FeatureSpec, Hasher


class OnlineSettings(Protocol):
    enabled: bool
    prior: float
    max_arms: int
    pending: int


class RewardSettings(Protocol):
    wait_window: float
    default: float


class _State(NamedTuple):
    """An arm's regression as one value: replaced whole by each update, so a decision reading it
    in another thread sees the state before or after an update, never half of one."""

    weights: np.ndarray  # theta spread over all d inputs: one dot product per mean
    row_of: np.ndarray  # input -> its row in theta and cov (-1: never seen)
    theta: np.ndarray
    cov: np.ndarray


class _Arm:
    """One action's regression over the inputs it has seen.

    Hashed contexts are sparse: an agent's contexts touch a few dozen of the hashed features, not
    all of them. An input the arm has never seen keeps its prior (mean 0, variance 1/prior, no
    covariance with the others), so the covariance is kept only over the ``m`` seen inputs and an
    update costs O(m²), not O(d²), with the same result as the full regression.
    """

    __slots__ = ("state", "features", "offset", "n")

    def __init__(self, d: int, offset: float) -> None:
        # the model score's prior weight: 1 beside a model (the head starts from the model's scores
        # and corrects them), 0 before any (the score input is then always 0)
        self.offset = offset
        self.state = _State(np.zeros(d), np.full(d, -1, dtype=np.intp), np.zeros(0), np.zeros((0, 0)))
        self.features = np.zeros(0, dtype=np.intp)  # row -> its input
        self.n = 0

    def update(self, x: np.ndarray, target: float, prior: float) -> None:
        """One recursive least squares step: gain k = Σx / (1 + xᵀΣx); Σ loses k(Σx)ᵀ, θ moves by k·error."""
        weights, row_of, theta, cov = self.state
        nz = np.flatnonzero(x)
        rows = row_of[nz]
        if rows.min() < 0:  # inputs never seen: add them at their prior
            new = nz[rows < 0]
            m, k = len(self.features), len(new)
            row_of = row_of.copy()
            row_of[new] = np.arange(m, m + k)
            grown = np.zeros((m + k, m + k))
            grown[:m, :m] = cov
            grown[range(m, m + k), range(m, m + k)] = 1.0 / prior
            cov, theta = grown, np.concatenate([theta, np.zeros(k)])
            self.features = np.concatenate([self.features, new])
            rows = row_of[nz]
        xs = x[nz]
        cx = cov[:, rows] @ xs
        gain = cx / (1.0 + float(xs @ cx[rows]))
        theta = theta + gain * (target - float(theta[rows] @ xs))
        weights = weights.copy()
        weights[self.features] = theta
        self.state = _State(weights, row_of, theta, cov - np.outer(gain, cx))
        self.n += 1


class OnlineHead:
    """The head's state for every (agent, action id) it has seen, and the decisions awaiting a reward."""

    def __init__(
        self,
        settings: OnlineSettings,
        spec: FeatureSpec = FeatureSpec(),
        rewards: Callable[[str], RewardSettings] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings  # may be replaced (a reload); read afresh at each use
        self.rewards = rewards  # an agent's wait_window and default; None: no default is learned
        self._clock = clock  # for wait windows
        self._hasher = Hasher(spec)
        self._d = spec.context_dim + 2  # the hashed context, a bias, the model's score
        self._arms: OrderedDict[tuple[str, str], _Arm] = OrderedDict()
        # decision id -> (agent, action id, its inputs with the model's score, whether a model was
        # live, when its wait window ends); oldest first
        self._pending: OrderedDict[str, tuple[str, str, np.ndarray, bool, float]] = OrderedDict()
        self._lock = threading.Lock()  # updates come from agent threads; decisions only read
        self.updates = 0
        self.defaults = 0  # of those, decisions with no outcome within their wait window
        self.base: str | None = None  # the live model the head learns beside (None: no model)

    def features(self, context: dict[str, Any]) -> np.ndarray:
        """The context's inputs, the model score's slot (the last) left at 0."""
        x = np.zeros(self._d)
        x[:-2] = self._hasher.context(context)
        x[-2] = 1.0
        return x

    def means(self, agent: str, x: np.ndarray, ids: list[str], scores: list[float] | None = None) -> list[float]:
        """Each action's expected reward at ``x``, given the live model's ``scores`` (None: no model)."""
        arms = self._arms
        out = []
        for k, aid in enumerate(ids):
            arm = arms.get((agent, aid))
            if arm is None:  # nothing learned: the model's score as it is, or the prior's 0
                out.append(scores[k] if scores is not None else 0.0)
                continue
            w = arm.state.weights
            out.append(float(w @ x) + ((float(w[-1]) + arm.offset) * scores[k] if scores is not None else 0.0))
        return out

    def knows(self, agent: str, ids: list[str]) -> bool:
        """Has the head learned anything for any of these actions of ``agent``?"""
        arms = self._arms
        return any((agent, aid) in arms for aid in ids)

    def spread(self, agent: str, x: np.ndarray, ids: list[str]) -> list[float]:
        """Each action's posterior standard deviation at ``x`` (up to the noise scale), no model live."""
        unit = 1.0 / self.settings.prior
        nz = np.flatnonzero(x)
        out = []
        for aid in ids:
            arm = self._arms.get((agent, aid))
            if arm is None:
                out.append(sqrt(unit * float(x @ x)))
                continue
            state = arm.state
            rows = state.row_of[nz]
            seen = rows >= 0
            xs, rs = x[nz[seen]], rows[seen]
            var = float(xs @ state.cov[np.ix_(rs, rs)] @ xs) + unit * (float(x @ x) - float(xs @ xs))
            out.append(sqrt(max(var, 0.0)))
        return out

    def remember(self, decision_id: str, agent: str, action: str, x: np.ndarray, score: float | None) -> None:
        """Keep what a reward for ``decision_id`` will need, the ``pending`` newest decisions at most.

        Takes no lock (a decision never waits for an update): each OrderedDict call is atomic.
        ``score``: the live model's score of ``action``, None without a model.
        """
        if score is not None:
            x = x.copy()
            x[-1] = score
        wait = self.rewards(agent).wait_window if self.rewards is not None else math.inf
        pending = self._pending
        pending[decision_id] = (agent, action, x, score is not None, self._clock() + wait)
        pending.move_to_end(decision_id)  # a reused id counts from now
        while len(pending) > self.settings.pending:
            try:
                pending.popitem(last=False)
            except KeyError:  # emptied meanwhile by another thread's trim
                break

    def learn(self, decision_id: str, reward: float) -> bool:
        """Update on ``reward`` for a decision this head remembers; False if it does not (any longer)."""
        if not math.isfinite(reward):
            return False
        found = self._pending.pop(decision_id, None)
        if found is None:
            return False
        agent, action, x, beside_model, _ = found
        with self._lock:
            self._update(agent, action, x, reward, beside_model)
        return True

    def expire(self) -> int:
        """Learn each agent's ``rewards.default`` for the decisions whose wait window ended with no
        outcome; how many. Called every fraction of a second by the client's sender thread and the
        daemon. Goes from the oldest and stops at the first still waiting."""
        if self.rewards is None:
            return 0
        now = self._clock()
        pending = self._pending
        done = 0
        while pending:
            try:
                decision_id, (agent, action, x, beside_model, deadline) = next(iter(pending.items()))
            except (StopIteration, RuntimeError):  # emptied or changed meanwhile: next time
                break
            if deadline > now:
                break
            if pending.pop(decision_id, None) is None:
                continue  # its reward came meanwhile
            with self._lock:
                self._update(agent, action, x, self.rewards(agent).default, beside_model)
            self.defaults += 1
            done += 1
        return done

    def _update(self, agent: str, action: str, x: np.ndarray, reward: float, beside_model: bool) -> None:
        key = (agent, action)
        arms = self._arms
        arm = arms.get(key)
        if arm is None:
            arm = arms[key] = _Arm(self._d, 1.0 if beside_model else 0.0)
            while len(arms) > self.settings.max_arms:
                arms.popitem(last=False)  # the arm updated least recently goes first
        else:
            arms.move_to_end(key)
        arm.update(x, reward - arm.offset * x[-1], self.settings.prior)
        self.updates += 1

    def follow(self, version: str | None) -> None:
        """Start afresh beside a new live model (or none): the gate judged it better than the policy
        that logged its holdout, which was this head's, so the head's corrections start from it."""
        if version == self.base:
            return
        with self._lock:
            self.base = version
            self._arms.clear()
            # their inputs were the last model's scores: they would teach the new arms another model's errors
            self._pending.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "arms": len(self._arms),
            "pending": len(self._pending),
            "updates": self.updates,
            "defaults": self.defaults,
            "base": self.base,
        }

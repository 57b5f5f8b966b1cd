"""Learning between retrains: a Bayesian linear head that each reward updates at once.

A batch model needs a snapshot, a trainer subprocess and the gate: seconds at best, and nothing
before the first run. The head closes that gap. It is one ridge regression per (agent, action
id) of the reward on the hashed context, a bias, and the live model's score of that action
(0 while there is none), updated by recursive least squares (Sherman-Morrison) in O(m²) per
reward for the m features the action has seen (see ``_Arm``). Its means are the scores the
exploration strategy turns into probabilities:

- before any model, it is the policy, so the first decisions already learn;
- once a model is live, the model's score is one more input: its weight starts at 0 and grows
  as far as the model's scores explain the rewards. A model that went live on a snapshot older
  than what the head has learned since (a first run takes seconds, while decisions go on) does
  not undo that learning, and a good one takes over as fast as the evidence says it should.
- a new model carries the head over: its scores mean what the last one's meant (the reward it
  expects), so the weight learned for them still applies.

Whoever made a decision learns from its reward: the in-process client for its own decisions,
the daemon for decisions made over the socket. Only the first reported outcome of a decision
is learned from (later ones still reach the store and the batch model).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from math import sqrt
from typing import Any, Protocol

import numpy as np

from reflexd.features import FeatureSpec, Hasher


class OnlineSettings(Protocol):
    enabled: bool
    prior: float
    max_arms: int
    pending: int


class _Arm:
    """One action's regression over the features it has seen.

    Hashed contexts are sparse: an agent's contexts touch a few dozen of the hashed features, not
    all of them. A feature the arm has never seen keeps its prior (mean 0, variance 1/prior, no
    covariance with the others), so the covariance is kept only over the ``m`` seen features and
    an update costs O(m²), not O(d²), with the same result as the full regression.
    """

    __slots__ = ("weights", "row_of", "features", "theta", "cov", "n", "offset")

    def __init__(self, d: int, offset: float) -> None:
        # the model score's prior weight: 1 for an arm born beside a model (it trusts the model
        # until the rewards say otherwise), 0 for one born before any (its context weights already
        # predict the reward, so trusting the model too would count it twice)
        self.offset = offset
        self.weights = np.zeros(d)  # theta spread over all d features, for one dot product per mean
        self.row_of = np.full(d, -1, dtype=np.intp)  # feature -> its row in theta and cov (-1: unseen)
        self.features = np.zeros(0, dtype=np.intp)  # row -> its feature
        self.theta = np.zeros(0)
        self.cov = np.zeros((0, 0))
        self.n = 0

    def rows(self, nz: np.ndarray, prior: float) -> np.ndarray:
        """The rows of ``nz``'s features, adding (at their prior) those not seen before."""
        rows = self.row_of[nz]
        if rows.min() >= 0:
            return rows
        new = nz[rows < 0]
        m, k = len(self.features), len(new)
        self.row_of[new] = np.arange(m, m + k)
        cov = np.zeros((m + k, m + k))
        cov[:m, :m] = self.cov
        cov[range(m, m + k), range(m, m + k)] = 1.0 / prior
        self.cov = cov
        self.theta = np.concatenate([self.theta, np.zeros(k)])
        self.features = np.concatenate([self.features, new])
        return self.row_of[nz]


class OnlineHead:
    """The head's state for every (agent, action id) it has seen, and the decisions awaiting a reward."""

    def __init__(self, settings: OnlineSettings, spec: FeatureSpec = FeatureSpec()) -> None:
        self.settings = settings
        self._hasher = Hasher(spec)
        self._d = spec.context_dim + 2  # the hashed context, a bias, the model's score
        self._arms: OrderedDict[tuple[str, str], _Arm] = OrderedDict()
        # decision id -> (agent, action id, its inputs with the model's score, whether a model
        # was live); oldest dropped first
        self._pending: OrderedDict[str, tuple[str, str, np.ndarray, bool]] = OrderedDict()
        self._lock = threading.Lock()  # updates come from agent threads; decisions only read
        self.updates = 0
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
            w = arm.weights
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
            rows = arm.row_of[nz]
            seen = rows >= 0
            xs, rs = x[nz[seen]], rows[seen]
            var = float(xs @ arm.cov[np.ix_(rs, rs)] @ xs) + unit * (float(x @ x) - float(xs @ xs))
            out.append(sqrt(max(var, 0.0)))
        return out

    def remember(self, decision_id: str, agent: str, action: str, x: np.ndarray, score: float | None) -> None:
        """Keep what a reward for ``decision_id`` will need, the ``pending`` newest decisions at most.

        Takes no lock (a decision never waits for an update): each OrderedDict call is atomic.
        """
        pending = self._pending
        if score is not None:
            x = x.copy()
            x[-1] = score
        pending[decision_id] = (agent, action, x, score is not None)
        while len(pending) > self.settings.pending:
            try:
                pending.popitem(last=False)
            except KeyError:  # emptied meanwhile by another thread's trim
                break

    def learn(self, decision_id: str, reward: float) -> bool:
        """Update on ``reward`` for a decision this head remembers; False if it does not (any longer)."""
        found = self._pending.pop(decision_id, None)
        if found is None:
            return False
        agent, action, x, beside_model = found
        with self._lock:
            self._update(agent, action, x, reward, beside_model)
        return True

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
        nz = np.flatnonzero(x)
        rows = arm.rows(nz, self.settings.prior)
        xs = x[nz]
        # recursive least squares: gain k = Σx / (1 + xᵀΣx); Σ loses k(Σx)ᵀ, θ moves by k·error
        cov = arm.cov
        cx = cov[:, rows] @ xs
        gain = cx / (1.0 + float(xs @ cx[rows]))
        target = reward - arm.offset * x[-1]
        theta = arm.theta + gain * (target - float(arm.theta[rows] @ xs))
        weights = arm.weights.copy()
        weights[arm.features] = theta
        # each array is replaced whole: a decision reading them meanwhile sees old or new, not half
        arm.theta, arm.cov, arm.weights = theta, cov - np.outer(gain, cx), weights
        arm.n += 1
        self.updates += 1

    def follow(self, version: str | None) -> None:
        """Note the live model: the head carries over (its score input means the same for each model)."""
        self.base = version

    def stats(self) -> dict[str, Any]:
        return {"arms": len(self._arms), "pending": len(self._pending), "updates": self.updates, "base": self.base}

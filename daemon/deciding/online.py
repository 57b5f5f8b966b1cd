"""Learning between retrains: a Bayesian linear head that each reward updates at once.

A batch model needs a snapshot, a trainer subprocess and the gate: seconds at best, and nothing
before the first run. The head closes that gap. It is one ridge regression per (agent, action
id) of the reward on the hashed context, a bias, and the live model's score of that action
(0 while there is none), updated by recursive least squares (Sherman-Morrison) in O(m²) per
reward for the m features the action has seen (see ``_Arm``). Its means are the scores the
exploration strategy turns into probabilities:

- before any model, it is the policy, so the first decisions already learn; each action regresses
  from the agent's mean reward so far (``OnlineHead._mean_reward``), so that where the rewards'
  zero is changes no decision;
- beside a live model, the model's score is one more input, its weight learned like the others'
  from a prior of 0 (ridge penalty ``model_prior``): the head learns from the rewards how far to
  trust the model's scores and what they miss, so a model worse than the head alone costs little
  (an action it has learned nothing about beside the model is served the model's score as it
  is). Held to the model's scores instead (a prior weight of 1 under a ridge penalty of 100),
  the head served an overfit model's mistakes: on a noisy stream that cost 0.015 reward per
  decision (``docs/results/2026-12-07-beside-the-model.md``);
- each new live model starts the head afresh beside it: the gate passed the model against the
  policy that logged its holdout (this head, before any model), and the head's corrections were
  for the last model's scores. The new head first relearns the newest rewards (``warm_rows``)
  beside the new model's scores: started empty it would learn again from its first few rewards
  how far to trust them. On the demo's world, regret per decision after a promotion was 0.037
  started empty and 0.027 relearning, against 0.025 for the head going on alone
  (``docs/results/2026-12-07-beside-the-model.md``).

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
from collections import OrderedDict, deque
from math import sqrt
from types import EllipsisType
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence

import numpy as np

from reflexd import log
from reflexd.features import FeatureSpec, Hasher
from reflexd.wire.protocol import Learned

try:
    from reflexd.deciding import _rls as _compiled
except ImportError:  # built without a C compiler (it is optional in pyproject.toml)
    _compiled = None

# how the head's arithmetic runs here, as the daemon's "reflexd ready" log line says it
ARITHMETIC = "compiled" if _compiled else "numpy (reflexd.deciding._rls was not built)"

_log = log.get("reflexd.online")


_Pending = tuple[str, str, np.ndarray, bool, "str | None", float]

# the new live model's score of each (source of a decision, as ``remember`` was handed it); None
# where it cannot say (``OnlineHead.follow``)
Rescore = Callable[[list[Any]], list[float | None]]


class OnlineSettings(Protocol):
    enabled: bool
    prior: float
    model_prior: float
    warm_rows: int
    max_arms: int
    pending: int


class RewardSettings(Protocol):
    wait_window: float
    default: float


class _State(NamedTuple):
    """An arm's regression as one value: replaced whole by each update, so a decision reading it
    in another thread sees the state before or after an update, never half of one.

    The covariance over the seen inputs is ``base - down[:r]ᵀ down[:r]``: each update's rank-one
    downdate is appended as a row of ``down``, and every ``_DEFERRED`` updates the first
    ``_DEFERRED`` rows are folded into a new ``base`` over the updates that follow (see
    ``_Arm._fold``). Rows past ``r`` belong to later states: only ever written, by the next
    updates, never read through this one.
    """

    weights: np.ndarray  # theta spread over all d inputs: one dot product per mean
    row_of: np.ndarray  # input -> its row in theta and the covariance (-1: never seen)
    features: np.ndarray  # row -> its input
    theta: np.ndarray
    base: np.ndarray
    down: np.ndarray
    r: int
    noise: float  # the reward noise's variance, estimated (``_Arm.update``)


# The noise estimate's prior: this many rewards' worth of a variance of 1, the scale the covariance
# is in, so that an arm's first few rewards cannot make it all but stop exploring.
_NOISE_PRIOR = 2.0

# Downdates kept beside the base before they are folded into it. Writing a new m×m covariance on
# every update (it cannot be changed in place under a reader) was most of an update's cost at a
# hundred inputs; a fold is one matrix product, and the downdates kept cost O(m·r) per update.
_DEFERRED = 16

# An arm's updates made together (``OnlineHead.learn_many``) go as one step (``_Arm.update_many``)
# from this many on. The step costs some 70 µs whatever their number (numpy's per-call cost, the
# Cholesky factor and its inverse): as much as three or four updates one by one in numpy, and as
# ten to sixteen compiled (``bench.online``: per update, 9–18 µs together at 4 to 8 rewards, 4–12 at 32).
_BATCH = 16 if _compiled else 4
# and at most this many in one step: its k×k factor and inverse cost O(k³) (relearning 1000 rows
# of one action at 85 inputs: 6 ms in steps of 32, 8 in steps of 64, 24 of 256, 130 in one)
_MOST = 32

# Expired decisions' defaults learned under one hold of the head's lock, at most: a daemon's event
# loop learning an outcome waits for them
_EXPIRED = 256

def _step_numpy(
    x: np.ndarray, row_of: np.ndarray, features: np.ndarray, theta: np.ndarray, base: np.ndarray, down: np.ndarray,
    r: int, target: float, new_theta: np.ndarray, new_weights: np.ndarray,
) -> tuple[float, float] | None:
    """An update's arithmetic (``_Arm.update``): for Σ = base − down[:r]ᵀdown[:r], writes θ + Σx·error/s
    to ``new_theta`` and over ``new_weights`` and Σx/√s to ``down[r]``, s = 1 + xᵀΣx; returns (s,
    error), or None, writing nothing, if ``x`` sets an input never seen.

    The compiled ``_rls.step`` does the same in one call where numpy makes some twelve (0.5–1.5 µs
    each here, whatever their size): this is its reference (``tests/unit/test_online_compiled.py``)
    and its stand-in where it could not be built, so it takes the same arguments (``row_of``,
    which only the compiled step reads).
    """
    xr = x[features]
    if np.count_nonzero(xr) != np.count_nonzero(x):
        return None
    # ndarray.dot, not @: on vectors of a few dozen numbers matmul's dispatch costs twice the product
    cx = base.dot(xr)
    if r:
        done = down[:r]
        cx -= done.dot(xr).dot(done)
    s = 1.0 + float(xr.dot(cx))
    error = target - float(theta.dot(xr))
    np.add(theta, cx * (error / s), out=new_theta)
    new_weights[features] = new_theta
    np.multiply(cx, 1.0 / sqrt(s), out=down[r])
    return s, error


def _spread_numpy(
    x: np.ndarray, row_of: np.ndarray, features: np.ndarray, base: np.ndarray, down: np.ndarray, r: int, last: float,
    unit: float,
) -> float:
    """The variance of an arm's mean at ``x`` with its last input (the live model's score) set to
    ``last``, at a noise of 1 (``OnlineHead.spread``): xᵀΣx over the inputs it has seen, plus the
    prior variance ``unit`` times the square of each it has not. ``x``'s last input is read as
    ``last`` whatever it holds (``features`` leaves it at 0). ``_rls.spread``'s reference and
    stand-in."""
    xr = x[features]
    row = row_of[-1]
    if row >= 0:
        xr[row] = last  # the score's input, left at 0 in ``x``
    var = xr.dot(base.dot(xr)) + unit * (x.dot(x) - x[-1] * x[-1] + last * last - xr.dot(xr))
    if r:
        done = down[:r].dot(xr)
        var -= done.dot(done)
    return float(var)


def _fold_numpy(new: np.ndarray, base: np.ndarray, rows: np.ndarray, down: np.ndarray, a: int, b: int) -> None:
    """Rows ``a`` to ``b`` of the next base (``_Arm._fold``): base − downᵀdown over the first
    ``rows.shape[1]`` rows of ``down``, ``rows`` being those rows transposed. ``_rls.fold``'s
    reference and stand-in, as ``_step_numpy`` is ``_rls.step``'s."""
    block = new[a:b]
    np.dot(rows[a:b], down[: rows.shape[1]], out=block)
    np.subtract(base[a:b], block, out=block)


# an arm's state less its weights and noise, as ``_Arm._grown`` returns it: row_of, features, theta, base, down, r
_Rows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


class _Arm:
    """One action's regression over the inputs it has seen.

    Hashed contexts are sparse: an agent's contexts touch a few dozen of the hashed features, not
    all of them. An input the arm has never seen keeps its prior (mean 0, variance 1/prior, no
    covariance with the others), so the covariance is kept only over the ``m`` seen inputs and an
    update costs O(m²), not O(d²), with the same result as the full regression.
    """

    __slots__ = ("_folded", "_folding", "n", "prior_mean", "residual", "state")

    # An update's arithmetic, a fold's block and the spread: compiled, or numpy's where that was not built
    # (class attributes, so that tests and ``bench.online`` can run numpy's beside them).
    _step = staticmethod(_compiled.step if _compiled else _step_numpy)
    _fold_block = staticmethod(_compiled.fold if _compiled else _fold_numpy)
    _spread = staticmethod(_compiled.spread if _compiled else _spread_numpy)
    # Rows of the new base a fold writes per update, at most (more only past 14× as many inputs, so
    # that a fold ends before the rows kept fill their buffer). Folding all m rows in one update made
    # that update 3× the others at 129 inputs, and the per-update p99 the fold's. In numpy a block
    # of 8 or 16 rows costs most of what one of 32 does (its per-call cost); compiled, a block costs
    # its arithmetic alone, so the fold is spread over as many updates as it may take.
    _fold_rows = 1 if _compiled else 32

    def __init__(self, d: int, prior_mean: float = 0.0) -> None:
        # the bias's prior mean: the arm regresses reward − prior_mean (see ``OnlineHead._mean_reward``)
        self.prior_mean = prior_mean
        self.state = _State(np.zeros(d), np.full(d, -1, dtype=np.intp), np.zeros(0, dtype=np.intp), np.zeros(0),
                            np.zeros((0, 0)), np.zeros((2 * _DEFERRED, 0)), 0, 1.0)
        # the fold under way (``_fold``; None: none): the new base, its first ``_folded`` rows written
        # (no published state holds it until it is whole); the downdates it folds, transposed (a
        # contiguous block of them makes a block's product a fifth cheaper); its rows per block
        self._folding: tuple[np.ndarray, np.ndarray, int] | None = None
        self._folded = 0
        self.n = 0
        # Σ error² / (1 + xᵀΣx) over the updates: each term's expectation is the noise variance (the
        # error's variance is the noise's times 1 + xᵀΣx); the sum is the residuals' squares plus
        # the ridge penalty. A linear model that fits badly shows here as noise, and explores more.
        self.residual = 0.0

    @property
    def features(self) -> np.ndarray:
        return self.state.features

    def covariance(self) -> np.ndarray:
        """The posterior covariance over the seen inputs, in row order (up to the noise scale)."""
        state = self.state
        done = state.down[: state.r]
        return state.base - done.T @ done

    def update(self, x: np.ndarray, target: float, prior: float) -> None:
        """One recursive least squares step: gain k = Σx / (1 + xᵀΣx); Σ loses k(Σx)ᵀ, θ moves by k·error.

        Σ loses it as the row u = Σx / √(1 + xᵀΣx) of ``down`` (uuᵀ = k(Σx)ᵀ), so an update writes
        O(m) numbers, and reads Σ through ``base`` and the rows kept (``_step``); and while a fold
        is under way, one block of the next base (``_fold``).
        """
        weights, row_of, features, theta, base, down, r, _ = self.state
        new_theta, new_weights = np.empty(len(theta)), weights.copy()
        stepped = self._step(x, row_of, features, theta, base, down, r, target, new_theta, new_weights)
        if stepped is None:  # inputs never seen: add them at their prior
            row_of, features, theta, base, down, r = self._grown(np.flatnonzero(x), prior)
            new_theta = np.empty(len(theta))
            stepped = self._step(x, row_of, features, theta, base, down, r, target, new_theta, new_weights)
        s, error = stepped
        self.residual += error * error / s
        r += 1
        if r >= _DEFERRED:
            base, down, r = self._fold(base, down, r)
        self.n += 1
        noise = (_NOISE_PRIOR + self.residual) / (_NOISE_PRIOR + self.n)
        self.state = _State(new_weights, row_of, features, new_theta, base, down, r, noise)

    def _grown(self, inputs: np.ndarray, prior: float) -> _Rows:
        """The state's rows with those of ``inputs`` never seen added at their prior (mean 0,
        variance 1/prior, no covariance), the rows kept folded into a new base."""
        _, row_of, features, theta, base, down, r, _ = self.state
        new = inputs[row_of[inputs] < 0]
        m, k = len(features), len(new)
        row_of = row_of.copy()
        row_of[new] = np.arange(m, m + k)
        grown = np.zeros((m + k, m + k))
        grown[:m, :m] = base if r == 0 else base - down[:r].T @ down[:r]
        grown[range(m, m + k), range(m, m + k)] = 1.0 / prior
        self._folding = None  # a fold under way folds rows that ``grown`` already holds
        return (row_of, np.concatenate([features, new]), np.concatenate([theta, np.zeros(k)]), grown,
                np.empty((2 * _DEFERRED, m + k)), 0)

    def update_many(self, xs: np.ndarray, targets: np.ndarray, prior: float) -> None:
        """The updates of ``update`` for each row of ``xs`` in turn, as one step of rank ``len(xs)``.

        With C = ΣXᵀ and S = I + XC = LLᵀ (its Cholesky factor), the k steps' downdates are the
        rows of U = L⁻¹Cᵀ (the same rows ``update`` would append one by one), θ moves by Uᵀz for
        z = L⁻¹(y − Xθ), and zᵀz is the sum of the steps' error² / (1 + xᵀΣx): the same state,
        in some twelve numpy calls instead of k times as many. The rows are kept beside the base
        while they fit before a fold; past that, the base takes them all at once.
        """
        k = len(xs)
        if k <= 1:
            if k:
                self.update(xs[0], float(targets[0]), prior)
            return
        weights, row_of, features, theta, base, down, r, _ = self.state
        xr = xs[:, features]
        if np.count_nonzero(xr) != np.count_nonzero(xs):
            row_of, features, theta, base, down, r = self._grown(np.flatnonzero(xs.any(axis=0)), prior)
            xr = xs[:, features]
        ct = xr.dot(base)  # Cᵀ = XΣ (Σ is symmetric), row by row as the downdates are
        if r:
            done = down[:r]
            ct -= xr.dot(done.T).dot(done)
        s = ct.dot(xr.T)
        s.flat[:: k + 1] += 1.0
        # L⁻¹ by an inverse, not a solve: for a k×k triangle numpy's inverse costs a third of a
        # solve's LU of the m + 1 right-hand sides; S ≥ I, so L is well conditioned
        inverse = np.linalg.inv(np.linalg.cholesky(s))
        u = inverse.dot(ct)
        z = inverse.dot(targets - xr.dot(theta))
        theta = theta + z.dot(u)
        self.residual += float(z.dot(z))
        if r + k < _DEFERRED:  # so that the next single update still starts a fold in time
            down[r : r + k] = u
            r += k
        else:  # a new base: the rows kept and these folded at once
            rows = np.concatenate([down[:r], u]) if r else u
            base = base - rows.T.dot(rows)
            down, r = np.empty((2 * _DEFERRED, len(features))), 0
            self._folding = None
        weights = weights.copy()
        weights[features] = theta
        self.n += k
        noise = (_NOISE_PRIOR + self.residual) / (_NOISE_PRIOR + self.n)
        self.state = _State(weights, row_of, features, theta, base, down, r, noise)

    def _fold(self, base: np.ndarray, down: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One step of folding ``down[:_DEFERRED]`` into a new base, base − downᵀdown: the first
        sets it up, each next writes a block of its rows, and the last returns it with the rows kept
        since. Until then the states keep the old base and every row kept.

        Setting up and handing over take an update each: beside a block they added a third to a
        half to its cost. A fold is at most ``_DEFERRED`` steps, one per row it folds, so the rows
        kept while it is under way never fill ``down`` (2·``_DEFERRED`` rows).
        """
        m = len(base)
        if self._folding is None:
            blocks = min(_DEFERRED - 2, -(-m // self._fold_rows)) or 1  # as even as they go
            self._folding = np.empty_like(base), np.ascontiguousarray(down[:_DEFERRED].T), -(-m // blocks)
            self._folded = 0
            return base, down, r
        new, rows, step = self._folding
        a = self._folded
        if a < m:
            b = self._folded = a + step
            self._fold_block(new, base, rows, down, a, b)
            return base, down, r
        self._folding = None
        rest = np.empty_like(down)  # a new buffer: states read before hold the old one
        rest[: r - _DEFERRED] = down[_DEFERRED:r]
        return new, rest, r - _DEFERRED


def _made_at(totals: dict[str, tuple[float, int]], agent: str, reward: float) -> float:
    """Count ``reward`` in ``agent``'s running (sum, count) in ``totals``; the prior mean of an arm
    it makes: the mean before it, or, for the agent's first reward, the reward itself (so that no
    arm starts from a 0 whose meaning depends on where the rewards' zero is)."""
    total, n = totals.get(agent, (0.0, 0))
    totals[agent] = (total + reward, n + 1)
    return total / n if n else reward


def _group(groups: dict, key: tuple) -> tuple[list[np.ndarray], list[float]]:
    """The inputs and rewards gathered for ``key``'s arm, moved last: arms are then updated in the
    order of their last reward, as one by one, so that ``max_arms`` drops the same arms."""
    group = groups[key] = groups.pop(key, None) or ([], [])
    return group


def _trim(kept: OrderedDict, most: int) -> None:
    """Drop the oldest of ``kept`` past ``most``; safe beside other threads' trims."""
    while len(kept) > most:
        try:
            kept.popitem(last=False)
        except KeyError:  # emptied meanwhile by another thread's trim
            break


def learned(head: OnlineHead, agent: str, action: str, decision_id: str, x: np.ndarray, reward: float, beside: bool) -> Learned:
    """One of ``head``'s updates as the ``Learned`` message that shares it (its inputs sparse)."""
    index = np.flatnonzero(x)
    return Learned(
        agent=agent, decision=decision_id, action=action, base=head.base, beside=beside,
        index=index.tolist(), value=x[index].tolist(), target=float(reward),
        prior_mean=None if beside else head.prior_mean(agent, action),
    )


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
        # agent -> (sum, count) of the rewards this head learned for it, own and absorbed: their
        # mean is the prior mean of each action's reward before any model (``_mean_reward``)
        self._rewards: dict[str, tuple[float, int]] = {}
        # decision id -> (agent, action id, its inputs with the model's score, whether it had one,
        # the model the head followed when it was made, when its wait window ends); oldest first
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        # decision id -> (agent, what a later model needs to score it again), the newest warm_rows decisions
        self._sources: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        # the newest rewards of decisions with a source, relearned beside each new model (``follow``):
        # (agent, action id, inputs, reward, source)
        self._recent: deque[tuple[str, str, np.ndarray, float, Any]] = deque(maxlen=settings.warm_rows)
        # arms ``prepare`` relearned for a model about to be served: (its version, (arms, rows))
        self._prepared: tuple[str | None, tuple[OrderedDict, int]] | None = None
        self._forgotten = 0  # agents forgotten so far (``forget``)
        self._lock = threading.Lock()  # updates come from agent threads; decisions only read
        self._inbox: deque[tuple[str, float]] = deque()  # rewards to learn at the next ``apply`` (``later``)
        # one ``apply`` at a time (the client's thread, and a flush): a flush returns once what was
        # handed on is learned, and two outcomes of a decision are learned in the order they came
        self._applying = threading.Lock()
        self.updates = 0
        self.defaults = 0  # of those, decisions with no outcome within their wait window
        self.base: str | None = None  # the live model the head learns beside (None: no model)
        # told of each update this head makes from its own decisions (not of those it ``absorb``s):
        # (agent, action, decision id, inputs, reward, beside a model), to share with other processes
        self.on_update: Callable[[str, str, str, np.ndarray, float, bool], None] | None = None
        self.absorbed = 0  # updates other processes made, learned here
        self.warmed = 0  # rewards relearned at the last change of model (``follow``)

    @property
    def hasher(self) -> Hasher:
        """How this head hashes a context (``features``' first inputs)."""
        return self._hasher

    def features(self, context: dict[str, Any]) -> np.ndarray:
        """The context's inputs, the model score's slot (the last) left at 0."""
        return self.inputs(self._hasher.context(context))

    def inputs(self, hashed: np.ndarray) -> np.ndarray:
        """The inputs of a context hashed with ``hasher``: it, a bias of 1, the model score's slot at 0."""
        x = np.zeros(self._d)
        x[:-2] = hashed
        x[-2] = 1.0
        return x

    def means(self, agent: str, x: np.ndarray, ids: list[str], scores: list[float] | None = None) -> list[float]:
        """Each action's expected reward at ``x``, given the live model's ``scores`` (None: no model)."""
        arms = self._arms
        prior = self._mean_reward(agent) if scores is None else 0.0
        out = []
        for k, aid in enumerate(ids):
            arm = arms.get((agent, aid))
            if arm is None:  # nothing learned: the model's score as it is, or the prior mean
                out.append(scores[k] if scores is not None else prior)
                continue
            w = arm.state.weights  # ndarray.dot, not @: see ``_step_numpy``
            out.append(float(w.dot(x)) + arm.prior_mean + (float(w[-1]) * scores[k] if scores is not None else 0.0))
        return out

    def _mean_reward(self, agent: str) -> float:
        """The prior mean of an action's reward before any model: the mean reward this head has
        learned for ``agent`` so far (0 before any). An arm made without a model regresses from
        it (its bias's prior mean, fixed when the arm is made; the agent's first arm from its
        first reward), and an action with no arm is valued at it. So the head's decisions do not
        depend on where the rewards' zero is: rewards shifted by a constant shift every mean by
        it, and leave every gap (tested; ``rewards.default`` is a reward like the others, so it is
        shifted too). From a prior of 0 they did: rewards of 10 or 11 made every untried action
        look 10 worse, and on iris so shifted the head alone earned 0.38, against 0.77 on the
        rewards of 0 or 1; and on those an action that failed once looked no worse than one never
        tried (``docs/results/2026-12-07-prior-mean.md``)."""
        total, n = self._rewards.get(agent, (0.0, 0))
        return total / n if n else 0.0

    def prior_mean(self, agent: str, action: str) -> float | None:
        """The prior mean of ``agent``'s ``action``'s arm (None: the head has no arm for it)."""
        arm = self._arms.get((agent, action))
        return None if arm is None else arm.prior_mean

    def knows(self, agent: str, ids: list[str]) -> bool:
        """Has the head learned anything for any of these actions of ``agent``?"""
        arms = self._arms
        return any((agent, aid) in arms for aid in ids)

    def spread(
        self, agent: str, x: np.ndarray, ids: list[str], scores: list[float] | None = None, noise: bool = False
    ) -> list[float]:
        """Each action's posterior standard deviation at ``x``: of its mean given the live model's
        ``scores`` (None: no model), as ``means`` gives it. Up to the noise scale, or with ``noise``
        in reward units: times the action's estimated noise (1 while it has no rewards)."""
        unit = 1.0 / (self.settings.prior if scores is None else self.settings.model_prior)
        xx = float(x.dot(x))
        arms = self._arms
        out = []
        for k, aid in enumerate(ids):
            score = scores[k] if scores is not None else 0.0
            arm = arms.get((agent, aid))
            if arm is None:
                out.append(sqrt(unit * (xx + score * score)))
                continue
            state = arm.state
            var = arm._spread(x, state.row_of, state.features, state.base, state.down, state.r, score, unit)
            out.append(sqrt(max(var, 0.0) * (state.noise if noise else 1.0)))
        return out

    def remember(
        self,
        decision_id: str,
        agent: str,
        action: str,
        x: np.ndarray,
        score: float | None,
        source: Any = None,
        model: str | None | EllipsisType = ...,
    ) -> None:
        """Keep what a reward for ``decision_id`` will need, the ``pending`` newest decisions at most.

        Takes no lock (a decision never waits for an update): each OrderedDict call is atomic.
        ``score``: the live model's score of ``action``, None without a model; ``model``: that
        model's version (by default the one the head follows now): a reward for a decision made
        beside another model than the head's teaches the head nothing (its score was another
        model's), though it is still relearned at the next model. ``source``: what a later model
        needs to score the decision again (``prepare``'s ``rescore`` reads it), kept for the
        newest ``warm_rows`` decisions; None: the reward is not relearned beside later models.
        """
        if score is not None:
            x = x.copy()
            x[-1] = score
        wait = self.rewards(agent).wait_window if self.rewards is not None else math.inf
        pending = self._pending
        if decision_id in pending:  # a reused id: the decision made first keeps it, as in the store
            return
        followed = self.base if model is ... else model
        pending[decision_id] = (agent, action, x, score is not None, followed, self._clock() + wait)
        _trim(pending, self.settings.pending)
        if source is not None and self.settings.warm_rows:
            sources = self._sources
            sources[decision_id] = (agent, source)
            sources.move_to_end(decision_id)
            _trim(sources, self.settings.warm_rows)

    def learn(self, decision_id: str, reward: float) -> bool:
        """Update on ``reward`` for a decision this head remembers; False if it does not (any
        longer), or if the decision was made beside another model than the head's."""
        if not math.isfinite(reward):
            return False
        found = self._pending.pop(decision_id, None)
        if found is None:
            return False
        return self._learn(decision_id, found, reward)

    def later(self, decision_id: str, reward: float) -> None:
        """Learn ``reward`` for ``decision_id`` at the next ``apply``: the caller (an agent's thread,
        reporting an outcome) pays for one append, and ``apply`` learns each action's rewards at once."""
        self._inbox.append((decision_id, reward))

    @property
    def waiting(self) -> int:
        """Rewards handed to ``later`` and not yet learned."""
        return len(self._inbox)

    def apply(self) -> int:
        """Learn the rewards handed to ``later`` since the last call (``learn_many``); how many it learned."""
        inbox = self._inbox
        with self._applying:
            # those there now (pops are atomic); any handed on meanwhile wait for the next
            return self.learn_many([inbox.popleft() for _ in range(len(inbox))])

    def learn_many(self, rewards: Iterable[tuple[str, float]], agents: Sequence[str] | None = None) -> int:
        """``learn`` for each (decision id, reward), each action's updates as one step
        (``_Arm.update_many``: the same state as one by one, for fewer numpy calls), the actions
        in the order of their last reward (which arms ``max_arms`` keeps); how many it learned.
        With ``agents`` (the agent each outcome named, in order), a reward is learned only for that
        agent's decision: an outcome naming another agent is no reward of this decision."""
        pending = self._pending
        found = []
        if agents is None:
            for decision_id, reward in rewards:
                if math.isfinite(reward) and (f := pending.pop(decision_id, None)) is not None:
                    found.append((decision_id, f, reward))
        else:
            for (decision_id, reward), agent in zip(rewards, agents, strict=True):
                f = pending.get(decision_id)
                if f is not None and f[0] == agent and math.isfinite(reward):
                    del pending[decision_id]
                    found.append((decision_id, f, reward))
        return self._learn_all(found)

    def _learn(self, decision_id: str, found: _Pending, reward: float) -> bool:
        # ``_learn_all`` for one reward, kept apart: its grouping added 2.5 µs (18%) to each ``learn``
        agent, action, x, beside, model, _ = found
        kept = self._sources.pop(decision_id, None)
        with self._lock:
            current = model == self.base
            if current:
                self._update(agent, action, x, reward, beside)
                self.updates += 1
            if kept is not None:
                self._keep_recent(agent, action, x, reward, kept[1])
        if current:
            self._shared(agent, action, decision_id, x, reward, beside)
        return current

    def _learn_all(self, found: list[tuple[str, _Pending, float]]) -> int:
        """``_learn`` for each, the updates of one arm made together."""
        groups: dict[tuple[str, str, bool], tuple[list[np.ndarray], list[float]]] = {}
        opened: dict[tuple[str, str], float] = {}
        learned = []
        with self._lock:
            for decision_id, (agent, action, x, beside, model, _), reward in found:
                kept = self._sources.pop(decision_id, None)
                if model == self.base:
                    xs, ys = _group(groups, (agent, action, beside))
                    xs.append(x)
                    ys.append(reward)
                    self._count(agent, action, beside, reward, opened)
                    learned.append((agent, action, decision_id, x, reward, beside))
                if kept is not None:
                    self._keep_recent(agent, action, x, reward, kept[1])
            for (agent, action, beside), (xs, ys) in groups.items():
                self._update_all(agent, action, xs, ys, beside, prior_mean=opened.get((agent, action), 0.0))
            self.updates += len(learned)
        for update in learned:
            self._shared(*update)
        return len(learned)

    def _keep_recent(self, agent: str, action: str, x: np.ndarray, reward: float, source: Any) -> None:
        recent = self._recent
        if recent.maxlen != self.settings.warm_rows:  # a reload changed it
            recent = self._recent = deque(recent, maxlen=self.settings.warm_rows)
        recent.append((agent, action, x, reward, source))

    def absorb(
        self, agent: str, action: str, base: str | None, beside: bool, index: list[int], value: list[float],
        target: float, prior_mean: float | None = None,
    ) -> bool:
        """Learn an update another process's head made (its inputs as ``index``/``value``, its
        arm's ``prior_mean``: None for this head's own); False unless it learned beside the same
        live model (its corrections were for that model's scores)."""
        return self._absorb_all([(agent, action, base, beside, index, value, target, prior_mean)]) == 1

    def absorb_many(self, updates: Iterable[Learned]) -> int:
        """``absorb`` for each of other processes' updates, each action's made together; how many it learned."""
        return self._absorb_all(
            (u.agent, u.action, u.base, u.beside, u.index, u.value, u.target, u.prior_mean) for u in updates
        )

    def _absorb_all(
        self, updates: Iterable[tuple[str, str, str | None, bool, list[int], list[float], float, float | None]]
    ) -> int:
        groups: dict[tuple[str, str, bool], tuple[list[np.ndarray], list[float]]] = {}
        order = []
        for agent, action, base, beside, index, value, target, prior_mean in updates:
            x = self._absorbable(base, index, value, target, prior_mean)
            if x is not None:
                xs, ys = _group(groups, (agent, action, beside))
                xs.append(x)
                ys.append(target)
                order.append((agent, action, beside, target, prior_mean))
        with self._lock:
            opened: dict[tuple[str, str], float] = {}
            for agent, action, beside, target, prior_mean in order:
                self._count(agent, action, beside, target, opened, prior_mean)
            for (agent, action, beside), (xs, ys) in groups.items():
                self._update_all(agent, action, xs, ys, beside, prior_mean=opened.get((agent, action), 0.0))
            self.updates += len(order)
            self.absorbed += len(order)
        return len(order)

    def _count(
        self, agent: str, action: str, beside: bool, reward: float, opened: dict[tuple[str, str], float],
        prior_mean: float | None = None,
    ) -> None:
        """Count ``reward`` towards ``agent``'s mean (under the lock), noting in ``opened`` at an
        action's first reward of the batch without a model the prior mean its arm is made at if
        the batch makes it: as ``_update`` would (as if the rewards were learned one by one), or
        ``prior_mean``, the one another process made it with."""
        made_at = _made_at(self._rewards, agent, reward)
        if not beside:  # used only if the arm is made (new, or dropped by max_arms meanwhile)
            opened.setdefault((agent, action), made_at if prior_mean is None else prior_mean)

    def _absorbable(
        self, base: str | None, index: list[int], value: list[float], target: float, prior_mean: float | None
    ) -> np.ndarray | None:
        """An update's inputs, or None if this head cannot learn it: made beside another live model
        (its corrections were for that model's scores), or not well formed."""
        if base != self.base or len(index) != len(value) or not math.isfinite(target):
            return None
        if prior_mean is not None and not math.isfinite(prior_mean):
            return None
        if index and max(index) >= self._d:
            return None
        x = np.zeros(self._d)
        x[index] = value
        return x if np.isfinite(x).all() else None

    def _shared(self, agent: str, action: str, decision_id: str, x: np.ndarray, reward: float, beside: bool) -> None:
        if self.on_update is not None:
            try:
                self.on_update(agent, action, decision_id, x, reward, beside)
            except Exception:  # sharing is beside learning: it must never undo it
                _log.exception("an online update could not be shared")

    def expire(self) -> int:
        """Learn each agent's ``rewards.default`` for the decisions whose wait window ended with no
        outcome; how many. Called every fraction of a second by the client's sender thread and the
        daemon. Goes from the oldest and stops at the first still waiting; first learns the rewards
        handed on (``later``), which would otherwise find their decision's default learned."""
        if self.rewards is None:
            return 0
        self.apply()
        now = self._clock()
        pending = self._pending
        expired = []
        while pending:
            try:
                decision_id, found = next(iter(pending.items()))
            except (StopIteration, RuntimeError):  # emptied or changed meanwhile: next time
                break
            if found[5] > now:
                break
            if pending.pop(decision_id, None) is None:
                continue  # its reward came meanwhile
            expired.append((decision_id, found, self.rewards(found[0]).default))
        for at in range(0, len(expired), _EXPIRED):
            self._learn_all(expired[at : at + _EXPIRED])
        self.defaults += len(expired)
        return len(expired)

    def _arm(self, agent: str, action: str, arms: OrderedDict | None, prior_mean: float) -> _Arm:
        """The arm to update (made if new, at ``prior_mean``), moved to the end of ``arms`` (the head's by default)."""
        key = (agent, action)
        arms = self._arms if arms is None else arms
        arm = arms.get(key)
        if arm is None:
            arm = arms[key] = _Arm(self._d, prior_mean)
            while len(arms) > self.settings.max_arms:
                arms.popitem(last=False)  # the arm updated least recently goes first
        else:
            arms.move_to_end(key)
        return arm

    def _update(self, agent: str, action: str, x: np.ndarray, reward: float, beside_model: bool) -> None:
        """Learn one reward (under the lock), and count it towards the agent's mean."""
        settings = self.settings
        made_at = _made_at(self._rewards, agent, reward)
        arm = self._arm(agent, action, None, 0.0 if beside_model else made_at)
        arm.update(x, reward - arm.prior_mean, settings.model_prior if beside_model else settings.prior)

    def _update_all(
        self, agent: str, action: str, xs: list[np.ndarray], rewards: list[float], beside_model: bool,
        arms: OrderedDict | None = None, prior_mean: float = 0.0,
    ) -> None:
        """``_update`` for each, as one step where there are enough of them to be cheaper so; a
        new arm is made at ``prior_mean``. Counts nothing: the caller has."""
        settings = self.settings
        arm = self._arm(agent, action, arms, prior_mean)
        prior = settings.model_prior if beside_model else settings.prior
        shift = arm.prior_mean
        if len(xs) < _BATCH:
            for x, reward in zip(xs, rewards):
                arm.update(x, reward - shift, prior)
            return
        for at in range(0, len(xs), _MOST):  # S is k×k: its factor and inverse cost O(k³)
            arm.update_many(np.array(xs[at : at + _MOST]), np.array(rewards[at : at + _MOST]) - shift, prior)

    def prepare(self, version: str | None, rescore: Rescore | None) -> None:
        """Relearn the newest ``warm_rows`` rewards beside ``version``'s scores of their decisions
        (``rescore``; with no model, as they were), into arms of their own that ``follow(version)``
        then starts with at once.

        Called by the thread that loads the model (``ModelSource.on_load``) before the model is
        served, so that the relearning, some tens of milliseconds, is no decision's. Rewards
        learned meanwhile go to the arms of the model still served, and are not relearned.
        """
        with self._lock:
            recent, forgotten = list(self._recent), self._forgotten
        arms = self._relearned(recent, version, rescore)
        with self._lock:
            if self._forgotten == forgotten:  # else an agent was forgotten meanwhile: ``follow`` relearns
                self._prepared = (version, arms)

    def follow(self, version: str | None, rescore: Rescore | None = None) -> None:
        """Start afresh beside a new live model (or none): the gate judged it better than the policy
        that logged its holdout, which was this head's, so the head's corrections start from it.

        It starts with the newest ``warm_rows`` rewards relearned beside the new model's scores of
        their decisions (with no model: as they were), as corrections to the new model: as
        ``prepare`` made them, or, if it was not told of this model as it loaded, relearned here
        with ``rescore``, under the lock. Only this head's own decisions have a source to rescore;
        what it absorbed from other processes is not relearned.
        """
        with self._lock:
            if version == self.base:
                return
            self.base = version
            prepared, self._prepared = self._prepared, None
            if prepared is None or prepared[0] != version:
                prepared = (version, self._relearned(list(self._recent), version, rescore))
            self._arms, self.warmed = prepared[1]

    def _relearned(
        self, recent: list[tuple[str, str, np.ndarray, float, Any]], version: str | None, rescore: Rescore | None
    ) -> tuple[OrderedDict, int]:
        """New arms that learned ``recent`` beside ``version``'s scores (``rescore``), and how many
        rows they learned; empty where there is nothing to score them with."""
        arms: OrderedDict[tuple[str, str], _Arm] = OrderedDict()
        if not recent or (version is not None and rescore is None):
            return arms, 0
        try:
            scores = [0.0] * len(recent) if version is None else rescore([r[4] for r in recent])  # type: ignore[misc]
        except Exception:  # the model is served all the same, beside a head started empty
            _log.exception(
                "the new model could not score the newest decisions; the online head starts empty", version=version
            )
            return arms, 0
        groups: dict[tuple[str, str], tuple[list[np.ndarray], list[float]]] = {}
        # with no model, each arm at the prior mean a head learning these rewards one by one makes it at
        totals: dict[str, tuple[float, int]] = {}
        opened: dict[tuple[str, str], float] = {}
        learned = 0
        for (agent, action, x, reward, _), score in zip(recent, scores):
            if score is None or not math.isfinite(score):
                continue
            x = x.copy()
            x[-1] = score
            xs, ys = _group(groups, (agent, action))
            xs.append(x)
            ys.append(reward)
            opened.setdefault((agent, action), _made_at(totals, agent, reward) if version is None else 0.0)
            learned += 1
        for (agent, action), (xs, ys) in groups.items():
            self._update_all(agent, action, xs, ys, version is not None, arms, opened[(agent, action)])
        return arms, learned

    def forget(self, agent: str) -> None:
        """Drop all the head holds of ``agent``: its arms, decisions awaiting a reward, and the
        decisions kept to relearn (their contexts)."""
        with self._lock:
            for key in [k for k in self._arms if k[0] == agent]:
                del self._arms[key]
            self._rewards.pop(agent, None)
            self._recent = deque((r for r in self._recent if r[0] != agent), maxlen=self._recent.maxlen)
            self._prepared = None  # relearned from what is forgotten now
            self._forgotten += 1  # and a ``prepare`` under way is not to publish its arms
        for decision_id, found in list(self._pending.items()):
            if found[0] == agent:
                self._pending.pop(decision_id, None)
        for decision_id, source in list(self._sources.items()):  # (agent, source)
            if source[0] == agent:
                self._sources.pop(decision_id, None)

    def stats(self) -> dict[str, Any]:
        return {
            "arms": len(self._arms),
            "pending": len(self._pending),
            "updates": self.updates,
            "defaults": self.defaults,
            "base": self.base,
            "absorbed": self.absorbed,
            "warmed": self.warmed,
        }

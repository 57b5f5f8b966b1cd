"""Doubly robust pseudo-outcomes: what each action would have earned on each logged decision.

For decision i and action a (among those it offered),

    Γ(i, a) = q̂(x_i, a) + 1{A_i = a} (r_i − q̂(x_i, a)) / p_i

(``reflexd.learning.ope.dr_terms`` with the policy that always takes a). Because p_i is the exact
probability the logged action was chosen with, the mean of Γ(·, a) over any set of decisions
picked by their context is an unbiased estimate of what always taking a would have earned on
them, whatever the logging policy did and however wrong q̂ is; q̂ only has to be good for the
estimate to be steady. So a segment's value, or the difference between two actions in it, is the
mean of these terms over the segment's rows, with an interval (``bounded_estimate``, below):
counterfactual, not the correlation a per-action average of observed rewards would give.

q̂ is the live model's score when the run is handed the live model (``reward_model: auto``), or
else fit here, cross-fitted: the agent's decisions are split in two at random, a gradient-boosted
tree model (scikit-learn's ``HistGradientBoostingRegressor``, the action as a categorical input
beside the raw context features) is fit on each half, and each decision is scored by the model
that did not see it, so no decision's own reward leaks into its q̂. Each fit uses at most
``FIT_ROWS`` decisions: past that the model improves little and the fit costs seconds. It runs on
one thread: the extraction is a background job at idle priority, and OpenMP's threads waiting on
each other on a busy host cost ten times more than they save (measured: 0.6 s on one thread,
8–12 s on two, for the same fit on a loaded 2-core machine).

**Intervals where propensities are tiny.** A segment's mean of Γ(·, a) rests on the decisions
that took a, each weighted 1/p: with p ≈ 0.02 a few dozen of them carry it, the terms are heavy
tailed, and the normal interval (whose spread is estimated from those same few) is too narrow
exactly when they happen to be few or alike. Two things make it honest (measured by
``python -m bench.coverage``):

- an estimate is made only where the action's importance weights 1{A = a}/p in the segment have a
  Kish effective sample size (Σw)² / Σw² of at least ``MIN_ESS`` (for a difference, both
  actions'): below it no interval of the mean covers reliably, whatever its form;
- the interval is the normal one widened by Bernstein's range term, R ln(2/α) / (3n) on each
  side (R the terms' observed range, n their number): the part of Bernstein's inequality for a
  mean of bounded terms that the normal approximation drops, which matters only while a few
  heavy terms carry the mean and vanishes as n grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reflexd.analysis.experience import Experience, Feature
from reflexd.learning.ope import Estimate, dr_terms, estimate

FIT_ROWS = 150_000
CHUNK_ROWS = 65_536  # decisions scored (and turned into pseudo-outcomes) at a time: bounds the temporaries
MAX_ACTIONS = 32  # per agent, the most chosen; rarer ones get no patterns or rules (a note says so)
_HGB_MAX_CATEGORY = 254  # HistGradientBoosting's categories must lie below max_bins (255)
# fewest effective decisions behind an estimate: below 10 every interval the coverage benchmark
# tried covered 77–84% for its worst logging policy, from 10 on the widened one 95% or more for
# every policy; 30 leaves a margin
MIN_ESS = 30.0
COVERAGE_CONFIDENCE = 0.999  # ``covered``


@dataclass(frozen=True)
class AgentOutcomes:
    """One agent's decisions with each analysed action's availability and Γ."""

    agent: str
    exp: Experience  # the agent's rows only (views of the whole's arrays), in time order
    actions: list[str]  # analysed actions, most chosen first
    chosen: np.ndarray  # int64 [n], index into ``actions``, -1 for an action not analysed
    available: np.ndarray  # bool [n, A]
    gamma: np.ndarray  # float64 [n, A], NaN where not available
    # r − q̂(x, chosen): what the reward model did not expect (NaN where the action is not analysed);
    # q̂ itself is not kept, it is [n, A] and nothing else needs it
    residual: np.ndarray
    left_out: list[str]  # actions beyond MAX_ACTIONS

    def __len__(self) -> int:
        return len(self.exp)


def agent_outcomes(exp: Experience, agent: int, live: bool, seed: int) -> AgentOutcomes:
    """The agent's rows of ``exp`` with q̂ (the live model's scores if ``live``) and Γ."""
    mine = exp.take(exp.rows_of(agent))
    counts = np.bincount(mine.chosen, minlength=len(exp.actions))
    offered_any = mine.offered[np.unique(mine.action_set)].any(axis=0)
    ranked = [int(a) for a in np.lexsort((np.arange(len(counts)), -counts)) if offered_any[a]]
    kept, left_out = ranked[:MAX_ACTIONS], ranked[MAX_ACTIONS:]
    local = np.full(len(exp.actions), -1, dtype=np.int64)
    local[kept] = np.arange(len(kept))
    chosen = local[mine.chosen]
    available = mine.offered[mine.action_set][:, kept]
    if live and mine.live_scores is not None:
        q_hat = mine.live_scores[:, kept].astype(np.float64)
    else:
        q_hat = cross_fit(mine, chosen, available, seed)
    q_hat = np.where(available & np.isfinite(q_hat), q_hat, 0.0)
    took = chosen >= 0
    residual = np.full(len(chosen), np.nan)
    residual[took] = mine.reward[took] - q_hat[np.flatnonzero(took), chosen[took]]
    return AgentOutcomes(
        agent=exp.agents[agent],
        exp=mine,
        actions=[exp.actions[a] for a in kept],
        chosen=chosen,
        available=available,
        gamma=pseudo_outcomes(chosen, mine.prob, mine.reward, q_hat, available),
        residual=residual,
        left_out=[exp.actions[a] for a in left_out],
    )


def kish_ess(weights: np.ndarray) -> float:
    """(Σw)² / Σw²: how many equally weighted decisions the weights are worth (0 for none)."""
    total = float(weights.sum())
    if total <= 0.0:
        return 0.0
    return total * total / float(np.square(weights).sum())


def action_weights(data: AgentOutcomes, rows: np.ndarray, action: int) -> np.ndarray:
    """The importance weights 1{A = action} / p of ``rows`` (indices or a mask)."""
    return np.where(data.chosen[rows] == action, 1.0 / data.exp.prob[rows], 0.0)


def effective_size(data: AgentOutcomes, rows: np.ndarray, *actions: int) -> float:
    """The smallest Kish effective sample size among ``actions``' weights on ``rows``: what an
    estimate of their values, or of a difference between them, rests on."""
    return min(kish_ess(action_weights(data, rows, a)) for a in actions)


def covered(data: AgentOutcomes, rows: np.ndarray, *actions: int) -> bool:
    """Whether the logged probabilities account for every decision of ``rows`` for each of ``actions``.

    Where the logging policy could take an action at every decision, the action's importance
    weights 1{A = a} / p average 1 (in expectation, whatever the policy). Where it never could at
    some (a policy that sends easy tasks to one action only, say), they average the share of
    decisions where it could, and the action's value there rests on the reward model's
    extrapolation alone, which no interval accounts for: a tight interval around a guess. So an
    estimate is made only where the weights' mean is consistent with 1, at ``COVERAGE_CONFIDENCE``:
    a check of the log's support, not of a finding. A log that takes the action rarely somewhere
    (a probability of a few thousandths on part of the decisions) fails it too until it has taken
    it there often enough, and rightly: until then the value there is the model's guess as well.
    """
    weights = [action_weights(data, rows, a) for a in actions]
    if any(len(w) < 2 for w in weights):
        return True  # too few to tell: the fewest decisions an estimate needs decide
    for w in weights:
        e = bounded_estimate(w, COVERAGE_CONFIDENCE)
        if not e.lower <= 1.0 <= e.upper:
            return False
    return True


def bounded_estimate(terms: np.ndarray, confidence: float) -> Estimate:
    """The mean of ``terms`` with the normal interval widened by Bernstein's range term on each side.

    Bernstein's inequality bounds a mean of bounded terms by a variance part (which the normal
    interval is) plus R ln(2/α) / (3n); the normal approximation drops the second, and with
    importance weights of 50 it is the second that a handful of heavy terms make large. The
    interval always contains the normal one.
    """
    e = estimate(terms, confidence)
    spread = float(terms.max() - terms.min())
    extra = spread * math.log(2.0 / (1.0 - confidence)) / (3.0 * len(terms))
    return Estimate(value=e.value, stderr=e.stderr, lower=e.lower - extra, upper=e.upper + extra)


def pseudo_outcomes(
    chosen: np.ndarray, prob: np.ndarray, reward: np.ndarray, q_hat: np.ndarray, available: np.ndarray
) -> np.ndarray:
    """Γ [n, A] by ``ope.dr_terms``, one action's always-take-it policy at a time (NaN where not offered).

    A decision whose action is not among the A analysed takes an extra column the policies never
    put weight on: its reward then only enters through q̂, as DR says it should. Computed
    ``CHUNK_ROWS`` decisions at a time, so the policies' [n, A + 1] arrays never exist whole.
    """
    n, n_actions = q_hat.shape
    gamma = np.empty((n, n_actions))
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, n)
        m = hi - lo
        other = np.where(chosen[lo:hi] < 0, n_actions, chosen[lo:hi])
        q_pad = np.zeros((m, n_actions + 1))
        q_pad[:, :n_actions] = q_hat[lo:hi]
        pi = np.zeros((m, n_actions + 1))
        for a in range(n_actions):
            pi[:, a] = 1.0
            gamma[lo:hi, a] = dr_terms(pi, other, prob[lo:hi], reward[lo:hi], q_pad)
            pi[:, a] = 0.0
    gamma[~available] = np.nan
    return gamma


def hgb_design(features: dict[str, Feature], rows: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    """The raw features of ``rows`` as a float32 matrix for HistGradientBoosting (NaN where absent),
    and which columns are categorical (codes beyond its limit share one). The last column is left
    for the action, set by the caller."""
    names = list(features)
    x = np.empty((len(rows), len(names) + 1), dtype=np.float32)
    categorical = []
    for j, name in enumerate(names):
        f = features[name]
        values = f.values[rows]
        if f.numeric:
            x[:, j] = values
            categorical.append(False)
        else:
            codes = np.minimum(values, _HGB_MAX_CATEGORY - 1).astype(np.float32)
            codes[values < 0] = np.nan
            x[:, j] = codes
            categorical.append(True)
    return x, categorical + [True]


def cross_fit(exp: Experience, chosen: np.ndarray, available: np.ndarray, seed: int) -> np.ndarray:
    """q̂ [n, A]: each row scored, for every action it offered, by the model fit on the other half."""
    # scikit-learn's own dependency, the documented way to bound its OpenMP threads
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _cross_fit(exp, chosen, available, seed)


def _cross_fit(exp: Experience, chosen: np.ndarray, available: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingRegressor

    n, n_actions = available.shape
    q_hat = np.zeros((n, n_actions))
    if n == 0:
        return q_hat
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, 2, size=n)
    # features no decision of this agent has are left out (the agent's rows of another's keys)
    features = {name: f for name, f in exp.features.items() if f.present().any()}
    # decisions of an action not analysed still teach the model about the context
    action = np.where(chosen < 0, min(n_actions, _HGB_MAX_CATEGORY - 1), chosen).astype(np.float32)
    for k in (0, 1):
        train = np.flatnonzero(fold != k)
        score = np.flatnonzero(fold == k)
        if len(score) == 0:
            continue
        if len(train) < 50:
            # too few to fit: the other half's mean reward, which DR corrects all the same
            q_hat[score] = exp.reward[train].mean() if len(train) else 0.0
            continue
        if len(train) > FIT_ROWS:
            train = np.sort(rng.choice(train, FIT_ROWS, replace=False))
        x, categorical = hgb_design(features, train)
        x[:, -1] = action[train]
        # 50 rounds at a rate of 0.2: scoring a million decisions for every action is most of a
        # run's time, and twice the rounds left the pseudo-outcomes' spread within 0.1%
        model = HistGradientBoostingRegressor(
            max_iter=50,
            learning_rate=0.2,
            max_leaf_nodes=31,
            min_samples_leaf=20,
            categorical_features=categorical,
            early_stopping=len(train) > 10_000,
            random_state=seed + k,
        )
        model.fit(x, exp.reward[train])
        del x
        for lo in range(0, len(score), CHUNK_ROWS):
            rows = score[lo : lo + CHUNK_ROWS]
            x, _ = hgb_design(features, rows)
            for a in range(n_actions):
                offered = available[rows, a]
                if offered.any():
                    x[:, -1] = a
                    q_hat[rows[offered], a] = model.predict(x[offered])
    return q_hat

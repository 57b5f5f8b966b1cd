"""Slate estimators: the value of a ranking policy on slates (k of n actions) another policy logged.

A slate is logged as one decision per slot (``slot`` 0, 1, ..., sharing a ``slate`` id), each with
its own reward r(l) and the probability ``prob`` its action had at that slot given the slots
before it. The estimators are Open Bandit Pipeline's (``obp.ope.estimators_slate``), formula for
formula; each weighs every slot's reward by a ratio of target to logging propensities, sums the
weighted rewards and divides by the number of slates:

- standard IPS (``SlateStandardIPS``): the joint propensity of the whole slate, the same for
  each of its slots. Unbiased whatever the user does, and the heaviest weights.
- independent IPS (``SlateIndependentIPS``): the marginal propensity of the slot's action at that
  slot. Unbiased when each slot's reward depends on its own action alone (item-position model).
- reward-interaction IPS (``SlateRewardInteractionIPS``): the propensity of the slots up to and
  including l (cascade model: a user reads from the top and what is below does not matter).

    V = (1 / #slates) * sum over logged slots of  r(l) * target_pscore(l) / pscore(l)

OBP's interval is a bootstrap; here, as in ``reflexd.learning.ope``, the value is the mean of
per-slate terms (each slate's summed weighted rewards), with their normal interval.

Arrays throughout, one entry per logged slot: ``slate`` (ids of any kind), ``slot`` (int, from
0), ``reward``, and the propensities of the logging and the target policy of the estimator's kind.
``joint_pscores`` and ``cascade_pscores`` build the first and last kind from per-slot conditional
probabilities (what a reflexd slate logs); ``slot_marginals`` gives the middle kind for a policy
that fills slots in order. Pure: numbers in, numbers out.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from reflexd.learning.ope import Estimate, estimate


def _slates(slate: np.ndarray, slot: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Each row's slate as 0..S-1, the rows ordered by slate then slot, and S; a slot named twice is refused."""
    if slate.ndim != 1 or slot.shape != slate.shape:
        raise ValueError(f"slate {slate.shape} and slot {slot.shape} must be 1-D and of one length")
    if slate.shape[0] == 0:
        raise ValueError("no logged slots")
    if not (np.issubdtype(slot.dtype, np.integer) and slot.min() >= 0):
        raise ValueError("slot must hold non-negative integers (positions counted from 0)")
    _, codes = np.unique(slate, return_inverse=True)
    codes = codes.reshape(-1)
    order = np.lexsort((slot, codes))
    same = (codes[order][1:] == codes[order][:-1]) & (slot[order][1:] == slot[order][:-1])
    if same.any():
        row = order[1:][same][0]
        raise ValueError(f"slot {int(slot[row])} of slate {str(slate[row])!r} is logged more than once")
    return codes, order, int(codes.max()) + 1


def _arrays(*arrays: object) -> list[np.ndarray]:
    return [np.asarray(a) for a in arrays]


def _check_pscores(n: int, reward: np.ndarray, pscore: np.ndarray, target: np.ndarray, kind: str) -> None:
    if not reward.shape == pscore.shape == target.shape == (n,):
        raise ValueError(
            f"reward {reward.shape}, {kind} {pscore.shape} and target_{kind} {target.shape} must have one entry per slot ({n})"
        )
    if not np.all((pscore > 0.0) & (pscore <= 1.0)):  # also false for NaN
        raise ValueError(f"every {kind} must be in (0, 1]: the logging policy chose the action with it")
    if not np.all((target >= 0.0) & (target <= 1.0)):
        raise ValueError(f"every target_{kind} must be in [0, 1]")
    if not np.all(np.isfinite(reward)):
        raise ValueError("every reward must be finite")


def _terms(codes: np.ndarray, n_slates: int, reward: np.ndarray, pscore: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each slate's sum of its slots' weighted rewards; their mean is the estimate."""
    return np.bincount(codes, weights=reward * (target / pscore), minlength=n_slates)


def _same_within(codes: np.ndarray, values: np.ndarray, name: str) -> None:
    first = np.full(int(codes.max()) + 1, np.nan)
    first[codes[::-1]] = values[::-1]  # each slate's first row wins
    if np.any(first[codes] != values):
        raise ValueError(f"{name} must be one value per slate (the joint propensity of the whole slate)")


def _non_increasing(codes: np.ndarray, order: np.ndarray, values: np.ndarray, name: str) -> None:
    c, v = codes[order], values[order]
    if np.any((c[1:] == c[:-1]) & (v[1:] > v[:-1])):
        raise ValueError(f"{name} must not increase down a slate: it is the propensity of the slots up to each one")


def standard_ips_terms(
    slate: Sequence, slot: Sequence, reward: Sequence, pscore: Sequence, target_pscore: Sequence
) -> np.ndarray:
    """Per-slate terms of standard slate IPS; ``pscore`` and ``target_pscore`` are joint (one per slate)."""
    slate, slot, reward, pscore, target_pscore = _arrays(slate, slot, reward, pscore, target_pscore)
    codes, _, n_slates = _slates(slate, slot)
    _check_pscores(slate.shape[0], reward, pscore, target_pscore, "pscore")
    _same_within(codes, pscore, "pscore")
    _same_within(codes, target_pscore, "target_pscore")
    return _terms(codes, n_slates, reward, pscore, target_pscore)


def independent_ips_terms(
    slate: Sequence, slot: Sequence, reward: Sequence, pscore: Sequence, target_pscore: Sequence
) -> np.ndarray:
    """Per-slate terms of independent slate IPS; the pscores are each slot's marginal (item-position)."""
    slate, slot, reward, pscore, target_pscore = _arrays(slate, slot, reward, pscore, target_pscore)
    codes, _, n_slates = _slates(slate, slot)
    _check_pscores(slate.shape[0], reward, pscore, target_pscore, "pscore")
    return _terms(codes, n_slates, reward, pscore, target_pscore)


def reward_interaction_ips_terms(
    slate: Sequence, slot: Sequence, reward: Sequence, pscore: Sequence, target_pscore: Sequence
) -> np.ndarray:
    """Per-slate terms of reward-interaction slate IPS; the pscores are cascade (slots up to each one)."""
    slate, slot, reward, pscore, target_pscore = _arrays(slate, slot, reward, pscore, target_pscore)
    codes, order, n_slates = _slates(slate, slot)
    _check_pscores(slate.shape[0], reward, pscore, target_pscore, "pscore")
    _non_increasing(codes, order, pscore, "pscore")
    _non_increasing(codes, order, target_pscore, "target_pscore")
    return _terms(codes, n_slates, reward, pscore, target_pscore)


def standard_ips(
    slate: Sequence, slot: Sequence, reward: Sequence, pscore: Sequence, target_pscore: Sequence,
    confidence: float = 0.95,
) -> Estimate:
    """OBP's ``SlateStandardIPS``: joint propensities (``joint_pscores``)."""
    return estimate(standard_ips_terms(slate, slot, reward, pscore, target_pscore), confidence)


def independent_ips(
    slate: Sequence, slot: Sequence, reward: Sequence, pscore: Sequence, target_pscore: Sequence,
    confidence: float = 0.95,
) -> Estimate:
    """OBP's ``SlateIndependentIPS``: each slot's marginal propensity (``slot_marginals``)."""
    return estimate(independent_ips_terms(slate, slot, reward, pscore, target_pscore), confidence)


def reward_interaction_ips(
    slate: Sequence, slot: Sequence, reward: Sequence, pscore: Sequence, target_pscore: Sequence,
    confidence: float = 0.95,
) -> Estimate:
    """OBP's ``SlateRewardInteractionIPS``: propensities of the slots up to each one (``cascade_pscores``)."""
    return estimate(reward_interaction_ips_terms(slate, slot, reward, pscore, target_pscore), confidence)


# every slate estimator as per-slate terms of one signature (slate, slot, reward, pscore, target_pscore)
SLATE_ESTIMATORS = {
    "sips": standard_ips_terms,
    "iips": independent_ips_terms,
    "rips": reward_interaction_ips_terms,
}


# ---- propensities ---------------------------------------------------------------------------


def _cascade(codes: np.ndarray, order: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """The running product of ``prob`` down each slate, in ``order`` (by slate, then slot)."""
    c, p = codes[order], prob[order].astype(np.float64)
    n = len(c)
    first = np.maximum.accumulate(np.where(np.r_[True, c[1:] != c[:-1]], np.arange(n), 0))
    depth = np.arange(n) - first  # the row's place in its slate
    out = p.copy()
    for d in range(1, int(depth.max()) + 1):  # one pass per depth, not per slate
        rows = np.flatnonzero(depth == d)
        out[rows] = out[rows - 1] * p[rows]
    return out


def _prob(slate: np.ndarray, prob: Sequence) -> np.ndarray:
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape != slate.shape:
        raise ValueError(f"prob {prob.shape} must have one entry per slot ({slate.shape[0]})")
    return prob


def cascade_pscores(slate: Sequence, slot: Sequence, prob: Sequence) -> np.ndarray:
    """Per row, the product of ``prob`` over its slate's slots up to and including its own.

    ``prob`` is each slot's probability given the slots before it (what ``Policy.decide_slate``
    logs), so the product is the probability of the slate's first slots as they were filled; a slot
    missing from the log is left out of the product.
    """
    slate, slot = _arrays(slate, slot)
    codes, order, _ = _slates(slate, slot)
    result = np.empty(slate.shape[0])
    result[order] = _cascade(codes, order, _prob(slate, prob))
    return result


def joint_pscores(slate: Sequence, slot: Sequence, prob: Sequence) -> np.ndarray:
    """Per row, the product of ``prob`` over all its slate's slots: the probability of the whole slate."""
    slate, slot = _arrays(slate, slot)
    codes, order, n_slates = _slates(slate, slot)
    joint = np.empty(n_slates)
    joint[codes[order]] = _cascade(codes, order, _prob(slate, prob))  # each slate's last slot is written last
    return joint[codes]


def slot_marginals(distribution: Callable[[list[int]], Sequence[float]], n_actions: int, slots: int) -> np.ndarray:
    """[slots, n_actions]: the probability of each action at each slot, for a policy that fills the
    slots in order, each from ``distribution(left)`` over the actions ``left`` (indices, ascending).

    Exact, by going through every way the earlier slots can be filled: about n^(slots-1) calls.
    """
    if not 1 <= slots <= n_actions:
        raise ValueError(f"slots must be from 1 to the {n_actions} actions, not {slots}")
    out = np.zeros((slots, n_actions))
    frontier: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    for position in range(slots):
        deeper = []
        for taken, p in frontier:
            left = [a for a in range(n_actions) if a not in taken]
            q = distribution(left)
            if len(q) != len(left):
                raise ValueError(f"distribution gave {len(q)} probabilities for {len(left)} actions")
            for a, qa in zip(left, q):
                if qa > 0.0:
                    out[position, a] += p * qa
                    if position + 1 < slots:
                        deeper.append(((*taken, a), p * qa))
        frontier = deeper
    return out

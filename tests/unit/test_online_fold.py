"""The online head's fold spread over updates (``_Arm._fold``): each update writes one block of
the next base at most, a fold ends before the rows kept fill their buffer, the buffer being
written is never in a published state, and the covariance stays the exact ridge one throughout,
new inputs arriving mid-fold included."""

from __future__ import annotations

import numpy as np
import pytest

from reflexd.deciding import online
from reflexd.deciding.online import _Arm


def contexts(n: int, d: int, keys: int, seed: int, grow: int = 4) -> np.ndarray:
    """Sparse rows of ``keys`` inputs and a bias; the inputs seen so far widen by one every ``grow`` rows."""
    rng = np.random.default_rng(seed)
    xs = np.zeros((n, d))
    for i in range(n):
        width = min(d - 2, keys + i // grow)
        at = rng.choice(width, size=keys, replace=False)
        xs[i, at] = rng.choice([-1.0, 1.0, 0.5, 2.3], size=keys)
        xs[i, -2] = 1.0
    return xs


def exact_covariance(xs: np.ndarray, features: np.ndarray, prior: float) -> np.ndarray:
    x = xs[:, features]
    return np.linalg.inv(x.T @ x + prior * np.eye(len(features)))


# 521 inputs: more rows per block than _Arm._fold_rows, or the fold would outlast the rows' buffer
@pytest.mark.parametrize(("d", "keys"), [(20, 3), (130, 40), (600, 520)])
def test_a_fold_writes_one_block_per_update_and_ends_before_the_rows_kept_fill(d: int, keys: int) -> None:
    xs = contexts(40 + 6 * online._DEFERRED, d, keys, seed=d, grow=1_000_000)  # the inputs seen stop growing
    arm = _Arm(d)
    start = 0
    while start < 40 or arm._folding is not None:  # from no fold under way
        arm.update(xs[start], 1.0, 1.0)
        start += 1
    m = len(arm.features)
    blocks = -(-m // max(_Arm._fold_rows, -(-m // (online._DEFERRED - 2))))
    steps = ended = 0
    for x in xs[start:]:
        before, folded = arm.state, arm._folded if arm._folding is not None else None
        arm.update(x, 0.5, 1.0)
        after = arm.state
        assert after.r < len(after.down)
        if arm._folding is not None:  # under way: the old base, and at most one more block written
            assert after.base is before.base
            assert arm._folded - (folded or 0) <= max(_Arm._fold_rows, -(-m // (online._DEFERRED - 2)))
            steps += 1
        elif after.base is not before.base:  # just ended: the old base less the first rows kept
            done = before.down[: online._DEFERRED]
            np.testing.assert_allclose(after.base, before.base - done.T @ done, rtol=1e-12, atol=1e-14)
            np.testing.assert_array_equal(after.down[: after.r], before.down[online._DEFERRED : before.r + 1])
            assert steps == 1 + blocks < online._DEFERRED  # set up alone, then a block per update
            steps = 0
            ended += 1
    assert ended >= 4


def test_the_base_being_written_is_in_no_published_state_and_none_changes() -> None:
    """Every state published, through several folds and new inputs arriving during them, stays as it
    was read; the fold's buffer becomes a state's base only whole, and is not written after."""
    d, prior = 60, 1.0
    xs = contexts(12 * online._DEFERRED, d, 8, seed=4, grow=2)
    arm = _Arm(d)
    published: list[tuple[online._State, list, np.ndarray]] = []
    finished = set()
    for i, x in enumerate(xs):
        arm.update(x, float(i % 3), prior)
        state = arm.state
        if arm._folding is not None:
            new, rows, _ = arm._folding
            for s in [state, *(s for s, _, _ in published)]:
                assert not np.may_share_memory(new, s.base) and not np.may_share_memory(new, s.down)
                assert not np.may_share_memory(rows, s.down)
        finished.add(id(state.base))
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in state]
        published.append((state, copies, state.down[: state.r].copy()))
    assert len(finished) > 6  # folds ended and inputs arrived more than a few times
    for state, copies, rows in published:
        for kept, now in zip(copies, state):
            if isinstance(kept, np.ndarray) and now is not state.down:
                np.testing.assert_array_equal(kept, now)
        np.testing.assert_array_equal(state.down[: state.r], rows)


@pytest.mark.parametrize("prior", [0.5, 2.0])
def test_the_covariance_is_the_exact_ridge_one_at_every_update_new_inputs_arriving_mid_fold(prior: float) -> None:
    # 99 inputs seen soon (the bias one), then 30 more one at a time, each during a fold (a fold
    # takes several updates at this width)
    n = 40 * online._DEFERRED
    xs = np.hstack([contexts(n, 100, 12, seed=7, grow=1_000_000), np.zeros((n, 30))])
    unseen = list(range(100, 130))
    rng = np.random.default_rng(1)
    arm = _Arm(130)
    arrived = 0
    for i, x in enumerate(xs):
        if arm._folding is not None and unseen and rng.random() < 0.5:
            x[unseen.pop()] = 1.5
            arrived += 1
        arm.update(x, float(np.sin(i)), prior)
        np.testing.assert_allclose(
            arm.covariance(), exact_covariance(xs[: i + 1], arm.features, prior), rtol=1e-9, atol=1e-12
        )
    assert arrived > 10

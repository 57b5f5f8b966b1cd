"""The online head's compiled update (``reflexd.deciding._rls``) is built by the install, gives numpy's
step and fold blocks (``_step_numpy``, ``_fold_numpy``) to float rounding on their own and over
whole streams, and refuses a wrong argument with a ValueError naming it instead of reading out of
bounds."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from reflexd.deciding import online
from reflexd.deciding.online import _Arm, _fold_numpy, _spread_numpy, _step_numpy
from test_online_fold import contexts

compiled = online._compiled


def test_the_compiled_update_is_built_and_used() -> None:
    # the extension is optional in pyproject.toml: an install that silently failed to build it would
    # leave the head at numpy's speed; `make install` must build it
    assert compiled is not None, "reflexd.deciding._rls was not built (is a C compiler installed?)"
    assert (_Arm._step, _Arm._fold_block, _Arm._spread) == (compiled.step, compiled.fold, compiled.spread)


class NumpyArm(_Arm):
    _step = staticmethod(_step_numpy)
    _fold_block = staticmethod(_fold_numpy)
    _spread = staticmethod(_spread_numpy)
    _fold_rows = 32


def random_state(rng: np.random.Generator, d: int, m: int) -> tuple[np.ndarray, ...]:
    features = rng.choice(d, size=m, replace=False).astype(np.intp)
    row_of = np.full(d, -1, dtype=np.intp)
    row_of[features] = np.arange(m)
    a = rng.normal(size=(m, m))
    base = a @ a.T / m + np.eye(m)
    down = rng.normal(scale=0.1, size=(2 * online._DEFERRED, m))
    theta = rng.normal(size=m)
    weights = np.zeros(d)
    weights[features] = theta
    x = np.zeros(d)
    if m:
        x[rng.choice(features, size=min(m, 1 + rng.integers(m)), replace=False)] = rng.choice([1.0, -1.0, 0.5, 2.3], 1)
    return x, row_of, features, theta, base, down, weights


@pytest.mark.parametrize("seed", range(40))
def test_one_step_equals_numpys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = int(rng.integers(3, 200))
    m = 0 if seed % 10 == 0 else int(rng.integers(1, d + 1))  # an arm that has seen nothing, now and then
    r = int(rng.integers(0, 2 * online._DEFERRED))
    x, row_of, features, theta, base, down, weights = random_state(rng, d, m)
    outs = []
    for step in (compiled.step, _step_numpy):
        mine = down.copy(), np.empty(m), weights.copy()
        stepped = step(x, row_of, features, theta, base, mine[0], r, 0.7, mine[1], mine[2])
        outs.append((stepped, *mine))
    (got, got_down, got_theta, got_weights), (want, want_down, want_theta, want_weights) = outs
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(got_theta, want_theta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_weights, want_weights, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_down, want_down, rtol=1e-12, atol=1e-12)  # row r written, the others kept
    assert np.array_equal(np.delete(got_down, r, axis=0), np.delete(down, r, axis=0))


@pytest.mark.parametrize("seed", range(30))
def test_the_spread_equals_numpys(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    d = int(rng.integers(2, 200))
    m = 0 if seed % 10 == 0 else int(rng.integers(1, d + 1))
    r = int(rng.integers(0, 2 * online._DEFERRED + 1))
    x, row_of, features, _, base, down, _ = random_state(rng, d, m)
    x[-1] = 0.0  # the score's slot, as at a decision
    if seed % 3 == 0:  # inputs the arm has never seen: their prior variance
        x[rng.choice(d - 1, size=min(3, d - 1), replace=False)] = 1.5
    last = 0.0 if seed % 4 == 0 else float(rng.normal())
    unit = float(rng.uniform(0.01, 2.0))
    got = compiled.spread(x, row_of, features, base, down, r, last, unit)
    want = _spread_numpy(x, row_of, features, base, down, r, last, unit)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_the_heads_spread_is_the_same_either_way() -> None:
    xs = contexts(300, 130, 10, seed=4)
    arms = {}
    for cls in (_Arm, NumpyArm):
        arm = arms[cls] = cls(130)
        for x, y in zip(xs, np.random.default_rng(4).normal(size=len(xs))):
            arm.update(x, float(y), 1.0)
    for x in xs[-20:]:
        values = [arm._spread(x, s.row_of, s.features, s.base, s.down, s.r, 0.3, 0.5)
                  for arm in arms.values() for s in [arm.state]]
        assert values[0] == pytest.approx(values[1], rel=1e-9)
        assert values[0] > 0


def test_a_wrong_spread_argument_is_refused() -> None:
    args = valid(np.random.default_rng(8))
    x, row_of, features, _, base, down = args[:6]
    with pytest.raises(ValueError, match="lengths disagree"):
        compiled.spread(x, row_of, features[:-1], base, down, 3, 0.0, 1.0)
    with pytest.raises(ValueError, match="r is past"):
        compiled.spread(x, row_of, features, base, down, len(down) + 1, 0.0, 1.0)
    with pytest.raises(ValueError, match=re.escape("row_of[")):
        compiled.spread(x, np.where(row_of >= 0, row_of + 100, row_of), features, base, down, 3, 0.0, 1.0)
    with pytest.raises(TypeError, match="8 arguments"):
        compiled.spread(x, row_of, features, base, down, 3, 0.0)


def test_an_input_never_seen_returns_none_and_writes_nothing() -> None:
    rng = np.random.default_rng(3)
    x, row_of, features, theta, base, down, weights = random_state(rng, 50, 20)
    unseen = int(np.flatnonzero(row_of < 0)[0])
    x[unseen] = 1.0
    new_theta, new_weights, kept = np.zeros(20), weights.copy(), down.copy()
    for step in (compiled.step, _step_numpy):
        assert step(x, row_of, features, theta, base, down, 4, 1.0, new_theta, new_weights) is None
        assert np.array_equal(down, kept) and not new_theta.any() and np.array_equal(new_weights, weights)


@pytest.mark.parametrize(("m", "a", "b"), [(1, 0, 1), (31, 0, 3), (85, 7, 14), (129, 120, 140), (40, 40, 40)])
def test_a_fold_block_equals_numpys(m: int, a: int, b: int) -> None:
    rng = np.random.default_rng(m)
    base, down = rng.normal(size=(m, m)), rng.normal(size=(2 * online._DEFERRED, m))
    rows = np.ascontiguousarray(down[: online._DEFERRED].T)
    got, want = np.zeros((m, m)), np.zeros((m, m))
    compiled.fold(got, base, rows, down, a, b)
    _fold_numpy(want, base, rows, down, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not got[b:].any() and not got[:a].any()  # the block alone


@pytest.mark.parametrize(("d", "keys", "n"), [(20, 3, 300), (130, 10, 800), (130, 40, 600), (600, 120, 200)])
def test_a_stream_of_updates_gives_numpys_state(d: int, keys: int, n: int) -> None:
    xs = contexts(n, d, keys, seed=keys)  # new inputs keep arriving, through folds
    targets = np.random.default_rng(keys).normal(0.3, 1.0, size=n)
    arm, reference = _Arm(d), NumpyArm(d)
    for x, y in zip(xs, targets):
        arm.update(x, float(y), 1.0)
        reference.update(x, float(y), 1.0)
    np.testing.assert_array_equal(arm.features, reference.features)
    np.testing.assert_allclose(arm.covariance(), reference.covariance(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(arm.state.weights, reference.state.weights, rtol=1e-9, atol=1e-12)
    assert arm.state.noise == pytest.approx(reference.state.noise, rel=1e-9)


def test_a_wrong_fold_argument_is_refused() -> None:
    m = 10
    base, down = np.eye(m), np.zeros((2 * online._DEFERRED, m))
    rows = np.ascontiguousarray(down[: online._DEFERRED].T)
    with pytest.raises(ValueError, match="shapes disagree"):
        compiled.fold(np.zeros((m, m + 1)), base, rows, down, 0, 2)
    with pytest.raises(ValueError, match="shapes disagree"):
        compiled.fold(np.zeros((m, m)), base, rows, down[:3], 0, 2)
    with pytest.raises(ValueError, match=re.escape("new: a C-contiguous, writable")):
        compiled.fold(_read_only(np.zeros((m, m))), base, rows, down, 0, 2)
    with pytest.raises(ValueError, match="0 <= a <= b"):
        compiled.fold(np.zeros((m, m)), base, rows, down, 3, 2)
    with pytest.raises(TypeError, match="6 arguments"):
        compiled.fold(base, rows, down, 0, 2)


def valid(rng: np.random.Generator) -> list:
    x, row_of, features, theta, base, down, weights = random_state(rng, 30, 12)
    return [x, row_of, features, theta, base, down, 3, 1.0, np.empty(12), weights.copy()]


ARGS = ["x", "row_of", "features", "theta", "base", "down", "r", "target", "new_theta", "new_weights"]


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("x", lambda a: a.astype(np.float32), "x: a 1-dimensional array of float64"),
        ("row_of", lambda a: a.astype(np.int32), "row_of: a 1-dimensional array of intp"),
        ("features", lambda a: a.astype(np.float64), "features: a 1-dimensional array of intp"),
        ("base", lambda a: np.asfortranarray(a[:, :-1])[:, :], "base: a C-contiguous"),
        ("base", lambda a: a[:-1], "lengths disagree"),
        ("theta", lambda a: a[::2], "theta: a C-contiguous"),
        ("down", lambda a: _read_only(a), "down: a C-contiguous, writable"),
        ("new_weights", lambda a: a[:-1], "lengths disagree"),
        ("r", lambda r: 2 * online._DEFERRED, "r is past down's rows"),
        ("r", lambda r: -1, "r is past down's rows"),
        ("row_of", lambda a: np.where(a >= 0, a + 100, a), "row_of"),
        ("features", lambda a: a + 1000, "features[0]"),
        ("x", lambda a: [0.0] * len(a), "x: a C-contiguous"),
    ],
)
def test_a_wrong_argument_is_refused_by_name(name: str, bad, message: str) -> None:
    args = valid(np.random.default_rng(5))
    i = ARGS.index(name)
    args[i] = bad(args[i])
    with pytest.raises(ValueError, match=re.escape(message)):
        compiled.step(*args)


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def test_a_refused_step_writes_nothing() -> None:
    args = valid(np.random.default_rng(7))
    args[2] = args[2].copy()
    args[2][-1] = 10_000  # the last seen input's index is past the inputs: found before any write
    kept = [a.copy() for a in (args[5], args[8], args[9])]
    with pytest.raises(ValueError, match="features"):
        compiled.step(*args)
    for before, after in zip(kept, (args[5], args[8], args[9])):
        assert np.array_equal(before, after, equal_nan=True)


def test_the_wrong_number_or_kind_of_arguments_is_a_type_error() -> None:
    args = valid(np.random.default_rng(6))
    with pytest.raises(TypeError, match="10 arguments"):
        compiled.step(*args[:9])
    args[7] = "one"
    with pytest.raises(TypeError):
        compiled.step(*args)
    args[7], args[6] = 1.0, np.intp(3)  # numpy's integers are integers
    assert compiled.step(*args) is not None


def test_without_the_compiled_module_the_head_learns_with_numpy() -> None:
    # as where it could not be built: the import of reflexd.deciding._rls fails
    code = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "reflexd.deciding._rls":
            raise ImportError("hidden")
sys.meta_path.insert(0, Hide())
from reflexd.config import OnlineConfig
from reflexd.deciding import online
assert online._compiled is None and online._Arm._step is online._step_numpy, online._Arm._step
head = online.OnlineHead(OnlineConfig())
x = head.features({"k": "v"})
for i in range(40):
    head.remember(str(i), "a", "good", x, None)
    assert head.learn(str(i), 1.0)
assert head.means("a", x, ["good"])[0] > 0.9
print("numpy")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "numpy", done.stderr

"""Segments of the context: found by scikit-learn's regression trees, stated as readable conditions.

A segment is a list of ``Condition``s on raw features (``task == code``, ``difficulty > 0.6``).
Trees find them: ``DecisionTreeRegressor`` fit to pseudo-outcomes (one action's, or the
difference between two actions') over the raw features, numeric ones as they are and each
frequent category of a categorical one as a 0/1 column (scikit-learn's trees take no categories
as such). Each leaf's path becomes a segment, simplified (the tightest bound per side of a
number; ``==`` a category, or ``!=`` / ``not in`` the ones excluded) with thresholds rounded to
three significant digits so a person can read them.

A tree splits a node only if the split separates the two halves by ``split_z`` standard errors:
the decrease in squared error a split makes is (n_L n_R / (N n)) (μ_L − μ_R)², which is z² σ² / N
for a difference of z standard errors, so ``min_impurity_decrease = split_z² · var(y) / N``.
Without this, every tree would split down to its depth limit on noise.

Whatever a tree did, every estimate is made on the rows a segment's conditions select
(``mask``), evaluated the same way everywhere: when the segment is found, when it is checked on a
later window, when a rule from an earlier run is checked again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import msgspec
import numpy as np

from reflexd.analysis.experience import Feature
from reflexd.analysis.findings import Condition

TREE_ROWS = 100_000  # rows a tree is fit on, at most: the segments' structure, not their estimates
ONE_HOT_CATEGORIES = 16  # the most frequent categories of a feature the trees can split on
ONE_HOT_MIN_SHARE = 0.01
_OP_ORDER = {"==": 0, "in": 1, "!=": 2, "not in": 3, ">": 4, "<=": 5}


@dataclass(frozen=True)
class Column:
    """One column of a tree's input: a numeric feature, or one category of a categorical one."""

    feature: str
    category: str | None = None
    among: tuple[str, ...] | None = None  # every value the feature takes, when they are all known


def tree_design(features: dict[str, Feature], rows: np.ndarray) -> tuple[np.ndarray, list[Column]]:
    """float32 [len(rows), C] of the features on ``rows``: numbers (NaN where absent) and 0/1 columns."""
    columns: list[Column] = []
    parts: list[np.ndarray] = []
    for name, f in features.items():
        values = f.values[rows]
        if f.numeric:
            if np.isnan(values).all():
                continue
            columns.append(Column(name))
            parts.append(values.astype(np.float32))
            continue
        assert f.categories is not None
        counts = np.bincount(values[values >= 0], minlength=f.other + 1)[: f.other]
        order = np.argsort(-counts, kind="stable")[:ONE_HOT_CATEGORIES]
        for code in order:
            if counts[code] < max(1, ONE_HOT_MIN_SHARE * len(rows)) or counts[code] == len(rows):
                continue
            columns.append(Column(name, f.categories[code], f.categories if f.complete else None))
            parts.append((values == code).astype(np.float32))
    if not parts:
        return np.zeros((len(rows), 0), dtype=np.float32), []
    return np.column_stack(parts), columns


def find_segments(
    x: np.ndarray,
    columns: list[Column],
    y: np.ndarray,
    *,
    max_depth: int,
    max_leaves: int,
    split_z: float,
    min_leaf: int,
    seed: int,
) -> list[list[Condition]]:
    """The leaves of a regression tree of ``y`` on ``x`` as segments (one empty segment: no split)."""
    from sklearn.tree import DecisionTreeRegressor

    n = len(y)
    variance = float(y.var()) if n else 0.0
    if n < 2 * min_leaf or not columns or variance == 0.0:
        return [[]]
    tree = DecisionTreeRegressor(
        max_depth=max_depth,
        max_leaf_nodes=max_leaves,
        min_samples_leaf=min_leaf,
        min_impurity_decrease=split_z**2 * variance / n,
        random_state=seed,
    )
    tree.fit(x, y)
    inner = tree.tree_
    segments: list[list[Condition]] = []

    def walk(node: int, path: list[tuple[Column, bool, float]]) -> None:
        left, right = inner.children_left[node], inner.children_right[node]
        if left == right:  # a leaf
            segments.append(simplify(path))
            return
        column = columns[inner.feature[node]]
        threshold = float(inner.threshold[node])
        walk(left, [*path, (column, True, threshold)])
        walk(right, [*path, (column, False, threshold)])

    walk(0, [])
    unique: dict[str, list[Condition]] = {}
    for segment in segments:
        unique.setdefault(segment_key(segment), segment)
    return list(unique.values())


def nice(x: float) -> float:
    """``x`` to three significant digits: thresholds people can read."""
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.3g}")


def simplify(path: list[tuple[Column, bool, float]]) -> list[Condition]:
    """A tree path (column, went left, threshold) as the fewest conditions saying the same."""
    lower: dict[str, float] = {}
    upper: dict[str, float] = {}
    equal: dict[str, str] = {}
    excluded: dict[str, set[str]] = {}
    among: dict[str, tuple[str, ...] | None] = {}
    for column, left, threshold in path:
        among[column.feature] = column.among
        name = column.feature
        if column.category is None:
            if left:  # x <= threshold
                upper[name] = min(upper.get(name, math.inf), nice(threshold))
            else:
                lower[name] = max(lower.get(name, -math.inf), nice(threshold))
        elif left:  # the 0/1 column is 0: not this category
            excluded.setdefault(name, set()).add(column.category)
        else:
            equal[name] = column.category
    conditions: list[Condition] = []
    for name, value in lower.items():
        conditions.append(Condition(name, ">", value))
    for name, value in upper.items():
        conditions.append(Condition(name, "<=", value))
    for name, value in equal.items():
        conditions.append(Condition(name, "==", value))
    for name, values in excluded.items():
        if name in equal:
            continue
        known = among.get(name)
        rest = [v for v in known if v not in values] if known is not None else None
        # said the shorter way round where every value is known: tier = pro, not tier != free
        if rest is not None and len(rest) == 1:
            conditions.append(Condition(name, "==", rest[0]))
        elif rest is not None and 0 < len(rest) < len(values):
            conditions.append(Condition(name, "in", sorted(rest)))
        elif len(values) == 1:
            conditions.append(Condition(name, "!=", next(iter(values))))
        else:
            conditions.append(Condition(name, "not in", sorted(values)))
    return canonical(conditions)


def canonical(conditions: list[Condition]) -> list[Condition]:
    return sorted(conditions, key=lambda c: (c.feature, _OP_ORDER[c.op]))


def segment_key(conditions: list[Condition]) -> str:
    return msgspec.json.encode(canonical(conditions)).decode()


def rule_id(agent: str, action: str, baseline: str, conditions: list[Condition]) -> str:
    """Stable across runs and processes: the same statement always has the same id."""
    text = msgspec.json.encode([agent, action, baseline, canonical(conditions)])
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def mask(conditions: list[Condition], features: dict[str, Feature], n: int) -> np.ndarray:
    """Rows where every condition holds; a condition on a feature a row lacks never holds."""
    out = np.ones(n, dtype=bool)
    for c in conditions:
        out &= _holds(c, features.get(c.feature), n)
    return out


def _holds(c: Condition, f: Feature | None, n: int) -> np.ndarray:
    if f is None:
        return np.zeros(n, dtype=bool)
    if c.op in ("<=", ">"):
        if not f.numeric or isinstance(c.value, (str, list)):
            return np.zeros(n, dtype=bool)
        bound = f.values.dtype.type(c.value)  # compared in the values' own precision: 0.6 <= 0.6 holds
        with np.errstate(invalid="ignore"):
            return f.values <= bound if c.op == "<=" else f.values > bound
    if f.numeric:  # a category named where the feature is a number: nothing to compare
        return np.zeros(n, dtype=bool)
    assert f.categories is not None
    index = {name: code for code, name in enumerate(f.categories)}
    values = [c.value] if isinstance(c.value, str) else c.value if isinstance(c.value, list) else []
    codes = [index[v] for v in values if v in index]
    inside = np.isin(f.values, codes) if codes else np.zeros(n, dtype=bool)
    if c.op in ("==", "in"):
        return inside
    return (f.values >= 0) & ~inside


def describe(conditions: list[Condition]) -> str:
    """``task = code and difficulty > 0.6``; empty conditions read ``everywhere``."""
    if not conditions:
        return "everywhere"
    return " and ".join(_text(c) for c in conditions)


def _text(c: Condition) -> str:
    if c.op in ("in", "not in"):
        values = c.value if isinstance(c.value, list) else [str(c.value)]
        return f"{c.feature} {c.op} {{{', '.join(values)}}}"
    value = f"{c.value:g}" if isinstance(c.value, float) else str(c.value)
    return f"{c.feature} {'=' if c.op == '==' else c.op} {value}"

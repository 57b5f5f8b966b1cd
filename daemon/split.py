"""How a snapshot's experiences divide between training and the gate, and the fewest a run can use.

A run on enough rows holds out the newest ``trainer.holdout_fraction`` for the gate. One on fewer
(from ``trainer.cross_fit_from`` on) is cross-fitted instead: the gate judges the learner on
every row, each scored by the learner fit on the others (``reflexd.trainer.fit``).

Plain arithmetic on the config's numbers, in a module of its own so the config check can use what
the dataset, the trainer and the scheduler use without importing them. It reads a ``Config`` by
the three settings it needs and imports nothing of reflexd's, so the config can import it.
"""

from __future__ import annotations

import math
from typing import Protocol


class _Trainer(Protocol):
    @property
    def holdout_fraction(self) -> float: ...
    @property
    def cross_fit_from(self) -> int: ...


class _Gate(Protocol):
    @property
    def first_min_holdout(self) -> int: ...


class Config(Protocol):
    """The settings run sizes depend on; ``reflexd.config.Config`` has them."""

    @property
    def trainer(self) -> _Trainer: ...
    @property
    def gate(self) -> _Gate: ...

# the fewest a holdout run trains on; a cross-fitted run's folds train on fewer
MIN_TRAIN_ROWS = 10
# a cross-fitted run on more rows than this (only with a large holdout run size) fits this many
# folds of consecutive rows rather than one per row, so its cost stays a dozen fits or so
MAX_FOLDS = 12


def holdout_rows(n: int, fraction: float) -> int:
    """How many of ``n`` rows ``dataset.split_holdout`` holds out: at least one and at most
    ``n - 1`` (none below two rows)."""
    return min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0


def holdout_run_rows(config: Config) -> int:
    """The fewest joined experiences a run with a holdout can use: 13 with the defaults.

    Holding out ``trainer.holdout_fraction`` of them must leave the trainer its MIN_TRAIN_ROWS
    and the gate ``gate.first_min_holdout`` rows (and the 2 an interval needs); a run on fewer
    is cross-fitted (``cross_fitted``), or with cross-fitting off could only fail.
    """
    fraction, wanted = config.trainer.holdout_fraction, max(2, config.gate.first_min_holdout)
    # round(fraction * n) reaches ``wanted`` only from (wanted - 0.5) / fraction on: start just
    # below that, so a tiny fraction costs a few steps rather than billions
    n = max(MIN_TRAIN_ROWS, math.floor((wanted - 0.5) / fraction) - 2)
    while n - holdout_rows(n, fraction) < MIN_TRAIN_ROWS or holdout_rows(n, fraction) < wanted:
        n += 1
    return n


def folds(rows: int) -> int:
    """How many fits a cross-fitted run on ``rows`` rows makes before the one on every row: one
    per row (leave-one-out), at most MAX_FOLDS."""
    return min(rows, MAX_FOLDS)


def first_run_rows(config: Config) -> int:
    """The fewest joined experiences a run can use: 6 with the defaults.

    With cross-fitting on (``trainer.cross_fit_from`` > 0), that setting, raised to the
    ``gate.first_min_holdout`` rows (and the 2 an interval needs) the gate judges a cross-fitted
    run on, if it is below them; ``holdout_run_rows`` if that is no more, or cross-fitting is off.
    """
    start = config.trainer.cross_fit_from
    if start:
        start = max(start, 2, config.gate.first_min_holdout)
    holdout_run = holdout_run_rows(config)
    return start if 0 < start < holdout_run else holdout_run


def cross_fitted(config: Config, rows: int) -> bool:
    """Is a run on ``rows`` experiences cross-fitted? Those too few for a holdout run are, when
    cross-fitting is on (a run on fewer than ``first_run_rows`` fails either way)."""
    holdout_run = holdout_run_rows(config)
    return first_run_rows(config) < holdout_run and rows < holdout_run

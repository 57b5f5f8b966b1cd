"""The plugin groups, the contract each kind of plugin meets, and the one loader for them all.

Built-ins register through the same entry points a third-party package would (``pyproject.toml``),
so the core never imports a plugin module by path: it asks the group for a name. This module
imports neither torch nor onnxruntime; a plugin imports what it needs when it is loaded.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol, Sequence

from reflexd.errors import (
    UnknownExplorer,
    UnknownExporter,
    UnknownLearner,
    UnknownPlugin,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from reflexd.config import TrainerConfig
    from reflexd.learning.dataset import Batch

LEARNERS = "reflexd.learners"
EXPLORATION = "reflexd.exploration"
EXPORTERS = "reflexd.exporters"

_UNKNOWN: dict[str, type[UnknownPlugin]] = {
    LEARNERS: UnknownLearner,
    EXPLORATION: UnknownExplorer,
    EXPORTERS: UnknownExporter,
}

Progress = Callable[[int, int, float], None]
"""Called after each epoch with (epoch counted from 1, total epochs, mean training loss)."""


class Learner(Protocol):
    """Fits a reward model on logged decisions (group ``reflexd.learners``).

    ``fit`` returns a module whose ``forward(context [B, Dc] float32, actions [B, A, Da] float32)``
    gives ``(scores [B, A], spread [B, A])``: the predicted reward of each action (higher is
    better, in reward units) and the model's uncertainty about it (0 when it has none to offer).
    The module must be exportable to ONNX with dynamic B and A, and deterministic given ``seed``.
    A run may call ``fit`` a dozen times on as few as ``trainer.cross_fit_from - 1`` rows: a
    cross-fitted run (``reflexd.trainer.fit.cross_fit``) fits once per fold, then on every row.
    Only the chosen action has a reward: ``train.chosen_actions`` gives those [N, Da] without
    building the padded [N, A, Da] ``train.actions``.
    """

    name: str

    def fit(
        self, train: Batch, settings: TrainerConfig, seed: int, progress: Progress | None = None
    ) -> torch.nn.Module: ...


class Explorer(Protocol):
    """Turns one decision's scores into the distribution it samples from (group ``reflexd.exploration``).

    Called on every decision with plain float lists, so it should stay in plain Python for the
    handful of actions a decision offers. ``settings`` is an ``ExplorationConfig``; ``t`` is the
    experience count that drives decay. Each probability should stay above zero where it can:
    off-policy evaluation divides by it. An optional ``reads`` attribute, the names of the
    settings it uses, lets ``reflexd evaluate`` refuse a setting that would change nothing.
    """

    def __call__(self, settings: Any, scores: list[float], spread: Sequence[float] | None, t: int) -> list[float]: ...


class Exported(NamedTuple):
    seconds: float
    reused: bool  # filled into a cached graph rather than traced


class Exporter(Protocol):
    """Writes a trained module as the file clients load, and checks it (group ``reflexd.exporters``)."""

    def export(
        self, module: torch.nn.Module, context_dim: int, action_dim: int, path: str | Path,
        graphs: Path | None = None, reuse: bool = True,
    ) -> Exported: ...

    def parity(self, module: torch.nn.Module, path: str | Path, context: np.ndarray, actions: np.ndarray) -> float: ...


def available(group: str) -> list[str]:
    """The names registered in ``group``, sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


@cache
def _loaded(group: str, name: str) -> Any:
    for ep in entry_points(group=group, name=name):
        return ep.load()
    raise _UNKNOWN.get(group, UnknownPlugin)(group, name, available(group))


def load(group: str, name: str) -> Any:
    """What ``name`` refers to in ``group`` (loaded once per process), or an ``UnknownPlugin`` error."""
    return _loaded(group, name)


def load_learner(name: str) -> Learner:
    """A fresh instance of the learner registered under ``name``."""
    return load(LEARNERS, name)()


def load_explorer(name: str) -> Explorer:
    return load(EXPLORATION, name)


def load_exporter(name: str) -> Exporter:
    return load(EXPORTERS, name)()

"""Learner plugins: what turns a training Batch into a torch reward model.

A learner is found by name in the ``reflexd.learners`` entry-point group, the same way third-party
learners are, so the built-in MLP has no privileged path. This module must not import torch: the
daemon imports it to validate names, and only the trainer subprocess may load torch (learner
modules import it themselves).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Callable, Protocol

from reflexd.errors import TrainingError

if TYPE_CHECKING:
    import torch

    from reflexd.config import TrainerConfig
    from reflexd.learning.dataset import Batch

GROUP = "reflexd.learners"

Progress = Callable[[int, int, float], None]
"""Called after each epoch with (epoch counted from 1, total epochs, mean training loss)."""


class Learner(Protocol):
    """Fits a reward model on logged decisions.

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


class UnknownLearner(TrainingError):
    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        choices = ", ".join(available) if available else "none installed"
        super().__init__(f"unknown learner {name!r}; available: {choices}")


def available_learners() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load_learner(name: str) -> Learner:
    """An instance of the learner registered under ``name``."""
    for ep in entry_points(group=GROUP, name=name):
        return ep.load()()
    raise UnknownLearner(name, available_learners())

"""Early warning in-process: a running episode's predicted success after each step.

    watch = EpisodeWatch("/var/lib/reflexd/models")      # follows models/behaviour/CURRENT
    ep = watch.episode("task-42")
    p = ep.step({"task": "lookup"}, "search", 0.0)        # Prediction
    p.success, p.next_action_probs["search"], p.action_prob

Each step runs the live behaviour model's ONNX step graph once (one thread, inputs and outputs
pre-bound) and keeps the episode's recurrent state (h, c) here, in the client, so a step costs
one hash of the observation and one small graph run. ``next_action_probs`` is the distribution
the model expected this step's action to come from, given the episode so far and the
observation (``action_prob`` is the taken action's share); ``success`` is P(the episode succeeds)
after the step. ``expect(observation)`` gives the distribution for a step not yet taken, without
changing the state. Imports numpy, onnxruntime and msgspec only: never torch.

A version that carries an int8-weight copy of its step graph (``manifest.int8``) is run on that
copy: at the default size it takes a step in less than half the float graph's time, its
probabilities within the manifest's ``int8.parity_tolerance`` (measured ~0.01) of the float
graph's. ``EpisodeWatch(..., full_precision=True)`` runs the float graph instead;
``watch.precision`` says which one is running.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from numbers import Real
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from reflexd.deciding.behaviour import BEHAVIOUR_DIR, BehaviourModel, BehaviourRegistry, BehaviourSource

DEFAULT_MODELS = "/var/lib/reflexd/models"


class Prediction(msgspec.Struct, frozen=True, gc=False):
    next_action_probs: dict[str, float]  # over the vocabulary; "" is every action outside it
    success: float  # P(the episode succeeds), after this step
    action_prob: float  # the probability the model gave the action taken
    version: str  # the behaviour model's


class _Bound:
    """One step's inputs and outputs, pre-allocated and bound to the session."""

    def __init__(self, model: BehaviourModel) -> None:
        layers, hidden, vocab = model.layers, model.hidden, len(model.vocabulary)
        self.observation = np.zeros((1, model.manifest.features.context_dim), dtype=np.float32)
        self.action = np.zeros(1, dtype=np.int64)
        self.reward = np.zeros(1, dtype=np.float32)
        self.h = np.zeros((layers, 1, hidden), dtype=np.float32)
        self.c = np.zeros((layers, 1, hidden), dtype=np.float32)
        self.probs = np.zeros((1, vocab), dtype=np.float32)
        self.success = np.zeros(1, dtype=np.float32)
        self.h_out = np.zeros_like(self.h)
        self.c_out = np.zeros_like(self.c)
        b = self.binding = model.session.io_binding()
        for name, arr in (("observation", self.observation), ("action", self.action), ("reward", self.reward),
                          ("h", self.h), ("c", self.c)):
            b.bind_cpu_input(name, arr)
        for name, arr in (("action_probs", self.probs), ("success", self.success), ("h_out", self.h_out),
                          ("c_out", self.c_out)):
            b.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        self.obs_row = self.observation[0]
        self.probs_row = self.probs[0]


class _State:
    __slots__ = ("c", "h", "steps", "success", "version")

    def __init__(self, model: BehaviourModel) -> None:
        self.version = model.version
        self.h, self.c = model.zero_state(1)
        self.success: float | None = None
        self.steps = 0


class EpisodeHandle:
    """One running episode of an ``EpisodeWatch``."""

    def __init__(self, watch: EpisodeWatch, key: str) -> None:
        self.watch = watch
        self.key = key
        self.ended = False

    def step(self, observation: dict[str, Any], action: str, reward: float = 0.0) -> Prediction | None:
        if self.ended:  # its state is gone: a step now would begin another episode under its name
            raise ValueError(f"episode {self.key!r} has ended")
        return self.watch.step(self.key, observation, action, reward)

    def expect(self, observation: dict[str, Any]) -> dict[str, float] | None:
        return self.watch.expect(self.key, observation)

    @property
    def success(self) -> float | None:
        return self.watch.success(self.key)

    def end(self) -> None:
        if self.ended:
            raise ValueError(f"episode {self.key!r} has ended already")
        self.ended = True
        self.watch.end(self.key)


def _observation(observation: Any) -> None:
    if not isinstance(observation, dict):
        raise TypeError(f"observation must be a dict of keys to values, not {type(observation).__name__}")


class EpisodeWatch:
    """Keeps each running episode's recurrent state and predicts after every step.

    ``models`` is the models directory (its ``behaviour/`` line is followed), a
    ``BehaviourRegistry``, or a ``BehaviourModel`` to use as it is. From a registry, a version's
    int8 graph is run where it has one, its float graph with ``full_precision=True`` or where it
    has none (``precision`` says which); either file is loaded only if it matches its sha256 in
    the manifest (``error`` says why a version was refused). ``step`` returns None while there is
    no behaviour model. At most ``max_episodes`` episodes are kept (the least recently
    stepped are forgotten). A new version is picked up by ``refresh`` (called every
    ``refresh_every`` steps); an episode begun on the old version carries on from scratch on the new
    one, as states of different models do not mix. Thread-safe.
    """

    def __init__(
        self, models: str | Path | BehaviourRegistry | BehaviourModel = DEFAULT_MODELS, *, threads: int = 1,
        max_episodes: int = 10_000, refresh_every: int = 1000, full_precision: bool = False,
    ) -> None:
        self._fixed: BehaviourModel | None = models if isinstance(models, BehaviourModel) else None
        self.source: BehaviourSource | None = None
        self.full_precision = full_precision
        if self._fixed is None:
            registry = models if isinstance(models, BehaviourRegistry) else BehaviourRegistry(Path(models) / BEHAVIOUR_DIR)
            self.source = BehaviourSource(registry, threads, int8=not full_precision)
            self.source.refresh()
        self.max_episodes = max_episodes
        self.refresh_every = refresh_every
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._bound: _Bound | None = None
        self._bound_model: BehaviourModel | None = None
        self._lock = threading.Lock()
        self._count = 0

    @property
    def model(self) -> BehaviourModel | None:
        return self._fixed if self._fixed is not None else (self.source.model if self.source else None)

    @property
    def precision(self) -> str | None:
        """"int8" or "fp32": the graph running now (None while there is no model)."""
        model = self.model
        return None if model is None else model.precision

    @property
    def error(self) -> str | None:
        """Why the current version is not running (e.g. a file that fails its sha256), or None."""
        return self.source.error if self.source is not None else None

    def refresh(self) -> bool:
        return self.source.refresh() if self.source is not None else False

    def episode(self, key: str) -> EpisodeHandle:
        return EpisodeHandle(self, key)

    def _prepare(self, model: BehaviourModel) -> _Bound:
        if self._bound_model is not model:
            self._bound = _Bound(model)
            self._bound_model = model
        assert self._bound is not None
        return self._bound

    def step(self, episode: str, observation: dict[str, Any], action: str, reward: float = 0.0) -> Prediction | None:
        """Advance ``episode`` by one step (the observation, the action taken on it, its reward)."""
        _observation(observation)
        if type(reward) is bool or not isinstance(reward, Real) or not math.isfinite(reward):
            raise ValueError(f"reward must be a finite number, not {reward!r}")  # NaN would poison the state for good
        with self._lock:
            self._count += 1
            if self.source is not None and self._count % self.refresh_every == 0:
                self.source.refresh()
            model = self.model
            if model is None:
                return None
            bound = self._prepare(model)
            state = self._states.get(episode)
            if state is None or state.version != model.version:
                state = _State(model)
                self._states[episode] = state
                if len(self._states) > self.max_episodes:
                    self._states.popitem(last=False)
            else:
                self._states.move_to_end(episode)
            model.hasher.context(observation, out=bound.obs_row)
            index = model.index.get(action, 0)
            bound.action[0] = index
            bound.reward[0] = reward
            np.copyto(bound.h, state.h)
            np.copyto(bound.c, state.c)
            model.session.run_with_iobinding(bound.binding)
            np.copyto(state.h, bound.h_out)
            np.copyto(state.c, bound.c_out)
            probs = bound.probs_row.tolist()
            success = float(bound.success[0])
            state.success = success
            state.steps += 1
            return Prediction(dict(zip(model.vocabulary, probs)), success, probs[index], model.version)

    def expect(self, episode: str, observation: dict[str, Any]) -> dict[str, float] | None:
        """The distribution of the next action of ``episode`` on ``observation``; the state is unchanged."""
        _observation(observation)
        with self._lock:
            model = self.model
            if model is None:
                return None
            bound = self._prepare(model)
            state = self._states.get(episode)
            model.hasher.context(observation, out=bound.obs_row)
            bound.action[0] = 0
            bound.reward[0] = 0.0
            if state is None or state.version != model.version:
                bound.h.fill(0.0)
                bound.c.fill(0.0)
            else:
                np.copyto(bound.h, state.h)
                np.copyto(bound.c, state.c)
            model.session.run_with_iobinding(bound.binding)
            return dict(zip(model.vocabulary, bound.probs_row.tolist()))

    def success(self, episode: str) -> float | None:
        state = self._states.get(episode)
        return None if state is None else state.success

    def end(self, episode: str) -> None:
        with self._lock:
            self._states.pop(episode, None)

    def __len__(self) -> int:
        return len(self._states)

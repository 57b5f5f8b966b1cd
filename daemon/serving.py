"""Deciding: score the actions with the live ONNX model, explore, return the exact probability.

Shared by the in-process client (``reflexd.Policy``) and the daemon's socket ``decide``. Imports
neither torch nor duckdb: numpy, onnxruntime and msgspec are all a decision needs.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any, Callable

import msgspec
import numpy as np
import onnxruntime as ort

from .config import ExplorationConfig
from .errors import ModelIntegrityError, ReflexdError
from .features import Hasher, action_ids
from .protocol import Decision
from .registry import Manifest, Registry
from .plugins import exploration

BATCH_ROWS = 4096


class Choice(msgspec.Struct, frozen=True):
    """One decision: which action, with what probability, by which model."""

    id: str
    action: str
    index: int
    prob: float
    probs: list[float]
    model_version: str | None
    strategy: str

    def event(self, agent: str, context: dict[str, Any], actions: list[Any]) -> Decision:
        """The decision event that logs this choice."""
        return Decision(
            id=self.id,
            agent=agent,
            context=context,
            actions=actions,
            chosen=self.action,
            prob=self.prob,
            probs=self.probs,
            model_version=self.model_version,
            strategy=self.strategy,
            ts=time.time(),
        )


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class _Bound:
    """Pre-allocated arrays bound to a session's inputs and outputs for one action count."""

    def __init__(self, session: ort.InferenceSession, context_dim: int, action_dim: int, n_actions: int) -> None:
        self.context = np.zeros((1, context_dim), dtype=np.float32)
        self.actions = np.zeros((1, n_actions, action_dim), dtype=np.float32)
        self.scores = np.zeros((1, n_actions), dtype=np.float32)
        self.spread = np.zeros((1, n_actions), dtype=np.float32)
        self.binding = session.io_binding()
        self.binding.bind_cpu_input("context", self.context)
        self.binding.bind_cpu_input("actions", self.actions)
        for name, out in (("scores", self.scores), ("spread", self.spread)):
            self.binding.bind_output(name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)


class Scorer:
    """One loaded model version."""

    def __init__(self, manifest: Manifest, model: bytes, threads: int = 1) -> None:
        self.manifest = manifest
        self.version = manifest.version
        self.hasher = Hasher(manifest.features)
        try:
            self.session = _session(model, threads)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise ModelIntegrityError(manifest.version, f"onnxruntime cannot load it: {exc}") from None
        self._local = threading.local()  # agents may decide from several threads

    def score(self, context: dict[str, Any], actions: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and spread of each action; the arrays are reused by this thread's next call."""
        bound = self._bound(len(actions))
        self.hasher.context(context, out=bound.context[0])
        np.copyto(bound.actions[0], self.hasher.actions(actions))
        self.session.run_with_iobinding(bound.binding)
        return bound.scores[0], bound.spread[0]

    def _bound(self, n_actions: int) -> _Bound:
        # Inputs and outputs bound once per action count: a decision then costs one run on
        # buffers onnxruntime already knows (about 5 µs less than session.run).
        cache: dict[int, _Bound] | None = getattr(self._local, "bound", None)
        if cache is None:
            cache = self._local.bound = {}
        bound = cache.get(n_actions)
        if bound is None:
            spec = self.manifest.features
            bound = cache[n_actions] = _Bound(
                self.session, spec.context_dim, spec.action_dim, n_actions
            )
        return bound

    def score_batch(self, context: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores for [N, Dc] contexts and [N, A, Da] actions, run in chunks to bound memory."""
        parts = [
            self.session.run(None, {"context": context[i : i + BATCH_ROWS], "actions": actions[i : i + BATCH_ROWS]})
            for i in range(0, len(context), BATCH_ROWS)
        ]
        if not parts:
            n_actions = actions.shape[1] if actions.ndim == 3 else 0
            empty = np.zeros((0, n_actions), dtype=np.float32)
            return empty, empty
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class ModelSource:
    """Follows the registry's CURRENT pointer; a model that fails to load leaves the last good one.

    ``refresh`` is cheap when nothing changed (one stat), so callers may poll it often.
    """

    def __init__(self, registry: Registry, threads: int = 1) -> None:
        self.registry = registry
        self.threads = threads
        self.scorer: Scorer | None = None
        self.error: str | None = None
        self._stamp: tuple[int, int] | None = None

    def refresh(self) -> bool:
        """Load the current version if the pointer moved; True when the live model changed."""
        stamp = self.registry.current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        version = self.registry.current()
        if version is None:
            return False
        if self.scorer is not None and self.scorer.version == version:
            self.error = None  # the pointer came back to the model we serve
            return False
        try:
            manifest, model = self.registry.load(version)
            self.scorer = Scorer(manifest, model, self.threads)
        except ReflexdError as exc:
            self.error = str(exc)
            return False
        self.error = None
        return True


ExplorationFor = Callable[[str, Manifest | None], ExplorationConfig]


class Chooser:
    """Turns (agent, context, actions) into a Choice using the live model and exploration.

    ``t`` (the experience count that drives epsilon decay and SquareCB's gamma) is the model's
    training rows plus the decisions this chooser made since that model went live.
    """

    def __init__(self, source: ModelSource | None, exploration_for: ExplorationFor, seed: int | None = None) -> None:
        self.source = source
        self.exploration_for = exploration_for
        self._rng = random.Random(seed)
        self._since_load = 0
        self._version: str | None = None

    def _model_probabilities(
        self, scorer: Scorer, cfg: ExplorationConfig, context: dict[str, Any], actions: list[Any], t: int
    ) -> np.ndarray | None:
        """The model's distribution, or None (and the reason in ``source.error``) if it fails."""
        try:
            scores, spread = scorer.score(context, actions)
            p = exploration.probabilities(cfg, scores.astype(np.float64), spread.astype(np.float64), t)
        except Exception as exc:  # onnxruntime's errors are untyped; a decision must still be made
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if np.isfinite(p).all():
                return p
            reason = "non-finite scores"
        if self.source is not None:
            self.source.error = f"model {scorer.version} failed while deciding ({reason}); using the default policy"
        return None

    def choose(self, agent: str, context: dict[str, Any], actions: list[Any], decision_id: str | None = None) -> Choice:
        ids = action_ids(actions)
        scorer = self.source.scorer if self.source is not None else None
        manifest = scorer.manifest if scorer is not None else None
        version = scorer.version if scorer is not None else None
        if version != self._version:
            self._version = version
            self._since_load = 0
        cfg = self.exploration_for(agent, manifest)
        t = self._since_load + (int(manifest.training.get("train_rows", 0)) if manifest else 0)
        self._since_load += 1
        p = self._model_probabilities(scorer, cfg, context, actions, t) if scorer is not None else None
        if p is not None:
            strategy = cfg.strategy
        else:
            version = None  # logged as what it was: the default policy, not the model
            default = ids.index(cfg.default_action) if cfg.default_action in ids else None
            p = exploration.fallback(cfg, len(ids), default, t)
            strategy = "default"
        i = exploration.sample(p, self._rng.random())
        return Choice(
            id=decision_id or os.urandom(16).hex(),  # as unique as uuid4, without its overhead
            action=ids[i],
            index=i,
            prob=float(p[i]),
            probs=p.tolist(),
            model_version=version,
            strategy=strategy,
        )

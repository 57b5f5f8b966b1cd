"""Deciding: score the actions with the live ONNX model, explore, return the exact probability.

Shared by the in-process client (``reflexd.Policy``) and the daemon's socket ``decide``. Imports
neither torch nor duckdb: numpy, onnxruntime and msgspec are all a decision needs.
"""

from __future__ import annotations

import os
import random
import threading
import time
from math import isfinite
from typing import Any, Callable

import msgspec
import numpy as np
import onnxruntime as ort

from reflexd.config import ExplorationConfig
from reflexd.errors import ModelIntegrityError, ReflexdError
from reflexd.features import Hasher, action_ids
from reflexd.wire.protocol import Decision
from reflexd.registry import Manifest, Registry, experience
from reflexd.plugins import exploration

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
        # the one row of each, viewed once here rather than on every decision
        self.context_row = self.context[0]
        self.actions_row = self.actions[0]
        self.scores_row = self.scores[0]
        self.spread_row = self.spread[0]


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
        self.hasher.context(context, out=bound.context_row)
        np.copyto(bound.actions_row, self.hasher.actions(actions))
        self.session.run_with_iobinding(bound.binding)
        return bound.scores_row, bound.spread_row

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

    def score_many(self, contexts: list[dict[str, Any]], actions: list[list[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and spread of several decisions offering the same number of actions, in one run.

        The ONNX contract keeps batch rows apart (the gate scores its holdout the same way), so
        row i is what ``score(contexts[i], actions[i])`` returns.
        """
        if len(contexts) == 1:  # alone, the buffers bound once cost less than a fresh run
            scores, spread = self.score(contexts[0], actions[0])
            return scores[None], spread[None]
        spec = self.manifest.features
        ctx = np.empty((len(contexts), spec.context_dim), dtype=np.float32)  # each row zeroed by the hasher
        acts = np.empty((len(contexts), len(actions[0]), spec.action_dim), dtype=np.float32)
        hasher = self.hasher
        for i, (context, offered) in enumerate(zip(contexts, actions)):
            hasher.context(context, out=ctx[i])
            acts[i] = hasher.actions(offered)  # usually the same set every time: cached
        return self.score_batch(ctx, acts)


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

    def _distribution(
        self, scorer: Scorer, cfg: ExplorationConfig, context: dict[str, Any], actions: list[Any], t: int
    ) -> list[float] | None:
        """The model's distribution, or None (and the reason in ``source.error``) if it fails."""
        try:
            scores, spread = scorer.score(context, actions)
            p = exploration.distribution(cfg, scores.tolist(), spread, t)  # spread is read by ucb alone
        except Exception as exc:  # onnxruntime's errors are untyped; a decision must still be made
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if isfinite(sum(p)):  # probabilities cannot overflow a sum: it is finite when each one is
                return p
            reason = "non-finite scores"
        if self.source is not None:
            self.source.error = f"model {scorer.version} failed while deciding ({reason}); using the default policy"
        return None

    def _model_probabilities(
        self, scorer: Scorer, cfg: ExplorationConfig, context: dict[str, Any], actions: list[Any], t: int
    ) -> np.ndarray | None:
        """``_distribution`` as an array."""
        p = self._distribution(scorer, cfg, context, actions, t)
        return None if p is None else np.array(p)

    def _explore(
        self, scorer: Scorer, cfg: ExplorationConfig, scores: list[float], spread: list[float], t: int
    ) -> list[float] | None:
        """``_distribution`` on scores already computed."""
        try:
            p = exploration.distribution(cfg, scores, spread, t)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if isfinite(sum(p)):
                return p
            reason = "non-finite scores"
        if self.source is not None:
            self.source.error = f"model {scorer.version} failed while deciding ({reason}); using the default policy"
        return None

    def choose_many(self, requests: list[tuple[str, dict[str, Any], list[Any], str | None]]) -> list[Choice]:
        """``choose(agent, context, actions, decision_id)`` for each request, in order.

        The same choices, and the same draws from the seed, as one ``choose`` after another; but
        requests offering the same number of actions are scored in one model run, where most of
        a lone decision's time is the run's fixed cost.
        """
        scorer, manifest, version = self._live()
        by_agent: dict[str, ExplorationConfig] = {}
        cfgs = []
        for agent, *_ in requests:
            cfg = by_agent.get(agent)
            if cfg is None:
                cfg = by_agent[agent] = self.exploration_for(agent, manifest)
            cfgs.append(cfg)
        t0 = self._since_load + (experience(manifest.training) if manifest else 0)
        self._since_load += len(requests)
        probs: list[list[float] | None] = [None] * len(requests)
        if scorer is not None:
            groups: dict[int, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(len(r[2]), []).append(i)
            for rows in groups.values():
                try:
                    scores, spread = scorer.score_many([requests[i][1] for i in rows], [requests[i][2] for i in rows])
                except Exception:  # one bad decision must not fail the others: each is scored alone
                    for i in rows:
                        _, context, actions, _ = requests[i]
                        probs[i] = self._distribution(scorer, cfgs[i], context, actions, t0 + i)
                    continue
                for k, (row, row_spread) in enumerate(zip(scores.tolist(), spread.tolist())):
                    probs[rows[k]] = self._explore(scorer, cfgs[rows[k]], row, row_spread, t0 + rows[k])
        fresh = os.urandom(16 * len(requests)).hex()  # ids for those that came without one
        choices = []
        for i, (agent, context, actions, decision_id) in enumerate(requests):
            ids = action_ids(actions)
            p, cfg, chosen_by = probs[i], cfgs[i], version
            if p is not None:
                strategy = cfg.strategy
            else:
                chosen_by = None  # logged as what it was: the default policy, not the model
                default = ids.index(cfg.default_action) if cfg.default_action in ids else None
                p = exploration.default_distribution(cfg, len(ids), default, t0 + i)
                strategy = "default"
            j = exploration.sample(p, self._rng.random())
            choices.append(
                Choice(
                    id=decision_id or fresh[32 * i : 32 * i + 32],
                    action=ids[j],
                    index=j,
                    prob=p[j],
                    probs=p,
                    model_version=chosen_by,
                    strategy=strategy,
                )
            )
        return choices

    def _live(self) -> tuple[Any, Any, str | None]:
        """The live scorer, its manifest and version (all None without a model); a new version restarts t."""
        scorer = self.source.scorer if self.source is not None else None
        version = scorer.version if scorer is not None else None
        if version != self._version:
            self._version = version
            self._since_load = 0
        return scorer, (scorer.manifest if scorer is not None else None), version

    def choose(self, agent: str, context: dict[str, Any], actions: list[Any], decision_id: str | None = None) -> Choice:
        ids = action_ids(actions)
        scorer, manifest, version = self._live()
        cfg = self.exploration_for(agent, manifest)
        t = self._since_load + (experience(manifest.training) if manifest else 0)
        self._since_load += 1
        # plain floats from here on: for one decision's few actions numpy's per-call cost dominates
        p = self._distribution(scorer, cfg, context, actions, t) if scorer is not None else None
        if p is not None:
            strategy = cfg.strategy
        else:
            version = None  # logged as what it was: the default policy, not the model
            default = ids.index(cfg.default_action) if cfg.default_action in ids else None
            p = exploration.default_distribution(cfg, len(ids), default, t)
            strategy = "default"
        i = exploration.sample(p, self._rng.random())
        return Choice(
            id=decision_id or os.urandom(16).hex(),  # as unique as uuid4, without its overhead
            action=ids[i],
            index=i,
            prob=p[i],
            probs=p,
            model_version=version,
            strategy=strategy,
        )

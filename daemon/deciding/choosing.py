"""Choosing: from the live model's scores to one action, with the exact probability it had.

Shared by the in-process client (``reflexd.Policy``) and the daemon's socket ``decide``.
"""

from __future__ import annotations

import os
import random
import time
from math import isfinite
from typing import Any, Callable

import msgspec
import numpy as np

from reflexd.config import ExplorationConfig
from reflexd.deciding import exploring
from reflexd.deciding.scoring import ModelSource, Scorer
from reflexd.features import action_ids
from reflexd.manifest import Manifest
from reflexd.wire.protocol import Decision


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
            p = exploring.distribution(cfg, scores.tolist(), spread, t)  # spread is read by ucb alone
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
            p = exploring.distribution(cfg, scores, spread, t)
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
        t0 = self._since_load + (manifest.training.experience if manifest else 0)
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
                p = exploring.default_distribution(cfg, len(ids), default, t0 + i)
                strategy = "default"
            j = exploring.sample(p, self._rng.random())
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
        t = self._since_load + (manifest.training.experience if manifest else 0)
        self._since_load += 1
        # plain floats from here on: for one decision's few actions numpy's per-call cost dominates
        p = self._distribution(scorer, cfg, context, actions, t) if scorer is not None else None
        if p is not None:
            strategy = cfg.strategy
        else:
            version = None  # logged as what it was: the default policy, not the model
            default = ids.index(cfg.default_action) if cfg.default_action in ids else None
            p = exploring.default_distribution(cfg, len(ids), default, t)
            strategy = "default"
        i = exploring.sample(p, self._rng.random())
        return Choice(
            id=decision_id or os.urandom(16).hex(),  # as unique as uuid4, without its overhead
            action=ids[i],
            index=i,
            prob=p[i],
            probs=p,
            model_version=version,
            strategy=strategy,
        )

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

from reflexd.config import ExplorationConfig
from reflexd.deciding import explaining, exploring
from reflexd.deciding.scoring import ModelSource, Scorer
from reflexd.features import action_ids
from reflexd.manifest import Manifest
from reflexd.wire.protocol import Decision, Explanation, Scored


class Choice(msgspec.Struct, frozen=True):
    """One decision: which action, with what probability, by which model."""

    id: str
    action: str
    index: int
    prob: float
    probs: list[float]
    model_version: str | None
    strategy: str
    # a slot of a slate (``Chooser.choose_slate``): ``prob`` and ``probs`` are then over the
    # actions left at this slot, and ``index`` the action's place among all the actions offered
    slot: int | None = None
    slate: str | None = None

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
            slot=self.slot,
            slate=self.slate,
        )


def slate_events(choices: list[Choice], agent: str, context: dict[str, Any], actions: list[Any]) -> list[Decision]:
    """The decisions that log a slate (``Chooser.choose_slate``): each slot's over the actions left."""
    left = list(range(len(actions)))
    events = []
    for choice in choices:
        events.append(choice.event(agent, context, [actions[i] for i in left]))
        left.remove(choice.index)
    return events


def _score_by_size(
    scorer: Scorer, requests: list[tuple[dict[str, Any], list[Any]]]
) -> list[tuple[list[float], list[float]] | Exception]:
    """Each (context, actions)'s scores and spread, or what failed: requests offering the same number
    of actions are scored in one model run, where most of a lone decision's time is the run's fixed
    cost; a run that fails is redone one request at a time, so that one bad request fails alone."""
    found: list[tuple[list[float], list[float]] | Exception] = [ValueError("not scored")] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, (_, actions) in enumerate(requests):
        groups.setdefault(len(actions), []).append(i)
    for rows in groups.values():
        try:
            scores, spread = scorer.score_many([requests[i][0] for i in rows], [requests[i][1] for i in rows])
        except Exception:  # onnxruntime's errors are untyped
            for i in rows:
                try:
                    one, one_spread = scorer.score(*requests[i])
                    found[i] = (one.tolist(), one_spread.tolist())
                except Exception as exc:
                    found[i] = exc
            continue
        for k, i in enumerate(rows):
            found[i] = (scores[k].tolist(), spread[k].tolist())
    return found


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
        except Exception as exc:  # onnxruntime's errors are untyped; a decision must still be made
            return self._failed(scorer, f"{type(exc).__name__}: {exc}")
        return self._explore(scorer, cfg, scores.tolist(), spread, t)  # spread is read by ucb alone

    def _explore(
        self, scorer: Scorer, cfg: ExplorationConfig, scores: list[float], spread: Any, t: int
    ) -> list[float] | None:
        """``_distribution`` on scores already computed."""
        try:
            p = exploring.distribution(cfg, scores, spread, t)
        except Exception as exc:
            return self._failed(scorer, f"{type(exc).__name__}: {exc}")
        if isfinite(sum(p)):  # probabilities cannot overflow a sum: it is finite when each one is
            return p
        return self._failed(scorer, "non-finite scores")

    def _failed(self, scorer: Scorer, reason: str) -> None:
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
            for i, found in enumerate(_score_by_size(scorer, [(r[1], r[2]) for r in requests])):
                if isinstance(found, Exception):
                    probs[i] = self._failed(scorer, f"{type(found).__name__}: {found}")
                else:
                    probs[i] = self._explore(scorer, cfgs[i], found[0], found[1], t0 + i)
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

    def choose_slate(
        self, agent: str, context: dict[str, Any], actions: list[Any], slots: int, slate_id: str | None = None
    ) -> list[Choice]:
        """Rank ``slots`` of ``actions``: one Choice per slot, in order, each action used once.

        The model scores the actions once; each slot is then drawn from the exploration applied to
        the scores of the actions still left, so a Choice's ``prob`` is exactly its action's
        probability at its slot given the slots before it, and ``probs`` is over the actions left
        (in the order offered). ``t`` moves by one per slot, as for as many decisions.
        """
        ids = action_ids(actions)
        if not 1 <= slots <= len(ids):
            raise ValueError(f"slots must be from 1 to the number of actions ({len(ids)}), not {slots}")
        if len(set(ids)) < len(ids):
            raise ValueError("the actions of a slate must have distinct ids")
        scorer, manifest, version = self._live()
        cfg = self.exploration_for(agent, manifest)
        t = self._since_load + (manifest.training.experience if manifest else 0)
        self._since_load += slots
        scores: list[float] | None = None
        spread: list[float] = []
        if scorer is not None:
            try:
                raw_scores, raw_spread = scorer.score(context, actions)
                scores, spread = raw_scores.tolist(), raw_spread.tolist()
            except Exception as exc:  # as in choose: the default policy, and the reason kept
                if self.source is not None:
                    self.source.error = (
                        f"model {scorer.version} failed while deciding ({type(exc).__name__}: {exc});"
                        " using the default policy"
                    )
        slate = slate_id or os.urandom(16).hex()
        fresh = os.urandom(16 * slots).hex()
        default_index = ids.index(cfg.default_action) if cfg.default_action in ids else None
        left = list(range(len(ids)))  # the actions not yet placed, as indices into ids
        choices = []
        for slot in range(slots):
            p = None
            if scores is not None:
                p = self._explore(scorer, cfg, [scores[i] for i in left], [spread[i] for i in left], t + slot)
            if p is not None:
                strategy, chosen_by = cfg.strategy, version
            else:
                scores = None  # a model that failed is not asked again for this slate's later slots
                default = left.index(default_index) if default_index in left else None
                p = exploring.default_distribution(cfg, len(left), default, t + slot)
                strategy, chosen_by = "default", None
            j = exploring.sample(p, self._rng.random())
            index = left.pop(j)
            choices.append(
                Choice(
                    id=fresh[32 * slot : 32 * slot + 32],
                    action=ids[index],
                    index=index,
                    prob=p[j],
                    probs=p,
                    model_version=chosen_by,
                    strategy=strategy,
                    slot=slot,
                    slate=slate,
                )
            )
        return choices

    # ---- looking without choosing: nothing drawn, nothing logged, the clock (t) left alone ----

    def score_many(self, requests: list[tuple[str, dict[str, Any], list[Any]]]) -> list[Scored]:
        """Each request's scores, spread and the probabilities a decision would sample from now.

        Requests offering the same number of actions are scored in one model run. No action is
        drawn and ``t`` does not move, so scoring changes no later decision. Without a model (or
        with one that fails) scores and spread are None and the probabilities the default policy's.
        """
        scorer, manifest, version = self._live()
        t = self._since_load + (manifest.training.experience if manifest else 0)
        scored: list[tuple[list[float], list[float]] | None] = [None] * len(requests)
        if scorer is not None:
            for i, found in enumerate(_score_by_size(scorer, [(r[1], r[2]) for r in requests])):
                if isinstance(found, Exception):
                    if self.source is not None:
                        self.source.error = (
                            f"model {scorer.version} failed while scoring ({type(found).__name__}: {found});"
                            " using the default policy"
                        )
                else:
                    scored[i] = found
        by_agent: dict[str, ExplorationConfig] = {}
        results = []
        for (agent, _, actions), found in zip(requests, scored):
            cfg = by_agent.get(agent)
            if cfg is None:
                cfg = by_agent[agent] = self.exploration_for(agent, manifest)
            ids = action_ids(actions)
            p = None if found is None else self._explore(scorer, cfg, found[0], found[1], t)
            if p is not None and found is not None:
                results.append(Scored(id=None, actions=ids, scores=found[0], spread=found[1], probs=p,
                                      model_version=version, strategy=cfg.strategy))
                continue
            default = ids.index(cfg.default_action) if cfg.default_action in ids else None
            p = exploring.default_distribution(cfg, len(ids), default, t)
            results.append(Scored(id=None, actions=ids, scores=None, spread=None, probs=p,
                                  model_version=None, strategy="default"))
        return results

    def score(self, agent: str, context: dict[str, Any], actions: list[Any]) -> Scored:
        """``score_many`` for one request."""
        return self.score_many([(agent, context, actions)])[0]

    def explain(
        self, agent: str, context: dict[str, Any], actions: list[Any], top: int | None = None
    ) -> Explanation:
        """``explaining.explain`` with the live model, its exploration and the current ``t`` (left alone).

        Reads the clock without resetting it on a model swap (the daemon explains in a worker
        thread, beside decisions on the event loop): a newer model than the clock's counts from 0.
        """
        scorer = self.source.scorer if self.source is not None else None
        manifest = scorer.manifest if scorer is not None else None
        since_load = self._since_load if (scorer.version if scorer is not None else None) == self._version else 0
        cfg = self.exploration_for(agent, manifest)
        t = since_load + (manifest.training.experience if manifest else 0)
        if scorer is not None:
            try:
                return explaining.explain(scorer, cfg, agent, context, actions, t, top)
            except Exception as exc:  # as a decision would: the default policy, and the reason kept
                if self.source is not None:
                    self.source.error = (
                        f"model {scorer.version} failed while explaining ({type(exc).__name__}: {exc});"
                        " using the default policy"
                    )
        return explaining.explain(None, cfg, agent, context, actions, t, top)

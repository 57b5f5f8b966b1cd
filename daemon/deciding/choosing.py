"""Choosing: from the live model's scores to one action, with the exact probability it had.

Shared by the in-process client (``reflexd.Policy``) and the daemon's socket ``decide``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from math import isfinite
from typing import Any, Callable, NamedTuple

import msgspec

from reflexd.config import ExplorationConfig
from reflexd.deciding import explaining, exploring
from reflexd.deciding.online import OnlineHead, Rescore
from reflexd.deciding.scoring import ModelSource, Scorer
from reflexd.features import action_ids, first_repeat, with_agent
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


def _check(context: dict[str, Any], actions: list[Any], default: str | None = None) -> list[str]:
    """The actions' ids, once the decision is found well formed: a dict for a context, a list of
    actions with distinct ids (an id offered twice would log a choice no one can tell apart), and
    ``default`` (the agent's own choice, if any) among them. A request over the socket was checked
    as it was decoded; an in-process agent's arguments are checked here."""
    if not isinstance(context, dict):
        raise TypeError(f"context must be a dict of keys to values, not {type(context).__name__}")
    if not set(map(type, context)) <= _STR:  # one C pass; a str subclass (a StrEnum) is a str too
        bad = next((k for k in context if not isinstance(k, str)), None)
        if bad is not None:
            raise TypeError(f"context keys must be str; {bad!r} is {type(bad).__name__}")
    if not isinstance(actions, (list, tuple)):
        kind = type(actions).__name__
        raise TypeError(f"actions must be a list of ids (or of dicts with id and features), not {kind}")
    try:
        ids = action_ids(actions)
    except (KeyError, AttributeError):
        known = (lambda a: isinstance(a, str) or (isinstance(a, dict) and "id" in a)
                 or (hasattr(a, "id") and hasattr(a, "features")))
        bad = next((a for a in actions if not known(a)), None)
        raise TypeError(
            f"action {bad!r} is neither an id (str), a dict with an 'id', nor an Action: actions must be a list of those"
        ) from None
    if not ids:
        raise ValueError("actions is empty: a decision needs at least one action")
    if "" in ids or max(map(len, ids)) > 256:
        bad = next(i for i in ids if not 0 < len(i) <= 256)
        raise ValueError(f"action id {bad[:40]!r} has {len(bad)} characters: ids have 1 to 256")
    if len(set(ids)) < len(ids):
        raise ValueError(f"action {first_repeat(ids)!r} is offered twice: a decision's actions must have distinct ids")
    for a in actions:  # a dict action as the wire's Action: a str id, and features that are a dict
        if type(a) is dict and (type(a["id"]) is not str or len(a) > 1 + ("features" in a) or type(a.get("features", _NONE)) not in _FEATURES):
            _check_action(a)
    if default is not None and default not in ids:
        raise ValueError(f"default {default!r} is not among the actions")
    return ids


_STR = {str}
_NONE: dict[str, Any] = {}
_FEATURES = (dict,)


def _check_action(a: dict[str, Any]) -> None:
    """Why a dict action is not one the wire takes (a str ``id`` and, if any, ``features``: a dict);
    its features' keys are the daemon's to check, off the decision's path."""
    if not isinstance(a["id"], str):
        raise TypeError(f"action id {a['id']!r} must be a str, not {type(a['id']).__name__}")
    extra = set(a) - {"id", "features"}
    if extra:
        raise TypeError(f"action {a['id']!r}: unknown key(s) {sorted(map(str, extra))}; an action has an id and features")
    features = a.get("features", {})
    if not isinstance(features, dict):
        raise TypeError(f"action {a['id']!r}: features must be a dict of keys to values, not {type(features).__name__}")


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


def _read_by(scorer: Scorer, agent: str, context: dict[str, Any]) -> dict[str, Any]:
    """``context`` as ``scorer``'s model reads it: with the agent's id when its line is shared."""
    manifest = scorer.manifest
    return with_agent(manifest.features, agent, context) if manifest is not None else context


def _rescorer(scorer: Scorer) -> Rescore:
    """The head's ``rescore`` for ``scorer``: its score of each remembered decision's chosen action
    (``Chooser._choice``'s sources), None where the model fails on it."""

    def rescore(sources: list[Any]) -> list[float | None]:
        requests = [(_read_by(scorer, agent, context), actions) for agent, context, actions, _ in sources]
        found = _score_by_size(scorer, requests)
        return [None if isinstance(f, Exception) or i >= len(f[0]) else f[0][i] for f, (*_, i) in zip(found, sources)]

    return rescore


class _Policy(NamedTuple):
    """How one decision is made (``Chooser._policy``)."""

    probs: list[float] | None  # None: the default policy decides
    strategy: str
    inputs: Any  # the head's inputs to remember for the reward, or None: nothing to learn
    model: list[float] | None  # the live model's own scores (one of the head's inputs)
    scores: list[float] | None  # what exploration worked on
    spread: Any


class Chooser:
    """Turns (agent, context, actions) into a Choice using the live model and exploration.

    ``t`` (the experience count that drives epsilon decay and SquareCB's gamma) is the model's
    training rows plus the decisions this chooser made since that model went live.
    """

    def __init__(
        self,
        source: ModelSource | None,
        exploration_for: ExplorationFor,
        seed: int | None = None,
        online: OnlineHead | None = None,
    ) -> None:
        self.source = source
        self.exploration_for = exploration_for
        self.online = online  # learns from the rewards of this chooser's decisions (``learn``)
        self._rng = random.Random(seed)
        self._since_load = 0
        self._decided = 0  # every decision this chooser made, whichever model was live
        self._version: str | None = None
        # decisions with the agent's own default for which the learned policy had a best action,
        # and how many of those it agreed with
        self.apprentice = {"compared": 0, "agreed": 0}
        self._counting = threading.Lock()
        if source is not None and online is not None:
            source.on_load = self._loaded

    def _loaded(self, scorer: Scorer | None) -> None:
        """On the thread that loaded ``scorer`` (or dropped the model: None), before it is served:
        the head relearns its newest rewards beside it there (``OnlineHead.prepare``), not on a
        decision's thread."""
        assert self.online is not None
        if scorer is None:
            self.online.prepare(None, None)
        else:
            self.online.prepare(scorer.version, _rescorer(scorer))

    def _clock(self, manifest: Manifest | None, since_load: int | None = None) -> int:
        """Exploration's ``t``: the live model's training experience plus the decisions made since
        it loaded. With the online head the policy before a model learned from every decision, so
        the clock does not go back below the decisions made in all when a model (whose snapshot
        lags them by a run's duration) goes live."""
        t = (self._since_load if since_load is None else since_load) + (manifest.training.experience if manifest else 0)
        return max(t, self._decided) if self.online is not None else t

    def _tick(self, n: int) -> None:
        self._since_load += n
        self._decided += n

    def learn(self, decision_id: str, reward: float) -> bool:
        """Update the online head on a reward for one of this chooser's decisions (False: not one it remembers)."""
        return self.online is not None and self.online.learn(decision_id, reward)

    def learn_many(self, rewards: list[tuple[str, float]], agents: list[str] | None = None) -> int:
        """``learn`` for each (decision id, reward), each action's together, with ``agents`` only
        for the decisions of the agent each names (``OnlineHead.learn_many``); how many the head learned."""
        return self.online.learn_many(rewards, agents) if self.online is not None else 0

    def _policy(
        self,
        scorer: Scorer | None,
        cfg: ExplorationConfig,
        agent: str,
        context: dict[str, Any],
        ids: list[str],
        found: tuple[list[float], Any] | None,
        t: int,
        default: str | None = None,
    ) -> _Policy:
        """How one decision is to be made, given the model's (scores, spread), or None without one.

        With a live model the head's means given the model's scores are what exploration works on
        (the model's own scores for actions it has learned nothing about). Without one, once the
        head has learned anything for this agent's actions its means are, unless a default is to
        be served until a model is live: the agent's own ``default`` for this decision, or an
        offered ``default_action``. With an agent's own ``default``, whether the learned policy's
        best action agrees with it is counted (``apprentice``).

        The spread exploration is handed is the strategy's to say (``exploring.spread_from``): the
        model's, or the head's posterior, of its means given the model's scores beside a model.
        """
        head = self.online
        x = head.features(context) if head is not None else None
        if found is not None:
            model, spread = found
            scores = head.means(agent, x, ids, model) if x is not None else model
            if x is not None and exploring.spread_from(cfg.strategy, True) == "head":
                spread = head.spread(agent, x, ids, model, noise=True)
            p = self._explore(scorer, cfg, scores, spread, t)
            if p is None:  # the model failed: the default policy, and nothing for the head to learn
                return _Policy(None, "default", None, None, None, None)
            if default is not None:
                self._agrees(ids, scores, default)
            return _Policy(p, cfg.strategy, x, model, scores, spread)
        if x is None or scorer is not None:  # no head, or a model that failed: the default policy
            return _Policy(None, "default", None, None, None, None)
        if head.knows(agent, ids):
            means = head.means(agent, x, ids)
            if default is not None:
                self._agrees(ids, means, default)
            elif cfg.default_action not in ids:
                source = exploring.spread_from(cfg.strategy, False)
                spread = head.spread(agent, x, ids, noise=source == "head") if source is not None else None
                try:
                    p = exploring.distribution(cfg, means, spread, t)
                except Exception:  # as for a model that fails: the default policy decides
                    p = None
                if p is not None and isfinite(sum(p)):
                    # logged with no model version and the strategy's name: the head alone chose
                    return _Policy(p, cfg.strategy, x, None, means, spread)
        return _Policy(None, "default", x, None, None, None)

    def _agrees(self, ids: list[str], scores: list[float], default: str) -> None:
        agreed = ids[exploring.argmax(scores)] == default
        with self._counting:  # agent threads decide at once
            self.apprentice["compared"] += 1
            self.apprentice["agreed"] += agreed

    def _scores(self, scorer: Scorer, context: dict[str, Any], actions: list[Any]) -> tuple[list[float], Any] | None:
        """The model's (scores, spread), or None (and the reason in ``source.error``) if it fails."""
        try:
            scores, spread = scorer.score(context, actions)
        except Exception as exc:  # onnxruntime's errors are untyped; a decision must still be made
            return self._failed(scorer, f"{type(exc).__name__}: {exc}")
        return scores.tolist(), spread  # read only by the strategies that read the model's spread

    def _explore(
        self, scorer: Scorer, cfg: ExplorationConfig, scores: list[float], spread: Any, t: int
    ) -> list[float] | None:
        """The exploration strategy's distribution over ``scores``, or None (and the reason in
        ``source.error``) if it fails."""
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

    def choose_many(
        self, requests: list[tuple[str, dict[str, Any], list[Any], str | None, str | None]], decoded: bool = False
    ) -> list[Choice]:
        """``choose(agent, context, actions, decision_id, default)`` for each request, in order.

        The same choices, and the same draws from the seed, as one ``choose`` after another; but
        requests offering the same number of actions are scored in one model run, where most of
        a lone decision's time is the run's fixed cost. ``decoded``: the requests are ``Decide``
        messages' fields, checked as they were decoded, and not checked again.
        """
        if not decoded:
            for _, context, actions, _, default in requests:
                _check(context, actions, default)
        scorer, manifest, version = self._live()
        by_agent: dict[str, ExplorationConfig] = {}
        cfgs = []
        for agent, *_ in requests:
            cfg = by_agent.get(agent)
            if cfg is None:
                cfg = by_agent[agent] = self.exploration_for(agent, manifest)
            cfgs.append(cfg)
        t0 = self._clock(manifest)
        self._tick(len(requests))
        model: list[tuple[list[float], Any] | None] = [None] * len(requests)
        if scorer is not None:
            for i, found in enumerate(_score_by_size(scorer, [(_read_by(scorer, r[0], r[1]), r[2]) for r in requests])):
                if isinstance(found, Exception):
                    self._failed(scorer, f"{type(found).__name__}: {found}")
                else:
                    model[i] = found
        fresh = os.urandom(16 * len(requests)).hex()  # ids for those that came without one
        return [
            self._choice(agent, context, action_ids(actions), actions, cfgs[i], scorer, version, model[i], t0 + i,
                         decision_id or fresh[32 * i : 32 * i + 32], default)
            for i, (agent, context, actions, decision_id, default) in enumerate(requests)
        ]

    def _choice(
        self,
        agent: str,
        context: dict[str, Any],
        ids: list[str],
        actions: list[Any],
        cfg: ExplorationConfig,
        scorer: Scorer | None,
        version: str | None,
        found: tuple[list[float], Any] | None,
        t: int,
        decision_id: str,
        default: str | None,
    ) -> Choice:
        """One decision, given the model's (scores, spread) or None: drawn, remembered for the head
        with what a later model needs to score it again (``_rescorer``)."""
        how = self._policy(scorer, cfg, agent, context, ids, found, t, default)
        p, strategy = how.probs, how.strategy
        if p is None:
            version = None  # logged as what it was: the default policy, not the model
            p = self._default(cfg, ids, default, t)
        i = exploring.sample(p, self._rng.random())
        if how.inputs is not None:
            head = self.online
            # copies: an agent may reuse its context's dict and its list of actions for the next decision
            source = (agent, dict(context), list(actions), i) if head.settings.warm_rows else None
            score = how.model[i] if how.model is not None else None
            head.remember(decision_id, agent, ids[i], how.inputs, score, source, version)
        return Choice(id=decision_id, action=ids[i], index=i, prob=p[i], probs=p, model_version=version, strategy=strategy)

    @staticmethod
    def _default(cfg: ExplorationConfig, ids: list[str], default: str | None, t: int) -> list[float]:
        """The default policy: the agent's own ``default`` or an offered ``default_action`` with
        exploration's share elsewhere, else uniform."""
        wanted = default if default is not None else cfg.default_action
        return exploring.default_distribution(cfg, len(ids), ids.index(wanted) if wanted in ids else None, t)

    def _live(self) -> tuple[Any, Any, str | None]:
        """The live scorer, its manifest and version (all None without a model); a new version restarts t."""
        scorer = self.source.scorer if self.source is not None else None
        version = scorer.version if scorer is not None else None
        if version != self._version:
            self._version = version
            self._since_load = 0
            if self.online is not None:
                self.online.follow(version, _rescorer(scorer) if scorer is not None else None)
        return scorer, (scorer.manifest if scorer is not None else None), version

    def choose(
        self,
        agent: str,
        context: dict[str, Any],
        actions: list[Any],
        decision_id: str | None = None,
        default: str | None = None,
    ) -> Choice:
        """One decision. ``default``: the agent's own choice, served (with exploration) until a
        model is live while the head learns beside it (apprentice mode)."""
        ids = _check(context, actions, default)
        scorer, manifest, version = self._live()
        cfg = self.exploration_for(agent, manifest)
        t = self._clock(manifest)
        self._tick(1)
        # plain floats from here on: for one decision's few actions numpy's per-call cost dominates
        found = self._scores(scorer, _read_by(scorer, agent, context), actions) if scorer is not None else None
        # as unique as uuid4, without its overhead
        decision_id = decision_id or os.urandom(16).hex()
        return self._choice(agent, context, ids, actions, cfg, scorer, version, found, t, decision_id, default)

    def choose_slate(
        self, agent: str, context: dict[str, Any], actions: list[Any], slots: int, slate_id: str | None = None
    ) -> list[Choice]:
        """Rank ``slots`` of ``actions``: one Choice per slot, in order, each action used once.

        The model scores the actions once; each slot is then drawn from the exploration applied to
        the scores of the actions still left, so a Choice's ``prob`` is exactly its action's
        probability at its slot given the slots before it, and ``probs`` is over the actions left
        (in the order offered). ``t`` moves by one per slot, as for as many decisions.
        """
        ids = _check(context, actions)
        if not 1 <= slots <= len(ids):
            raise ValueError(f"slots must be from 1 to the number of actions ({len(ids)}), not {slots}")
        scorer, manifest, version = self._live()
        cfg = self.exploration_for(agent, manifest)
        t = self._clock(manifest)
        self._tick(slots)
        scores: list[float] | None = None
        spread: list[float] = []
        if scorer is not None:
            try:
                raw_scores, raw_spread = scorer.score(_read_by(scorer, agent, context), actions)
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

    def score_many(self, requests: list[tuple[Any, ...]]) -> list[Scored]:
        """Each (agent, context, actions[, default]) request's scores, spread and the probabilities
        a decision would sample from now.

        Requests offering the same number of actions are scored in one model run. No action is
        drawn and ``t`` does not move, so scoring changes no later decision. With the online head,
        the scores are the model's plus the head's means (or the head's alone before any model).
        When the default policy would decide, scores and spread are None.
        """
        # every request checked before any is scored: a caller's mistake is not the model's failure
        checked = [_check(r[1], r[2], r[3] if len(r) > 3 else None) for r in requests]
        scorer, manifest, version = self._live()
        t = self._clock(manifest)
        scored: list[tuple[list[float], list[float]] | None] = [None] * len(requests)
        if scorer is not None:
            for i, found in enumerate(_score_by_size(scorer, [(_read_by(scorer, r[0], r[1]), r[2]) for r in requests])):
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
        for (agent, context, actions, *rest), found, ids in zip(requests, scored, checked):
            default = rest[0] if rest else None
            cfg = by_agent.get(agent)
            if cfg is None:
                cfg = by_agent[agent] = self.exploration_for(agent, manifest)
            how = self._policy(scorer, cfg, agent, context, ids, found, t, default)
            if how.probs is not None:
                spread = how.spread
                if spread is None:  # the head alone, by a strategy that reads no spread: the head's, to report
                    spread = self.online.spread(agent, how.inputs, ids)
                results.append(Scored(id=None, actions=ids, scores=how.scores, spread=list(spread), probs=how.probs,
                                      model_version=version if found is not None else None, strategy=how.strategy))
                continue
            results.append(Scored(id=None, actions=ids, scores=None, spread=None, probs=self._default(cfg, ids, default, t),
                                  model_version=None, strategy="default"))
        return results

    def score(self, agent: str, context: dict[str, Any], actions: list[Any], default: str | None = None) -> Scored:
        """``score_many`` for one request."""
        return self.score_many([(agent, context, actions, default)])[0]

    def explain(
        self, agent: str, context: dict[str, Any], actions: list[Any], top: int | None = None,
        default: str | None = None,
    ) -> Explanation:
        """``explaining.explain`` with the live model, its exploration and the current ``t`` (left alone);
        before any model, of the online head where it decides (``explaining.HeadScorer``), or of the
        default policy serving the agent's own ``default`` (apprentice mode), as a decision would.

        Reads the clock without resetting it on a model swap (the daemon explains in a worker
        thread, beside decisions on the event loop): a newer model than the clock's counts from 0.
        """
        _check(context, actions, default)
        scorer = self.source.scorer if self.source is not None else None
        manifest = scorer.manifest if scorer is not None else None
        since_load = self._since_load if (scorer.version if scorer is not None else None) == self._version else 0
        cfg = self.exploration_for(agent, manifest)
        t = self._clock(manifest, since_load)
        if scorer is not None:
            try:
                return explaining.explain(scorer, cfg, agent, _read_by(scorer, agent, context), actions, t, top)
            except Exception as exc:  # as a decision would: the default policy, and the reason kept
                if self.source is not None:
                    self.source.error = (
                        f"model {scorer.version} failed while explaining ({type(exc).__name__}: {exc});"
                        " using the default policy"
                    )
            return explaining.explain(None, cfg, agent, context, actions, t, top)
        if default is not None:  # served until a model is live, with exploration's share elsewhere
            return explaining.explain(None, msgspec.structs.replace(cfg, default_action=default), agent, context, actions, t, top)
        head, ids = self.online, action_ids(actions)
        # before any model, the head decides once it has learned anything, unless a default is served
        if head is not None and head.knows(agent, ids) and cfg.default_action not in ids:
            spread = exploring.spread_from(cfg.strategy, False)
            learned = explaining.HeadScorer(head, agent, ids, spread)
            try:
                return explaining.explain(learned, cfg, agent, context, actions, t, top)
            except Exception:  # noqa: BLE001 -- as a decision whose strategy fails: the default policy's
                return explaining.explain(None, cfg, agent, context, actions, t, top)
        return explaining.explain(None, cfg, agent, context, actions, t, top)

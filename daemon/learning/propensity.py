"""What the behaviour model is for, offline: estimated propensities and unusual trajectories.

``estimate_propensities`` gives each step of logs that carry no logged probability the behaviour
model's probability of the action taken (``EstimatedPropensity.estimated`` is always True, so OPE
and training can tell them from logged ones). ``unusual`` returns the episodes that loop, repeat
a failing call, or that the model finds unlikely, as plain records (``Unusual``) that the
insights extraction can report as anomalies (``msgspec.to_builtins`` gives dicts).

numpy and onnxruntime only (through ``reflexd.deciding.behaviour``): no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from reflexd.deciding.behaviour import OTHER, BehaviourModel

DEFAULT_FLOOR = 1e-3  # an estimated propensity is never below this: OPE weights stay bounded


class EstimatedPropensity(msgspec.Struct, frozen=True, kw_only=True):
    id: str | None  # the step's (or decision's) id, when known
    agent: str
    episode: str
    index: int
    action: str
    prob: float  # P(action | episode so far, observation), over ``offered`` when given, floored
    raw: float  # the model's probability before renormalising and flooring
    known_action: bool  # False: the action is outside the model's vocabulary (prob from the "other" mass)
    estimated: bool = True  # never a logged probability
    model_version: str = ""


def _prob(model: BehaviourModel, probs: np.ndarray, action: str, offered: Sequence[str] | None, floor: float) -> tuple[float, float, bool]:
    i = model.action_index(action)
    known = i != OTHER
    raw = float(probs[i])
    if not known and offered is not None:
        # the "other" mass is shared evenly among the offered actions it stands for; without an
        # offered set it is all of it (an upper bound)
        raw = raw / max(1, sum(1 for a in offered if model.action_index(a) == OTHER))
    p = raw
    if offered is not None:
        total = 0.0
        outside = sum(1 for a in offered if model.action_index(a) == OTHER)
        for a in offered:
            j = model.action_index(a)
            total += float(probs[j]) / (outside if j == OTHER else 1)
        p = raw / total if total > 0 else 1.0 / max(1, len(offered))
    return max(floor, min(1.0, p)), raw, known


def estimate_propensities(
    model: BehaviourModel,
    episodes: Sequence[Any],
    offered: Mapping[str, Sequence[str]] | None = None,
    floor: float = DEFAULT_FLOOR,
) -> list[EstimatedPropensity]:
    """One record per step of ``episodes`` (``reflexd.learning.steps.Episode``s, or objects with
    ``agent, episode, observations, actions, rewards`` and optionally ``ids``, ``indices``).

    With ``offered`` (step id → the actions that step could choose from), each probability is
    renormalised over the offered actions; otherwise it is over the model's whole vocabulary.
    A lone decision with no episode is an episode of one step."""
    out = []
    for ep, (probs, _) in zip(episodes, model.run_episodes(list(episodes))):
        ids = getattr(ep, "ids", None) or [None] * len(ep.actions)
        indices = getattr(ep, "indices", None) or list(range(len(ep.actions)))
        for t, action in enumerate(ep.actions):
            step_id = ids[t] if t < len(ids) else None
            choices = offered.get(step_id) if offered is not None and step_id is not None else None
            p, raw, known = _prob(model, probs[t], action, choices, floor)
            out.append(EstimatedPropensity(
                id=step_id, agent=ep.agent, episode=ep.episode, index=int(indices[t]) if t < len(indices) else t,
                action=action, prob=p, raw=raw, known_action=known, model_version=model.version,
            ))
    return out


def decision_propensities(
    model: BehaviourModel,
    contexts: Sequence[Mapping[str, Any]],
    actions: Sequence[Sequence[str] | None],
    chosen: Sequence[str],
    floor: float = DEFAULT_FLOOR,
) -> np.ndarray:
    """Estimated propensities of lone decisions (imported decision logs with no episode):
    each decision is a one-step episode whose observation is its context, renormalised over its
    offered actions (``actions[i]``; None: the whole vocabulary). float64 [N], each floored."""
    from reflexd.learning.steps import Episode

    episodes = [Episode("", str(i), [dict(c)], [a], [0.0], ids=[str(i)]) for i, (c, a) in enumerate(zip(contexts, chosen))]
    offered = {str(i): list(a) for i, a in enumerate(actions) if a is not None}
    return np.array([e.prob for e in estimate_propensities(model, episodes, offered, floor)], dtype=np.float64)


class Unusual(msgspec.Struct, frozen=True, kw_only=True):
    """One unusual stretch of an episode, an anomaly for insights."""

    agent: str
    episode: str
    kind: str  # "loop", "repeated_failure" or "unlikely"
    first_index: int  # the stretch's first and last step (the whole episode for "unlikely")
    last_index: int
    action: str | None  # the repeated action (the cycle's first for a loop of period > 1)
    count: int  # repetitions (loop, repeated_failure) or steps (unlikely)
    score: float  # the count, or the episode's mean NLL per step (nats)
    threshold: float  # what the score had to reach
    detail: str


def failed_by_reward(observation: Mapping[str, Any], action: str, reward: float) -> bool:
    """The default failure test: a step with a negative reward, or an observation saying error."""
    return reward < 0.0 or observation.get("error") is True


def unusual(
    episodes: Sequence[Any],
    model: BehaviourModel | None = None,
    *,
    loop_repeats: int = 6,
    cycle_repeats: int = 3,
    max_period: int = 3,
    failure_repeats: int = 3,
    nll_threshold: float | None = None,
    failed: Callable[[Mapping[str, Any], str, float], bool] = failed_by_reward,
) -> list[Unusual]:
    """The unusual stretches of ``episodes``, episode by episode.

    - ``loop``: one action ``loop_repeats`` or more times in a row, or a cycle of 2..``max_period``
      actions repeated ``cycle_repeats`` or more times in a row (the longest per episode);
    - ``repeated_failure``: one action failing (``failed``) ``failure_repeats`` or more times in a row;
    - ``unlikely`` (with ``model``): a mean negative log-likelihood per step above ``nll_threshold``
      (default the model's ``manifest.nll_threshold``, calibrated on its training snapshot's episodes).
    """
    found: list[Unusual] = []
    for ep in episodes:
        found.extend(_loops(ep, loop_repeats, cycle_repeats, max_period))
        found.extend(_failures(ep, failure_repeats, failed))
    if model is not None and episodes:
        threshold = model.manifest.nll_threshold if nll_threshold is None else nll_threshold
        for ep, (probs, _) in zip(episodes, model.run_episodes(list(episodes))):
            if not len(ep.actions):
                continue
            idx = np.fromiter((model.action_index(a) for a in ep.actions), dtype=np.int64, count=len(ep.actions))
            nll = float(-np.log(np.clip(probs[np.arange(len(idx)), idx], 1e-12, None)).mean())
            if nll > threshold:
                indices = getattr(ep, "indices", None) or list(range(len(ep.actions)))
                found.append(Unusual(
                    agent=ep.agent, episode=ep.episode, kind="unlikely", first_index=int(indices[0]),
                    last_index=int(indices[-1]), action=None, count=len(ep.actions), score=nll, threshold=threshold,
                    detail=f"mean NLL {nll:.3f} nats per step over {len(ep.actions)} steps, above {threshold:.3f}",
                ))
    return found


def _loops(ep: Any, loop_repeats: int, cycle_repeats: int, max_period: int) -> list[Unusual]:
    actions = list(ep.actions)
    indices = getattr(ep, "indices", None) or list(range(len(actions)))
    best: tuple[int, int, int, int] | None = None  # (reps, period, start, end)
    for period in range(1, max_period + 1):
        need = loop_repeats if period == 1 else cycle_repeats
        run_start = 0
        for t in range(period, len(actions) + 1):
            if t < len(actions) and actions[t] == actions[t - period]:
                continue
            # actions[run_start : t] repeats with this period
            length = t - run_start
            reps = length // period
            cycle = actions[run_start : run_start + period]
            distinct = period == 1 or len(set(cycle)) == period
            if reps >= need and distinct and (best is None or reps * period > best[0] * best[1]):
                best = (reps, period, run_start, run_start + reps * period - 1)
            run_start = max(t - period + 1, 0) if t < len(actions) else t
    if best is None:
        return []
    reps, period, a, b = best
    cycle = actions[a : a + period]
    need = loop_repeats if period == 1 else cycle_repeats
    what = cycle[0] if period == 1 else " → ".join(cycle)
    return [Unusual(
        agent=ep.agent, episode=ep.episode, kind="loop", first_index=int(indices[a]), last_index=int(indices[b]),
        action=cycle[0], count=reps, score=float(reps), threshold=float(need),
        detail=f"{what} repeated {reps} times in a row",
    )]


def _failures(ep: Any, repeats: int, failed: Callable[[Mapping[str, Any], str, float], bool]) -> list[Unusual]:
    indices = getattr(ep, "indices", None) or list(range(len(ep.actions)))
    out = []
    run_action, run_start, run = None, 0, 0
    steps = list(zip(ep.observations, ep.actions, ep.rewards))
    for t, (obs, action, reward) in enumerate([*steps, (None, None, 0.0)]):
        bad = action is not None and failed(obs if isinstance(obs, Mapping) else {}, action, float(reward))
        if bad and action == run_action:
            run += 1
            continue
        if run >= repeats:
            out.append(Unusual(
                agent=ep.agent, episode=ep.episode, kind="repeated_failure", first_index=int(indices[run_start]),
                last_index=int(indices[t - 1]), action=run_action, count=run, score=float(run),
                threshold=float(repeats), detail=f"{run_action} failed {run} times in a row",
            ))
        run_action, run_start, run = (action, t, 1) if bad else (None, t, 0)
    return out

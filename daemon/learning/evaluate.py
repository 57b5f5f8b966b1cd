"""Evaluate any policy on logged decisions: Personalizer's offline evaluation, on reflexd's estimators.

Every logged decision carries the exact probability its action was chosen with, so the value of
another policy can be estimated on the same rows (``reflexd.learning.ope``). This module turns the
policies a user names into per-row distributions over each decision's actions and reports, for
each, IPS, SNIPS, DM and DR with normal intervals, the effective sample size of its importance
weights and how often its most likely action is the logged one, beside the logging policy itself
(the baseline: its value is the mean observed reward). Pure: arrays and loaded models in,
an ``Evaluation`` out; the daemon (``reflexd.service.evaluation``) takes the snapshot of the
window and loads the models.

A policy is named as one of:

- ``v0003`` (or ``live``): the model with the exploration its manifest records, per agent, at its
  run's experience on the exploration clock (as the gate judges it and a client deploys it);
- ``action:ID``: always ID (every decision of the window must offer it);
- ``file:PATH``: per-decision probabilities, NDJSON lines ``{"id": decision id, "probs": {action
  id: p}}``, one for every decision of the window, summing to 1 over the actions it offered;
- ``v0003@strategy=softmax,temperature=0.5``: the model with exploration settings of one's own,
  laid over its manifest's (any key of the ``exploration`` config section).

When some decision's reward is an episode return (``rewards.episode_return``), the window is
judged by episode, exactly as the gate judges a holdout: decisions of one episode share its
return, so as independent rows their intervals would be too narrow. Every estimator is then its
per-decision form over episodes (``reflexd.learning.episodes.ByEpisode``: IPS → PDIS, SNIPS →
weighted PDIS, DR → per-decision DR, DM → q_hat of each episode's first step), the logging
policy's value is its mean discounted return per episode, and intervals, ESS and the paired
difference take the episode as their unit; a decision without an episode is one of its own.

Intervals can reach beyond what any policy could earn (a doubly robust interval below 0 on 0/1
rewards): each ``Interval`` keeps the raw bounds and gives them bounded to the rewards observed in
the window, with ``clipped`` saying whether that changed them.

``discover`` searches a grid of exploration settings on one model and recommends the setting
with the best lower bound, only if that bound is above the logging policy's lower bound.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import msgspec
import numpy as np

from reflexd.config import ExplorationConfig
from reflexd.deciding.exploring import epsilon_at
from reflexd.errors import EvaluationError, PolicySpecError
from reflexd.extensions import EXPLORATION, available, load_explorer
from reflexd.features import FeatureSpec
from reflexd.learning import ope
from reflexd.learning.episodes import ByEpisode, Episodes, RewardsFor, credited_episodes
from reflexd.learning.gate import deployed_probs, target_probs
from reflexd.wire.protocol import Evaluation, Interval, PolicyValue, Recommendation

if TYPE_CHECKING:
    from reflexd.deciding.online import OnlineSettings
    from reflexd.deciding.scoring import Scorer

__all__ = [
    "DISCOVERY_GRID",
    "LOGGING",
    "PolicySpec",
    "agreement",
    "apply_settings",
    "bounded",
    "constant_probs",
    "discover",
    "effective_sample_size",
    "evaluate",
    "exploration_probs",
    "file_probs",
    "parse_policy",
    "run",
]

LOGGING = "logging policy"
_MODEL = re.compile(r"v\d{4,}|live")
_FORMS = "a model version (v0003), live, action:ID, file:PATH, or VERSION@strategy=softmax,temperature=0.5"
_TEXT_FIELDS = {"strategy": str, "default_action": str}


class PolicySpec(msgspec.Struct, frozen=True, kw_only=True):
    """A policy as named: ``kind`` is ``model``, ``action``, ``file`` or ``exploration``."""

    text: str
    kind: str
    version: str | None = None  # vNNNN or live (model, exploration)
    action: str | None = None
    path: str | None = None
    settings: tuple[tuple[str, str], ...] = ()  # exploration: key=value, as written


# ---- naming a policy ------------------------------------------------------------------------


def parse_policy(text: str) -> PolicySpec:
    """Read a policy's name (the forms in the module docstring); PolicySpecError says what is wrong."""
    text = text.strip()
    if text.startswith("action:"):
        action = text[len("action:") :]
        if not action:
            raise PolicySpecError(text, "action: needs an action id, as in action:large")
        return PolicySpec(text=text, kind="action", action=action)
    if text.startswith("file:"):
        path = text[len("file:") :]
        if not path:
            raise PolicySpecError(text, 'file: needs a path, as in file:/tmp/probs.ndjson (lines {"id", "probs"})')
        return PolicySpec(text=text, kind="file", path=path)
    version, at, settings = text.partition("@")
    if not _MODEL.fullmatch(version):
        raise PolicySpecError(text, f"not a policy; expected {_FORMS}")
    if not at:
        return PolicySpec(text=text, kind="model", version=version)
    return PolicySpec(text=text, kind="exploration", version=version, settings=parse_settings(text, settings))


def parse_settings(policy: str, text: str) -> tuple[tuple[str, str], ...]:
    """``strategy=softmax,temperature=0.5`` as (key, value) pairs, each key an exploration setting."""
    known = ExplorationConfig.__struct_fields__
    pairs: list[tuple[str, str]] = []
    for part in text.split(","):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not key or not value:
            raise PolicySpecError(policy, f"exploration settings are key=value pairs separated by commas, not {part.strip()!r}")
        if key not in known:
            raise PolicySpecError(policy, f"{key!r} is not an exploration setting; expected one of {', '.join(known)}")
        if key in dict(pairs):
            raise PolicySpecError(policy, f"{key} is given twice")
        pairs.append((key, value))
    return tuple(pairs)


def apply_to_agents(
    policy: str, exploration_for: Callable[[str], ExplorationConfig], agents: Iterable[str], settings: Sequence[tuple[str, str]]
) -> dict[str, ExplorationConfig]:
    """``apply_settings`` for each of ``agents``' own exploration. A line's agents may explore by
    different strategies (``agent_exploration``): a setting is refused only where none of them
    reads it, and changes nothing for the agents whose strategy does not."""
    configs = {a: apply_settings(policy, exploration_for(a), settings, check_reads=False) for a in sorted(set(agents))}
    _refuse_unread(policy, list(configs.values()), settings)
    return configs


def _refuse_unread(policy: str, configs: list[ExplorationConfig], settings: Iterable[tuple[str, str]]) -> None:
    """Refuse the settings none of ``configs``' strategies reads: they would change nothing."""
    if not configs:
        return
    reads = {cfg.strategy: getattr(load_explorer(cfg.strategy), "reads", None) for cfg in configs}  # a plugin may not say
    if any(r is None for r in reads.values()):
        return
    unread = [key for key, _ in settings if key not in ("strategy", "default_action") and all(key not in r for r in reads.values())]
    if unread:
        under = "; nor under ".join(f"{strategy}, which reads {', '.join(r)}" for strategy, r in reads.items())
        raise PolicySpecError(
            policy,
            f"{', '.join(unread)} changes nothing under {under};"
            " to evaluate another strategy, set it too (strategy=epsilon_greedy,epsilon=0.5)",
        )


def apply_settings(
    policy: str, base: ExplorationConfig, settings: Iterable[tuple[str, str]], check_reads: bool = True
) -> ExplorationConfig:
    """``base`` with ``settings`` laid over it, checked as the config file's ``exploration`` is;
    with ``check_reads``, a setting its strategy does not read is refused (``apply_to_agents``
    checks that over a line's agents)."""
    settings = tuple(settings)
    values: dict[str, Any] = {}
    for key, value in settings:
        if key == "default_action":
            values[key] = None if value.lower() in ("none", "null") else value
        elif key in _TEXT_FIELDS:
            values[key] = value
        else:
            try:
                values[key] = float(value)
            except ValueError:
                raise PolicySpecError(policy, f"{key}: {value!r} is not a number") from None
            if not math.isfinite(values[key]):
                raise PolicySpecError(policy, f"{key}: {value!r} is not a finite number")
    try:
        cfg = msgspec.convert({**msgspec.structs.asdict(base), **values}, ExplorationConfig)
    except msgspec.ValidationError as exc:
        found = re.fullmatch(r"(?P<msg>.*?) - at `\$\.(?P<key>[^`]*)`", str(exc))
        problem = f"{found['key']}: {found['msg']}" if found else str(exc)
        raise PolicySpecError(policy, f"exploration {problem}") from None
    strategies = available(EXPLORATION)
    if cfg.strategy not in strategies:
        raise PolicySpecError(policy, f"{cfg.strategy!r} is not an exploration strategy; expected one of {', '.join(strategies)}")
    if check_reads:
        _refuse_unread(policy, [cfg], settings)
    reads = getattr(load_explorer(cfg.strategy), "reads", None)  # a plugin may not say
    if cfg.epsilon_min > cfg.epsilon and (reads is None or "epsilon" in reads):  # softmax's floor has no epsilon over it
        raise PolicySpecError(
            policy, f"epsilon_min ({cfg.epsilon_min:g}) must not exceed epsilon ({cfg.epsilon:g}): set epsilon_min too"
        )
    return cfg


def settings_text(settings: Iterable[tuple[str, Any]]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings)


# ---- a policy's distribution per decision --------------------------------------------------

_VECTORISED = ("epsilon_greedy", "ucb", "softmax", "squarecb")


def _built_in(name: str) -> bool:
    fn = load_explorer(name)
    return getattr(fn, "__module__", None) == "reflexd.plugins.exploration" and getattr(fn, "__name__", None) == name


def exploration_probs(
    cfg: ExplorationConfig, scores: np.ndarray, spread: np.ndarray | None, mask: np.ndarray, t: int = 0
) -> np.ndarray:
    """``gate.target_probs`` (the deployed policy's distribution per row, 0 on padding), computed for
    all rows at once when ``cfg.strategy`` is one of the built-in strategies (the same arithmetic,
    equal to rounding), and row by row through the strategy plugin otherwise."""
    if cfg.strategy not in _VECTORISED or not _built_in(cfg.strategy):
        return target_probs(cfg, scores, spread, mask, t)
    scores = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if scores.shape != mask.shape:
        raise ValueError(f"scores {scores.shape} and mask {mask.shape} disagree")
    n = mask.sum(axis=1, keepdims=True).astype(np.float64)
    if not (n > 0).all():
        raise ValueError("every row needs at least one valid action")
    rows = np.arange(scores.shape[0])
    if cfg.strategy == "ucb" and spread is not None:
        scores = scores + cfg.ucb_c * np.asarray(spread, dtype=np.float64)
    masked = np.where(mask, scores, -np.inf)
    best = masked.argmax(axis=1)  # the first of ties, as the plugins' argmax
    top = masked[rows, best][:, None]
    valid_scores = np.where(mask, scores, top)  # padding at the top: a gap of 0, then zeroed
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if cfg.strategy in ("epsilon_greedy", "ucb"):
            eps = epsilon_at(cfg, t)
            p = np.where(mask, eps / n, 0.0)
            p[rows, best] += 1.0 - eps
        elif cfg.strategy == "softmax":
            e = np.where(mask, np.exp((valid_scores - top) / cfg.temperature), 0.0)
            floor = cfg.epsilon_min
            p = np.where(mask, (1.0 - floor) * e / e.sum(axis=1, keepdims=True) + floor / n, 0.0)
        else:  # squarecb
            gamma = cfg.gamma * (t + 1) ** cfg.gamma_exponent
            p = np.where(mask, 1.0 / (n + gamma * (top - valid_scores)), 0.0)
            p[rows, best] = 0.0
            p[rows, best] = 1.0 - p.sum(axis=1)
    single = n[:, 0] == 1
    if single.any():
        p[single] = mask[single]
    return p


def model_probs(
    scores: np.ndarray,
    spread: np.ndarray | None,
    mask: np.ndarray,
    agents: Sequence[str],
    exploration_for: Callable[[str], ExplorationConfig],
    t: int,
    context: np.ndarray | None = None,
    online: OnlineSettings | None = None,
    features: FeatureSpec | None = None,
) -> np.ndarray:
    """A model's deployed distribution per row, each agent's rows explored with its own settings
    (``gate.deployed_probs``, computed for all rows at once by ``exploration_probs``). With the
    rows' ``context`` and the online head's settings (``online``), a strategy that explores by the
    head's posterior is handed the spread its clients hand it beside a new model, as the gate
    judges it (``gate.served_spread``); otherwise the model's own."""
    return deployed_probs(
        exploration_for, agents, context, scores, spread, mask, t, online, features, explore=exploration_probs
    )


def constant_probs(policy: str, action: str, action_ids: Sequence[Sequence[str]], mask: np.ndarray) -> np.ndarray:
    """Probability 1 on ``action`` in every row; EvaluationError if a decision did not offer it."""
    pi = np.zeros(np.shape(mask), dtype=np.float64)
    missing: list[int] = []
    for i, offered in enumerate(action_ids):
        try:
            pi[i, list(offered).index(action)] = 1.0
        except ValueError:
            missing.append(i)
    if missing:
        raise EvaluationError(
            f"{policy}: {len(missing)} of {len(action_ids)} decisions in the window did not offer {action!r}, so the "
            "policy is not defined on them; narrow the window (--agent, --since, --until) to decisions that offer it"
        )
    return pi


def file_probs(
    policy: str,
    table: Mapping[str, Mapping[str, Any]] | None,
    ids: Sequence[str],
    action_ids: Sequence[Sequence[str]],
    mask: np.ndarray,
) -> np.ndarray:
    """The distributions a file gave for the window's decisions: ``table`` maps a decision id to
    ``{action id: p}``, as the sender read the file (``protocol.probability_tables``).

    Every decision of the window needs one; others are ignored. A distribution must give a finite,
    non-negative probability to actions the decision offered only (an action left out has 0) and
    sum to 1 (within 1e-6).
    """
    if table is None:
        raise PolicySpecError(
            policy, "its probabilities did not come with the request (reflexd evaluate and Policy.evaluate read the file)"
        )
    pi = np.zeros(np.shape(mask), dtype=np.float64)
    missing = [decision for decision in ids if decision not in table]
    for i, decision in enumerate(ids):
        if decision not in table:
            continue
        offered = list(action_ids[i])
        for action, p in table[decision].items():
            if action not in offered:
                raise PolicySpecError(policy, f"decision {decision!r} did not offer {action!r}")
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
                raise PolicySpecError(policy, f"decision {decision!r}: the probability of {action!r} must be a finite number ≥ 0")
            pi[i, offered.index(action)] = float(p)
        if abs(pi[i].sum() - 1.0) > 1e-6:
            raise PolicySpecError(policy, f"decision {decision!r}: probabilities sum to {pi[i].sum():.9g}, not 1")
    if missing:
        raise EvaluationError(
            f"{policy}: no probabilities for {len(missing)} of the {len(ids)} decisions in the window "
            f"(the first: {missing[0]!r}); give every decision's probabilities, or narrow the window"
        )
    return pi


# ---- what a policy is worth ---------------------------------------------------------------


def effective_sample_size(weights: np.ndarray) -> float:
    """(Σw)² / Σw²: how many on-policy decisions the weighted ones are worth (0 if every w is 0)."""
    w = np.asarray(weights, dtype=np.float64)
    squares = float((w * w).sum())
    return float(w.sum()) ** 2 / squares if squares > 0 else 0.0


def agreement(pi: np.ndarray, mask: np.ndarray, chosen: np.ndarray) -> float:
    """The share of rows where the policy's most likely action (the first of ties) is the logged one."""
    likeliest = np.where(mask, pi, -np.inf).argmax(axis=1)
    return float((likeliest == np.asarray(chosen)).mean())


def bounded(terms: np.ndarray, confidence: float, low: float, high: float) -> Interval:
    """The mean of per-row terms with its normal interval, and that interval bounded to [low, high]."""
    found = ope.estimate(terms, confidence)
    lower = min(max(found.lower, low), high)
    upper = max(min(found.upper, high), low)
    return Interval(
        value=found.value,
        stderr=found.stderr,
        lower=found.lower,
        upper=found.upper,
        bounded_lower=lower,
        bounded_upper=upper,
        clipped=found.lower < low or found.upper > high,
    )


class _Logged(msgspec.Struct, frozen=True):
    chosen: np.ndarray
    prob: np.ndarray
    reward: np.ndarray
    mask: np.ndarray
    low: float
    high: float
    observed: Interval
    # the logging policy's value per unit: each row's reward, or each episode's discounted return
    baseline: np.ndarray
    by_episode: ByEpisode | None = None


def _logged(batch: Any, confidence: float, episodes: Episodes | None = None, q_hat: np.ndarray | None = None) -> _Logged:
    reward = np.asarray(batch.reward, dtype=np.float64)
    n = reward.shape[0]
    if n < 2:
        raise EvaluationError(
            f"the window holds {n} usable matured decision{'s' if n != 1 else ''}; at least 2 are needed for an "
            "interval (widen it, or wait for the rewards' wait window to pass)"
        )
    chosen = np.asarray(batch.chosen, dtype=np.int64)
    prob = np.asarray(batch.prob, dtype=np.float64)
    by_episode = None if episodes is None else ByEpisode(episodes, chosen, prob, reward, q_hat)
    baseline = reward if by_episode is None else by_episode.observed
    if baseline.shape[0] < 2:
        raise EvaluationError(
            f"the window's {n} usable matured decisions are one episode, and its rewards are episode returns, judged "
            "episode by episode: at least 2 episodes are needed for an interval (widen the window)"
        )
    # an episode's observed return is its first row's credited return, so these bound it too
    low, high = float(reward.min()), float(reward.max())
    return _Logged(
        chosen=chosen,
        prob=prob,
        reward=reward,
        mask=np.asarray(batch.mask, dtype=bool),
        low=low,
        high=high,
        observed=bounded(baseline, confidence, low, high),
        baseline=baseline,
        by_episode=by_episode,
    )


def _value(
    logged: _Logged,
    name: str,
    kind: str,
    pi: np.ndarray,
    q_hat: np.ndarray | None,
    estimator: str,
    confidence: float,
    **extra: Any,
) -> PolicyValue:
    if not np.isfinite(pi).all():
        raise EvaluationError(f"{name}: its probabilities are not finite on {int((~np.isfinite(pi).all(axis=1)).sum())} rows")
    chosen, prob, reward = logged.chosen, logged.prob, logged.reward
    low, high = logged.low, logged.high
    by_episode = logged.by_episode
    terms: dict[str, np.ndarray | None]
    if by_episode is None:
        terms = {
            "ips": ope.ips_terms(pi, chosen, prob, reward),
            "snips": ope.snips_terms(pi, chosen, prob, reward) if pi[np.arange(len(chosen)), chosen].any() else None,
        }
        if q_hat is not None:
            terms["dm"] = ope.dm_terms(pi, q_hat)
            terms["dr"] = ope.dr_terms(pi, chosen, prob, reward, q_hat)
        weights = pi[np.arange(len(chosen)), chosen] / prob
    else:
        # q_hat is the one the episodes were laid out with (_logged): the same reward model
        terms = {"ips": by_episode.term("ips", pi)}
        try:
            terms["snips"] = by_episode.term("snips", pi)
        except ValueError:  # weighted PDIS is 0/0 for a policy that takes no logged first step
            terms["snips"] = None
        for estimator_name in ("dm", "dr") if q_hat is not None else ():
            terms[estimator_name] = by_episode.term(estimator_name, pi)
        weights = by_episode.weights(pi)
    # SNIPS is 0/0 for a policy that never takes a logged action (None); IPS then says 0
    intervals = {k: None if t is None else bounded(t, confidence, low, high) for k, t in terms.items()}
    headline = terms[estimator] if terms.get(estimator) is not None else terms["ips"]
    return PolicyValue(
        policy=name,
        kind=kind,
        value=intervals[estimator] or intervals["ips"],
        ips=intervals["ips"],
        snips=intervals["snips"],
        dm=intervals.get("dm"),
        dr=intervals.get("dr"),
        versus_logging=bounded(headline - logged.baseline, confidence, low - high, high - low),
        ess=effective_sample_size(weights),
        agreement=agreement(pi, logged.mask, chosen),
        **extra,
    )


def _baseline(logged: _Logged, with_reward_model: bool) -> PolicyValue:
    observed = logged.observed
    n = logged.baseline.shape[0]
    return PolicyValue(
        policy=LOGGING,
        kind="logging",
        value=observed,
        ips=observed,
        snips=observed,
        dr=observed if with_reward_model else None,
        ess=float(n),
    )


def evaluate(
    batch: Any,
    policies: Sequence[tuple[str, str, np.ndarray]],
    q_hat: np.ndarray | None = None,
    confidence: float = 0.95,
    estimator: str = "dr",
    episodes: Episodes | None = None,
) -> list[PolicyValue]:
    """The logging policy's row, then one per (name, kind, pi) in ``policies``, on ``batch``'s rows.

    ``batch`` has chosen, prob, reward and mask (a ``reflexd.learning.dataset.Batch``); each ``pi``
    is float [N, A] (0 on padding). ``q_hat`` [N, A] is the reward model's prediction for every
    action (DM and DR are left out without it). ``estimator`` is the headline (``value``); without
    ``q_hat`` DR falls back to SNIPS. With ``episodes`` (``credited_episodes``) the rows are judged
    by episode (the module docstring).
    """
    logged = _logged(batch, confidence, episodes, q_hat)
    estimator = _headline(estimator, q_hat is not None)
    rows = [_baseline(logged, q_hat is not None)]
    for name, kind, pi in policies:
        rows.append(_value(logged, name, kind, np.asarray(pi, dtype=np.float64), q_hat, estimator, confidence))
    return rows


def _headline(estimator: str, with_reward_model: bool) -> str:
    return estimator if (with_reward_model or estimator not in ("dm", "dr")) else "snips"


# ---- optimization discovery ----------------------------------------------------------------

# Settings laid over the model's own exploration. Pure greedy is left out on purpose: a policy that
# never explores leaves nothing for the next evaluation (or training run) to learn from.
DISCOVERY_GRID: tuple[tuple[tuple[str, Any], ...], ...] = (
    *((("strategy", "squarecb"), ("gamma", float(g))) for g in (1, 3, 10, 30, 100, 300)),
    *((("strategy", "epsilon_greedy"), ("epsilon", e), ("epsilon_min", e), ("decay", 0.0)) for e in (0.01, 0.02, 0.05, 0.1, 0.2)),
    *((("strategy", "softmax"), ("temperature", T)) for T in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
)


def discover(
    batch: Any,
    model: str,
    scores: np.ndarray,
    spread: np.ndarray | None,
    exploration_for: Callable[[str], ExplorationConfig],
    t: int,
    q_hat: np.ndarray | None,
    confidence: float = 0.95,
    estimator: str = "dr",
    grid: Sequence[Sequence[tuple[str, Any]]] = DISCOVERY_GRID,
    episodes: Episodes | None = None,
    context: np.ndarray | None = None,
    online: OnlineSettings | None = None,
    features: FeatureSpec | None = None,
) -> Recommendation:
    """Evaluate ``model`` under its own exploration and each setting of ``grid``; recommend one.

    The rule: the setting whose interval (of the headline estimator) has the highest lower bound
    is recommended if that lower bound is above the logging policy's lower bound (the mean observed
    reward's); otherwise none is. The model's own setting is one of the candidates, so the
    recommendation may be to keep it. With ``episodes`` every setting is judged by episode; with
    the rows' ``context`` (hashed as the model reads it) and ``online``, a strategy exploring by the
    online head's posterior as the gate judges it (``model_probs``).
    """
    logged = _logged(batch, confidence, episodes, q_hat)
    estimator = _headline(estimator, q_hat is not None)
    mask, agents = logged.mask, list(batch.agents)
    candidates = [
        _value(logged, model, "model",
               model_probs(scores, spread, mask, agents, exploration_for, t, context, online, features), q_hat, estimator, confidence,
               version=model, exploration=msgspec.to_builtins(exploration_for(agents[0])))
    ]
    for settings in grid:
        name = f"{model}@{settings_text(settings)}"
        pairs = [(k, f"{v:g}" if isinstance(v, float) else str(v)) for k, v in settings]
        try:
            configs = apply_to_agents(name, exploration_for, agents, pairs)
        except PolicySpecError:
            continue  # a setting that cannot apply to this model's exploration (no such strategy installed)
        pi = model_probs(scores, spread, mask, agents, configs.__getitem__, t, context, online, features)
        candidates.append(
            _value(logged, name, "exploration", pi, q_hat, estimator, confidence, version=model,
                   exploration=msgspec.to_builtins(configs[agents[0]]))
        )
    candidates.sort(key=lambda row: -row.value.lower if math.isfinite(row.value.lower) else math.inf)
    best = candidates[0]
    floor = logged.observed.lower
    pct = f"{confidence * 100:g}%"
    found = f"{best.value.value:.4f} [{best.value.lower:.4f}, {best.value.upper:.4f}] at {pct} ({estimator})"
    if best.value.lower > floor:
        reason = (
            f"{best.policy}: {found} has the best lower bound of the {len(candidates)} settings tried, above the "
            f"logging policy's lower bound {floor:.4f}"
        )
        return Recommendation(model=model, estimator=estimator, policy=best.policy, value=best.value, reason=reason,
                              candidates=candidates)
    reason = (
        f"none recommended: the best lower bound of the {len(candidates)} settings tried, {best.policy} {found}, is not "
        f"above the logging policy's lower bound {floor:.4f}"
    )
    return Recommendation(model=model, estimator=estimator, policy=None, value=None, reason=reason, candidates=candidates)


# ---- the whole evaluation -------------------------------------------------------------------


def run(
    policies: Sequence[str],
    batch_for: Callable[[FeatureSpec | None], Any],
    load_model: Callable[[str], Scorer],
    live: str | None,
    *,
    reward_model: str | None = None,
    discover_settings: bool = False,
    confidence: float = 0.95,
    estimator: str = "dr",
    agent: str | None = None,
    since: float | None = None,
    until: float | None = None,
    tables: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    rewards_for: RewardsFor | None = None,
    online: OnlineSettings | None = None,
) -> Evaluation:
    """Evaluate ``policies`` (names as in the module docstring) on the window ``batch_for`` loads;
    ``tables`` holds each ``file:`` policy's probabilities, as its sender read them.

    ``batch_for(spec)`` gives the window's rows hashed with ``spec`` (None: any spec, for policies
    that need no model), the same rows in the same order whatever the spec. ``load_model(version)``
    gives a loaded model. ``live`` is the live version (None: no model is live), which ``live`` names
    and which scores DR and DM unless ``reward_model`` names another. ``rewards_for`` (an agent's
    reward settings) tells which decisions' rewards are episode returns, to be judged by episode.
    ``online`` (the online head's settings): a model exploring by the head's posterior is judged
    with the spread its clients hand it beside a new model, as the gate judges it.
    """
    started = time.perf_counter()
    tables = tables or {}
    specs = [parse_policy(p) for p in policies]  # every name is checked before anything is loaded
    scorers: dict[str, Scorer] = {}
    scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def version_of(spec_version: str, text: str) -> str:
        if spec_version != "live":
            return spec_version
        if live is None:
            raise PolicySpecError(text, "no model is live")
        return live

    def scorer(version: str) -> Scorer:
        if version not in scorers:
            scorers[version] = load_model(version)
        return scorers[version]

    def scores_of(version: str) -> tuple[np.ndarray, np.ndarray]:
        if version not in scored:
            model = scorer(version)
            rows = batch_for(model.manifest.features)
            found = model.score_batch(rows.context, rows.actions)
            scored[version] = (np.asarray(found[0], dtype=np.float64), np.asarray(found[1], dtype=np.float64))
        return scored[version]

    # the reward model first: it fixes the spec most policies are hashed with
    reward_version = reward_model if reward_model is not None else live
    q_hat = None
    if reward_version is not None:
        scores, _ = scores_of(reward_version)
        batch = batch_for(scorer(reward_version).manifest.features)
        if not np.isfinite(scores[np.asarray(batch.mask)]).all():
            raise EvaluationError(f"reward model {reward_version}'s predictions are not finite on this window")
        q_hat = np.where(batch.mask, scores, 0.0)
    else:
        first_model = next((s for s in specs if s.version is not None), None)
        batch = batch_for(scorer(version_of(first_model.version, first_model.text)).manifest.features if first_model else None)

    episodes = credited_episodes(batch, rewards_for)
    logged = _logged(batch, confidence, episodes, q_hat)  # at least 2 rows, before any policy is applied
    values: list[tuple[str, str, np.ndarray, dict[str, Any]]] = []
    mask, agents = logged.mask, list(batch.agents)
    for spec in specs:
        if spec.kind == "action":
            assert spec.action is not None
            values.append((spec.text, spec.kind, constant_probs(spec.text, spec.action, batch.action_ids, mask), {}))
        elif spec.kind == "file":
            assert spec.path is not None
            values.append((spec.text, spec.kind, file_probs(spec.text, tables.get(spec.text), batch.ids, batch.action_ids, mask), {}))
        else:
            assert spec.version is not None
            version = version_of(spec.version, spec.text)
            manifest = scorer(version).manifest
            exploration_for = manifest.exploration_for
            if spec.kind == "exploration":
                configs = apply_to_agents(spec.text, manifest.exploration_for, agents, spec.settings)
                exploration_for = configs.__getitem__
            scores, spread = scores_of(version)
            context = batch_for(manifest.features).context
            t = manifest.training.experience
            pi = model_probs(scores, spread, mask, agents, exploration_for, t, context, online, manifest.features)
            shown = exploration_for(agents[0])
            values.append((spec.text, spec.kind, pi, {"version": version, "exploration": msgspec.to_builtins(shown)}))

    headline = _headline(estimator, q_hat is not None)
    rows = [_baseline(logged, q_hat is not None)]
    for name, kind, pi, extra in values:
        rows.append(_value(logged, name, kind, pi, q_hat, headline, confidence, **extra))

    discovery = None
    if discover_settings:
        model_spec = next((s for s in specs if s.version is not None), None)
        if model_spec is not None:
            model_version = version_of(model_spec.version, model_spec.text)  # type: ignore[arg-type]
        elif live is not None:
            model_version = live
        else:
            raise EvaluationError("discover needs a model: name one (v0003), or have one live")
        manifest = scorer(model_version).manifest
        scores, spread = scores_of(model_version)
        discovery = discover(
            batch, model_version, scores, spread, manifest.exploration_for, manifest.training.experience, q_hat,
            confidence, estimator, episodes=episodes, context=batch_for(manifest.features).context, online=online,
            features=manifest.features,
        )

    return Evaluation(
        decisions=len(batch.reward),
        dropped=int(getattr(batch, "dropped", 0)),
        agent=agent,
        since=since,
        until=until,
        estimator=headline,
        reward_model=reward_version,
        confidence=confidence,
        reward_min=logged.low,
        reward_max=logged.high,
        rows=rows,
        discovery=discovery,
        seconds=round(time.perf_counter() - started, 3),
        unit="decision" if logged.by_episode is None else "episode",
        episodes=None if logged.by_episode is None else logged.by_episode.count,
    )

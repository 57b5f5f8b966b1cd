"""The gate: off-policy evaluation decides whether a candidate model may replace the incumbent.

Both policies are evaluated on the same logged rows with ``reflexd.learning.ope`` (the deployed
policy's exploration included, via ``target_probs``), and the candidate must be better by
``gate.margin`` with ``gate.confidence``; a first model must beat the logging policy.

When rewards are episode returns (``rewards.episode_return``), the holdout's decisions are judged
by episode, not as independent rows: the estimators are the per-decision ones over episodes
(``reflexd.learning.episodes``), the interval's unit is the episode (``credited_episodes``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import msgspec
import numpy as np

from reflexd.config import ExplorationConfig, GateConfig
from reflexd.deciding import exploring as _exploration
from reflexd.features import AGENT_KEY, FeatureSpec, Hasher
from reflexd.learning import episodes as _episodes
from reflexd.learning.episodes import Episodes, RewardsFor, credited_episodes
from reflexd.learning.ope import ESTIMATORS, ROUNDING, estimate
from reflexd.manifest import GateResult, Training

if TYPE_CHECKING:
    # serving imports onnxruntime; the gate itself only needs score_batch, version and manifest
    from reflexd.deciding.online import OnlineSettings
    from reflexd.deciding.scoring import Scorer

__all__ = [
    "LOGGED_POLICY", "Exploration", "check_refit", "compare", "credited_episodes", "deployed_probs", "evaluate",
    "evaluate_cross_fit", "served_spread", "target_probs", "unseen_rows", "with_refit",
]

LOGGED_POLICY = "logged policy"

# how a model explores once deployed: the same for every agent, or each agent's own (a manifest's
# ``exploration_for``, a config's per-agent settings), as clients look it up for each decision
Exploration = Union[ExplorationConfig, Callable[[str], ExplorationConfig]]


def target_probs(
    cfg: ExplorationConfig, scores: np.ndarray, spread: np.ndarray | None, mask: np.ndarray, t: int = 0
) -> np.ndarray:
    """The deployed policy's distribution per row [N, A]: exploration over the valid actions, 0 on padding.

    Padded actions are left out before exploring, not zeroed after, because the client explores
    over exactly the actions it was given: a padded slot must neither win the argmax nor dilute
    epsilon.
    """
    scores = np.asarray(scores, dtype=np.float64)
    spread = None if spread is None else np.asarray(spread, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if scores.shape != mask.shape:
        raise ValueError(f"scores {scores.shape} and mask {mask.shape} disagree")
    if not mask.any(axis=1).all():
        raise ValueError("every row needs at least one valid action")
    out = np.zeros(scores.shape, dtype=np.float64)
    for i in range(scores.shape[0]):
        valid = mask[i]
        out[i, valid] = _exploration.probabilities(
            cfg, scores[i, valid], None if spread is None else spread[i, valid], t
        )
    return out


def _percent(confidence: float) -> str:
    return f"{confidence * 100:g}%"


def _rejected(reason: str, gate: GateConfig, baseline_name: str, rows: int) -> GateResult:
    # zeros rather than NaN: a GateResult is stored in a JSON manifest, where NaN cannot round-trip
    return GateResult(
        passed=False,
        reason=reason,
        estimator=gate.estimator,
        baseline=baseline_name,
        candidate_value=0.0,
        baseline_value=0.0,
        difference=0.0,
        lower=0.0,
        upper=0.0,
        confidence=gate.confidence,
        margin=gate.margin,
        holdout_rows=rows,
    )


def compare(
    candidate_pi: np.ndarray,
    baseline_pi: np.ndarray | None,
    chosen: np.ndarray,
    prob: np.ndarray,
    reward: np.ndarray,
    q_hat: np.ndarray,
    gate: GateConfig,
    baseline_name: str,
    episodes: Episodes | None = None,
) -> GateResult:
    """Candidate against baseline on the same rows: the mean and interval of per-row differences
    (per-episode differences with ``episodes``: see ``credited_episodes``).

    ``baseline_pi=None`` means the baseline is the logging policy itself, whose unbiased per-row
    value is simply the observed reward. The candidate passes when the lower bound of the
    difference is at least ``-gate.margin`` and the holdout has at least ``gate.min_holdout`` rows
    (and at least 2, the fewest an interval can be computed from). On fewer than
    ``gate.point_estimate_below`` rows the point estimate of the difference is held to
    ``-gate.margin`` instead: on so few heavy-tailed terms the interval is too wide to tell a
    replacement fit on more of the same experience from the incumbent, and its normal
    approximation too rough to trust.

    Against the logging policy (a first model) ``gate.first_min_holdout`` and
    ``gate.first_confidence`` take the place of ``min_holdout`` and ``confidence``, and only the
    interval decides, its lower bound above 0 (an interval of [0, 0] is a policy the holdout cannot
    tell from the logging one): until a model passes, every decision is made at the logging
    policy's value, while a first model that disappoints is still explored around and is replaced
    by the next candidate that passes the rule for replacements (or, while runs are cross-fitted,
    this rule: ``evaluate_cross_fit``). A candidate whose probabilities
    or reward predictions are not finite is rejected; a malformed log raises ValueError.

    ``estimates`` holds every estimator's value for the candidate (``candidate_ips``, ``_snips``,
    ``_dm``, ``_dr``) and for a baseline policy (``baseline_ips`` ...); the logging policy's DM and
    DR would need its full distribution, which the log does not keep, so it is reported as
    ``baseline_observed``, the mean observed reward.
    """
    candidate_pi = np.asarray(candidate_pi, dtype=np.float64)
    q_hat = np.asarray(q_hat, dtype=np.float64)
    chosen = np.asarray(chosen, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    reward = np.asarray(reward, dtype=np.float64)
    if baseline_pi is None:
        # a first model: judged by its own rule (GateConfig.first_min_holdout, first_confidence),
        # with no margin, which is for replacing an incumbent trained on less experience, and
        # always by its interval: replacing the logging policy is where a point estimate misleads
        gate = msgspec.structs.replace(
            gate,
            min_holdout=gate.first_min_holdout,
            confidence=gate.first_confidence,
            margin=0.0,
            point_estimate_below=0,
        )
    n = reward.shape[0]
    needed = max(gate.min_holdout, 2)
    if n < needed:
        return _rejected(f"holdout has {n} rows, fewer than the {needed} required: rejected", gate, baseline_name, n)
    if not np.isfinite(reward).all():
        raise ValueError("rewards must be finite")
    if baseline_pi is not None:
        baseline_pi = np.asarray(baseline_pi, dtype=np.float64)
        if not np.isfinite(baseline_pi).all():
            raise ValueError(f"{baseline_name}'s probabilities are not finite")
    broken = int((~np.isfinite(candidate_pi).all(axis=1) | ~np.isfinite(q_hat).all(axis=1)).sum())
    if broken:
        return _rejected(
            f"candidate's probabilities or reward predictions are not finite on {broken} of {n} rows: rejected",
            gate,
            baseline_name,
            n,
        )

    if episodes is None:
        def terms_of(pi: np.ndarray) -> dict[str, np.ndarray]:
            return {name: terms(pi, chosen, prob, reward, q_hat) for name, terms in ESTIMATORS.items()}

        observed, unit = reward, ""
    else:
        by_episode = _episodes.ByEpisode(episodes, chosen, prob, reward, q_hat)
        terms_of, observed = by_episode.terms, by_episode.observed
        unit = f" over {observed.shape[0]} episodes"
        if observed.shape[0] < 2:
            return _rejected(f"holdout has {n} rows in 1 episode, fewer than the 2 required: rejected", gate, baseline_name, n)
    candidate_terms = terms_of(candidate_pi)
    estimates = {f"candidate_{name}": float(t.mean()) for name, t in candidate_terms.items()}
    if baseline_pi is None:
        baseline_terms = observed
        estimates["baseline_observed"] = float(observed.mean())
    else:
        all_baseline = terms_of(baseline_pi)
        estimates.update({f"baseline_{name}": float(t.mean()) for name, t in all_baseline.items()})
        baseline_terms = all_baseline[gate.estimator]

    chosen_terms = candidate_terms[gate.estimator]
    diff = estimate(chosen_terms - baseline_terms, gate.confidence)
    candidate_value = float(chosen_terms.mean())
    baseline_value = float(baseline_terms.mean())
    interval = f"[{diff.lower:+.3f}, {diff.upper:+.3f}] at {_percent(gate.confidence)}"
    by_point = n < gate.point_estimate_below
    # an overflowed term makes the point estimate infinite, which must not pass
    bound = (diff.value if by_point else diff.lower) if math.isfinite(diff.value) else math.nan
    if baseline_pi is None:
        # likely better, strictly: an interval of [0, 0], every row's difference exactly 0, is a
        # policy the holdout cannot tell from the logging one (a model fit on rewards all equal)
        passed = bound > ROUNDING
        verdict = f"{'>' if passed else '≤'} +0.000"
    else:
        passed = bound >= -gate.margin - ROUNDING
        verdict = f"{'≥' if passed else '<'} {-gate.margin:+.3f}"
    if by_point:
        judged = (
            f"{diff.value:+.3f} {verdict} on its point estimate ({n} holdout rows, under "
            f"gate.point_estimate_below {gate.point_estimate_below}; interval {interval})"
        )
    else:
        judged = f"{diff.value:+.3f} {interval} {verdict}"
    reason = (
        f"candidate {candidate_value:.3f} vs {baseline_name} {baseline_value:.3f} ({gate.estimator}{unit}), "
        f"difference {judged}: {'promoted' if passed else 'rejected'}"
    )
    return GateResult(
        passed=passed,
        reason=reason,
        estimator=gate.estimator,
        baseline=baseline_name,
        candidate_value=candidate_value,
        baseline_value=baseline_value,
        difference=diff.value,
        lower=diff.lower,
        upper=diff.upper,
        confidence=gate.confidence,
        margin=gate.margin,
        holdout_rows=n,
        estimates=estimates,
    )


def deployed_probs(
    exploration: Exploration,
    agents: Sequence[str],
    context: np.ndarray | None,
    scores: np.ndarray,
    spread: np.ndarray | None,
    mask: np.ndarray,
    t: int,
    online: OnlineSettings | None = None,
    features: FeatureSpec | None = None,
    explore: Callable[..., np.ndarray] = target_probs,
) -> np.ndarray:
    """``target_probs`` (or ``explore``, which computes the same) of a model deployed with
    ``exploration``, each row explored as its agent's client explores it, with the spread it hands
    the strategy (``served_spread``, with the rows' ``context`` hashed with ``features``; without
    a context, the model's own); rows whose agents share a setting are explored together."""

    def explored(cfg: ExplorationConfig, rows: Any) -> np.ndarray:
        found = None if spread is None else np.asarray(spread)[rows]
        if context is not None and found is not None:
            who = np.asarray(agents, dtype=object)[rows].tolist() if len(agents) else ()
            found = served_spread(cfg, online, np.asarray(context)[rows], np.asarray(scores)[rows], found, features, who)
        return explore(cfg, np.asarray(scores)[rows], found, np.asarray(mask)[rows], t)

    if isinstance(exploration, ExplorationConfig):
        return explored(exploration, slice(None))
    if len(agents) != len(mask):
        raise ValueError(f"exploration per agent needs each row's agent: {len(agents)} agents for {len(mask)} rows")
    names, which = np.unique(np.asarray(agents, dtype=object).astype(str), return_inverse=True)
    groups: dict[ExplorationConfig, list[int]] = {}
    for k, agent in enumerate(names.tolist()):
        groups.setdefault(exploration(agent), []).append(k)
    if len(groups) <= 1:
        return explored(next(iter(groups)) if groups else exploration(""), slice(None))
    out = np.zeros(np.shape(mask), dtype=np.float64)
    for cfg, members in groups.items():
        rows = np.flatnonzero(np.isin(which, members))
        out[rows] = explored(cfg, rows)
    return out


def _agents(rows: Any) -> Sequence[str]:
    return getattr(rows, "agents", ())  # read only when exploration is per agent (``deployed_probs``)


def served_spread(
    cfg: ExplorationConfig,
    online: OnlineSettings | None,
    context: np.ndarray,
    scores: np.ndarray,
    spread: np.ndarray,
    features: FeatureSpec | None = None,
    agents: Sequence[str] = (),
) -> np.ndarray:
    """The spread a model's clients hand exploration by ``cfg.strategy`` once it goes live: its own
    ``spread``, or, for a strategy that explores by the online head's posterior
    (``exploring.spread_from``), that of the head started afresh beside it (its prior
    ``online.model_prior`` over the context's inputs, a bias and the model's score). The head
    then narrows it as it learns, so this judges the policy at its most exploratory.

    ``context`` is hashed as the model reads it (``features``); where that includes each row's
    agent (a shared line), the head, which reads the context alone, does not: its id is taken
    out again (``agents``)."""
    if online is None or not online.enabled or _exploration.spread_from(cfg.strategy, True) != "head":
        return spread
    context = np.asarray(context, dtype=np.float64)
    if features is not None and features.agent and len(agents):
        hasher = Hasher(features)
        ids = {agent: hasher.context({AGENT_KEY: agent}) for agent in set(agents)}
        context = context - np.stack([ids[agent] for agent in agents])  # hashing adds each key's part
    # OnlineHead.spread of an arm that has learned nothing, for every row at once (a test holds
    # the two equal)
    inputs = np.square(context).sum(axis=1, keepdims=True) + 1.0
    return np.sqrt((inputs + np.square(np.asarray(scores, dtype=np.float64))) / online.model_prior)


def _deployed_t(scorer: Scorer) -> int:
    # the Chooser starts a freshly loaded model at its run's experience, which sets epsilon decay
    # and SquareCB's gamma; judging the policy at t=0 would judge a far more exploratory one
    return scorer.manifest.training.experience


def unseen_rows(incumbent_training: Training, received_at: np.ndarray) -> np.ndarray | None:
    """The holdout rows newer than a refit incumbent's snapshot, or None for any other incumbent.

    A model fit without its holdout has seen none of a later run's holdout (the newest fifth of a
    larger snapshot). A refit was fit on its whole snapshot, and once runs come every
    ``min_new_examples`` rather than by growth, the next holdout reaches back into it: judged on
    rows it was fit on, the incumbent would look better than it is.
    """
    if not incumbent_training.refit:
        return None
    end = incumbent_training.window_end
    return np.flatnonzero(np.asarray(received_at) > (-math.inf if end is None else end))


def evaluate(
    candidate: Scorer,
    incumbent: Scorer | None,
    holdout: Any,
    exploration: Exploration,
    gate: GateConfig,
    incumbent_holdout: Any | None = None,
    incumbent_exploration: Exploration | None = None,
    rewards_for: RewardsFor | None = None,
    online: OnlineSettings | None = None,
) -> GateResult:
    """Score the holdout with both models and ``compare`` their deployed policies on it.

    ``holdout`` is a ``reflexd.learning.dataset.Batch`` (anything with context, actions, mask, chosen, prob,
    reward and ids), hashed with the candidate's feature spec. The candidate's scores are the
    reward model q_hat for both sides, so DM and DR differences are paired on one model.

    When the incumbent hashes features differently (its manifest's ``features`` differ from the
    candidate's), pass the same rows hashed with its spec as ``incumbent_holdout`` (for example
    ``dataset.load_snapshot(path, incumbent.manifest.features)``); its ids must match the
    holdout's row for row. Without it such a comparison raises ValueError rather than feed the
    incumbent features it was not trained on.

    With no incumbent the baseline is the logged policy (the observed rewards). The incumbent is
    judged exploring as it really does (``incumbent_exploration``, from its manifest), which may
    differ from the settings the candidate will be deployed with (``exploration``). Either may
    be each agent's own (a callable, as ``Manifest.exploration_for``): each row is then judged
    as its agent's client would explore it.

    ``rewards_for`` (an agent's reward settings) tells which rows' rewards are episode returns, to
    be judged by episode (``credited_episodes``). ``online`` (the online head's settings) gives a
    strategy that explores by the head's posterior the spread clients hand it (``served_spread``).
    """
    mask = np.asarray(holdout.mask, dtype=bool)
    scores, spread = candidate.score_batch(holdout.context, holdout.actions)
    # padded slots hold whatever the model makes of a zero vector; they must not reach DM's sum
    q_hat = np.where(mask, scores, 0.0)
    candidate_pi = deployed_probs(
        exploration, _agents(holdout), holdout.context, scores, spread, mask, _deployed_t(candidate), online,
        candidate.manifest.features,
    )

    baseline_pi = None
    baseline_name = LOGGED_POLICY
    if incumbent is not None:
        baseline_name = f"incumbent {incumbent.version}"
        rows = holdout
        if incumbent_holdout is not None:
            if list(incumbent_holdout.ids) != list(holdout.ids):
                raise ValueError("incumbent_holdout must hold the holdout's rows in the same order")
            rows = incumbent_holdout
        elif incumbent.manifest.features != candidate.manifest.features:
            raise ValueError(
                f"{baseline_name} hashes features with {incumbent.manifest.features}, the candidate with "
                f"{candidate.manifest.features}: pass incumbent_holdout hashed with the incumbent's spec"
            )
        inc_scores, inc_spread = incumbent.score_batch(rows.context, rows.actions)
        inc_exploration = incumbent_exploration or exploration
        baseline_pi = deployed_probs(
            inc_exploration, _agents(rows), rows.context, inc_scores, inc_spread, mask, _deployed_t(incumbent), online,
            incumbent.manifest.features,
        )

    return compare(
        candidate_pi, baseline_pi, holdout.chosen, holdout.prob, holdout.reward, q_hat, gate, baseline_name,
        credited_episodes(holdout, rewards_for),
    )


def evaluate_cross_fit(
    rows: Any,
    scores: np.ndarray,
    spread: np.ndarray,
    exploration: Exploration,
    gate: GateConfig,
    incumbent: Scorer | None = None,
    rewards_for: RewardsFor | None = None,
    online: OnlineSettings | None = None,
    features: FeatureSpec | None = None,
) -> GateResult:
    """Judge a learner on a cross-fitted run's out-of-fold predictions against the logging policy
    (``rows`` hashed with ``features``, the learner's).

    ``rows`` is every row of the run's snapshot (a ``reflexd.learning.dataset.Batch``) and ``scores`` and
    ``spread`` [N, A_max] each row's predictions by the learner fit without it, so each row is
    one the policy judged on it has not seen. The rule is a first model's (``compare`` with no
    baseline policy) even when a cross-fitted model is live: that model was fit on these same
    rows, so they cannot judge it, and it came from the same learner on fewer of them. Any other
    incumbent (from a run with a holdout, or cross-fitted on more rows, as after retention has
    shrunk the snapshot) is kept: these rows cannot judge it either, and it was judged on more.
    What goes live if this passes is the learner fit on every row (``refit_rows``), deployed at
    their count on the exploration clock.
    """
    mask = np.asarray(rows.mask, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n = mask.shape[0]
    if incumbent is not None:
        training = incumbent.manifest.training
        if not training.cross_fitted or training.experience > n:
            what = "came from a run with a holdout"
            if training.cross_fitted:
                what = f"was cross-fitted on {training.experience}"
            reason = (
                f"a cross-fitted run on {n} rows replaces only a model cross-fitted on as many or fewer, "
                f"and incumbent {incumbent.version} {what}: rejected"
            )
            return _rejected(reason, gate, f"incumbent {incumbent.version}", n)
    pi = deployed_probs(exploration, _agents(rows), rows.context, scores, spread, mask, n, online, features)
    verdict = compare(
        pi, None, rows.chosen, rows.prob, rows.reward, np.where(mask, scores, 0.0), gate, LOGGED_POLICY,
        credited_episodes(rows, rewards_for),
    )
    note = f" (cross-fitted: each of the {n} rows scored by the learner fit without it)"
    return msgspec.structs.replace(verdict, reason=verdict.reason + note, refit_rows=n if verdict.passed else 0)


def check_refit(
    refit: Scorer,
    candidate: Scorer,
    holdout: Any,
    exploration: Exploration,
    gate: GateConfig,
    rewards_for: RewardsFor | None = None,
    online: OnlineSettings | None = None,
) -> GateResult:
    """Did the refit go wrong? It passes unless, on the candidate's holdout, its value falls below
    the candidate's by more than ``gate.margin`` (point estimates, by ``gate.estimator``).

    The refit was fit on these rows, so they cannot show that it generalises (the candidate's
    verdict shows that of the learner and its settings), and no interval is asked for: only that
    a model that has seen the rows does about as well on them as one that has not. A refit whose
    output is not finite fails.
    """
    found = evaluate(
        refit, candidate, holdout, exploration, msgspec.structs.replace(gate, min_holdout=2), rewards_for=rewards_for,
        online=online,
    )
    if not found.estimates:  # refused before any estimate: its output is not finite
        return found
    passed = found.difference >= -gate.margin - ROUNDING
    reason = (
        f"refit {found.candidate_value:.3f} vs candidate {found.baseline_value:.3f} ({gate.estimator}) on the holdout "
        f"it was fit on, difference {found.difference:+.3f} {'≥' if passed else '<'} {-gate.margin:+.3f}"
    )
    return msgspec.structs.replace(found, passed=passed, reason=reason)


def with_refit(verdict: GateResult, check: GateResult, rows: int) -> GateResult:
    """The candidate's passing ``verdict``, with what became of its refit on all ``rows``:
    it goes live if it passed ``check_refit`` (``check``), otherwise the candidate does."""
    if check.passed:
        note = f"; went live refit on all {rows} rows ({check.reason})"
    else:
        note = f"; its refit on all {rows} rows failed ({check.reason}), so the candidate went live"
    estimates = {**verdict.estimates, "refit_difference": check.difference}
    return msgspec.structs.replace(
        verdict, reason=verdict.reason + note, estimates=estimates, refit_rows=rows if check.passed else 0
    )

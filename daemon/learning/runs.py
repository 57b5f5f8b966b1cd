"""When runs happen, and which model a run leaves live: the scheduler's rules, free of I/O.

The daemon's scheduler and ``bench/replay.py`` both call these, so the benchmark's replay is the
daemon's own decision, not a copy of it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import msgspec
import numpy as np

from reflexd.config import GateConfig, TrainerConfig
from reflexd.learning import gate
from reflexd.manifest import GateResult

if TYPE_CHECKING:
    from reflexd.deciding.online import OnlineSettings
    from reflexd.deciding.scoring import Scorer


def due_after(cfg: TrainerConfig, trained_on: int, first: int) -> int:
    """How many new matured experiences make a run due, when the last run's snapshot held ``trained_on``.

    ``min_new_examples``, or fewer while experience is scarce: once it has grown by
    ``cfg.growth`` since the last run, and the first run as soon as there are ``first``
    (``first_run_rows``). Learning early and often is what an agent with little experience gains
    most from; as experience grows the gaps widen geometrically until ``min_new_examples``
    governs. A snapshot as large as ``max_examples`` means experience is no longer scarce,
    however small that cap. Never fewer than ``first`` in all: a run on fewer would only fail.
    """
    needed = max(first - trained_on, 1)
    if cfg.growth <= 0 or trained_on >= cfg.max_examples:
        return max(cfg.min_new_examples, needed)
    # rounded up, less a hair, so 0.07 × 100 asks for 7 and not the 8 of its float (7.000000000000001)
    grown = math.ceil(cfg.growth * trained_on - 1e-9)
    return max(min(cfg.min_new_examples, grown), needed)


def run_points(cfg: TrainerConfig, below: int, first: int) -> list[int]:
    """The experience totals under ``below`` at which ``due_after`` makes runs due, each run
    training on everything so far: 6, 8, 10, 13, 17, 22, 28, ... with the defaults."""
    points, total = [], 0
    while (total := total + due_after(cfg, total, first)) < below:
        points.append(total)
    return points


class Judged(NamedTuple):
    """What a run with a holdout leaves live: ``live`` is the candidate, its refit, or None (refused)."""

    live: Any  # a Scorer, or None
    verdict: GateResult


def judge_run(
    candidate: Scorer,
    incumbent: Scorer | None,
    holdout: Any,
    exploration: gate.Exploration,
    settings: GateConfig,
    refit: Callable[[], Scorer] | None = None,
    incumbent_holdout: Any | None = None,
    incumbent_exploration: gate.Exploration | None = None,
    rewards_for: gate.RewardsFor | None = None,
    online: OnlineSettings | None = None,
) -> Judged:
    """The rule for which model goes live after a run with a holdout.

    The candidate, fit without the holdout, is judged on it (``gate.evaluate``); against a refit
    incumbent only on the rows newer than that incumbent's snapshot (``gate.unseen_rows``). When it
    passes and ``refit`` gives the same learner fit on every row (``trainer.refit_below``), the refit
    goes live unless it went wrong (``gate.check_refit``); otherwise the candidate does. ``refit`` is
    called only for a candidate that passed, so a caller may fit it lazily. ``rewards_for`` (an
    agent's reward settings) has rows whose rewards are episode returns judged by episode;
    ``online`` (the online head's settings) has a strategy that explores by the head's posterior
    judged with the spread clients hand it (``gate.served_spread``).
    """
    held = len(holdout)
    if incumbent is not None:
        unseen = gate.unseen_rows(incumbent.manifest.training, holdout.received_at)
        if unseen is not None and len(unseen) < held:
            holdout = holdout.take(unseen)
            incumbent_holdout = incumbent_holdout.take(unseen) if incumbent_holdout is not None else None
    verdict = gate.evaluate(
        candidate, incumbent, holdout, exploration, settings, incumbent_holdout, incumbent_exploration, rewards_for,
        online,
    )
    if incumbent is not None and len(holdout) < held:
        note = f" (on the {len(holdout)} of {held} holdout rows newer than what {incumbent.version} was fit on)"
        verdict = msgspec.structs.replace(verdict, reason=verdict.reason + note)
    if not verdict.passed:
        return Judged(None, verdict)
    if refit is None:
        return Judged(candidate, verdict)
    refitted = refit()
    check = gate.check_refit(refitted, candidate, holdout, exploration, settings, rewards_for, online)
    verdict = gate.with_refit(verdict, check, candidate.manifest.training.experience)
    return Judged(refitted if check.passed else candidate, verdict)


# the newest decisions made during a run that a first model is confirmed on (``confirm_first``)
CONFIRM_ROWS = 20_000


def confirm_needs(verdict: GateResult) -> int:
    """The fewest decisions made during a run that ``confirm_first`` judges its verdict on: as many
    as the holdout held (and the 2 an interval needs), at most ``CONFIRM_ROWS``."""
    return min(max(2, verdict.holdout_rows), CONFIRM_ROWS)


def confirm_first(
    live: Scorer,
    verdict: GateResult,
    fresh: Any,
    exploration: gate.Exploration,
    settings: GateConfig,
    rewards_for: gate.RewardsFor | None = None,
    online: OnlineSettings | None = None,
    cross_fitted: bool = False,
) -> GateResult:
    """A first model's passing verdict, confirmed or overturned on the decisions made while its run
    trained (``fresh``, hashed with ``live``'s spec, at most ``CONFIRM_ROWS``): the model about to
    go live, judged against the logging policy by the first-model rule on the newest half of them
    (at least as many as the holdout held), rows neither it nor its refit has seen.

    The logging policy is an online head that learns on while a run trains, and the holdout's
    newest rows tell what it earned at the snapshot, not what the model would replace: a model fit
    on a hundred early rows, estimated on twenty of them, beat the head of those rows and went live
    beside a head that had since learned from thousands. The newest decisions are the policy it
    replaces as it is now (the older half would average in what the head has since outgrown),
    logged with their propensities. With fewer than the holdout held (a run quicker than the
    decisions come), or fewer than 2 episodes when rewards are episode returns, the verdict stands,
    as does one that did not pass or was against an incumbent. A refusal keeps the verdict's own
    numbers and reports the confirmation's in ``estimates`` (``confirmed_*``), as a confirmation
    does; ``cross_fitted``: the verdict is on out-of-fold predictions, not a holdout.
    """
    least = confirm_needs(verdict)
    if not verdict.passed or verdict.baseline != gate.LOGGED_POLICY or len(fresh) < least:
        return verdict
    newest = np.sort(np.argsort(fresh.received_at, kind="stable")[-max(least, len(fresh) // 2):])
    rows = fresh.take(newest)
    episodes = gate.credited_episodes(rows, rewards_for)
    if episodes is not None and len(np.unique(episodes[0])) < 2:
        return verdict
    again = gate.evaluate(live, None, rows, exploration, settings, rewards_for=rewards_for, online=online)
    newer = f"the {len(fresh)} decisions"
    if len(rows) < len(fresh):
        newer = f"the newest {len(rows)} of the {len(fresh)} decisions"
    since = f"on {newer} made since its snapshot, which it never saw: {again.reason}"
    estimates = {
        **verdict.estimates, "confirmed_rows": float(len(rows)), "confirmed_value": again.candidate_value,
        "confirmed_difference": again.difference, "confirmed_lower": again.lower, "confirmed_upper": again.upper,
    }
    if again.passed:
        return msgspec.structs.replace(verdict, reason=f"{verdict.reason}; confirmed {since}", estimates=estimates)
    held, _, after = verdict.reason.partition(": promoted")
    # refused, what the trainer said of the model going live (its refit) no longer holds
    judged = f"its out-of-fold predictions{after}" if cross_fitted else "its holdout"
    return msgspec.structs.replace(
        verdict, passed=False, reason=f"{held} on {judged}; {since}", estimates=estimates, refit_rows=0
    )

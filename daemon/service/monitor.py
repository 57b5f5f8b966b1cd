"""Automatic rollback: the live model against its predecessor, judged on the same decisions.

The gate judges a candidate off-policy, on logged data, before it goes live. The monitor checks
the promise afterwards: every ``gate.rollback_check_interval`` seconds it takes the live
version's newest matured decisions (at most ``WINDOW_ROWS``: those logged with its
``model_version``, with their rewards joined as for training; a ``decide`` with ``log: false`` is
never logged, so it never counts) and evaluates on those same rows both the live version's policy
and its predecessor's (the version live before it in the registry's history), each exploring as
its manifest says, by ``gate.estimator`` (default ``dr``, with the live model's scores as the
reward model). Both are judged on the same traffic, so a change in the mix of contexts (easier or
harder requests, a burst of probing decides that got the default reward) moves both alike and is
not mistaken for a worse model.

The rule (``judge_window``): once the window holds ``gate.rollback_min_decisions`` decisions, the
live model is rolled back when the upper bound of the paired interval of (live − predecessor), at
``gate.confidence`` (two-sided, like the gate's), is below ``−gate.rollback_margin``: when it is
worse by more than the margin with that confidence. With ``gate.auto_rollback: false`` the
comparison is still made and shown in ``status``.

Where an agent's rewards are episode returns (``rewards.episode_return``), the window is judged
by episode, as the gate judges a holdout (``reflexd.learning.episodes``): the decisions of one
episode share its return, so paired row by row their interval would be too narrow and an equal
model would be rolled back on chance. The estimator is then ``gate.estimator``'s episode form, the
interval's unit the episode (at least 2 of them), and a decision without an episode one of its own.

Never a cascade: after an automatic rollback, the version rolled back to is not itself rolled
back automatically (the comparison is still made and shown, verdict ``held``) until a version is
promoted. The store's model events (``auto_rolled_back``, ``promoted``) say which came last, so a
restart keeps the hold.

``judge`` is the rule for two independent samples (Welch's interval on two means), which the
monitor applied to each version's own live rewards before it compared them on one window.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal

import anyio
import msgspec
import numpy as np

from reflexd import log
from reflexd.config import Config, GateConfig
from reflexd.deciding.scoring import ModelSource
from reflexd.errors import PointerMoved, ReflexdError
from reflexd.learning.ope import estimate, z_score
from reflexd.registry import Registry
from reflexd.service.evaluation import Models, same_window
from reflexd.service.store import RewardStats, Store

_log = log.get("reflexd.monitor")

Verdict = Literal["no_model", "no_predecessor", "too_few_decisions", "not_worse", "worse", "held"]
_NONE = RewardStats(count=0, mean=0.0, variance=0.0)
# the live version's newest matured decisions a check judges both versions on
WINDOW_ROWS = 20_000


class Comparison(msgspec.Struct, frozen=True, kw_only=True):
    """One check of the live version against its predecessor; ``rollback`` says if it should go."""

    at: float
    verdict: Verdict
    rollback: bool
    reason: str
    current: str | None = None
    predecessor: str | None = None
    current_decisions: int = 0
    current_mean: float | None = None
    predecessor_decisions: int = 0
    predecessor_mean: float | None = None
    difference: float | None = None  # current − predecessor
    lower: float | None = None
    upper: float | None = None
    confidence: float = 0.95
    margin: float = 0.0
    min_decisions: int = 0
    # judged on one window (judge_window): the estimator, and the window's mean observed reward;
    # current_mean and predecessor_mean are then the two policies' estimated values on it
    estimator: str | None = None
    observed_mean: float | None = None
    episodes: int | None = None  # judged by episode (rewards are episode returns): how many; None: row by row
    held: bool = False  # the live version is where the last automatic rollback went: never rolled back automatically


def judge(
    current: str,
    cur: RewardStats | None,
    predecessor: str,
    prev: RewardStats | None,
    gate: GateConfig,
    at: float | None = None,
) -> Comparison:
    """Two independent samples' means (say, each version's own live reward) by Welch's interval:
    rolled back when its upper bound of (current − predecessor) is below ``−gate.rollback_margin``."""
    cur = cur or _NONE
    prev = prev or _NONE
    common = dict(
        at=time.time() if at is None else at,
        current=current,
        predecessor=predecessor,
        current_decisions=cur.count,
        current_mean=cur.mean if cur.count else None,
        predecessor_decisions=prev.count,
        predecessor_mean=prev.mean if prev.count else None,
        confidence=gate.confidence,
        margin=gate.rollback_margin,
        min_decisions=gate.rollback_min_decisions,
    )
    needed = max(gate.rollback_min_decisions, 2)
    if cur.count < needed or prev.count < needed:
        return Comparison(
            verdict="too_few_decisions",
            rollback=False,
            reason=(
                f"{current} has {cur.count} and {predecessor} {prev.count} matured decisions; "
                f"{needed} each are needed to compare them"
            ),
            **common,
        )
    diff = cur.mean - prev.mean
    stderr = math.sqrt(max(cur.variance, 0.0) / cur.count + max(prev.variance, 0.0) / prev.count)
    half = z_score(gate.confidence) * stderr
    lower, upper = diff - half, diff + half
    worse = upper < -gate.rollback_margin
    reason = (
        f"live reward {current} {cur.mean:.3f} (n={cur.count}) vs {predecessor} {prev.mean:.3f} "
        f"(n={prev.count}): difference {diff:+.3f} [{lower:+.3f}, {upper:+.3f}] at "
        f"{gate.confidence * 100:g}% {'<' if worse else '≥'} {-gate.rollback_margin:+.3f}"
        + (f": roll back to {predecessor}" if worse else "")
    )
    return Comparison(
        verdict="worse" if worse else "not_worse",
        rollback=worse,
        reason=reason,
        difference=diff,
        lower=lower,
        upper=upper,
        **common,
    )



def judge_window(
    current: str,
    predecessor: str,
    rows: int,
    current_terms: np.ndarray | None,
    predecessor_terms: np.ndarray | None,
    gate: GateConfig,
    at: float | None = None,
    estimator: str | None = None,
    observed: float | None = None,
    episodes: int | None = None,
) -> Comparison:
    """Both versions' policies on the same ``rows`` decisions (per-row terms of one estimator, or
    per-episode terms of ``episodes`` episodes): the rule in the module docstring, on the paired
    differences."""
    common = dict(
        at=time.time() if at is None else at,
        current=current,
        predecessor=predecessor,
        current_decisions=rows,
        predecessor_decisions=rows,  # the same decisions: both are judged on the live version's
        confidence=gate.confidence,
        margin=gate.rollback_margin,
        min_decisions=gate.rollback_min_decisions,
        estimator=estimator,
        observed_mean=observed,
        episodes=episodes,
    )
    needed = max(gate.rollback_min_decisions, 2)
    if rows < needed or current_terms is None or predecessor_terms is None:
        return Comparison(
            verdict="too_few_decisions",
            rollback=False,
            reason=(
                f"{current} has {rows} matured decisions; {needed} are needed to compare it with {predecessor} on them"
            ),
            **common,
        )
    if episodes is not None and episodes < 2:
        return Comparison(
            verdict="too_few_decisions",
            rollback=False,
            reason=(
                f"{current}'s {rows} matured decisions make {episodes} episode (rewards are episode returns, judged "
                f"by episode); 2 episodes are needed to compare it with {predecessor} on them"
            ),
            **common,
        )
    cur = float(np.mean(current_terms))
    prev = float(np.mean(predecessor_terms))
    diff = estimate(np.asarray(current_terms) - np.asarray(predecessor_terms), gate.confidence)
    worse = diff.upper < -gate.rollback_margin
    unit = "" if episodes is None else f" over {episodes} episodes"
    reason = (
        f"on {current}'s {rows} newest matured decisions ({estimator or gate.estimator}{unit}): {current} {cur:.3f} vs "
        f"{predecessor} {prev:.3f}, difference {diff.value:+.3f} [{diff.lower:+.3f}, {diff.upper:+.3f}] at "
        f"{gate.confidence * 100:g}% {'<' if worse else '≥'} {-gate.rollback_margin:+.3f}"
        + (f": roll back to {predecessor}" if worse else "")
    )
    return Comparison(
        verdict="worse" if worse else "not_worse",
        rollback=worse,
        reason=reason,
        current_mean=cur,
        predecessor_mean=prev,
        difference=diff.value,
        lower=diff.lower,
        upper=diff.upper,
        **common,
    )


class Monitor:
    """Runs ``check`` every ``gate.rollback_check_interval`` seconds inside the daemon."""

    def __init__(self, settings: Callable[[], Config], registry: Registry, store: Store, models: ModelSource) -> None:
        self._settings = settings
        self.registry = registry
        self.store = store
        self.models = models
        self.checks = 0
        self.rollbacks = 0
        self.last: Comparison | None = None
        self.last_rollback: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._reported: set[tuple[str, str]] = set()  # (current, predecessor) pairs warned about
        self._scorers = Models(registry, lambda: getattr(models, "scorer", None))
        self._cached: tuple[Any, Comparison] | None = None  # the last comparison and what it was made on
        self._rolled_to: str | None = None  # where this process last rolled back to, while it stays live

    @property
    def config(self) -> Config:
        return self._settings()

    async def run(self) -> None:
        while True:
            await self.check_reporting()
            await anyio.sleep(self.config.gate.rollback_check_interval)

    async def check_reporting(self) -> None:
        """``check``, with a failure kept in ``last_error`` (for ``status``) rather than raised.

        A failure is logged when it first appears, not at every check: a predecessor that can
        never be loaded (hashed with another feature scheme) would otherwise log the same error
        every ``rollback_check_interval`` for as long as it stays in history.
        """
        try:
            await self.check()
            error = None
        except ReflexdError as exc:
            error = str(exc)
            if error != self.last_error:
                _log.error("rollback check failed", error=error)
        except Exception as exc:  # a bug costs one check, never the daemon
            error = f"{type(exc).__name__}: {exc}"
            if error != self.last_error:
                _log.exception("rollback check failed unexpectedly")
        self.last_error = error

    async def check(self) -> Comparison:
        """Compare the live version with its predecessor; roll back if it is worse (and allowed)."""
        cfg = self.config
        registry = self.registry
        current, predecessor = await anyio.to_thread.run_sync(registry.predecessor)
        now = time.time()
        self.checks += 1
        if current is None or predecessor is None:
            verdict: Verdict = "no_model" if current is None else "no_predecessor"
            reason = "no live model" if current is None else f"{current} has no predecessor to compare with"
            self.last = Comparison(at=now, verdict=verdict, rollback=False, reason=reason, current=current)
            return self.last
        # the snapshot, loading and scoring block: a worker thread, never the event loop
        result = await anyio.to_thread.run_sync(self._compare, current, predecessor, now, cfg)
        if await anyio.to_thread.run_sync(self._held, current):
            result = msgspec.structs.replace(result, held=True)
            if result.rollback:
                result = msgspec.structs.replace(
                    result,
                    verdict="held",
                    rollback=False,
                    reason=result.reason
                    + f"; but {current} is where the last automatic rollback went: it is not rolled back "
                    "automatically until a version is promoted",
                )
        self.last = result
        if not result.rollback:
            return result
        if not cfg.gate.auto_rollback:
            if (current, predecessor) not in self._reported:
                self._reported.add((current, predecessor))
                _log.warning("live model is worse than its predecessor; gate.auto_rollback is off", reason=result.reason)
            return result
        try:
            target = await anyio.to_thread.run_sync(registry.rollback, current)
        except PointerMoved as exc:
            _log.info("live model changed during the rollback check; checking again later", detail=str(exc))
            return result
        await anyio.to_thread.run_sync(self.models.refresh)
        self.rollbacks += 1
        self._rolled_to = target  # held at once, even if the event below cannot be recorded
        detail = {**msgspec.to_builtins(result), "from": current, "to": target}
        self.last_rollback = detail
        _log.warning(
            "model rolled back automatically",
            version=current,
            to=target,
            reason=result.reason,
            difference=round(result.difference or 0.0, 4),
            upper=round(result.upper or 0.0, 4),
        )
        await anyio.to_thread.run_sync(self.store.record_model_event, current, "auto_rolled_back", detail, time.time())
        return result

    def _compare(self, current: str, predecessor: str, now: float, cfg: Config) -> Comparison:
        """``judge_window`` on the live version's newest matured decisions (blocking: a worker thread).

        Nothing is snapshotted or scored again while the live version has no newly matured
        decision and the settings are the same: the last comparison stands.
        """
        gate = cfg.gate
        stats = self.store.live_rewards([current], now, cfg).get(current) or _NONE
        # the reward settings decide whether the window is judged by episode
        key = (current, predecessor, stats.count, stats.mean, gate, cfg.rewards, cfg.agents)
        if self._cached is not None and self._cached[0] == key:
            return msgspec.structs.replace(self._cached[1], at=now)
        if stats.count < max(gate.rollback_min_decisions, 2):
            result = judge_window(current, predecessor, stats.count, None, None, gate, now)
        else:
            found = same_window(
                self.store, cfg, now, self._scorers.load(current), self._scorers.load(predecessor), WINDOW_ROWS
            )
            result = judge_window(
                current, predecessor, found.rows, found.current, found.predecessor, gate, now,
                estimator=found.estimator, observed=found.observed, episodes=found.episodes,
            )
        self._cached = (key, result)
        return result

    def _held(self, current: str) -> bool:
        """Is ``current`` where the last automatic rollback went, with no promotion since?"""
        if self._rolled_to != current:
            self._rolled_to = None  # another version went live since
        last = self.store.last_model_event(("auto_rolled_back", "promoted"), self.registry.versions())
        recorded = last is not None and last["event"] == "auto_rolled_back" and last["detail"].get("to") == current
        return recorded or self._rolled_to == current

    def as_dict(self) -> dict[str, Any]:
        gate = self.config.gate
        return {
            "auto_rollback": gate.auto_rollback,
            "check_interval": gate.rollback_check_interval,
            "checks": self.checks,
            "rollbacks": self.rollbacks,
            "last": msgspec.to_builtins(self.last) if self.last is not None else None,
            "last_rollback": self.last_rollback,
            "last_error": self.last_error,
        }

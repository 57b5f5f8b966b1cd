"""Automatic rollback: the live model's real reward against its predecessor's.

The gate judges a candidate off-policy, on logged data, before it goes live. The monitor checks
the promise afterwards, on the decisions the model actually made: every
``gate.rollback_check_interval`` seconds it compares the mean joined reward of the live version's
matured decisions with that of its predecessor (the version live before it in the registry's
history, on the decisions that one made), using the same reward join as training.

The rule (``judge``) is Welch's difference of means with a normal interval at ``gate.confidence``
(two-sided, like the gate's): once both versions have ``gate.rollback_min_decisions`` decisions,
the live model is rolled back when the interval's upper bound of (current − predecessor) is below
``−gate.rollback_margin``, that is when it is worse by more than the margin with that confidence.
With ``gate.auto_rollback: false`` the comparison is still made and shown in ``status``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal

import anyio
import msgspec

from reflexd import log
from reflexd.config import Config, GateConfig
from reflexd.deciding.scoring import ModelSource
from reflexd.errors import PointerMoved, ReflexdError
from reflexd.learning.ope import z_score
from reflexd.registry import Registry
from reflexd.service.store import RewardStats, Store

_log = log.get("reflexd.monitor")

Verdict = Literal["no_model", "no_predecessor", "too_few_decisions", "not_worse", "worse"]
_NONE = RewardStats(count=0, mean=0.0, variance=0.0)


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


def judge(
    current: str,
    cur: RewardStats | None,
    predecessor: str,
    prev: RewardStats | None,
    gate: GateConfig,
    at: float | None = None,
) -> Comparison:
    """Compare two versions' live rewards by the rule in the module docstring."""
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
        stats = await anyio.to_thread.run_sync(
            self.store.live_rewards, [current, predecessor], now, cfg
        )
        result = judge(current, stats.get(current), predecessor, stats.get(predecessor), cfg.gate, now)
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
        self.models.refresh()
        self.rollbacks += 1
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

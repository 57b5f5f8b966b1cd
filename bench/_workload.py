"""What the benchmark sends: the demo's simulated LLM router, with a wider (10-key) context.

The demo's World decides rewards from task, difficulty and tier; six more keys make the context
the size a real agent logs (~10 keys), so one msgpack Decision frame is ~400 bytes. The decide
benchmark asks more of one decision (``DecideWorkload``): a 20-key context and 10 actions with
3 features each.
"""

from __future__ import annotations

import time
from typing import Any

from reflexd.tools.demo import World
from reflexd.wire.framing import MSGPACK, encode_frame
from reflexd.wire.protocol import Decision, Outcome

AGENT = "bench-router"
LANGS = ("en", "de", "fr", "es", "ja", "pt")
REGIONS = ("eu-west", "us-east", "us-west", "ap-south")
CLIENTS = ("cli", "ide", "web", "api", "slack")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# id → (cost, latency s, uses tools): the decide workload's 10 actions
ACTIONS_10: dict[str, tuple[float, float, bool]] = {
    "small-model": (1.0, 0.4, False),
    "medium-model": (3.0, 0.9, False),
    "large-model": (8.0, 2.0, False),
    "small+tools": (2.0, 1.0, True),
    "medium+tools": (4.5, 1.6, True),
    "large+tools": (10.0, 3.0, True),
    "small+retry": (2.5, 1.1, False),
    "large+retry": (12.0, 3.5, False),
    "small+cache": (0.6, 0.2, False),
    "ensemble+tools": (20.0, 4.0, True),
}
CHUNK_BYTES = 64 << 10


class Workload:
    """Deterministic contexts, actions and rewards for one seed."""

    def __init__(self, seed: int) -> None:
        self.world = World(seed)
        self.rng = self.world.rng
        self.actions: list[dict[str, Any]] = self.world.actions  # 5 actions with features
        self.action_ids: list[str] = [a["id"] for a in self.actions]

    def context(self) -> dict[str, Any]:
        r = self.rng
        ctx = self.world.context()  # task, difficulty, tier, prompt_tokens
        ctx.update(
            lang=r.choice(LANGS),
            region=r.choice(REGIONS),
            hour=r.randrange(24),
            turn=r.randrange(1, 30),
            history_tokens=int(r.lognormvariate(7, 1.0)),
            has_attachment=r.random() < 0.2,
        )
        return ctx

    def logged_decision(self, event_id: str, *, with_features: bool) -> tuple[Decision, dict[str, Any]]:
        """A decision logged by a uniform-random (no model yet) policy, as an agent would send it."""
        ctx = self.context()
        chosen = self.rng.choice(self.action_ids)
        n = len(self.action_ids)
        decision = Decision(
            id=event_id,
            agent=AGENT,
            context=ctx,
            actions=self.actions if with_features else self.action_ids,
            chosen=chosen,
            prob=1.0 / n,
            probs=[1.0 / n] * n,
            model_version=None,
            strategy="default",
            ts=time.time(),
        )
        return decision, ctx


class DecideWorkload:
    """One decision as the decide benchmark times it: a 20-key context, 10 actions × 3 features."""

    def __init__(self, seed: int) -> None:
        self.base = Workload(seed)
        self.rng = self.base.rng
        self.actions: list[dict[str, Any]] = [
            {"id": name, "features": {"cost": cost, "latency": lat, "tools": tools}}
            for name, (cost, lat, tools) in ACTIONS_10.items()
        ]

    def context(self) -> dict[str, Any]:
        """Numbers, short strings and booleans, as an agent's own state usually is."""
        r = self.rng
        ctx = self.base.context()  # 10 keys
        ctx.update(
            client=r.choice(CLIENTS),
            weekday=r.choice(WEEKDAYS),
            user_id=f"u{r.randrange(5000)}",
            budget_usd=round(r.uniform(0.0, 5.0), 2),
            queue_depth=r.randrange(50),
            error_rate=round(r.random() * 0.2, 4),
            retries=r.randrange(4),
            latency_slo_ms=r.choice((500, 1000, 2000, 5000)),
            streaming=r.random() < 0.5,
            tools_allowed=r.random() < 0.7,
        )
        return ctx


def decision_frames(prefix: str, n: int, seed: int, framing: str = MSGPACK) -> list[bytes]:
    """``n`` framed ~400-byte decisions (context of 10 keys, 5 action ids) with unique ids."""
    w = Workload(seed)
    return [encode_frame(w.logged_decision(f"{prefix}-{i}", with_features=False)[0], framing) for i in range(n)]


def experience_frames(prefix: str, n: int, seed: int) -> list[bytes]:
    """``n`` decisions (actions with features) each followed by its outcome: joined experience."""
    w = Workload(seed)
    frames = []
    for i in range(n):
        decision, ctx = w.logged_decision(f"{prefix}-{i}", with_features=True)
        reward = w.world.reward(ctx, decision.chosen)
        outcome = Outcome(decision_id=decision.id, reward=reward, id=f"{prefix}-o{i}", agent=AGENT, ts=time.time())
        frames.append(encode_frame(decision, MSGPACK))
        frames.append(encode_frame(outcome, MSGPACK))
    return frames


def chunks(frames: list[bytes], size: int = CHUNK_BYTES) -> list[bytes]:
    """Whole frames joined into writes of about ``size`` bytes, as a batching sender writes them."""
    out: list[bytes] = []
    part: list[bytes] = []
    filled = 0
    for frame in frames:
        part.append(frame)
        filled += len(frame)
        if filled >= size:
            out.append(b"".join(part))
            part, filled = [], 0
    if part:
        out.append(b"".join(part))
    return out

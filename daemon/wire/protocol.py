"""Wire messages: what agents and operators send, and what reflexd answers.

Every message is a frozen msgspec Struct tagged by its ``type`` field; ``reflexd.wire.framing``
turns them into bytes and back.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Union

import msgspec

from reflexd.features import action_ids

Prob = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ReqId = Union[int, str, None]
Context = dict[str, Any]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", kw_only=True):
    pass


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")


def _check_ts(ts: float | None) -> None:
    if ts is not None and not math.isfinite(ts):
        raise ValueError("ts must be a finite number of seconds")


class Action(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One available action; ``features`` describe it to the model (cost, latency, ...)."""

    id: Id
    features: Context = {}


ActionSpec = Union[str, Action]


# ---- experience events -------------------------------------------------------------------


class Decision(_Msg, tag="decision"):
    id: Id
    agent: Id
    context: Context
    actions: Annotated[list[ActionSpec], msgspec.Meta(min_length=1)]
    chosen: Id
    prob: Prob
    probs: list[float] | None = None
    model_version: str | None = None
    strategy: str | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        # msgspec turns these into validation errors, so such a frame is dead-lettered with the reason
        # also runs for every decision a client makes in-process, so it is kept cheap
        actions = self.actions
        # plain ids are found by the list's own (C) search; in-process actions may be plain dicts
        if self.chosen not in actions and self.chosen not in action_ids(actions):
            raise ValueError(f"chosen action {self.chosen!r} is not among the actions")
        probs = self.probs
        if probs is not None:
            if len(probs) != len(actions):
                raise ValueError(f"probs has {len(probs)} entries for {len(actions)} actions")
            # a plain sum's rounding is far inside the tolerance
            if not (min(probs) >= 0.0 and max(probs) <= 1.0 and abs(sum(probs) - 1.0) <= 1e-3):
                raise ValueError("probs must be probabilities summing to 1")
        _check_ts(self.ts)


class Outcome(_Msg, tag="outcome"):
    decision_id: Id
    reward: float
    id: Id | None = None
    agent: Id | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        _check_finite("reward", self.reward)
        _check_ts(self.ts)


class Step(_Msg, tag="step"):
    agent: Id
    episode: Id
    index: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # stored as a 32-bit INTEGER
    observation: Context
    action: str
    reward: float = 0.0
    done: bool = False
    id: Id | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        _check_finite("reward", self.reward)
        _check_ts(self.ts)


class Event(_Msg, tag="event"):
    agent: Id
    kind: Id
    data: Any = None
    id: Id | None = None
    ts: float | None = None


# ---- requests ----------------------------------------------------------------------------


class Flush(_Msg, tag="flush"):
    """Answered with Ack once everything the connection sent before it is durable.

    Durable means fsynced to the daemon's spool; with ``loaded``, the Ack waits until the events
    are in the store too, so queries and the next training run see them. ``dropped`` reports
    events the client had to drop (its buffer was full) since its last acknowledged flush, so the
    loss shows in the daemon's status.
    """

    req: ReqId = None
    dropped: Annotated[int, msgspec.Meta(ge=0)] = 0
    loaded: bool = False


class Decide(_Msg, tag="decide"):
    agent: Id
    context: Context
    actions: Annotated[list[ActionSpec], msgspec.Meta(min_length=1)]
    id: Id | None = None
    req: ReqId = None


class StatusRequest(_Msg, tag="status"):
    req: ReqId = None


class ModelsRequest(_Msg, tag="models"):
    req: ReqId = None


class Promote(_Msg, tag="promote"):
    version: Id
    req: ReqId = None


class Rollback(_Msg, tag="rollback"):
    req: ReqId = None


class Train(_Msg, tag="train"):
    """Start a training run now, ignoring the idle and new-data thresholds."""

    req: ReqId = None


class Forget(_Msg, tag="forget"):
    """Delete everything stored about ``agent`` (database, archive, training snapshots); answered with Done."""

    agent: Id
    req: ReqId = None


ExperienceEvent = Union[Decision, Outcome, Step, Event]
Request = Union[Flush, Decide, StatusRequest, ModelsRequest, Promote, Rollback, Train, Forget]
Inbound = Union[
    Decision, Outcome, Step, Event, Flush, Decide, StatusRequest, ModelsRequest, Promote, Rollback, Train, Forget
]
EXPERIENCE_TYPES = (Decision, Outcome, Step, Event)


# ---- replies -----------------------------------------------------------------------------


class Ack(_Msg, tag="ack"):
    """Everything this connection sent before the flush is durable; ``count`` events so far."""

    count: int
    req: ReqId = None


class Error(_Msg, tag="error"):
    code: str
    message: str
    seq: int | None = None  # index of the offending frame on this connection, from 0
    req: ReqId = None


class Decided(_Msg, tag="decided"):
    id: str
    action: str
    prob: float
    model_version: str | None
    strategy: str
    req: ReqId = None


class StatusReply(_Msg, tag="status"):
    version: str
    pid: int
    uptime: float
    state_dir: str
    socket: str
    ingest: dict[str, int]
    backlog: int
    experience: dict[str, int]
    model: dict[str, Any] | None
    trainer: dict[str, Any]
    storage: dict[str, Any]
    monitor: dict[str, Any] = {}  # automatic rollback: the live model's last comparison
    req: ReqId = None


class ModelsReply(_Msg, tag="models"):
    current: str | None  # what the registry's CURRENT names
    models: list[dict[str, Any]]
    serving: str | None = None  # what the daemon serves (another when CURRENT cannot be loaded)
    req: ReqId = None


class Done(_Msg, tag="ok"):
    message: str
    req: ReqId = None


Reply = Union[Ack, Error, Decided, StatusReply, ModelsReply, Done]

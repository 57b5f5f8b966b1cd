"""Wire messages: what agents and operators send, and what reflexd answers.

Every message is a frozen msgspec Struct tagged by its ``type`` field; ``reflexd.wire.framing``
turns them into bytes and back.
"""

from __future__ import annotations

import math
import os
from typing import Annotated, Any, Union

import msgspec

from reflexd.features import action_ids, first_repeat

Prob = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ReqId = Union[int, str, None]
Context = dict[str, Any]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", kw_only=True):
    pass


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")


def _distinct_ids(actions: list[Any]) -> list[str]:
    """The actions' ids, refused if one is offered twice: the choice logged could not be told apart."""
    ids = action_ids(actions)
    if len(set(ids)) < len(ids):
        raise ValueError(f"the actions must have distinct ids; {first_repeat(ids)!r} is given twice")
    return ids


# A reward's magnitude is bounded: a decision's outcomes are added up (rewards.aggregation: sum),
# and two rewards of 1e308 would sum to infinity, and the decision drop out of every estimate.
MAX_REWARD = 1e15
# Timestamps are seconds since the epoch, from 1970 to about 5138: ts of milliseconds (1.7e12)
# would sort every decision thousands of years ahead, and a negative one before any agent ran.
MAX_TS = 1e11


def _check_reward(reward: float) -> None:
    _check_finite("reward", reward)
    if abs(reward) > MAX_REWARD:
        raise ValueError(f"reward must be within ±{MAX_REWARD:g}, not {reward:g}: a decision's outcomes are added up")


def _check_ts(ts: float | None, name: str = "ts") -> None:
    if ts is None:
        return
    if not math.isfinite(ts):
        raise ValueError(f"{name} must be a finite number of seconds")
    if not 0.0 <= ts < MAX_TS:
        hint = ": it looks like milliseconds" if MAX_TS <= ts < MAX_TS * 1000 else ""
        raise ValueError(f"{name} must be seconds since the epoch (0 to {MAX_TS:g}), not {ts:g}{hint}")


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
    # a slate (rank k of n actions) is logged as one decision per slot: its 0-based position and
    # the id its slots share; ``prob`` is then the chosen action's probability at this slot
    slot: int | None = None
    slate: Id | None = None
    # the episode the decision belongs to: with ``rewards.episode_return`` it is credited with the
    # discounted return from it to the episode's end (an EpisodeEnd, or the episode timing out)
    episode: Id | None = None

    def __post_init__(self) -> None:
        # msgspec turns these into validation errors, so such a frame is dead-lettered with the reason
        # also runs for every decision a client makes in-process, so it is kept cheap
        actions = self.actions
        ids = _distinct_ids(actions)  # as decide refuses them: a logged probability would name no one action
        if self.chosen not in ids:
            raise ValueError(f"chosen action {self.chosen!r} is not among the actions")
        probs = self.probs
        if probs is not None:
            if len(probs) != len(actions):
                raise ValueError(f"probs has {len(probs)} entries for {len(actions)} actions")
            # a plain sum's rounding is far inside the tolerance
            if not (min(probs) >= 0.0 and max(probs) <= 1.0 and abs(sum(probs) - 1.0) <= 1e-3):
                raise ValueError("probs must be probabilities summing to 1")
            # estimators weigh by prob and evaluate other policies with probs: they must agree (to 1%,
            # or 0.0005 for loggers that print three decimals)
            logged = probs[ids.index(self.chosen)]
            if abs(logged - self.prob) > max(0.01 * self.prob, 5e-4):
                raise ValueError(f"prob {self.prob!r} is not the chosen action's probability in probs ({logged!r})")
        _check_ts(self.ts)
        if self.slot is not None or self.slate is not None:
            _check_slot(self.slot, self.slate)


def _check_slot(slot: int | None, slate: str | None) -> None:
    if slot is None or slate is None:
        raise ValueError("slot and slate go together: a slot decision names its slate, a slate decision its slot")
    if not 0 <= slot <= 2**31 - 1:  # stored as a 32-bit INTEGER
        raise ValueError(f"slot must be a position counted from 0, not {slot}")


class Outcome(_Msg, tag="outcome"):
    decision_id: Id
    reward: float
    id: Id | None = None
    agent: Id | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        _check_reward(self.reward)
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
        _check_reward(self.reward)
        _check_ts(self.ts)


class Event(_Msg, tag="event"):
    agent: Id
    kind: Id
    data: Any = None
    id: Id | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        _check_ts(self.ts)


EPISODE_END = "episode_end"  # the kind of the Event an EpisodeEnd is stored as


class EpisodeEnd(_Msg, tag="episode_end"):
    """``agent``'s episode ``episode`` is over; ``reward``, when given, is its final reward, credited
    (with ``rewards.episode_return``) to the episode's last decision and, discounted, to those before.

    Stored as an Event of kind ``episode_end`` whose data is ``{"episode": ..., "reward": ...}``
    (``as_event``), so an end is kept, archived, exported and forgotten as events are.
    """

    agent: Id
    episode: Id
    reward: float | None = None
    id: Id | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        if self.reward is not None:
            _check_reward(self.reward)
        _check_ts(self.ts)

    def as_event(self) -> Event:
        return Event(
            agent=self.agent, kind=EPISODE_END, data={"episode": self.episode, "reward": self.reward}, id=self.id, ts=self.ts
        )


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
    """Answered with Decided, and the decision logged; with ``log`` false, answered with Scored
    and nothing logged, learned from or counted by exploration's clock."""

    agent: Id
    context: Context
    actions: Annotated[list[ActionSpec], msgspec.Meta(min_length=1)]
    id: Id | None = None
    req: ReqId = None
    log: bool = True
    # rank this many of the actions (a slate): answered with DecidedSlate, one decision logged per slot
    slots: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # the agent's own choice (apprentice mode): served, with exploration, until a model is live
    default: Id | None = None
    # the episode the decision is part of, logged with it (Decision.episode)
    episode: Id | None = None

    def __post_init__(self) -> None:
        ids = _distinct_ids(self.actions)
        if self.default is not None:
            if self.default not in ids:
                raise ValueError(f"default {self.default!r} is not among the actions")
            if self.slots is not None and self.log:
                raise ValueError("default is for single decisions: a slate (slots) has none")
        if self.slots is not None and self.slots > len(self.actions):
            raise ValueError(f"slots ({self.slots}) must not exceed the {len(self.actions)} actions offered")


class StatusRequest(_Msg, tag="status"):
    # whose model line ``model``, ``trainer``, ``monitor`` and ``online`` describe (learning.scope);
    # without it, the only line, or every line added up
    agent: Id | None = None
    req: ReqId = None


class ModelsRequest(_Msg, tag="models"):
    agent: Id | None = None  # whose model line; needed once there is more than one
    req: ReqId = None


class Promote(_Msg, tag="promote"):
    version: Id
    agent: Id | None = None  # whose model line; needed once there is more than one
    req: ReqId = None


class Rollback(_Msg, tag="rollback"):
    agent: Id | None = None  # whose model line; needed once there is more than one
    req: ReqId = None


class Train(_Msg, tag="train"):
    """Start a training run now, ignoring the idle and new-data thresholds: of ``agent``'s model
    line, or of every line in turn."""

    agent: Id | None = None
    req: ReqId = None


class Forget(_Msg, tag="forget"):
    """Delete everything stored about ``agent`` (database, archive, training snapshots); answered with Done."""

    agent: Id
    req: ReqId = None


class Adopt(_Msg, tag="adopt"):
    """Bring in a model trained elsewhere (``reflexd models pull``, a fleet model): its manifest as
    written (JSON) and its model file's bytes, which must match the manifest's sha256. The daemon
    judges it on its own latest snapshot's holdout against its live model, by the rule its own runs
    go live by, and registers it, promoted or rejected; answered with Done. The sender reads the
    files: the daemon never opens a path a peer names (``source`` is recorded, not read)."""

    manifest: bytes
    model: bytes
    source: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    agent: Id | None = None  # whose model line judges and keeps it; needed once there is more than one
    req: ReqId = None


class Explain(_Msg, tag="explain", omit_defaults=True):
    """Why the live model ranks ``actions`` as it does for ``context``; answered with Explanation.

    Nothing is logged. ``top`` keeps the context keys that moved the choice most (all without it).
    """

    agent: Id
    context: Context
    actions: Annotated[list[ActionSpec], msgspec.Meta(min_length=1)]
    top: Annotated[int, msgspec.Meta(ge=1)] | None = None
    req: ReqId = None
    # the agent's own choice (apprentice mode), as a decide would carry it: explained as served; left
    # out when there is none (omit_defaults), so that a daemon older than the field takes the rest
    default: Id | None = None

    def __post_init__(self) -> None:
        ids = _distinct_ids(self.actions)
        if self.default is not None and self.default not in ids:
            raise ValueError(f"default {self.default!r} is not among the actions")


class Evaluate(_Msg, tag="evaluate"):
    """Evaluate policies off-policy on the logged decisions of a window; answered with Evaluation.

    Each policy is ``vNNNN`` or ``live`` (a model with its manifest's exploration), ``action:ID``
    (always that action), ``file:PATH`` (per-decision probabilities: the sender reads the NDJSON
    lines ``{"id": decision id, "probs": {action id: p}}`` and sends them in ``tables`` under the
    policy's name; the daemon never opens a path a peer names) or
    ``VERSION@key=value,...`` (a model with exploration settings of one's own). The window is the
    matured decisions of ``agent`` (every agent without it) logged at ``since`` or later and before
    ``until`` (epoch seconds, the decision's own ``ts``). DR and DM score each row with
    ``reward_model`` (default: the live model). ``discover`` also searches exploration settings for
    the first model policy (the live model without one) and recommends one.
    """

    policies: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]], msgspec.Meta(max_length=64)] = []
    agent: Id | None = None
    since: float | None = None
    until: float | None = None
    reward_model: Id | None = None
    discover: bool = False
    # each file: policy's probabilities, by its name: {decision id: {action id: p}}
    tables: dict[str, dict[str, dict[str, float]]] = {}
    req: ReqId = None

    def __post_init__(self) -> None:
        _check_ts(self.since, "since")
        _check_ts(self.until, "until")
        if not self.policies and not self.discover:
            raise ValueError("name at least one policy to evaluate, or ask to discover (--discover)")


_probs_line = msgspec.json.Decoder(dict[str, Any])


def probability_tables(policies: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Read the file of each ``file:PATH`` policy, as the sender of an Evaluate does.

    Each NDJSON line is ``{"id": decision id, "probs": {action id: p}}``; ValueError names the
    file and line of anything else.
    """
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for policy in policies:
        if not policy.startswith("file:") or not policy[5:]:
            continue
        path = os.path.expanduser(policy[5:])
        table: dict[str, dict[str, float]] = {}
        try:
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    where = f"{path}:{number}"
                    try:
                        line = _probs_line.decode(raw)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        raise ValueError(f'{where}: not a JSON object {{"id", "probs"}} ({exc})') from None
                    decision, probs = line.get("id"), line.get("probs")
                    if not isinstance(decision, str) or not isinstance(probs, dict):
                        raise ValueError(f'{where}: needs "id" (a decision id) and "probs" (action id: probability)')
                    if decision in table:
                        raise ValueError(f"{where}: decision {decision!r} has a line already")
                    table[decision] = probs
        except OSError as exc:
            raise ValueError(f"{policy}: cannot read {path}: {exc.strerror or exc}") from None
        tables[policy] = table
    return tables


class Snapshot(_Msg, tag="snapshot"):
    """Write every table of the store to Parquet as of one moment, in a folder of the daemon's own
    under its state directory (the peer names no path); answered with SnapshotTaken.

    With ``archive``, the Parquet archive's files as of the same moment are linked beside them, so
    a row is in exactly one of the two. The daemon deletes the folder on Release, or once it has
    kept it for its time (``SnapshotTaken.expires``, which a Release with ``renew`` puts off); it
    keeps a few at a time and refuses more. ``reflexd query`` and ``reflexd export`` read the
    daemon's data this way while it runs.
    """

    archive: bool = True
    req: ReqId = None


class Release(_Msg, tag="release"):
    """The sender is done with snapshot ``id``: the daemon deletes it now; answered with Done.

    With ``renew`` the sender is still reading it instead: the daemon keeps it its full time again
    from now (up to a limit from when it was taken); answered with Done, which says until when.
    """

    id: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
    renew: bool = False
    req: ReqId = None


class InsightsRequest(_Msg, tag="insights"):
    """Answered with Insights: what the newest knowledge extraction found (``reflexd.analysis``).

    ``agent`` keeps the findings about that agent (and those about no one agent); ``since`` keeps
    anomalies from then on and trends whose window ends after it; ``now`` runs an extraction first
    and waits for it, as ``train`` does.
    """

    agent: Id | None = None
    since: float | None = None
    now: bool = False
    req: ReqId = None

    def __post_init__(self) -> None:
        if self.since is not None and not math.isfinite(self.since):
            raise ValueError("since must be a finite number of seconds")


class Learned(_Msg, tag="learned", omit_defaults=True):
    """One update of an online head (``reflexd.deciding.online``), shared so that every process
    deciding for the agent learns it: a Policy sends each of its own, the daemon passes them on
    (``Learnings``). Hashed inputs only, never the context; not stored."""

    agent: Id
    decision: Id  # the decision it learned from: a process skips its own
    action: Id
    base: str | None  # the live model the head learned beside (None: none); others ignore it
    beside: bool  # the arm's model-score weight: whether a model was live when it decided
    index: list[Annotated[int, msgspec.Meta(ge=0)]]  # the inputs that are not 0
    value: list[float]
    target: float  # the reward
    # the arm's prior mean at the sender (``OnlineHead.prior_mean``), for a process that makes the
    # arm on this update to make it alike; None (then not sent, so that a reflexd older than the
    # field takes the update): beside a model, or the sender no longer holds the arm
    prior_mean: float | None = None

    def __post_init__(self) -> None:
        if len(self.index) != len(self.value):
            raise ValueError(f"index has {len(self.index)} inputs and value {len(self.value)}: one value per input")
        if not all(math.isfinite(v) for v in self.value):
            raise ValueError("value must be finite numbers")
        _check_finite("target", self.target)
        if self.prior_mean is not None:
            _check_finite("prior_mean", self.prior_mean)


class LearningsRequest(_Msg, tag="learnings"):
    """The online-head updates the daemon passed on for ``agent``'s model line after ``after``."""

    agent: Id
    after: Annotated[int, msgspec.Meta(ge=0)] = 0
    req: ReqId = None


class Learnings(_Msg, tag="learnings"):
    """Updates ``after`` < n ≤ ``next``, oldest first; ``missed`` counts those no longer kept."""

    updates: list[Learned]
    next: int
    missed: int = 0
    req: ReqId = None


ExperienceEvent = Union[Decision, Outcome, Step, Event, EpisodeEnd]
Request = Union[
    Flush, Decide, StatusRequest, ModelsRequest, Promote, Rollback, Train, Forget, Explain, Evaluate, Adopt, Snapshot,
    Release, InsightsRequest, LearningsRequest,
]
Inbound = Union[
    Decision, Outcome, Step, Event, EpisodeEnd, Flush, Decide, StatusRequest, ModelsRequest, Promote, Rollback, Train, Forget,
    Explain, Evaluate, Adopt, Snapshot, Release, InsightsRequest, Learned, LearningsRequest,
]
EXPERIENCE_TYPES = (Decision, Outcome, Step, Event, EpisodeEnd)


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


class SlotDecided(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One slot of a slate, as logged: ``prob`` is its action's probability given the slots before it."""

    id: str
    slot: int
    action: str
    prob: float
    model_version: str | None
    strategy: str


class DecidedSlate(_Msg, tag="decided_slate"):
    slate: str
    slots: list[SlotDecided]
    req: ReqId = None


class Scored(_Msg, tag="scored"):
    """A decide with ``log`` false: every action's score, spread and probability; nothing logged.

    ``id`` echoes the request's (nothing is logged under it); ``scores`` and ``spread`` are None
    without a model, and ``probs`` then the default policy's.
    """

    id: str | None
    actions: list[str]
    scores: list[float] | None
    spread: list[float] | None
    probs: list[float]
    model_version: str | None
    strategy: str
    req: ReqId = None


class ActionExplained(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One action in an explanation: its score and spread (None without a model) and probability."""

    id: str
    score: float | None
    spread: float | None
    prob: float


class KeyEffect(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one context key (a dotted leaf path) did, found by scoring the context without it.

    ``score``: the chosen action's score with the key minus without it. ``margin``: the chosen
    action's lead over the runner-up with the key minus without it (None with one action).
    ``best_without``: the action the model scores highest without the key.
    """

    key: str
    score: float
    margin: float | None
    best_without: str


class Explanation(_Msg, tag="explanation"):
    """The answer to Explain (and ``Policy.explain``): scores, probabilities and the keys that
    moved the choice most, largest ``|margin|`` first. ``chosen`` is the action the model scores
    highest (the default policy's likeliest without a model, and then ``keys`` is empty)."""

    agent: str
    actions: list[ActionExplained]
    chosen: str
    runner_up: str | None
    keys: list[KeyEffect]
    model_version: str | None
    strategy: str
    req: ReqId = None


class Interval(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A policy value (or a difference of two) with its standard error and normal interval.

    ``bounded_lower``/``bounded_upper`` are the interval bounded to the rewards observed in the
    window, [reward_min, reward_max] (a difference: to [min − max, max − min]); ``clipped`` says
    whether the raw ``lower``/``upper`` fell outside it and were bounded.
    """

    value: float
    stderr: float
    lower: float
    upper: float
    bounded_lower: float
    bounded_upper: float
    clipped: bool


class PolicyValue(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One row of an evaluation: a policy's value by each estimator on the window.

    ``kind``: ``logging`` (the policy that logged the window: its value is the mean observed reward,
    reported under every estimator), ``model``, ``action``, ``file`` or ``exploration``.
    ``dm``/``dr`` are None without a reward model. ``value`` is the headline estimate (the
    evaluation's ``estimator``) and ``versus_logging`` its paired difference from the logging
    policy's observed reward, row by row. ``ess`` is the effective sample size (Σw)²/Σw² of the
    importance weights w = π(chosen)/prob (judged by episode, the evaluation's ``unit``: of each
    episode's weight, the product of its decisions', and ``versus_logging`` is paired episode by
    episode against the observed discounted returns); ``agreement`` the share of decisions where the policy's
    most likely action is the logged one (None for the logging policy). ``exploration`` is the
    setting a model policy was evaluated with (the manifest's for a plain version).
    """

    policy: str
    kind: str
    value: Interval
    ips: Interval
    snips: Interval | None = None  # None: 0/0, the policy never takes a logged action
    dm: Interval | None = None
    dr: Interval | None = None
    versus_logging: Interval | None = None
    ess: float
    agreement: float | None = None
    version: str | None = None
    exploration: dict[str, Any] | None = None


class Recommendation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What ``discover`` found: every exploration setting tried on ``model``, best lower bound first,
    and the one recommended (``policy``, None when none is better than the logging policy: the rule
    is in ``reason`` and docs/learning.md)."""

    model: str
    estimator: str
    policy: str | None
    value: Interval | None
    reason: str
    candidates: list[PolicyValue]


class Evaluation(_Msg, tag="evaluation"):
    """The answer to Evaluate: one row per policy, the logging policy first (the baseline)."""

    decisions: int  # rows evaluated: matured decisions of the window
    dropped: int  # decisions of the window left out (chosen action not offered, no usable prob or reward)
    agent: str | None
    since: float | None
    until: float | None
    estimator: str  # the headline: dr with a reward model, else snips
    reward_model: str | None  # the model whose scores DR and DM use; None: no model, no DR or DM
    confidence: float
    reward_min: float
    reward_max: float
    rows: list[PolicyValue]
    discovery: Recommendation | None = None
    seconds: float = 0.0  # how long the evaluation took, the window's snapshot included
    # what an interval's terms are: "decision", or "episode" when some decision's reward is an
    # episode return (rewards.episode_return), every estimator then in its episode form
    unit: str = "decision"
    episodes: int | None = None  # judged by episode: how many (a decision without one is one of its own)
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
    # the online head of the daemon's own (socket) decisions: arms, pending, updates, base; None when off
    online: dict[str, Any] | None = None
    # knowledge extraction: its state, last run, rules published, the newest anomaly
    insights: dict[str, Any] | None = None
    # OTLP trace ingest (traces.enabled): requests, spans, steps, episodes, rejected spans; None when off
    traces: dict[str, Any] | None = None
    # the behaviour model: state, runs, last run (version, calibration), the live version
    behaviour: dict[str, Any] | None = None
    # each model line (learning.scope) at a glance: its agents, what it serves, its trainer
    lines: dict[str, Any] = {}
    # the config in force: its file, when it was loaded, reloads, the last failed reload's error
    # (the running config kept), settings changed in the file that wait for a restart
    config: dict[str, Any] | None = None
    req: ReqId = None


class ModelsReply(_Msg, tag="models"):
    current: str | None  # what the registry's CURRENT names
    models: list[dict[str, Any]]
    serving: str | None = None  # what the daemon serves (another when CURRENT cannot be loaded)
    line: str | None = None  # the model line these are (reflexd.lines): shared, agent:<id>, group:<name>
    req: ReqId = None


class Done(_Msg, tag="ok"):
    message: str
    req: ReqId = None


class RewardRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How an agent's outcomes become one reward (the ``rewards`` config section)."""

    wait_window: float
    default: float
    aggregation: str
    episode_return: bool = False
    discount: float = 1.0
    episode_timeout: float = 3600.0


class SnapshotTaken(_Msg, tag="snapshot"):
    """The answer to Snapshot: where its files are, the daemon's, readable by its primary group.

    ``tables``: each table's Parquet file, columns as the Parquet archive names and types them (JSON
    as text). ``archive``: the folder of each experience table that has archive files, which are
    below it in ``agent=``/``date=`` folders (hive-style, ``<folder>/agent=*/date=*/*.parquet``):
    hard links inside ``directory`` when ``linked``, else the archive's own folders, where rows
    archived since ``taken_at`` (also in ``tables``) and pruned files come and go.
    ``rewards``: the reward rules in force, by agent ("" for the global ones), so a reader can join
    rewards as training does; ``taken_at`` is the moment the snapshot shows.
    """

    id: str
    directory: str
    taken_at: float
    expires: float
    tables: dict[str, str]
    rows: dict[str, int]
    archive: dict[str, str]
    linked: bool
    rewards: dict[str, RewardRule]
    req: ReqId = None


class Insights(_Msg, tag="insights"):
    """The answer to InsightsRequest. ``run`` says which extraction and on what window (``id``,
    ``at``, ``window_start``, ``window_end``, ``experiences``), None before the first; each list
    holds findings as ``reflexd.analysis.findings`` defines them (a rule: ``agent``, ``action``,
    ``baseline``, ``when``, ``lift``, ``ci``, ``support``, ``status``, ``first_seen``,
    ``last_confirmed``, ...). ``summary``: counts and the newest anomaly, as ``status`` shows them."""

    run: dict[str, Any] | None
    rules: list[dict[str, Any]] = []
    patterns: list[dict[str, Any]] = []
    anomalies: list[dict[str, Any]] = []
    trends: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    req: ReqId = None


Reply = Union[
    Ack, Error, Decided, DecidedSlate, StatusReply, ModelsReply, Done, Scored, Explanation, Evaluation, SnapshotTaken,
    Insights, Learnings,
]

"""``reflexd.Policy``: the in-process client an agent imports to decide and to report rewards.

Deciding never waits on the daemon: the model is scored in-process with onnxruntime, and the
decision event is encoded at once and appended to a bounded buffer that a background thread
ships over the socket in batches. That thread also reloads the model when the registry's pointer
moves, keeps every event until the daemon acknowledges it durable, and resends after
reconnecting. Imports neither torch nor duckdb.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import OrderedDict
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable

import msgspec

from reflexd import log
from reflexd.config import (
    CLIENT_SETTINGS_FILE,
    ClientSettings,
    ExplorationConfig,
    LearningConfig,
    OnlineConfig,
    read_client_settings,
)
from reflexd.deciding.choosing import Choice, Chooser
from reflexd.deciding.online import OnlineHead, learned
from reflexd.deciding.scoring import ModelSource
from reflexd.errors import DaemonUnavailable, FrameError
from reflexd.features import FeatureSpec
from reflexd.lines import line_of, line_path
from reflexd.manifest import Manifest
from reflexd.registry import Registry
from reflexd.wire.connection import Connection, default_socket
from reflexd.wire.framing import MSGPACK, encode_frame
from reflexd.wire.protocol import (
    Ack,
    EpisodeEnd,
    Error,
    Evaluate,
    Evaluation,
    Event,
    Explanation,
    Flush,
    Insights,
    InsightsRequest,
    Learnings,
    LearningsRequest,
    Outcome,
    Scored,
    Step,
    probability_tables,
)

__all__ = ["Choice", "Episode", "Policy"]

_log = log.get("reflexd.client")
# a models folder no daemon has published its settings in is one registry: a model line of its own
_BARE = ClientSettings(learning=LearningConfig(scope="shared"))
DEFAULT_MODELS = "/var/lib/reflexd/models"
JOIN_FRAMES = 64  # frames joined per write: the join holds the GIL (a decision waits), so it is kept short
# Frames sent before the flush that closes them is awaited. Replies are read only after the
# flush is sent, so the daemon's replies to these frames (an error of ~200 bytes for each it
# refuses) must fit the socket's buffer, or both sides would wait on each other.
CYCLE_FRAMES = 500
MAX_BACKOFF = 0.5  # the daemon is local: a restart takes about a second


class _DecisionFrame(msgspec.Struct, frozen=True, gc=False, tag="decision", tag_field="type"):
    """``protocol.Decision`` as the client writes it, byte for byte, without its validation.

    The Chooser made the decision, so ``chosen`` is among the actions and ``probs`` is their
    distribution by construction; the daemon validates every frame it stores all the same.
    Never part of a cycle (built, encoded and dropped), so the cyclic GC need not track it.
    """

    id: str
    agent: str
    context: Any
    actions: Any
    chosen: str
    prob: float
    probs: list[float]
    model_version: str | None
    strategy: str
    ts: float
    slot: int | None = None  # set for a slot of a slate (decide_slate)
    slate: str | None = None
    episode: str | None = None  # set for a decision of an episode (Policy.episode)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def default_models() -> str:
    if os.environ.get("REFLEXD_MODELS"):
        return os.environ["REFLEXD_MODELS"]
    if os.environ.get("REFLEXD_STATE_DIR"):
        return os.path.join(os.environ["REFLEXD_STATE_DIR"], "models")
    return DEFAULT_MODELS


class Policy:
    """Decide with the live model, log every decision, report rewards.

    >>> policy = Policy("router", socket="/run/reflexd/reflexd.sock", state_dir="/var/lib/reflexd")
    >>> choice = policy.decide({"task": "code", "tokens": 812}, ["small", "large"])
    >>> policy.reward(choice.id, 1.0)

    ``exploration`` applies until a model is live (then the model's manifest says how to
    explore; without it, the agent's ``exploration`` in the daemon's config applies until then);
    its ``default_action`` is what the agent does before any model exists. ``online``
    sets the head that learns from every reward between retrains (``reflexd.deciding.online``),
    at once on the agent's thread, or with ``batch_learning`` on the background thread, each
    action's rewards since its last wake as one update (for agents deciding hundreds of times a
    second or more: ``reward`` then costs the agent an append, and the head lags by one wake of
    that thread, longer while it waits on the daemon).
    """

    def __init__(
        self,
        agent: str,
        *,
        socket: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        models: str | os.PathLike[str] | None = None,
        exploration: ExplorationConfig | None = None,
        online: OnlineConfig | None = None,
        buffer_size: int = 100_000,
        refresh_interval: float = 0.5,
        send_interval: float = 0.02,
        seed: int | None = None,
        batch_learning: bool = False,
    ) -> None:
        _check_id("agent", agent)
        _check_settings(exploration, online, buffer_size, refresh_interval, send_interval, seed)
        self.agent = str(agent)  # a StrEnum member as its value
        models_dir = Path(models) if models else Path(state_dir) / "models" if state_dir else Path(default_models())
        blocked = next((p for p in (models_dir, *models_dir.parents) if p.exists()), None)
        if blocked is not None and not blocked.is_dir():
            raise NotADirectoryError(f"models folder {models_dir}: {blocked} is not a directory (state_dir or models is wrong)")
        self._exploration = exploration  # None: the daemon's config says (``_exploration_for``)
        # what the daemon's config says to its clients (models/clients.json): the agent's model line,
        # the online head's settings unless ``online`` is given, and each agent's wait window and default reward
        self._models_dir = models_dir
        self._settings_file = models_dir / CLIENT_SETTINGS_FILE
        self._settings_stamp = _stamp(self._settings_file)
        self._settings = read_client_settings(models_dir) or _BARE
        self.models = ModelSource(self._line_registry())
        self.models.refresh()
        self._online_given = online is not None
        self._batch_learning = batch_learning
        online = online or self._settings.online
        head = None
        if online.enabled:
            f = self._settings.features
            head = OnlineHead(online, FeatureSpec(f.context_dim, f.action_dim, f.seed), self._rewards_for)
        self._chooser = Chooser(self.models, self._exploration_for, seed, head)
        self._sender = _Sender(
            os.fspath(socket or default_socket()), int(buffer_size), send_interval, refresh_interval, self.models, self._refresh,
            head.apply if head is not None else None,
        )
        # the head's updates are shared through the daemon: this process's go out as they are made,
        # the others' come back every refresh_interval (its own, recognised by decision id, skipped)
        self._own: OrderedDict[str, None] = OrderedDict()
        self._cursor = 0  # the last update of the daemon's relay this head has seen
        self._sharing = head is not None
        if head is not None:
            head.on_update = self._share
        self._sender.start()

    def _rewards_for(self, agent: str) -> Any:
        return self._settings.rewards_for(agent)

    def _line_registry(self) -> Registry:
        """The registry of this agent's model line (``reflexd.lines``), as the daemon's settings say."""
        return Registry(line_path(self._models_dir, line_of(self.agent, self._settings.learning)), self._models_dir)

    def _refresh(self) -> None:
        """On the sender thread, every ``refresh_interval``: the daemon's settings if they changed,
        and the default reward for decisions whose wait window passed with no outcome."""
        stamp = _stamp(self._settings_file)
        if stamp != self._settings_stamp:
            self._settings_stamp = stamp
            self._settings = read_client_settings(self._settings_file.parent) or self._settings
            registry = self._line_registry()
            if registry.root != self.models.registry.root:  # the daemon published after this client started
                self.models.switch(registry)
            if self._chooser.online is not None and not self._online_given:
                self._chooser.online.settings = self._settings.online
        if self._chooser.online is not None:
            self._chooser.online.expire()
            if self._sharing:
                self._absorb(self._chooser.online)

    def _share(self, agent: str, action: str, decision_id: str, x: Any, reward: float, beside: bool) -> None:
        head = self._chooser.online
        assert head is not None
        own = self._own
        own[decision_id] = None
        while len(own) > head.settings.pending:
            own.popitem(last=False)
        self._sender.share(learned(head, agent, action, decision_id, x, reward, beside))

    def _absorb(self, head: OnlineHead) -> None:
        """Learn what the agent's other processes (and the daemon's socket decisions) learned since
        the last look; only once the head follows the model served here, whose scores those
        updates corrected (until then the cursor waits)."""
        scorer = self.models.scorer
        if head.base != (scorer.version if scorer is not None else None):
            return
        reply = self._sender.ask(LearningsRequest(agent=self.agent, after=self._cursor, req="learnings"))
        if isinstance(reply, Error):  # a daemon from before shared learning: stop asking and sharing
            _log.warning("the daemon does not share online updates; this process learns on its own", error=reply.message)
            head.on_update = None
            self._sharing = False
            return
        if not isinstance(reply, Learnings):
            return
        own = self._own
        head.absorb_many(u for u in reply.updates if u.agent == self.agent and u.decision not in own)
        self._cursor = reply.next

    def _exploration_for(self, agent: str, manifest: Manifest | None) -> ExplorationConfig:
        """The live model's exploration; before any model, the one this Policy was given, else the
        agent's in the daemon's config (as the daemon's socket ``decide`` explores for it)."""
        if manifest is not None:
            return manifest.exploration_for(agent)
        return self._exploration if self._exploration is not None else self._settings.exploration_for(agent)

    @property
    def model_version(self) -> str | None:
        scorer = self.models.scorer
        return scorer.version if scorer is not None else None

    def _open(self) -> None:
        if self._sender.closed:  # before anything is chosen, counted or learned for a decision no one would log
            raise RuntimeError(_CLOSED)

    def decide(
        self,
        context: dict[str, Any],
        actions: list[Any],
        *,
        decision_id: str | None = None,
        default: str | None = None,
        episode: str | None = None,
    ) -> Choice:
        """Choose among ``actions`` (ids, or dicts with ``id`` and ``features``) for ``context``.

        ``default``: the agent's own choice (apprentice mode). Until a model is live it is served,
        with the exploration's share given to the others, while the online head learns beside it;
        ``stats()["apprentice"]`` says how often the learned policy would have agreed.
        ``episode``: the episode the decision is part of (``Policy.episode`` sets it).
        """
        self._open()
        if decision_id is not None:
            _check_id("decision_id", decision_id)
        if episode is not None:
            _check_id("episode", episode)
        choice = self._chooser.choose(self.agent, context, actions, decision_id, default)
        self._sender.enqueue(
            _DecisionFrame(
                id=choice.id,
                agent=self.agent,
                context=context,
                actions=actions,
                chosen=choice.action,
                prob=choice.prob,
                probs=choice.probs,
                model_version=choice.model_version,
                strategy=choice.strategy,
                ts=time.time(),
                episode=episode,
            )
        )
        return choice

    def episode(self, episode_id: str | None = None, **decide_kw: Any) -> Episode:
        """A handle on one episode: its decisions carry its id, and its end can carry a final reward.

        >>> with policy.episode() as ep:
        ...     choice = ep.decide(context, actions)
        ...     ep.reward(choice, 0.1)
        ...     ep.end(reward=1.0)  # leaving the block without end() ends it with no final reward

        With ``rewards.episode_return`` on in the daemon, each decision is credited with the
        discounted return from it to the episode's end. ``episode_id`` defaults to a random one;
        ``decide_kw`` (``default=...``) is passed to each ``ep.decide``.
        """
        return Episode(self, episode_id or uuid.uuid4().hex, decide_kw)

    def end_episode(self, episode: str, reward: float | None = None) -> None:
        """Log the end of ``episode`` with an optional final reward (``Episode.end`` calls this)."""
        _check_id("episode", episode)
        end = EpisodeEnd(
            id=uuid.uuid4().hex, agent=self.agent, episode=episode,
            reward=None if reward is None else float(reward), ts=time.time(),
        )
        self._sender.enqueue(end)

    def decide_slate(
        self, context: dict[str, Any], actions: list[Any], slots: int, *, slate_id: str | None = None
    ) -> list[Choice]:
        """Rank ``slots`` of ``actions`` for ``context``: one Choice per slot (position 0 first).

        Each slot is drawn without replacement from the actions left, with the model's exploration
        applied to them, and logged as a decision of its own: the actions left, the chosen one, its
        exact probability at that slot given the slots before it, and the ``slot`` and ``slate`` id
        that group them. Report each slot's reward with ``reward(choice.id, r)``.
        """
        self._open()
        if type(slots) is bool or not isinstance(slots, Integral):  # a bool is an int to Python, not a count of slots
            raise TypeError(f"slots must be an int, not {type(slots).__name__}")
        slots = int(slots)
        if slate_id is not None:
            _check_id("slate_id", slate_id)
        choices = self._chooser.choose_slate(self.agent, context, actions, slots, slate_id)
        ts = time.time()
        left = list(range(len(actions)))
        for choice in choices:
            self._sender.enqueue(
                _DecisionFrame(
                    id=choice.id,
                    agent=self.agent,
                    context=context,
                    actions=[actions[i] for i in left],
                    chosen=choice.action,
                    prob=choice.prob,
                    probs=choice.probs,
                    model_version=choice.model_version,
                    strategy=choice.strategy,
                    ts=ts,
                    slot=choice.slot,
                    slate=choice.slate,
                )
            )
            left.remove(choice.index)
        return choices

    def score(self, context: dict[str, Any], actions: list[Any], *, default: str | None = None) -> Scored:
        """Every action's score and spread and the probabilities ``decide`` would sample from now
        (with the same ``default``); nothing is logged, learned from or counted by exploration's clock.

        ``scores`` are what exploration works on: the online head's means, given the model's scores
        when one is live. When the default policy would decide, ``scores`` and ``spread`` are None.
        """
        return self._chooser.score(self.agent, context, actions, default)

    def explain(
        self, context: dict[str, Any], actions: list[Any], *, top: int | None = None, default: str | None = None
    ) -> Explanation:
        """Each action's score, spread and probability, and the context keys that moved the choice
        most (by occlusion: see ``reflexd.deciding.explaining``), the ``top`` ones; nothing is logged.
        ``default``: the agent's own choice, as ``decide`` takes it (apprentice mode)."""
        return self._chooser.explain(self.agent, context, actions, top, default)

    def evaluate(
        self,
        policies: list[str],
        since: float | None = None,
        until: float | None = None,
        *,
        reward_model: str | None = None,
        discover: bool = False,
        timeout: float = 600.0,
    ) -> Evaluation:
        """Estimate off-policy what each of ``policies`` would have earned on this agent's matured
        logged decisions made from ``since`` and before ``until`` (epoch seconds), beside the
        logging policy (``rows[0]``, the baseline).

        A policy is ``"v0003"`` or ``"live"``, ``"action:ID"``, ``"file:PATH"`` (per-decision
        probabilities, NDJSON ``{"id", "probs"}``, read here and sent with the request) or
        ``"v0003@strategy=softmax,temperature=0.5"``; see ``reflexd evaluate --help``. The daemon
        answers over a connection of its own; a policy it cannot read or apply raises RequestFailed.

        >>> found = policy.evaluate(["live", "action:small"], since=time.time() - 86400)
        >>> [(row.policy, row.value.value, row.value.lower) for row in found.rows]
        """
        from reflexd.wire.connection import request

        if isinstance(policies, str):  # a list of one was meant: a str would be read letter by letter
            raise TypeError(f"policies must be a list of policy names, as in [{policies!r}], not a str")
        since, until = _times(since=since, until=until)
        msg = Evaluate(
            policies=list(policies),
            tables=probability_tables(list(policies)),
            agent=self.agent,
            since=since,
            until=until,
            reward_model=reward_model,
            discover=discover,
        )
        return request(msg, self._sender.path, timeout=timeout)  # type: ignore[return-value]

    def insights(self, since: float | None = None, *, now: bool = False, timeout: float = 30.0) -> Insights:
        """What the daemon's newest knowledge extraction found about this agent: ``rules``
        (published ones held on decisions they were not found on), ``patterns``, ``anomalies`` (from
        ``since`` on) and ``trends``; ``now`` runs an extraction first (give it a longer timeout).

        Each published rule carries ``text``, one sentence an agent can put in a prompt:

        >>> found = policy.insights()
        >>> prompt += "\n".join(r["text"] for r in found.rules if r["status"] == "published")
        """
        from reflexd.wire.connection import request

        (since,) = _times(since=since)
        msg = InsightsRequest(agent=self.agent, since=since, now=now)
        return request(msg, self._sender.path, timeout=timeout)  # type: ignore[return-value]

    def reward(self, decision_id: str, value: float) -> None:
        """Report an outcome of a decision; several outcomes combine as the daemon is configured.

        The online head learns from the first outcome of each of this policy's decisions at once;
        with ``batch_learning``, within ``send_interval`` on the background thread (``flush``:
        at once), each action's rewards since its last wake as one update.
        """
        if not isinstance(decision_id, str):  # refused here, where the agent can see it, not on the sender's thread
            raise TypeError(f"decision_id must be the str id a decision returned, not {type(decision_id).__name__}")
        _check_id("decision_id", decision_id)
        try:  # "1" and True are no rewards; numpy's numbers and Decimal are
            reward = None if isinstance(value, (str, bytes, bool)) else float(value)
        except (TypeError, ValueError):
            reward = None
        if reward is None:
            raise TypeError(f"value must be a number, not {type(value).__name__}")
        # built first: Outcome refuses a reward that is not a finite number, before anything learns it
        outcome = Outcome(id=uuid.uuid4().hex, decision_id=decision_id, reward=reward, agent=self.agent, ts=time.time())
        self._sender.enqueue(outcome)
        head = self._chooser.online
        if head is not None:
            if self._batch_learning:
                head.later(decision_id, outcome.reward)
            else:
                head.learn(decision_id, outcome.reward)

    def step(
        self, episode: str, index: int, observation: dict[str, Any], action: str, reward: float = 0.0, done: bool = False
    ) -> None:
        """Log one step of a sequential episode."""
        _check_id("episode", episode)
        if not isinstance(action, str):  # any str: a step's action may be empty, as traced steps' are
            raise TypeError(f"action must be a str, not {type(action).__name__}")
        if type(index) is bool or not isinstance(index, Integral) or not 0 <= index <= 2**31 - 1:  # a 32-bit INTEGER
            raise ValueError(f"index must be the step's position in its episode, an int from 0, not {index!r}")
        index = int(index)  # numpy's integers included
        if len(episode) + 1 + len(str(index)) > 256:  # the step's id, episode:index, is an id too
            raise ValueError(f"episode is {len(episode)} characters: with ':{index}' the step's id would be over 256")
        _check_keys("observation", observation)
        self._sender.enqueue(
            Step(
                id=f"{episode}:{index}",
                agent=self.agent,
                episode=episode,
                index=index,
                observation=observation,
                action=action,
                reward=float(reward),
                done=bool(done),
                ts=time.time(),
            )
        )

    def event(self, kind: str, data: Any = None) -> None:
        """Log anything else worth keeping (a metric, an error) as a generic event."""
        _check_id("kind", kind)
        self._sender.enqueue(Event(id=uuid.uuid4().hex, agent=self.agent, kind=kind, data=data, ts=time.time()))

    def flush(self, timeout: float = 30.0) -> bool:
        """Learn the outcomes reported so far (the online head), and wait until everything logged
        so far is durable in the daemon; False on timeout."""
        if self._chooser.online is not None:
            try:
                self._chooser.online.apply()
            except Exception:  # the learning beside must not fail the agent's flush
                _log.exception("the online head could not learn the rewards reported")
        return self._sender.wait_settled(timeout)

    def stats(self) -> dict[str, Any]:
        s = self._sender
        return {
            "enqueued": s.enqueued,
            "settled": s.settled,
            "pending": s.pending,
            "dropped": s.dropped,
            "rejected": s.rejected,
            "reconnects": s.reconnects,
            "connected": s.conn is not None,
            "last_error": s.last_error,
            "model_version": self.model_version,
            # a models folder that is not there (yet: the daemon makes it at its start) is said, not silent
            "model_error": self.models.error or (
                None if self._models_dir.is_dir() else f"no models folder at {self._models_dir} (is state_dir right?)"
            ),
            "online": (
                {**self._chooser.online.stats(), "unshared": s.unshared, "waiting": self._chooser.online.waiting}
                if self._chooser.online is not None else None
            ),
            "apprentice": dict(self._chooser.apprentice),
        }

    def close(self, timeout: float = 10.0) -> bool:
        """Flush (up to ``timeout``) and stop the background thread; False, and a warning naming how
        many, if events logged were not yet durable in the daemon (they are lost with the process)."""
        if self._sender.closed:
            return self._sender.pending == 0
        self._sender.closed = True  # first: nothing logged from here on can slip past the flush unseen
        settled = self.flush(timeout) and self._sender.pending == 0
        self._sender.stop()
        if not settled:
            _log.warning(
                "closed with events the daemon has not acknowledged; they are lost with this process",
                pending=self._sender.pending, last_error=self._sender.last_error,
            )
        return settled

    def __enter__(self) -> Policy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CLOSED = "this Policy is closed: nothing more can be logged through it"


def _check_id(what: str, value: Any) -> None:
    """An id as the wire takes it (1 to 256 characters), or TypeError/ValueError naming ``what``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not 0 < len(value) <= 256:
        raise ValueError(f"{what} must be 1 to 256 characters, not {len(value)}")


def _times(**times: Any) -> list[float | None]:
    """Each of ``times`` as float epoch seconds (numpy's numbers included), or TypeError naming it."""
    out = []
    for name, value in times.items():
        if value is not None and (type(value) is bool or not isinstance(value, Real)):
            raise TypeError(f"{name} must be epoch seconds (a number) or None, not {type(value).__name__}")
        out.append(None if value is None else float(value))
    return out


def _check_keys(what: str, mapping: Any) -> None:
    if not isinstance(mapping, dict):
        raise TypeError(f"{what} must be a dict of keys to values, not {type(mapping).__name__}")
    bad = next((k for k in mapping if not isinstance(k, str)), None)
    if bad is not None:
        raise TypeError(f"{what}'s keys must be str; {bad!r} is {type(bad).__name__}")


def _check_settings(
    exploration: Any, online: Any, buffer_size: Any, refresh_interval: Any, send_interval: Any, seed: Any
) -> None:
    """The constructor's settings, refused at the call rather than failing later on the sender's thread."""
    if exploration is not None and not isinstance(exploration, ExplorationConfig):
        raise TypeError(f"exploration must be a reflexd.config.ExplorationConfig, not {type(exploration).__name__}")
    if online is not None and not isinstance(online, OnlineConfig):
        raise TypeError(f"online must be a reflexd.config.OnlineConfig, not {type(online).__name__}")
    if type(buffer_size) is bool or not isinstance(buffer_size, Integral) or buffer_size < 1:
        raise ValueError(f"buffer_size must be an int of at least 1 (events held while the daemon is away), not {buffer_size!r}")
    for name, value in (("refresh_interval", refresh_interval), ("send_interval", send_interval)):
        if type(value) is bool or not isinstance(value, Real) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}")
    if seed is not None and (type(seed) is bool or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, not {type(seed).__name__}")


class Episode:
    """One episode of a Policy's decisions (``Policy.episode``); a context manager that ends it."""

    def __init__(self, policy: Policy, episode_id: str, decide_kw: dict[str, Any]) -> None:
        self.policy = policy
        self.id = episode_id
        self.decisions = 0
        self.ended = False
        self._decide_kw = decide_kw

    def decide(self, context: dict[str, Any], actions: list[Any], **kw: Any) -> Choice:
        """``Policy.decide``, the decision logged as part of this episode."""
        if self.ended:
            raise ValueError(f"episode {self.id!r} has ended: start another for more decisions")
        choice = self.policy.decide(context, actions, **{**self._decide_kw, **kw}, episode=self.id)
        self.decisions += 1
        return choice

    def reward(self, choice: Choice | str, value: float) -> None:
        """Report an outcome of one of this episode's decisions (a Choice or its id)."""
        self.policy.reward(choice if isinstance(choice, str) else choice.id, value)

    def end(self, reward: float | None = None) -> None:
        """End the episode, with ``reward`` as its final reward (none: nothing added)."""
        if self.ended:
            raise ValueError(f"episode {self.id!r} has ended already")
        self.policy.end_episode(self.id, reward)
        self.ended = True

    def __enter__(self) -> Episode:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.ended:
            self.end()


class _Sender(threading.Thread):
    """Ships encoded events in batches, each closed by a flush whose ack releases them.

    Whenever this thread runs it may hold up a decision (they share the GIL), so it wakes once per
    ``send_interval`` (sooner only when someone waits on a flush), never per event, and its work
    per batch does not grow with the batch: the agent's thread appends each encoded frame to a
    list under a lock held for a few bytecodes, and this thread swaps the whole list out.
    """

    def __init__(
        self,
        path: str,
        capacity: int,
        send_interval: float,
        refresh_interval: float,
        models: ModelSource,
        on_refresh: Callable[[], None] | None = None,
        on_cycle: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(name="reflexd-sender", daemon=True)
        self.path = path
        self.capacity = capacity
        self.send_interval = send_interval
        self.refresh_interval = refresh_interval
        self.models = models
        self.on_refresh = on_refresh
        self.on_cycle = on_cycle  # each wake: the online head learns the rewards reported since the last
        self._lock = threading.Lock()  # guards _frames, _held, enqueued and dropped
        self._frames: list[bytes] = []  # encoded, not yet taken by this thread
        self._shared: list[bytes] = []  # online updates to share (``share``), not yet sent
        self.unshared = 0  # of those, let go: the buffer was full or the daemon could not be reached
        self._batches: list[list[bytes]] = []  # taken, not yet acknowledged; resent after a reconnect
        self._held = 0  # frames in _batches
        self.conn: Connection | None = None
        self.enqueued = 0  # frames accepted into the buffer
        self.settled = 0  # frames the daemon stored or dead-lettered
        self.rejected = 0  # of those, dead-lettered (the daemon said why)
        self.dropped = 0  # frames refused because the buffer was full
        self.reconnects = 0
        self.last_error: str | None = None
        self._reported_drops = 0
        self._stopping = threading.Event()
        self.closed = False  # by Policy.close: what is logged after it would never be sent
        self._wake = threading.Event()
        self._settled_cv = threading.Condition()
        self._flush_seq = 0
        self._backoff = 0.05
        self._next_refresh = 0.0

    @property
    def pending(self) -> int:
        """Frames not yet acknowledged (buffered, or sent and awaiting their flush's ack)."""
        return len(self._frames) + self._held

    def enqueue(self, msg: msgspec.Struct) -> None:
        if self.closed:  # nothing would send it: said at the call, not lost unseen
            raise RuntimeError(_CLOSED)
        try:
            frame = encode_frame(msg, MSGPACK)
        except OverflowError as exc:  # msgpack's integers are 64-bit; said at the call, naming the kind
            raise OverflowError(
                f"this {type(msg).__struct_config__.tag or type(msg).__name__} cannot be sent: {exc} (send a larger"
                " integer as a float or a str)"
            ) from None
        with self._lock:
            if len(self._frames) + self._held >= self.capacity:
                self.dropped += 1  # never block the agent: overflow is counted and reported
                return
            self._frames.append(frame)
            self.enqueued += 1

    def share(self, msg: msgspec.Struct) -> None:
        """Queue an online update to share (``Learned``): beside the events, never stored nor
        acknowledged, and let go when the daemon cannot be reached (sharing is best effort; the
        head that made it keeps it)."""
        frame = encode_frame(msg, MSGPACK)
        with self._lock:
            if len(self._shared) >= self.capacity:
                self.unshared += 1
                return
            self._shared.append(frame)

    def _send_shared(self) -> None:
        with self._lock:
            frames, self._shared = self._shared, []
        try:
            conn = self._connect()
            for i in range(0, len(frames), JOIN_FRAMES):
                conn.send_raw(b"".join(frames[i : i + JOIN_FRAMES]))
        except (DaemonUnavailable, FrameError, OSError) as exc:
            self.unshared += len(frames)
            self._disconnect(str(exc))

    def wait_settled(self, timeout: float) -> bool:
        target = self.enqueued
        self._wake.set()  # ship now rather than at the next interval
        deadline = time.monotonic() + timeout
        with self._settled_cv:
            while self.settled < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return False
                self._settled_cv.wait(min(left, 0.1))
        return True

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.join(timeout=5)
        if self.conn is not None:
            self.conn.close()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if self.on_cycle is not None:
                try:
                    self.on_cycle()
                except Exception:  # the learning beside must never stop the shipping of events
                    _log.exception("the online head could not learn the rewards reported")
            now = time.monotonic()
            if now >= self._next_refresh:
                self._next_refresh = now + self.refresh_interval
                self.models.refresh()  # loads a new model here, off the agent's thread
                if self.on_refresh is not None:
                    try:
                        self.on_refresh()
                    except Exception:  # the learning beside must never stop the shipping of events
                        _log.exception("refreshing the client's settings or online head failed")
            if self._shared and (self.conn is not None or self.last_error is None):
                self._send_shared()  # before the events: a flush's ack then also means the daemon has them
            self._take()
            if self._batches or self.dropped != self._reported_drops:
                try:
                    self._cycle()
                    self._backoff = 0.05
                    if self._batches:
                        continue  # more held than one cycle sends: on at once
                except (DaemonUnavailable, FrameError, OSError) as exc:
                    self._disconnect(str(exc))
                    self._stopping.wait(self._backoff)
                    self._backoff = min(self._backoff * 2, MAX_BACKOFF)
                    continue
            self._wake.wait(self.send_interval)

    def _take(self) -> None:
        with self._lock:
            if not self._frames:
                return
            frames, self._frames = self._frames, []
            self._held += len(frames)
        self._batches += [frames[i : i + CYCLE_FRAMES] for i in range(0, len(frames), CYCLE_FRAMES)]

    def _connect(self) -> Connection:
        if self.conn is None:
            self.conn = Connection(self.path, timeout=30.0)
            if self.last_error is not None:
                self.reconnects += 1
                _log.info("reconnected to reflexd", socket=self.path, resending=self._held)
        return self.conn

    def _disconnect(self, reason: str) -> None:
        if self.last_error is None:
            _log.warning("lost reflexd; buffering events", socket=self.path, error=reason)
        self.last_error = reason
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def ask(self, msg: msgspec.Struct) -> Any:
        """``msg``'s reply on this thread's connection (no flush is waiting on it here), or None if
        the daemon cannot be reached: asking is beside shipping, whose retries it leaves alone."""
        if self.conn is None and self.last_error is not None:
            return None  # shipping is backing off; asking waits for it to reconnect
        try:
            conn = self._connect()
            conn.send_raw(encode_frame(msg, MSGPACK))
            while True:
                reply = conn.receive()
                # nothing else is outstanding here: an error is this request's, even without its req
                # (a daemon that cannot read the request cannot say which it was)
                if isinstance(reply, Error) or (getattr(reply, "req", None) == getattr(msg, "req", None) and not isinstance(reply, Ack)):
                    return reply
        except (DaemonUnavailable, FrameError, OSError) as exc:
            self._disconnect(str(exc))
            return None

    def _cycle(self) -> None:
        conn = self._connect()
        # The oldest held batches go, up to CYCLE_FRAMES: a cycle that fails drops its connection,
        # so on this one each batch is either new or unacknowledged. Event ids make a resend
        # idempotent.
        sending, count = 0, 0
        for frames in self._batches:
            if sending and count + len(frames) > CYCLE_FRAMES:
                break
            sending, count = sending + 1, count + len(frames)
            for i in range(0, len(frames), JOIN_FRAMES):
                conn.send_raw(b"".join(frames[i : i + JOIN_FRAMES]))
        drops = self.dropped
        self._flush_seq += 1
        conn.send_raw(encode_frame(Flush(req=self._flush_seq, dropped=drops - self._reported_drops), MSGPACK))
        rejected = 0
        while True:
            reply = conn.receive()
            if isinstance(reply, Error) and reply.req == self._flush_seq:
                # the flush itself failed: nothing is acknowledged; reconnect and send again
                raise DaemonUnavailable(self.path, f"flush failed: {reply.message}")
            if isinstance(reply, Error):
                rejected += 1
                _log.warning("reflexd rejected an event", code=reply.code, message=reply.message)
            elif isinstance(reply, Ack) and reply.req == self._flush_seq:
                break
        self.last_error = None
        self._reported_drops = drops
        acked = count
        del self._batches[:sending]
        with self._lock:
            self._held -= acked
        with self._settled_cv:
            self.settled += acked
            self.rejected += rejected
            self._settled_cv.notify_all()

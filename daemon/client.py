"""``reflexd.Policy``: the in-process client an agent imports to decide and to report rewards.

Deciding never waits on the daemon: the model is scored in-process with onnxruntime, and the
decision event is encoded at once and appended to a bounded buffer that a background thread
ships over the socket. That thread also reloads the model when the registry's pointer moves,
keeps every event until the daemon acknowledges it durable, and resends after reconnecting.
Imports neither torch nor duckdb.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

from . import log
from .config import ExplorationConfig
from .connection import Connection, default_socket
from .errors import DaemonUnavailable, FrameError
from .protocol import MSGPACK, Ack, Error, Event, Flush, Outcome, Step, encode_frame
from .registry import Manifest, Registry
from .serving import Choice, Chooser, ModelSource

__all__ = ["Choice", "Policy"]

_log = log.get("reflexd.client")
DEFAULT_MODELS = "/var/lib/reflexd/models"
SEND_BATCH = 5000
MAX_BACKOFF = 0.5  # the daemon is local: a restart takes about a second


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
    explore); its ``default_action`` is what the agent does before any model exists.
    """

    def __init__(
        self,
        agent: str,
        *,
        socket: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        models: str | os.PathLike[str] | None = None,
        exploration: ExplorationConfig | None = None,
        buffer_size: int = 100_000,
        refresh_interval: float = 0.5,
        send_interval: float = 0.02,
        seed: int | None = None,
    ) -> None:
        self.agent = agent
        models_dir = Path(models) if models else Path(state_dir) / "models" if state_dir else Path(default_models())
        self.models = ModelSource(Registry(models_dir))
        self.models.refresh()
        self._fallback = exploration or ExplorationConfig()
        self._chooser = Chooser(self.models, self._exploration_for, seed)
        self._sender = _Sender(os.fspath(socket or default_socket()), buffer_size, send_interval, refresh_interval, self.models)
        self._sender.start()

    def _exploration_for(self, agent: str, manifest: Manifest | None) -> ExplorationConfig:
        return manifest.exploration_for(agent) if manifest is not None else self._fallback

    @property
    def model_version(self) -> str | None:
        scorer = self.models.scorer
        return scorer.version if scorer is not None else None

    def decide(self, context: dict[str, Any], actions: list[Any], *, decision_id: str | None = None) -> Choice:
        """Choose among ``actions`` (ids, or dicts with ``id`` and ``features``) for ``context``."""
        choice = self._chooser.choose(self.agent, context, actions, decision_id)
        self._sender.enqueue(choice.event(self.agent, context, actions))
        return choice

    def reward(self, decision_id: str, value: float) -> None:
        """Report an outcome of a decision; several outcomes combine as the daemon is configured."""
        self._sender.enqueue(
            Outcome(id=uuid.uuid4().hex, decision_id=decision_id, reward=float(value), agent=self.agent, ts=time.time())
        )

    def step(
        self, episode: str, index: int, observation: dict[str, Any], action: str, reward: float = 0.0, done: bool = False
    ) -> None:
        """Log one step of a sequential episode."""
        self._sender.enqueue(
            Step(
                id=f"{episode}:{index}",
                agent=self.agent,
                episode=episode,
                index=index,
                observation=observation,
                action=action,
                reward=float(reward),
                done=done,
                ts=time.time(),
            )
        )

    def event(self, kind: str, data: Any = None) -> None:
        """Log anything else worth keeping (a metric, an error) as a generic event."""
        self._sender.enqueue(Event(id=uuid.uuid4().hex, agent=self.agent, kind=kind, data=data, ts=time.time()))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything logged so far is durable in the daemon; False on timeout."""
        return self._sender.wait_settled(timeout)

    def stats(self) -> dict[str, Any]:
        s = self._sender
        return {
            "enqueued": s.enqueued,
            "settled": s.settled,
            "pending": len(s.pending) + len(s.unacked),
            "dropped": s.dropped,
            "rejected": s.rejected,
            "reconnects": s.reconnects,
            "connected": s.conn is not None,
            "last_error": s.last_error,
            "model_version": self.model_version,
            "model_error": self.models.error,
        }

    def close(self, timeout: float = 10.0) -> None:
        """Flush (up to ``timeout``) and stop the background thread."""
        self.flush(timeout)
        self._sender.stop()

    def __enter__(self) -> Policy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sender(threading.Thread):
    """Ships encoded events in batches, each closed by a flush whose ack releases them."""

    def __init__(
        self, path: str, capacity: int, send_interval: float, refresh_interval: float, models: ModelSource
    ) -> None:
        super().__init__(name="reflexd-sender", daemon=True)
        self.path = path
        self.capacity = capacity
        self.send_interval = send_interval
        self.refresh_interval = refresh_interval
        self.models = models
        # deque append/popleft are atomic, so the agent's thread never takes a lock to enqueue
        self.pending: deque[bytes] = deque()
        self.unacked: list[bytes] = []
        self.conn: Connection | None = None
        self.enqueued = 0  # frames accepted into the buffer
        self.settled = 0  # frames the daemon stored or dead-lettered
        self.rejected = 0  # of those, dead-lettered (the daemon said why)
        self.dropped = 0  # frames refused because the buffer was full
        self.reconnects = 0
        self.last_error: str | None = None
        self._reported_drops = 0
        self._stopping = threading.Event()
        self._settled_cv = threading.Condition()
        self._flush_seq = 0
        self._backoff = 0.05
        self._next_refresh = 0.0

    def enqueue(self, msg: msgspec.Struct) -> None:
        if len(self.pending) + len(self.unacked) >= self.capacity:
            self.dropped += 1  # never block the agent: overflow is counted and reported
            return
        self.pending.append(encode_frame(msg, MSGPACK))
        self.enqueued += 1

    def wait_settled(self, timeout: float) -> bool:
        target = self.enqueued
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
        self.join(timeout=5)
        if self.conn is not None:
            self.conn.close()

    def run(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= self._next_refresh:
                self._next_refresh = now + self.refresh_interval
                self.models.refresh()  # loads a new model here, off the agent's thread
            if not self.pending and not self.unacked and self.dropped == self._reported_drops:
                self._stopping.wait(self.send_interval)
                continue
            try:
                self._cycle()
                self._backoff = 0.05
            except (DaemonUnavailable, FrameError, OSError) as exc:
                self._disconnect(str(exc))
                self._stopping.wait(self._backoff)
                self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _connect(self) -> Connection:
        if self.conn is None:
            self.conn = Connection(self.path, timeout=30.0)
            if self.last_error is not None:
                self.reconnects += 1
                _log.info("reconnected to reflexd", socket=self.path, resending=len(self.unacked))
            # everything unacknowledged goes again; event ids make the resend idempotent
            self.conn.send_raw(b"".join(self.unacked))
        return self.conn

    def _disconnect(self, reason: str) -> None:
        if self.last_error is None:
            _log.warning("lost reflexd; buffering events", socket=self.path, error=reason)
        self.last_error = reason
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _cycle(self) -> None:
        conn = self._connect()
        drops = self.dropped
        batch = [self.pending.popleft() for _ in range(min(len(self.pending), SEND_BATCH))]
        self.unacked.extend(batch)
        self._flush_seq += 1
        conn.send_raw(b"".join(batch) + encode_frame(Flush(req=self._flush_seq, dropped=drops - self._reported_drops), MSGPACK))
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
        with self._settled_cv:
            self.settled += len(self.unacked)
            self.rejected += rejected
            self.unacked.clear()
            self._settled_cv.notify_all()

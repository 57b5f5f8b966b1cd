"""Online updates shared between processes: a head that absorbs another's updates learns what it
learned, and the daemon's relay hands each reader the updates it has not seen."""

from __future__ import annotations

import random
import socket as socketlib
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from reflexd.client.policy import Policy
from reflexd.config import OnlineConfig
from reflexd.deciding.online import OnlineHead, learned
from reflexd.errors import FrameError
from reflexd.service.lines import Relay
from reflexd.wire.framing import MSGPACK, FrameReader, decode_inbound, encode_frame
from reflexd.wire.protocol import Ack, Error

TASKS = ("code", "chat", "math")
ACTIONS = ["small", "large", "tools"]


def test_a_head_that_absorbs_anothers_updates_learns_the_same_means() -> None:
    rng = random.Random(3)
    teacher, pupil = OnlineHead(OnlineConfig()), OnlineHead(OnlineConfig())
    shared: list = []
    teacher.on_update = lambda *update: shared.append(learned(teacher, *update))
    for i in range(300):
        task = rng.choice(TASKS)
        action = rng.choice(ACTIONS)
        x = teacher.features({"task": task, "n": rng.random()})
        teacher.remember(f"d{i}", "router", action, x, None)
        assert teacher.learn(f"d{i}", float(action == "large") + rng.gauss(0, 0.1))
    assert len(shared) == 300 and pupil.stats()["updates"] == 0
    # in another order: a ridge regression's posterior does not depend on it, given each arm's
    # prior mean (the teacher's, which the update carries)
    for update in reversed(shared):
        frame = encode_frame(update, MSGPACK)  # as it travels
        u = decode_inbound(frame[4:], MSGPACK)
        assert pupil.absorb(u.agent, u.action, u.base, u.beside, u.index, u.value, u.target, u.prior_mean)
    x = teacher.features({"task": "math", "n": 0.5})
    assert pupil.means("router", x, ACTIONS) == pytest.approx(teacher.means("router", x, ACTIONS), abs=1e-9)
    assert pupil.stats()["absorbed"] == 300 and not pupil.stats()["pending"]


def test_an_update_made_beside_another_model_or_malformed_is_not_absorbed() -> None:
    head = OnlineHead(OnlineConfig())
    head.follow("v0002")
    assert not head.absorb("a", "p", "v0001", True, [0], [1.0], 1.0)  # corrected another model's scores
    assert not head.absorb("a", "p", "v0002", True, [10**6], [1.0], 1.0)  # an input the head does not have
    assert not head.absorb("a", "p", "v0002", True, [0, 1], [1.0], 1.0)
    bad = {"type": "learned", "agent": "a", "decision": "d", "action": "p", "base": None, "beside": False,
           "index": [0, 1], "value": [1.0], "target": 1.0}
    with pytest.raises(FrameError, match="one value per input"):  # refused at the edge, as it arrives
        decode_inbound(msgspec.msgpack.encode(bad), MSGPACK)
    assert not head.absorb("a", "p", "v0002", True, [0], [float("nan")], 1.0)
    assert head.absorb("a", "p", "v0002", True, [0, 129], [1.0, 0.5], 1.0)
    assert head.stats()["absorbed"] == 1


def test_the_relay_hands_each_reader_what_it_has_not_seen() -> None:
    relay = Relay()
    head = OnlineHead(OnlineConfig())
    x = np.zeros(130)
    x[[3, 128]] = 1.0
    for i in range(5):
        relay.add(learned(head, "a" if i % 2 else "b", "p", f"d{i}", x, float(i), False))
    updates, last, missed = relay.since(0)
    assert [u.decision for u in updates] == ["d0", "d1", "d2", "d3", "d4"] and last == 5 and missed == 0
    assert relay.since(5) == ([], 5, 0) and relay.since(3)[0][0].decision == "d3"
    assert relay.since(99) == ([], 5, 0)  # a reader ahead (the daemon restarted): afresh from now
    relay.forget("a")
    assert [u.decision for u in relay.since(0)[0]] == ["d0", "d2", "d4"]
    assert [u.decision for u in relay.since(2)[0]] == ["d2", "d4"] and relay.since(2)[1] == 5


def test_the_relay_says_how_many_a_slow_reader_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Relay, "KEEP", 3)
    relay = Relay()
    head = OnlineHead(OnlineConfig())
    for i in range(5):
        relay.add(learned(head, "a", "p", f"d{i}", np.ones(130), 1.0, False))
    updates, last, missed = relay.since(1)
    assert [u.decision for u in updates] == ["d2", "d3", "d4"] and last == 5 and missed == 1


def test_a_policy_beside_a_daemon_that_cannot_share_learns_on_its_own(tmp_path: Path) -> None:
    """A daemon from before shared learning answers ``learnings`` with an error: the Policy stops
    asking and sharing (no dead letter every half second) and its head goes on learning alone."""
    path = str(tmp_path / "old.sock")
    server = socketlib.socket(socketlib.AF_UNIX)
    server.bind(path)
    server.listen(1)
    asked = threading.Event()

    def old_daemon() -> None:  # acks flushes, and cannot read a `learnings` request
        conn, _ = server.accept()
        reader = FrameReader(MSGPACK, 1 << 20)
        with conn:
            while chunk := conn.recv(65536):
                for frame in reader.feed(chunk):
                    payload = msgspec.msgpack.decode(frame)
                    if payload.get("type") == "learnings":
                        asked.set()
                        conn.sendall(encode_frame(Error(code="malformed", message="unknown type 'learnings'", seq=0), MSGPACK))
                    elif payload.get("type") == "flush":
                        conn.sendall(encode_frame(Ack(count=0, req=payload.get("req")), MSGPACK))

    threading.Thread(target=old_daemon, daemon=True).start()
    try:
        with Policy("router", socket=path, models=tmp_path / "models", refresh_interval=0.05) as policy:
            choice = policy.decide({"task": "code"}, ACTIONS)
            policy.reward(choice.id, 1.0)
            assert asked.wait(10)
            deadline = time.monotonic() + 10
            while policy._sharing and time.monotonic() < deadline:  # the sender thread reads the answer
                time.sleep(0.01)
            assert not policy._sharing and policy.stats()["online"]["updates"] == 1
    finally:
        server.close()

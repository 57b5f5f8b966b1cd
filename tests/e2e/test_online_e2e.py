"""The online head in a live daemon: rewards for socket decisions teach the next ones at once,
and an agent's Policy learns from its own rewards before any model exists."""

from __future__ import annotations

import random

import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy
from reflexd.config import ExplorationConfig
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Decide, Decided, Flush, Outcome

pytestmark = pytest.mark.e2e

BEST = {"code": "large", "chat": "small", "math": "tools"}
ACTIONS = ["small", "large", "tools"]


def test_socket_decisions_learn_from_their_rewards_before_any_model(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory()  # min_new_examples out of reach: no batch model in this test
    rng = random.Random(4)
    hits = []
    with Connection(d.socket) as conn:
        for i in range(500):
            task = rng.choice(list(BEST))
            reply = conn.request(Decide(agent="router", context={"task": task, "n": rng.random()}, actions=ACTIONS))
            assert isinstance(reply, Decided) and reply.model_version is None
            hits.append(reply.action == BEST[task])
            reward = (1.0 if reply.action == BEST[task] else 0.0) + rng.gauss(0, 0.2)
            conn.send([Outcome(decision_id=reply.id, reward=reward, id=f"o{i}")])
        conn.send([Flush()])
        while not isinstance(conn.receive(), Ack):
            pass
    # the default policy, which nothing taught, is right one time in three; how fast the head
    # gets there varies with the daemon's own random draws, so only where it ends up is asserted
    assert sum(hits[-200:]) / 200 > 0.8, sum(hits[-200:])
    online = d.status().online
    assert online is not None and online["updates"] >= 450 and online["base"] is None


def test_online_learning_can_be_turned_off(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory({"online": {"enabled": False}})
    with Connection(d.socket) as conn:
        replies = [conn.request(Decide(agent="a", context={"task": "code"}, actions=ACTIONS)) for _ in range(20)]
    assert {r.strategy for r in replies} == {"default"}
    assert d.status().online is None


def test_a_policy_learns_from_its_own_rewards_at_once(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory()
    rng = random.Random(9)
    with Policy("router", socket=d.socket, state_dir=d.state_dir, seed=3) as policy:
        hits = []
        for _ in range(500):
            task = rng.choice(list(BEST))
            choice = policy.decide({"task": task}, ACTIONS)
            hits.append(choice.action == BEST[task])
            policy.reward(choice.id, 1.0 if choice.action == BEST[task] else 0.0)
        assert sum(hits[-200:]) / 200 > 0.8
        assert policy.stats()["online"]["updates"] == 500


def test_policies_follow_the_daemons_online_rewards_and_exploration_settings(daemon_factory) -> None:
    """models/clients.json carries the config to in-process clients: the head's switch, each
    agent's wait window and default reward (decisions with no outcome teach the default), and
    how each agent explores before any model, as the socket's decide explores for it."""
    off: DaemonProcess = daemon_factory({"online": {"enabled": False}})
    with Policy("router", socket=off.socket, state_dir=off.state_dir) as policy:
        assert policy.stats()["online"] is None
    own = {"strategy": "epsilon_greedy", "epsilon": 0.3, "default_action": "large"}
    on: DaemonProcess = daemon_factory(
        {"agents": {"clicks": {"rewards": {"wait_window": 0.2, "default": 0.0}, "exploration": own}}}
    )
    with Policy("router", socket=on.socket, state_dir=on.state_dir) as router:
        assert router.score({"task": "code"}, ACTIONS).probs == pytest.approx([1 / 3] * 3)
    with Policy("clicks", socket=on.socket, state_dir=on.state_dir, exploration=ExplorationConfig()) as given:
        assert given.score({"task": "code"}, ACTIONS).probs == pytest.approx([1 / 3] * 3)  # its own, as given
    with Connection(on.socket) as conn:
        socket_probs = conn.request(Decide(agent="clicks", context={"task": "code"}, actions=ACTIONS, log=False)).probs
    assert socket_probs == pytest.approx([0.1, 0.8, 0.1])
    with Policy("clicks", socket=on.socket, state_dir=on.state_dir, refresh_interval=0.05) as policy:
        assert policy.score({"task": "code"}, ACTIONS).probs == pytest.approx(socket_probs)  # the daemon's, for this agent
        for _ in range(20):
            policy.decide({"task": "code"}, ACTIONS)  # no outcome: the default, once 0.2 s have passed
        wait_for(lambda: policy.stats()["online"]["defaults"] == 20, 30, "the default reward learned")
        assert policy.stats()["online"]["updates"] == 20

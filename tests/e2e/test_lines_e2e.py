"""Model lines in a live daemon (learning.scope): agents whose worlds disagree each learn their own
model, trained on their own experience, served over the socket and to their in-process Policy."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy
from reflexd.errors import RequestFailed
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import (
    Ack,
    Decide,
    Decided,
    Flush,
    ModelsReply,
    ModelsRequest,
    Outcome,
    Promote,
    Rollback,
    Scored,
    StatusRequest,
    Train,
)

pytestmark = pytest.mark.e2e

ACTIONS = ["x", "y"]
# the same contexts, opposite worlds: "left" earns with x, "right" with y
BEST = {"left": "x", "right": "y"}
# uniform logging (no head): a first model then clearly beats the policy that logged its holdout
QUIET = {"online": {"enabled": False}}


def _log_decisions(d: DaemonProcess, agents: list[str], n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with Connection(d.socket) as conn:
        for i in range(n):
            agent = agents[i % len(agents)]
            reply = conn.request(Decide(agent=agent, context={"n": rng.random()}, actions=ACTIONS))
            assert isinstance(reply, Decided)
            reward = (1.0 if reply.action == BEST[agent] else 0.0) + rng.gauss(0, 0.1)
            conn.send([Outcome(decision_id=reply.id, reward=reward, id=f"o{i}", agent=agent)])
        conn.send([Flush()])
        while not isinstance(conn.receive(), Ack):
            pass


def _prefers(d: DaemonProcess, agent: str) -> tuple[str, str | None]:
    with Connection(d.socket) as conn:
        scored = conn.request(Decide(agent=agent, context={"n": 0.5}, actions=ACTIONS, log=False))
    assert isinstance(scored, Scored) and scored.scores is not None
    return ACTIONS[scored.scores.index(max(scored.scores))], scored.model_version


def test_agents_that_disagree_each_learn_their_own_model(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory(QUIET)
    _log_decisions(d, ["left", "right"], 600)
    wait_for(lambda: d.status().experience["new_since_training"] >= 590, 60, "the decisions to mature")
    status = d.status()
    assert set(status.lines) == {"agent:left", "agent:right"} and status.model is None  # two lines: no one model
    assert status.lines["agent:left"]["agents"] == ["left"]

    done = d.request(Train(), timeout=600)  # every line in turn
    assert [said.split()[:1] for said in done.message.splitlines()] == [["promoted"], ["promoted"]], done.message
    wait_for(lambda: all(line["serving"] for line in d.status().lines.values()), 30, "both lines to serve their model")

    left, right = (d.request(ModelsRequest(agent=a)) for a in ("left", "right"))
    assert isinstance(left, ModelsReply) and left.line == "agent:left" and right.line == "agent:right"
    assert left.current != right.current  # version numbers are counted across lines: no name is used twice
    for agent, reply in (("left", left), ("right", right)):
        manifest = reply.models[0]
        assert manifest["training"]["train_rows"] + manifest["training"]["holdout_rows"] <= 300  # its agent's rows only
        assert _prefers(d, agent) == (BEST[agent], reply.current)
    models = Path(d.state_dir) / "models"
    assert (models / "agents" / "left" / "CURRENT").read_text().strip() == left.current
    assert not (models / "CURRENT").exists()

    # the per-agent view: status and a Policy in the agent's own process serve the agent's line
    one = d.request(StatusRequest(agent="right"))
    assert one.model is not None and one.model["version"] == right.current and one.trainer["promoted"] == 1
    with Policy("left", socket=d.socket, state_dir=d.state_dir) as policy:
        assert policy.models.scorer is not None and policy.models.scorer.version == left.current
        assert policy.score({"n": 0.5}, ACTIONS).scores[0] > policy.score({"n": 0.5}, ACTIONS).scores[1]

    # requests about models must say whose once there are several lines
    with pytest.raises(RequestFailed, match="name an agent") as refused:
        d.request(Rollback())
    assert refused.value.code == "line_unknown" and "(--agent left, --agent right)" in str(refused.value)
    with pytest.raises(RequestFailed, match="no model version"):
        d.request(Promote(version=left.current, agent="right"))  # another line's version is not this line's


def test_a_shared_scope_keeps_one_model_that_tells_the_agents_apart(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory({**QUIET, "learning": {"scope": "shared"}})
    _log_decisions(d, ["left", "right"], 600, seed=2)
    wait_for(lambda: d.status().experience["new_since_training"] >= 590, 60, "the decisions to mature")
    status = d.status()
    assert list(status.lines) == ["shared"] and status.lines["shared"]["agents"] is None
    done = d.request(Train(agent="left"), timeout=600)
    assert done.message.startswith("promoted"), done.message
    shared = d.request(ModelsRequest())
    assert shared.line == "shared" and len(shared.models) == 1
    manifest = shared.models[0]
    assert manifest["training"]["train_rows"] + manifest["training"]["holdout_rows"] > 590  # both agents' experience
    assert manifest["features"]["agent"] is True  # the agent is one of the shared model's inputs
    assert (Path(d.state_dir) / "models" / manifest["version"]).is_dir()
    # one model, two worlds: the same context, each agent its own best action
    wait_for(lambda: d.status().model is not None, 30, "the shared model served")
    assert _prefers(d, "left") == ("x", manifest["version"]) and _prefers(d, "right") == ("y", manifest["version"])


def test_groups_learn_together_and_an_agent_in_none_alone(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory(
        {**QUIET, "learning": {"scope": "group", "groups": {"support": ["left", "triage"]}}}
    )
    BEST["triage"] = "x"
    try:
        _log_decisions(d, ["left", "triage", "right"], 90, seed=3)
    finally:
        del BEST["triage"]
    wait_for(lambda: len(d.status().lines) == 2, 30, "two lines")
    lines = d.status().lines
    assert lines["group:support"]["agents"] == ["left", "triage"] and lines["agent:right"]["agents"] == ["right"]
    assert d.request(ModelsRequest(agent="triage")).line == "group:support"

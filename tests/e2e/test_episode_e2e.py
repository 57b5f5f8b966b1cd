"""Episodes end to end: the client's episode handle against a real daemon, and the proof that
episode-return credit learns what per-step credit cannot (rewards.episode_return)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy
from reflexd.config import OnlineConfig, TrainerConfig
from reflexd.learning import join
from reflexd.tools.readout import from_snapshot
from reflexd.wire.protocol import Decide, Decided, Release, Snapshot

EPISODIC = "by-episode"  # credited with episode returns (an agents: override)
STEPWISE = "by-step"  # the global settings: per-decision rewards
CONFIG = {
    "rewards": {"wait_window": 0.2, "default": 0.0},
    "agents": {EPISODIC: {"rewards": {"episode_return": True, "discount": 1.0, "episode_timeout": 60}}},
}


def _policy(d: DaemonProcess, agent: str, seed: int) -> Policy:
    return Policy(agent, socket=d.socket, state_dir=d.state_dir, seed=seed, online=OnlineConfig(enabled=False))


def _read(d: DaemonProcess, sql: str, **params: Any) -> list[dict[str, Any]]:
    """``sql`` on a read-out snapshot of the running daemon (its tables, and ``rules`` in force)."""
    reply = d.request(Snapshot(archive=False))
    with from_snapshot(reply, release=lambda: d.request(Release(id=reply.id))) as source:
        cursor = source.con.execute(sql, {k: v for k, v in {"now": source.now, **params}.items() if f"${k}" in sql})
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def _joined(d: DaemonProcess) -> list[dict[str, Any]]:
    """Every matured decision with its joined reward, as a training snapshot has it."""
    return _read(d, join.EXPERIENCES, max_rows=1_000_000, agent=None, since=None, until=None, version=None, agents=None,
                 after=None)


def test_the_episode_handle_logs_decisions_and_ends(daemon_factory: Callable[..., DaemonProcess]) -> None:
    d = daemon_factory(CONFIG)
    with _policy(d, EPISODIC, 1) as policy:
        with policy.episode("e-1") as ep:
            first = ep.decide({"stage": 0}, ["a", "b"])
            ep.reward(first, 0.25)
            second = ep.decide({"stage": 1}, ["c"])
            ep.reward(second.id, 0.5)
            ep.end(reward=2.0)
            with pytest.raises(ValueError, match="ended"):
                ep.decide({"stage": 2}, ["c"])
            with pytest.raises(ValueError, match="ended"):
                ep.end()
        with policy.episode() as unnamed:  # a random id, and ended on leaving the block
            unnamed.decide({"stage": 0}, ["a", "b"])
        assert unnamed.ended and unnamed.id != "e-1" and unnamed.decisions == 1
        assert policy.flush(30)
    # the socket's decide takes an episode too
    decided = d.request(Decide(agent=EPISODIC, context={"stage": 0}, actions=["a", "b"], id="sock-1", episode="e-2"))
    assert isinstance(decided, Decided)
    wait_for(lambda: d.loaded_status().experience.get("decisions") == 4, 30, "the decisions in the store")

    decisions = _read(d, "SELECT id, episode FROM decisions ORDER BY ts")
    assert [r["episode"] for r in decisions] == ["e-1", "e-1", unnamed.id, "e-2"]
    ends = _read(d, "SELECT json_extract_string(data, '$.episode') AS episode, CAST(data->'reward' AS VARCHAR) AS reward "
                    "FROM events WHERE kind = 'episode_end' ORDER BY ts")
    assert ends == [{"episode": "e-1", "reward": "2.0"}, {"episode": unnamed.id, "reward": "null"}]
    # credited with the return to the end: 0.25 + 0.5 + 2.0, then 0.5 + 2.0; e-2 has not ended
    rewards = wait_for(lambda: (r := {x["id"]: x["reward"] for x in _joined(d)}) and len(r) == 3 and r, 30, "matured")
    assert rewards[first.id] == pytest.approx(2.75) and rewards[second.id] == pytest.approx(2.5)
    assert "sock-1" not in rewards


# The proof: an episode's first step chooses "prepare" or "rush"; rush pays 0.1 at once, prepare
# nothing, and the episode pays 1 at its end after a prepare. The second step is a formality.
EPISODES = 300


def _play(policy: Policy, rng: np.random.Generator) -> None:
    for _ in range(EPISODES):
        with policy.episode() as ep:
            size = float(rng.uniform(0, 1))
            first = ep.decide({"stage": "first", "size": size}, ["prepare", "rush"])
            if first.action == "rush":
                ep.reward(first, 0.1)
            ep.decide({"stage": "second", "size": size}, ["finish", "stop"])
            ep.end(reward=1.0 if first.action == "prepare" else 0.0)


def _first_steps(rows: list[dict[str, Any]], agent: str) -> dict[str, float]:
    firsts = [r for r in rows if r["agent"] == agent and '"first"' in r["context"]]
    return {a: float(np.mean([r["reward"] for r in firsts if r["chosen"] == a])) for a in ("prepare", "rush")}


def _preference(rows: list[dict[str, Any]], agent: str) -> float:
    """What a reward model fit on the agent's joined experiences (the daemon's own learner and
    feature hashing) scores prepare above rush, on average over first steps."""
    import pyarrow as pa
    import torch

    from reflexd.extensions import load_learner
    from reflexd.features import FeatureSpec
    from reflexd.learning.dataset import from_table

    mine = [r for r in rows if r["agent"] == agent]
    batch = from_table(pa.Table.from_pylist(mine), FeatureSpec(context_dim=32, action_dim=8, seed=0))
    settings = TrainerConfig(epochs=5, min_steps=150, batch_size=64, hidden_size=16, ensemble=1, max_threads=1)
    model = load_learner("mlp").fit(batch, settings, seed=0)
    firsts = batch.take([i for i, acts in enumerate(batch.action_ids) if acts == ["prepare", "rush"]])
    with torch.no_grad():
        scores, _ = model(torch.from_numpy(firsts.context), torch.from_numpy(firsts.actions))
    return float((scores[:, 0] - scores[:, 1]).mean())


def test_episode_return_credit_finds_the_first_step_that_pays_at_the_end(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory(CONFIG)
    # the same episodes, played by two agents: one credited by episode, one by step
    for agent in (EPISODIC, STEPWISE):
        with _policy(d, agent, 7) as policy:
            _play(policy, np.random.default_rng(3))
            assert policy.flush(30)
    total = 2 * 2 * EPISODES
    rows = wait_for(lambda: len(r := _joined(d)) == total and r, 30, f"{total} matured decisions")

    by_episode, by_step = _first_steps(rows, EPISODIC), _first_steps(rows, STEPWISE)
    # episode credit sees the end's reward on the first step; per-step credit sees only the 0.1
    assert by_episode == pytest.approx({"prepare": 1.0, "rush": 0.1})
    assert by_step == pytest.approx({"prepare": 0.0, "rush": 0.1})
    # and a model fit on each prefers, for the first step, what its credit says
    prefers_by_episode, prefers_by_step = _preference(rows, EPISODIC), _preference(rows, STEPWISE)
    print(f"first steps: by episode {by_episode}, by step {by_step}; model's prepare - rush: "
          f"{prefers_by_episode:+.3f} by episode, {prefers_by_step:+.3f} by step")
    assert prefers_by_episode > 0.5
    assert prefers_by_step < 0.0

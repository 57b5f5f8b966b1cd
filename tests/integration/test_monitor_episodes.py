"""The rollback monitor and ``evaluate`` judge a store's window by episode when rewards are episode
returns, on a real DuckDB store and registry, on known truth.

Episodes of two decisions, made by the live model exploring (ε-greedy 0.3 over x and y: 0.85 on
the one it prefers), whose only reward is the episode's end: a payoff set by the pair of actions,
plus an effect of the episode's own that both its decisions share. With ``rewards.episode_return``
each decision is credited with that return.

- Equal models: the end pays when the two actions differ. A model always preferring x and one
  always preferring y are then worth exactly the same (0.85·0.15 twice: 0.255). Row by row, the
  predecessor is judged at one decision with the live model at the other, where the pair differs
  far more often (0.745): the row-wise rule sees a worse live model and would roll it back.
- A truly worse model: the end pays when the first action is x; the live model prefers y.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import numpy as np
import pytest

from linear_models import register
from reflexd.config import Config, GateConfig, parse_config
from reflexd.deciding import exploring
from reflexd.deciding.scoring import Scorer
from reflexd.features import FeatureSpec
from reflexd.learning import episodes as ep
from reflexd.learning import evaluate as ev
from reflexd.learning import ope
from reflexd.learning.dataset import load_snapshot
from reflexd.registry import Registry
from reflexd.service import evaluation
from reflexd.service.evaluation import Models, evaluate_window, same_window
from reflexd.service.monitor import WINDOW_ROWS, Monitor, judge_window
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, EpisodeEnd, Evaluate

SPEC = FeatureSpec(context_dim=16, action_dim=16, seed=0)
EXPLORE = {"strategy": "epsilon_greedy", "epsilon": 0.3, "epsilon_min": 0.01}
GATE = GateConfig(confidence=0.95, rollback_min_decisions=200, rollback_margin=0.0)
REWARDS = "rewards: {wait_window: 1, default: 0.0, episode_return: true, discount: 1.0, episode_timeout: 100000}"
PREFERS = {"x": {"x": 0.9, "y": 0.2}, "y": {"x": 0.2, "y": 0.9}}
ACTIONS = ["x", "y"]


class World:
    """A store and a registry; the live model makes two-decision episodes with exact propensities."""

    def __init__(self, tmp: Path, seed: int) -> None:
        self.tmp = tmp
        self.rng = np.random.default_rng(seed)
        self.config = Config(state_dir=str(tmp), rewards=parse_config(REWARDS).rewards, gate=GATE)
        self.registry = Registry(tmp / "models")
        self.store = Store(tmp / "db.duckdb")
        self.refreshed: list[bool] = []
        self.served = SimpleNamespace(refresh=lambda: self.refreshed.append(True))
        self.prefers: dict[str, str] = {}

    def add(self, prefers: str) -> str:
        version = register(self.registry, self.tmp, SPEC, PREFERS[prefers], EXPLORE).version
        self.prefers[version] = prefers
        return version

    def promote(self, version: str) -> None:
        self.registry.promote(version)
        self.store.record_model_event(version, "promoted", {"reason": "test"}, time.time())

    def serve(self, version: str, episodes: int, payoff: Callable[[str, str], float], effect: float = 0.3) -> None:
        cfg = self.registry.manifest(version).exploration
        p = exploring.greedy(len(ACTIONS), ACTIONS.index(self.prefers[version]), exploring.epsilon_at(cfg, 100))
        events: list[Any] = []
        ends: list[Any] = []
        start = time.time() - 60
        for e in range(episodes):
            name = f"{version}-e{e}"
            picked = []
            for step in range(2):
                k = int(self.rng.choice(len(ACTIONS), p=p))
                picked.append(ACTIONS[k])
                events.append(Decision(
                    id=f"{name}-{step}", agent="bot", context={"step": step}, actions=ACTIONS, chosen=ACTIONS[k],
                    prob=float(p[k]), model_version=version, episode=name, ts=start + e * 0.01 + step * 0.001,
                ))
            # the episode's own effect: every decision of it is credited with it
            ends.append(EpisodeEnd(agent="bot", episode=name, reward=payoff(*picked) + float(self.rng.normal(0.0, effect))))
        self.store.write(events, received_at=time.time() - 10)
        self.store.write(ends, received_at=time.time() - 5)

    def monitor(self) -> Monitor:
        return Monitor(lambda: self.config, self.registry, self.store, self.served)  # type: ignore[arg-type]

    def compare(self, current: str, predecessor: str) -> Any:
        """What the monitor's check computes, without acting on it."""
        found = same_window(
            self.store, self.config, time.time(), Scorer(*self.registry.load(current)),
            Scorer(*self.registry.load(predecessor)), WINDOW_ROWS,
        )
        return found, judge_window(
            current, predecessor, found.rows, found.current, found.predecessor, GATE,
            estimator=found.estimator, observed=found.observed, episodes=found.episodes,
        )


@pytest.fixture
def world_factory(tmp_path: Path) -> Any:
    made: list[World] = []

    def make(seed: int) -> World:
        world = World(tmp_path / f"w{len(made)}", seed)
        made.append(world)
        return world

    yield make
    for world in made:
        world.store.close()


def differ(a0: str, a1: str) -> float:
    return float(a0 != a1)


def test_equal_models_on_episode_returns_are_not_rolled_back(world_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world = world_factory(seed=11)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.promote(v2)
    world.serve(v2, 600, differ)

    # the row-wise rule (the decisions of an episode as independent rows, as before) would roll back
    with monkeypatch.context() as patched:
        patched.setattr(evaluation, "credited_episodes", lambda rows, rewards_for: None)
        rows_found, row_wise = world.compare(v2, v1)
    assert rows_found.episodes is None and rows_found.current.shape == (1200,)
    assert row_wise.rollback and row_wise.upper < -0.3, row_wise.reason

    found, by_episode = world.compare(v2, v1)
    assert found.episodes == 600 and found.current.shape == found.predecessor.shape == (600,)
    # the truth, 0, is in the interval, which is wider than the row-wise one
    assert by_episode.lower < 0 < by_episode.upper, by_episode.reason
    assert by_episode.upper - by_episode.lower > row_wise.upper - row_wise.lower
    assert by_episode.current_mean == pytest.approx(0.255, abs=0.05)
    assert by_episode.predecessor_mean == pytest.approx(0.255, abs=0.15)
    assert by_episode.observed_mean == pytest.approx(0.255, abs=0.05)

    result = anyio.run(world.monitor().check)
    assert result.verdict == "not_worse" and not result.rollback, result.reason
    assert (result.episodes, result.current_decisions) == (600, 1200)
    assert f"on {v2}'s 1200 newest matured decisions (dr over 600 episodes)" in result.reason
    assert world.registry.current() == v2 and not world.refreshed


def test_a_truly_worse_model_on_episode_returns_is_rolled_back(world_factory: Any) -> None:
    world = world_factory(seed=12)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.promote(v2)
    world.serve(v2, 400, lambda a0, a1: float(a0 == "x"))

    result = anyio.run(world.monitor().check)
    assert result.rollback and result.verdict == "worse" and result.episodes == 400, result.reason
    # the truth: v0002 finds x first 15% of the time, v0001 85%
    assert result.current_mean == pytest.approx(0.15, abs=0.06)
    assert result.predecessor_mean == pytest.approx(0.85, abs=0.2)
    assert result.lower < -0.7 < result.upper < 0
    assert world.registry.current() == v1 and world.refreshed
    (event,) = world.store.model_events(limit=1)
    assert (event["event"], event["detail"]["to"], event["detail"]["episodes"]) == ("auto_rolled_back", v1, 400)


def test_one_episode_is_too_few_to_compare(world_factory: Any) -> None:
    world = world_factory(seed=13)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.promote(v2)
    world.serve(v2, 1, differ)
    config = world.config
    world.config = Config(state_dir=config.state_dir, rewards=config.rewards,
                          gate=GateConfig(confidence=0.95, rollback_min_decisions=2, rollback_margin=0.0))
    result = anyio.run(world.monitor().check)
    assert result.verdict == "too_few_decisions" and not result.rollback and result.episodes == 1
    assert "2 episodes are needed" in result.reason


def test_evaluate_on_the_window_reports_the_episode_estimators(world_factory: Any) -> None:
    world = world_factory(seed=14)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.promote(v2)
    world.serve(v2, 300, differ)
    now = time.time()
    found = evaluate_window(world.store, Models(world.registry), world.config, Evaluate(policies=["action:x", v1]), now)
    assert (found.unit, found.episodes, found.decisions, found.reward_model) == ("episode", 300, 600, v2)

    # the same window, snapshotted as the request does, judged by hand with reflexd.learning.episodes
    world.store.snapshot(world.tmp / "same.parquet", now, world.config, world.config.trainer.max_examples)
    rows = load_snapshot(str(world.tmp / "same.parquet"), SPEC)
    live, old = Scorer(*world.registry.load(v2)), Scorer(*world.registry.load(v1))
    scores, _ = live.score_batch(rows.context, rows.actions)
    q_hat = np.where(rows.mask, scores, 0.0)
    old_scores, old_spread = old.score_batch(rows.context, rows.actions)
    pis = {
        "action:x": np.tile([1.0, 0.0], (len(rows), 1)),
        v1: ev.model_probs(old_scores, old_spread, rows.mask, rows.agents, old.manifest.exploration_for,
                           old.manifest.training.experience),
    }
    number, gamma = ep.credited_episodes(rows, lambda agent: world.config.for_agent(agent).rewards)
    order = ep.grouped(number)
    number, gamma = number[order], gamma[order]
    step = ep.step_rewards(rows.reward[order], number, gamma)
    chosen, prob = rows.chosen[order], rows.prob[order]
    observed = ep.observed(step, number, gamma)
    assert found.rows[0].value.value == pytest.approx(observed.mean(), abs=1e-12, rel=0)
    for row in found.rows[1:]:
        pi = pis[row.policy][order]
        for name, want in {
            "ips": ep.pdis(pi, chosen, prob, step, number, gamma, world.config.gate.confidence),
            "snips": ep.wpdis(pi, chosen, prob, step, number, gamma, world.config.gate.confidence),
            "dr": ep.pddr(pi, chosen, prob, step, q_hat[order], number, gamma, world.config.gate.confidence),
        }.items():
            got = getattr(row, name)
            assert (got.value, got.stderr, got.lower, got.upper) == pytest.approx(
                (want.value, want.stderr, want.lower, want.upper), abs=1e-12, rel=0
            ), (row.policy, name)
        terms = ep.pddr_terms(pi, chosen, prob, step, q_hat[order], number, gamma)
        assert row.versus_logging.value == pytest.approx(ope.estimate(terms - observed).value, abs=1e-12, rel=0)
    # both policies worth 0.255 (x twice never differs: 0)
    assert found.rows[1].dr.lower <= 0.0 <= found.rows[1].dr.upper
    assert found.rows[2].dr.lower <= 0.255 <= found.rows[2].dr.upper

"""The rollback monitor judges the live model and its predecessor on the same decisions, on known truth.

Two models served in turn, each on a traffic mix of its own, with rewards drawn from a known
table: a mix that shifts while both are equally good is no reason to roll back (the old comparison
of each version's own mean reward would have), a truly worse live model is rolled back even when
its traffic flatters it (the old comparison would have kept it), and after an automatic rollback
the version rolled back to is never rolled back in turn until a version is promoted.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import anyio
import msgspec
import numpy as np
import pytest

from linear_models import register
from reflexd.config import Config, GateConfig, parse_config
from reflexd.deciding import exploring
from reflexd.features import FeatureSpec
from reflexd.registry import Registry
from reflexd.service import monitor as monitor_module
from reflexd.service.monitor import Monitor, judge
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, Outcome

SPEC = FeatureSpec(context_dim=16, action_dim=16, seed=0)
EXPLORE = {"strategy": "epsilon_greedy", "epsilon": 0.3, "epsilon_min": 0.01}
GATE = GateConfig(confidence=0.95, rollback_min_decisions=200, rollback_margin=0.0)

# a model by the action it prefers: its scores rank that one first
PREFERS = {
    "x": {"x": 0.9, "y": 0.2, "z": 0.5},
    "y": {"x": 0.2, "y": 0.9, "z": 0.5},
    "z": {"x": 0.2, "y": 0.5, "z": 0.9},
}


class World:
    """A store and a registry; models promoted in turn, each making decisions with exact propensities."""

    def __init__(self, tmp: Path, reward: Callable[[str, str], float], actions: list[str], seed: int = 0) -> None:
        self.tmp = tmp
        self.reward = reward
        self.actions = actions
        self.rng = np.random.default_rng(seed)
        self.config = Config(
            state_dir=str(tmp), rewards=parse_config("rewards: {wait_window: 1, default: 0.0}").rewards, gate=GATE
        )
        self.registry = Registry(tmp / "models")
        self.store = Store(tmp / "db.duckdb")
        self.refreshed: list[bool] = []
        self.served = SimpleNamespace(refresh=lambda: self.refreshed.append(True))  # stands in for the ModelSource
        self.prefers: dict[str, str] = {}  # version → the action its scores rank first

    def promote(self, version: str) -> None:
        self.registry.promote(version)
        self.store.record_model_event(version, "promoted", {"reason": "test"}, time.time())

    def serve(self, version: str, n: int, easy: float, probes: int = 0) -> None:
        """``n`` decisions by ``version``, a share ``easy`` of them on easy traffic, and ``probes``
        probing decisions that never get an outcome (the default reward, 0)."""
        cfg = self.registry.manifest(version).exploration
        best = self.actions.index(self.prefers[version])
        events: list[Any] = []
        for i in range(n + probes):
            segment = "probe" if i >= n else ("easy" if self.rng.random() < easy else "hard")
            p = exploring.greedy(len(self.actions), best, exploring.epsilon_at(cfg, 100))
            k = int(self.rng.choice(len(self.actions), p=p))
            decision = Decision(
                id=f"{version}-{len(events)}-{self.rng.integers(1 << 62)}", agent="probe" if segment == "probe" else "bot",
                context={"segment": segment}, actions=self.actions, chosen=self.actions[k], prob=p[k],
                model_version=version, ts=time.time() - 20,
            )
            events.append(decision)
            if segment != "probe":
                events.append(Outcome(decision_id=decision.id, reward=float(self.rng.random() < self.reward(segment, self.actions[k]))))
        self.store.write(events, received_at=time.time() - 10)

    def add(self, prefers: str) -> str:
        """Register a model preferring ``prefers`` as the next version."""
        version = register(self.registry, self.tmp, SPEC, PREFERS[prefers], EXPLORE).version
        self.prefers[version] = prefers
        return version

    def monitor(self) -> Monitor:
        return Monitor(lambda: self.config, self.registry, self.store, self.served)  # type: ignore[arg-type]

    def old_rule(self, current: str, predecessor: str) -> Any:
        """What the monitor did before: each version's own mean live reward, Welch's interval."""
        stats = self.store.live_rewards([current, predecessor], time.time(), self.config)
        return judge(current, stats.get(current), predecessor, stats.get(predecessor), GATE)


@pytest.fixture
def world_factory(tmp_path: Path) -> Any:
    made: list[World] = []

    def make(reward: Callable[[str, str], float], actions: list[str], seed: int = 0) -> World:
        world = World(tmp_path / f"w{len(made)}", reward, actions, seed)
        made.append(world)
        return world

    yield make
    for world in made:
        world.store.close()


def test_a_shifting_traffic_mix_with_equally_good_models_is_no_reason_to_roll_back(world_factory: Any) -> None:
    # the reward depends on the traffic only: easy requests pay 0.9, hard ones 0.2, whatever the action;
    # so every policy is worth the same on any traffic, and v0002 is exactly as good as v0001
    world = world_factory(lambda segment, action: 0.9 if segment == "easy" else 0.2, ["x", "y"], seed=1)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.serve(v1, 600, easy=0.9)
    world.promote(v2)
    # then the mix shifts to hard requests, and a burst of probing decides gets the default reward
    world.serve(v2, 600, easy=0.1, probes=200)

    # the old rule compares v0002's mean (about 0.27·600/800 ≈ 0.2) with v0001's (about 0.83) from
    # another period and mix, and would roll a model as good as its predecessor back
    old = world.old_rule(v2, v1)
    assert old.rollback and old.upper < -0.4, old.reason

    monitor = world.monitor()
    result = anyio.run(monitor.check)
    assert result.verdict == "not_worse" and not result.rollback, result.reason
    assert world.registry.current() == v2 and not world.refreshed
    # both judged on v0002's 800 decisions, probes included: they moved both values alike
    assert (result.current_decisions, result.predecessor_decisions, result.estimator) == (800, 800, "dr")
    assert result.lower < 0 < result.upper
    # v0002 judged on its own decisions is worth about what it earned (0.9·0.1 + 0.2·0.9 = 0.27 on 600,
    # 0 on 200 probes: 0.2); v0001 on them the same, within the interval's noise
    assert result.observed_mean == pytest.approx(result.current_mean, abs=0.03)
    assert result.current_mean == pytest.approx(0.2, abs=0.03) and result.predecessor_mean == pytest.approx(0.2, abs=0.1)
    assert f"on {v2}'s 800 newest matured decisions (dr)" in result.reason


def test_a_truly_worse_live_model_is_rolled_back_even_on_flattering_traffic(world_factory: Any) -> None:
    # x is the better action on every request (by 0.4); easy requests pay more whatever is chosen
    table = {("easy", "x"): 0.9, ("easy", "y"): 0.5, ("hard", "x"): 0.5, ("hard", "y"): 0.1}
    world = world_factory(lambda segment, action: table[segment, action], ["x", "y"], seed=2)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.serve(v1, 1000, easy=0.1)  # the good model served hard traffic
    world.promote(v2)
    world.serve(v2, 1000, easy=0.9)  # the worse one easy traffic

    # the old rule sees v0002 earn about as much or more (0.56 against 0.44 in expectation) and keeps it
    old = world.old_rule(v2, v1)
    assert not old.rollback, old.reason

    monitor = world.monitor()
    on_loop = threading.current_thread()
    threads: list[threading.Thread] = []
    compare = monitor._compare

    def recording(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return compare(*args)

    monitor._compare = recording  # type: ignore[method-assign]
    result = anyio.run(monitor.check)
    assert threads and all(t is not on_loop for t in threads)  # snapshot and scoring off the event loop

    assert result.rollback and result.verdict == "worse", result.reason
    # the truth on v0002's traffic (90% easy, ε-greedy 0.3 over two actions: 0.85 on the preferred one):
    # v0002 0.9·(0.85·0.5 + 0.15·0.9) + 0.1·(0.85·0.1 + 0.15·0.5) = 0.52, v0001 0.9·0.84 + 0.1·0.44 = 0.80
    assert result.current_mean == pytest.approx(0.52, abs=0.06)
    assert result.predecessor_mean == pytest.approx(0.80, abs=0.1)
    assert result.lower < -0.28 < result.upper < 0
    assert world.registry.current() == v1 and world.refreshed
    (event,) = world.store.model_events(limit=1)
    assert (event["version"], event["event"], event["detail"]["to"]) == (v2, "auto_rolled_back", v1)


def test_no_cascade_the_version_rolled_back_to_is_held_until_a_promotion(world_factory: Any) -> None:
    table = {"x": 0.9, "z": 0.5, "y": 0.1}
    world = world_factory(lambda segment, action: table[action], ["x", "y", "z"], seed=3)
    v1, v2, v3 = world.add("x"), world.add("z"), world.add("y")  # good, middling, bad
    for version in (v1, v2, v3):
        world.promote(version)
        world.serve(version, 800, easy=0.5)

    monitor = world.monitor()
    first = anyio.run(monitor.check)
    assert first.rollback and (first.current, first.predecessor) == (v3, v2)
    assert world.registry.current() == v2

    # v0002 is worse than v0001 on its own decisions too, but it is where the rollback went: held
    again = anyio.run(monitor.check)
    assert (again.current, again.predecessor) == (v2, v1)
    assert again.verdict == "held" and not again.rollback and again.held and again.upper < 0, again.reason
    assert "not rolled back automatically until a version is promoted" in again.reason
    assert world.registry.current() == v2 and monitor.rollbacks == 1

    # a restarted daemon's monitor holds it too: the store's model events say so
    restarted = world.monitor()
    assert anyio.run(restarted.check).verdict == "held" and world.registry.current() == v2

    # a new version is promoted: the hold is over, and that version is judged as any other
    v4 = world.add("y")
    world.promote(v4)
    world.serve(v4, 800, easy=0.5)
    fourth = anyio.run(restarted.check)
    assert fourth.rollback and (fourth.current, fourth.predecessor) == (v4, v2) and not fourth.held
    assert world.registry.current() == v2
    assert anyio.run(restarted.check).verdict == "held"  # and v0002 is held again
    assert [e["event"] for e in world.store.model_events() if e["event"] == "auto_rolled_back"] == ["auto_rolled_back"] * 2


def test_with_auto_rollback_off_a_held_version_is_still_reported(world_factory: Any) -> None:
    table = {"x": 0.9, "y": 0.1}
    world = world_factory(lambda segment, action: table[action], ["x", "y"], seed=4)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.promote(v2)
    world.serve(v2, 600, easy=0.5)
    world.config = msgspec.structs.replace(world.config, gate=msgspec.structs.replace(GATE, auto_rollback=False))
    monitor = world.monitor()
    result = anyio.run(monitor.check)
    assert result.rollback and result.verdict == "worse" and world.registry.current() == v2
    assert monitor.as_dict()["last"]["estimator"] == "dr"


def test_a_check_with_nothing_new_reuses_its_comparison(world_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world = world_factory(lambda segment, action: 0.5, ["x", "y"], seed=5)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.promote(v2)
    world.serve(v2, 300, easy=0.5)
    calls: list[int] = []
    real = monitor_module.same_window

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(monitor_module, "same_window", counting)
    monitor = world.monitor()
    first = anyio.run(monitor.check)
    second = anyio.run(monitor.check)
    assert len(calls) == 1 and first.reason == second.reason and second.at >= first.at
    world.serve(v2, 10, easy=0.5)  # newly matured decisions: compared afresh
    anyio.run(monitor.check)
    assert len(calls) == 2


def test_too_few_decisions_of_the_live_model_never_roll_back(world_factory: Any) -> None:
    world = world_factory(lambda segment, action: 1.0 if action == "x" else 0.0, ["x", "y"], seed=6)
    v1, v2 = world.add("x"), world.add("y")
    world.promote(v1)
    world.serve(v1, 500, easy=0.5)
    world.promote(v2)
    world.serve(v2, 150, easy=0.5)
    result = anyio.run(world.monitor().check)
    assert result.verdict == "too_few_decisions" and not result.rollback
    assert result.reason == f"{v2} has 150 matured decisions; 200 are needed to compare it with {v1} on them"

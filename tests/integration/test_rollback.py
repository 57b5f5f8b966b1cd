"""Automatic rollback: the rule on synthetic numbers, live rewards from the store, the monitor
against a real store and registry, and end to end a model made to be bad, rolled back by the
daemon while a real agent plays with it."""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import duckdb
import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

import onnx
from conftest import DaemonProcess, line_registry, wait_for
from linear_models import register
from onnx import helper
from reflexd.client.policy import Policy
from reflexd.config import Config, GateConfig, OnlineConfig, parse_config
from reflexd.errors import ModelIntegrityError, PointerMoved
from reflexd.features import FeatureSpec
from reflexd.registry import CURRENT_FILE, HISTORY_FILE, Registry
from reflexd.service.monitor import Monitor, judge
from reflexd.service.store import RewardStats, Store
from reflexd.wire.protocol import Decision, ModelsRequest, Outcome, Promote, Train

GATE = GateConfig(confidence=0.95, rollback_min_decisions=100, rollback_margin=0.0)


def stats(values: np.ndarray) -> RewardStats:
    return RewardStats(count=len(values), mean=float(values.mean()), variance=float(values.var(ddof=1)))


def bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.float64)


# ---- the rule -------------------------------------------------------------------------------


def test_clearly_worse_is_rolled_back() -> None:
    c = judge("v2", stats(bernoulli(0.3, 500, 1)), "v1", stats(bernoulli(0.7, 500, 2)), GATE, at=5.0)
    assert c.rollback and c.verdict == "worse"
    assert c.upper < 0 and c.lower < c.difference < c.upper
    assert c.difference == pytest.approx(c.current_mean - c.predecessor_mean)
    assert (c.current, c.predecessor, c.current_decisions, c.predecessor_decisions, c.at) == ("v2", "v1", 500, 500, 5.0)
    assert "roll back to v1" in c.reason


def test_a_difference_within_the_noise_is_kept() -> None:
    # the same true reward; and a small true gap that 150 decisions cannot resolve
    same = judge("v2", stats(bernoulli(0.5, 400, 3)), "v1", stats(bernoulli(0.5, 400, 4)), GATE)
    assert not same.rollback and same.verdict == "not_worse"
    close = judge(
        "v2",
        RewardStats(count=150, mean=0.47, variance=0.25),
        "v1",
        RewardStats(count=150, mean=0.50, variance=0.25),
        GATE,
    )
    assert close.difference == pytest.approx(-0.03)
    assert close.upper > 0 and not close.rollback


def test_welch_interval_uses_each_sides_variance_and_count() -> None:
    cur = RewardStats(count=200, mean=0.40, variance=0.09)
    prev = RewardStats(count=800, mean=0.50, variance=0.01)
    c = judge("v2", cur, "v1", prev, GATE)
    half = 1.959963984540054 * np.sqrt(0.09 / 200 + 0.01 / 800)
    assert (c.lower, c.upper) == (pytest.approx(-0.1 - half), pytest.approx(-0.1 + half))
    assert c.rollback


def test_too_few_decisions_never_roll_back() -> None:
    worse = RewardStats(count=99, mean=0.0, variance=0.01)
    better = RewardStats(count=5000, mean=1.0, variance=0.01)
    c = judge("v2", worse, "v1", better, GATE)
    assert not c.rollback and c.verdict == "too_few_decisions" and c.difference is None
    assert "100 each" in c.reason
    assert not judge("v2", better, "v1", None, GATE).rollback  # the predecessor made none
    assert judge("v2", None, "v1", better, GATE).current_mean is None


def test_the_margin_tolerates_a_small_loss_and_a_better_model_stays() -> None:
    cur = RewardStats(count=10_000, mean=0.48, variance=0.25)
    prev = RewardStats(count=10_000, mean=0.50, variance=0.25)
    assert judge("v2", cur, "v1", prev, GATE).rollback  # clearly 0.02 worse
    assert not judge("v2", cur, "v1", prev, msgspec.structs.replace(GATE, rollback_margin=0.05)).rollback
    assert not judge("v2", prev, "v1", cur, GATE).rollback


# ---- live rewards in the store ----------------------------------------------------------------


def test_live_rewards_join_exactly_like_the_training_snapshot(tmp_path: Path) -> None:
    config = parse_config(
        "rewards: {wait_window: 10, default: -1.0, aggregation: sum}\n"
        "agents: {slow: {rewards: {wait_window: 100, aggregation: max}}}\n"
    )
    rng = random.Random(0)
    with Store(tmp_path / "db.duckdb") as store:
        for start in (50.0, 100.0):  # at now=180, "slow" decisions from 100 have not matured
            ids = [f"d{start:g}-{i}" for i in range(40)]
            store.write(
                [
                    Decision(id=id, agent="slow" if i % 3 == 0 else "fast", context={"i": i}, actions=["a", "b"],
                             chosen="a", prob=0.5, model_version=["v0001", "v0002", None, "v0009"][i % 4])
                    for i, id in enumerate(ids)
                ],
                received_at=start,
            )
            # two outcomes in the window (some decisions get none: the default reward), one late for "fast"
            for delay, reward in ((1.0, None), (5.0, None), (50.0, 50.0)):
                store.write(
                    [Outcome(decision_id=id, reward=rng.random() if reward is None else reward)
                     for i, id in enumerate(ids) if i % 5 or reward is not None],
                    received_at=start + delay,
                )
        now = 180.0
        live = store.live_rewards(["v0001", "v0002", "v0003"], now, config)
        store.snapshot(tmp_path / "snap.parquet", now, config, max_rows=1000)

    rows = pq.read_table(tmp_path / "snap.parquet").to_pylist()
    assert set(live) == {"v0001", "v0002"}  # v0003 made no decision; v0009 and None were not asked for
    for version, got in live.items():
        rewards = np.array([r["reward"] for r in rows if r["model_version"] == version])
        assert got.count == len(rewards) > 5
        assert got.mean == pytest.approx(rewards.mean())
        assert got.variance == pytest.approx(rewards.var(ddof=1))


# ---- the monitor against a real store and registry -----------------------------------------


def identity_model(path: Path, name: str) -> Path:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], name, [x], [y])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def monitor_world(
    tmp_path: Path, auto_rollback: bool, bad_mean: float, first_scheme: str | None = None
) -> tuple[Monitor, Any]:
    """v0001 then v0002 live, with 80 decisions each; ``first_scheme`` hashes v0001 another way,
    as a model left from before an upgrade.

    The monitor judges both on v0002's decisions, so each model is a real one with a preference:
    v0001 ranks x first and v0002 y, both exploring (epsilon-greedy, 0.5) with the exact probability
    logged; x pays 0.8 of the time, y ``bad_mean`` of the time.
    """
    config = Config(
        state_dir=str(tmp_path),
        rewards=parse_config("rewards: {wait_window: 1}").rewards,
        gate=GateConfig(auto_rollback=auto_rollback, rollback_min_decisions=50),
    )
    registry = Registry(tmp_path / "models")
    spec = FeatureSpec(context_dim=4, action_dim=8, seed=0)
    explore = {"strategy": "epsilon_greedy", "epsilon": 0.5, "epsilon_min": 0.01}
    prefers = {"v0001": "x", "v0002": "y"}
    for v in ("v0001", "v0002"):
        features: dict[str, Any] = msgspec.to_builtins(spec)
        if first_scheme is not None and v == "v0001":
            features["scheme"] = first_scheme
        scores = {"x": 0.9, "y": 0.2} if prefers[v] == "x" else {"x": 0.2, "y": 0.9}
        register(registry, tmp_path, spec, scores, explore, features=features)
    if first_scheme is not None:  # promoted by an older reflexd, which wrote the pointer itself
        (registry.root / HISTORY_FILE).write_text('["v0001"]')
        (registry.root / CURRENT_FILE).write_text("v0001\n")
    else:
        registry.promote("v0001")
    registry.promote("v0002")
    store = Store(tmp_path / "db.duckdb")
    rng = np.random.default_rng(7)
    pays = {"x": 0.8, "y": bad_mean}
    for version in ("v0001", "v0002"):
        probs = {prefers[version]: 0.75, ("y" if prefers[version] == "x" else "x"): 0.25}
        chosen = [str(rng.choice(["x", "y"], p=[probs["x"], probs["y"]])) for _ in range(80)]
        decisions = [Decision(id=f"{version}-{i}", agent="a", context={}, actions=["x", "y"], chosen=c, prob=probs[c],
                              model_version=version) for i, c in enumerate(chosen)]
        outcomes = [Outcome(decision_id=d.id, reward=float(rng.random() < pays[d.chosen])) for d in decisions]
        store.write([*decisions, *outcomes], received_at=time.time() - 10)
    refreshed: list[bool] = []
    models = SimpleNamespace(refresh=lambda: refreshed.append(True))  # stands in for the ModelSource
    return Monitor(lambda: config, registry, store, models), refreshed


def test_monitor_rolls_back_a_worse_model_and_records_why(tmp_path: Path) -> None:
    monitor, refreshed = monitor_world(tmp_path, auto_rollback=True, bad_mean=0.1)
    try:
        result = anyio.run(monitor.check)
        assert result.rollback and result.current == "v0002" and result.predecessor == "v0001"
        assert monitor.registry.current() == "v0001" and refreshed
        events = monitor.store.model_events()
        assert [(e["version"], e["event"]) for e in events] == [("v0002", "auto_rolled_back")]
        detail = events[0]["detail"]
        assert (detail["from"], detail["to"], detail["current_decisions"]) == ("v0002", "v0001", 80)
        assert detail["upper"] < 0 and "roll back to v0001" in detail["reason"]
        status = monitor.as_dict()
        assert status["rollbacks"] == 1 and status["last_rollback"]["to"] == "v0001"

        # now v0001 is live with nothing before it: nothing more to compare
        again = anyio.run(monitor.check)
        assert again.verdict == "no_predecessor" and not again.rollback
        assert monitor.registry.current() == "v0001"
    finally:
        monitor.store.close()


def test_monitor_never_rolls_back_to_a_model_agents_would_refuse(tmp_path: Path) -> None:
    old = "crc32-signed-log1p-v1"
    monitor, refreshed = monitor_world(tmp_path, auto_rollback=True, bad_mean=0.1, first_scheme=old)
    try:
        with pytest.raises(ModelIntegrityError, match="v0001 refused: its features were hashed with scheme"):
            anyio.run(monitor.check)
        assert monitor.registry.current() == "v0002" and not refreshed
        assert monitor.store.model_events() == [] and monitor.rollbacks == 0
    finally:
        monitor.store.close()


def test_a_check_failing_the_same_way_each_time_is_logged_once_and_shown_in_status(tmp_path: Path) -> None:
    monitor, _ = monitor_world(tmp_path, auto_rollback=True, bad_mean=0.1, first_scheme="crc32-signed-log1p-v1")
    try:
        with capture_logs() as logs:
            for _ in range(3):
                anyio.run(monitor.check_reporting)
        failed = [entry for entry in logs if entry["event"] == "rollback check failed"]
        assert len(failed) == 1 and "v0001 refused" in failed[0]["error"]
        assert monitor.checks == 3 and "v0001 refused" in monitor.as_dict()["last_error"]
        assert monitor.registry.current() == "v0002"
    finally:
        monitor.store.close()


def test_monitor_only_reports_when_auto_rollback_is_off(tmp_path: Path) -> None:
    monitor, refreshed = monitor_world(tmp_path, auto_rollback=False, bad_mean=0.1)
    try:
        result = anyio.run(monitor.check)
        assert result.rollback and result.verdict == "worse"
        assert monitor.registry.current() == "v0002" and not refreshed
        assert monitor.store.model_events() == []
        assert monitor.as_dict()["rollbacks"] == 0 and monitor.as_dict()["last"]["verdict"] == "worse"
    finally:
        monitor.store.close()


def test_monitor_keeps_a_model_as_good_as_its_predecessor(tmp_path: Path) -> None:
    monitor, _ = monitor_world(tmp_path, auto_rollback=True, bad_mean=0.8)
    try:
        assert anyio.run(monitor.check).verdict == "not_worse"
        assert monitor.registry.current() == "v0002"
    finally:
        monitor.store.close()


def test_rollback_refuses_when_the_pointer_moved(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models")
    for v in ("v0001", "v0002", "v0003"):
        registry.add(identity_model(tmp_path / f"{v}.onnx", v), {
            "parent": None, "created": 1.0, "learner": "mlp", "features": {"context_dim": 2, "action_dim": 2, "seed": 0},
            "exploration": {},
        })
    registry.promote("v0001")
    registry.promote("v0002")
    assert registry.predecessor() == ("v0002", "v0001")
    registry.promote("v0003")  # promoted while a check about v0002 was running
    with pytest.raises(PointerMoved, match="v0003, no longer v0002"):
        registry.rollback(expect="v0002")
    assert registry.current() == "v0003"
    assert registry.rollback(expect="v0003") == "v0002"


# ---- end to end: a model made to be bad -------------------------------------------------------

BEST = {"a": "x", "b": "y", "c": "z"}


def play(policy: Policy, rng: random.Random, n: int) -> float:
    """``n`` decisions with real rewards (the best action pays 0.8 of the time, others 0.2)."""
    total = 0.0
    for _ in range(n):
        kind = rng.choice(sorted(BEST))
        choice = policy.decide({"kind": kind, "noise": rng.random()}, ["x", "y", "z"])
        reward = float(rng.random() < (0.8 if choice.action == BEST[kind] else 0.2))
        policy.reward(choice.id, reward)
        total += reward
    return total / n


def inverted(src: Path, dest: Path) -> Path:
    """The model at ``src`` with its scores negated: it ranks the best action last.

    Same contract (inputs context [B, Dc] and actions [B, A, Da], outputs scores and spread [B, A]);
    every use of the original scores inside the graph (the spread is computed from them) keeps
    the original, and a Neg node makes the new output.
    """
    model = onnx.load(str(src))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["scores_good" if o == "scores" else o for o in node.output]
        node.input[:] = ["scores_good" if i == "scores" else i for i in node.input]
    graph.node.append(helper.make_node("Neg", ["scores_good"], ["scores"], name="make_it_bad"))
    onnx.checker.check_model(model)
    dest.write_bytes(model.SerializeToString())
    return dest


@pytest.mark.e2e
@pytest.mark.slow
def test_a_model_made_to_be_bad_is_rolled_back_automatically(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory(
        {
            "rewards": {"wait_window": 0.3},
            "trainer": {"epochs": 10, "ensemble": 2},  # trains only when asked
            "exploration": {"strategy": "epsilon_greedy", "epsilon": 0.2, "epsilon_min": 0.05},
            "gate": {"min_holdout": 50, "rollback_check_interval": 0.3, "rollback_min_decisions": 150},
        }
    )
    rng = random.Random(11)
    # the batch path alone: the online head would make the logging policy too good for this first model
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=12, online=OnlineConfig(enabled=False)) as policy:
        play(policy, rng, 1500)
        assert policy.flush(60)
        wait_for(lambda: d.status().experience["new_since_training"] >= 1500, 30, "matured experience")
        done = d.request(Train(), timeout=300)
        assert done.message.startswith("promoted v0001"), done.message
        wait_for(lambda: policy.model_version == "v0001", 30, "the client to load v0001")
        good = play(policy, rng, 300)
        assert policy.flush(60)

        # a model made to be bad, registered as the next version and promoted by the operator
        registry = line_registry(d, "bot")
        manifest = registry.manifest("v0001")
        bad_file = inverted(registry.root / "v0001" / "policy.onnx", d.root / "bad.onnx")
        fields = {**msgspec.structs.asdict(manifest), "parent": "v0001", "created": time.time(), "gate": None}
        assert registry.add(bad_file, fields).version == "v0002"
        d.request(Promote(version="v0002"))
        wait_for(lambda: policy.model_version == "v0002", 30, "the client to load v0002")
        monitor = d.status().monitor
        assert monitor["last"] is None or not monitor["last"]["rollback"]

        # the monitor judges v0002 against v0001 on v0002's own decisions: v0001's choices are
        # among them only as v0002 explores (1 in 15), so it takes hundreds (800 in a trial) to find it out
        def rolled() -> bool:
            return d.request(ModelsRequest()).current == "v0001"

        # the agent goes on deciding until the monitor has seen enough: only what v0002 decided alone counts
        earned = []
        deadline = time.monotonic() + 300
        while not rolled():
            assert time.monotonic() < deadline, f"no automatic rollback\n{d.status().monitor}\n{d.log()}"
            before = policy.model_version
            chunk = play(policy, rng, 100)
            assert policy.flush(60)
            if before == policy.model_version == "v0002":
                earned.append(chunk)
        bad = sum(earned) / len(earned)
        wait_for(lambda: policy.model_version == "v0001", 30, "the client to swap back to v0001")
        after = play(policy, rng, 300)
        assert policy.flush(60)

    assert bad < good - 0.2 and after > bad + 0.2, (good, bad, after)

    status = d.status()
    assert status.model["version"] == "v0001"
    mon = status.monitor
    assert mon["rollbacks"] == 1 and mon["auto_rollback"] is True
    rolled = mon["last_rollback"]
    assert (rolled["from"], rolled["to"]) == ("v0002", "v0001")
    assert rolled["current_decisions"] >= 150 and rolled["predecessor_decisions"] >= 150
    assert rolled["upper"] < 0 and rolled["current_mean"] < rolled["predecessor_mean"]
    assert '"model rolled back automatically"' in d.log_path.read_text()

    assert d.stop() == 0
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        events = con.execute('SELECT version, event, CAST(detail AS VARCHAR) FROM models ORDER BY "at"').fetchall()
    assert [(v, e) for v, e, _ in events] == [
        ("v0001", "registered"), ("v0001", "promoted"), ("v0002", "promoted"), ("v0002", "auto_rolled_back")
    ]
    detail = msgspec.json.decode(events[-1][2])
    assert detail["to"] == "v0001" and "roll back to v0001" in detail["reason"]

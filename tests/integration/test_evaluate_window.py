"""``evaluate`` against a real store and registry: the window's filters, models loaded and checked
from the registry, the snapshot removed after, and the work done off the event loop."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from linear_models import register
from reflexd.config import Config, GateConfig, LearningConfig, parse_config
from reflexd.deciding.scoring import Scorer
from reflexd.errors import EvaluationError, ModelIntegrityError, ModelNotFound, PolicySpecError
from reflexd.features import FeatureSpec
from reflexd.learning import ope
from reflexd.learning.dataset import from_records
from reflexd.learning.gate import target_probs
from reflexd.registry import Registry
from reflexd.service import daemon as daemon_module
from reflexd.service.evaluation import WINDOWS_DIR, Models, evaluate_window
from reflexd.service.store import Store
from reflexd.wire.framing import MSGPACK, decode_reply, encode_frame
from reflexd.wire.protocol import Decision, Evaluate, Evaluation, Outcome

SPEC = FeatureSpec(context_dim=16, action_dim=16, seed=0)
T0 = 1_700_000_000.0  # the decisions' own time: an hour of them, one every 3.6 s


def logged(n: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Uniformly random decisions between a and b by two agents; b pays 0.7, a 0.3 (known truth)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        chosen = "ab"[int(rng.integers(2))]
        rows.append(
            {
                "id": f"d{i:05d}", "agent": "left" if i % 2 else "right", "ts": T0 + 3.6 * i,
                "context": {"i": i % 7}, "actions": ["a", "b"], "chosen": chosen, "prob": 0.5,
                "reward": float(rng.random() < (0.7 if chosen == "b" else 0.3)),
            }
        )
    return rows


@pytest.fixture
def world(tmp_path: Path) -> Any:
    config = Config(
        state_dir=str(tmp_path), rewards=parse_config("rewards: {wait_window: 1, default: 0.0}").rewards,
        gate=GateConfig(estimator="dr", confidence=0.9),
        learning=LearningConfig(scope="shared"),  # one model line: the registry at models/
    )
    store = Store(tmp_path / "db.duckdb")
    rows = logged()
    events: list[Any] = []
    for r in rows:
        events.append(Decision(id=r["id"], agent=r["agent"], context=r["context"], actions=r["actions"],
                               chosen=r["chosen"], prob=r["prob"], ts=r["ts"]))
        events.append(Outcome(decision_id=r["id"], reward=r["reward"]))
    store.write(events, received_at=time.time() - 10)
    registry = Registry(tmp_path / "models")
    good = register(registry, tmp_path, SPEC, {"a": 0.3, "b": 0.7}, {"strategy": "epsilon_greedy", "epsilon": 0.1}).version
    bad = register(registry, tmp_path, SPEC, {"a": 0.7, "b": 0.3}, {"strategy": "epsilon_greedy", "epsilon": 0.1}).version
    registry.promote(good)
    yield config, store, registry, rows, (good, bad)
    store.close()


def evaluate(world: Any, **fields: Any) -> Evaluation:
    config, store, registry, _, _ = world
    return evaluate_window(store, Models(registry), config, Evaluate(**fields), time.time())


def test_the_window_is_narrowed_by_agent_and_by_the_decisions_own_time(world: Any) -> None:
    config, _, _, rows, _ = world
    since, until = T0 + 600, T0 + 1800  # from the 167th decision (i·3.6 ≥ 600), before the 500th
    found = evaluate(world, policies=["action:b"], agent="left", since=since, until=until)
    mine = [r for r in rows if r["agent"] == "left" and since <= r["ts"] < until]
    assert found.decisions == len(mine) == 167 and found.dropped == 0
    assert (found.agent, found.since, found.until) == ("left", since, until)

    batch = from_records([r | {"received_at": r["ts"]} for r in mine], SPEC)
    pi = np.zeros(batch.mask.shape)
    pi[:, 1] = 1.0
    args = (batch.chosen, batch.prob, batch.reward)
    row = found.rows[1]
    for name, want in (("ips", ope.ips(pi, *args, 0.9)), ("snips", ope.snips(pi, *args, 0.9))):
        got = getattr(row, name)
        assert (got.value, got.lower, got.upper) == pytest.approx((want.value, want.lower, want.upper), abs=1e-12)
    assert found.rows[0].value.value == pytest.approx(batch.reward.mean(), abs=1e-12)
    assert not list((config.state_path / WINDOWS_DIR).iterdir())  # the window's snapshot is gone

    assert evaluate(world, policies=["action:b"]).decisions == 1000
    with pytest.raises(EvaluationError, match="the window holds 0 usable matured decisions"):
        evaluate(world, policies=["action:b"], agent="nobody")


def test_models_are_loaded_from_the_registry_and_dr_scores_with_the_live_one(world: Any) -> None:
    _, _, registry, rows, (good, bad) = world
    found = evaluate(world, policies=[good, bad, f"{good}@epsilon=0.5"])
    assert found.reward_model == good and found.estimator == "dr" and found.confidence == 0.9
    base, g, b, explored = found.rows
    assert (g.version, b.version, explored.version) == (good, bad, good)
    # the truth: the good model (b with 0.95) is worth 0.68, the bad one 0.32, uniform 0.5
    assert g.value.value == pytest.approx(0.68, abs=0.05) and b.value.value == pytest.approx(0.32, abs=0.05)
    assert g.value.lower > base.value.upper > base.value.lower > b.value.upper
    assert explored.value.value == pytest.approx(0.6, abs=0.05) and explored.exploration["epsilon"] == 0.5
    assert g.agreement == pytest.approx(np.mean([r["chosen"] == "b" for r in rows]))

    # the same numbers computed directly: the live model's scores as q_hat, its deployed policy
    manifest, model = registry.load(good)
    scorer = Scorer(manifest, model)
    batch = from_records([r | {"received_at": r["ts"]} for r in rows], SPEC)
    scores, spread = scorer.score_batch(batch.context, batch.actions)
    pi = target_probs(manifest.exploration, scores, spread, batch.mask, manifest.training.experience)
    dr = ope.dr(pi, batch.chosen, batch.prob, batch.reward, np.where(batch.mask, scores, 0.0), 0.9)
    assert (g.dr.value, g.dr.lower, g.dr.upper) == pytest.approx((dr.value, dr.lower, dr.upper), abs=1e-9)

    # another reward model: DR changes, IPS does not
    other = evaluate(world, policies=[good], reward_model=bad)
    assert other.reward_model == bad and other.rows[1].ips == g.ips and other.rows[1].dr != g.dr


def test_a_model_that_fails_its_check_or_does_not_exist_is_refused(world: Any) -> None:
    _, _, registry, _, (good, bad) = world
    with pytest.raises(ModelNotFound):
        evaluate(world, policies=["v0042"])
    with pytest.raises(PolicySpecError, match="exploration temperature: Expected `float` > 0"):
        evaluate(world, policies=[f"{bad}@strategy=softmax,temperature=0"])
    path = registry.root / bad / "policy.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match=f"model {bad} refused: sha256"):
        evaluate(world, policies=[bad])


def test_discovery_through_the_window(world: Any) -> None:
    _, _, _, _, (good, _) = world
    found = evaluate(world, policies=[], discover=True)
    rec = found.discovery
    assert rec is not None and rec.model == good and rec.policy is not None
    assert rec.value.lower > found.rows[0].value.lower and len(found.rows) == 1


def test_the_daemon_evaluates_in_a_worker_thread(world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config, store, registry, _, (good, _) = world
    daemon = daemon_module.Daemon(config)
    daemon.store = store
    daemon.lines.one(None, "evaluate").models.refresh()
    seen: list[threading.Thread] = []
    real = daemon_module.evaluate_window

    def recording(*args: Any) -> Any:
        seen.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(daemon_module, "evaluate_window", recording)
    loop_thread = threading.current_thread()
    reply = anyio.run(daemon.request, Evaluate(policies=["live", "action:a"], req=7))
    assert seen and seen[0] is not loop_thread
    assert isinstance(reply, Evaluation) and reply.req == 7 and reply.rows[1].version == good
    # and it crosses the wire whole
    frame = encode_frame(reply, MSGPACK)
    assert decode_reply(frame[4:], MSGPACK) == reply

"""Serving: a real ONNX model through the registry, ModelSource hot swaps, Scorer and Chooser."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

import onnx
from onnx import TensorProto, helper, numpy_helper
from reflexd.config import ExplorationConfig, OnlineConfig
from reflexd.deciding import exploring
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.online import OnlineHead
from reflexd.deciding.scoring import BATCH_ROWS, ModelSource
from reflexd.errors import ModelIntegrityError
from reflexd.features import FeatureSpec, Hasher
from reflexd.manifest import MODEL_FILE, Manifest
from reflexd.registry import CURRENT_FILE, Registry

DC, DA = 16, 8
SPEC = FeatureSpec(context_dim=DC, action_dim=DA, seed=3)
ACTIONS: list[Any] = ["small", "medium", {"id": "large", "features": {"cost": 3.0, "family": "gpt"}}]
CTX = {"task": "summarise the report", "lang": "en", "tokens": 800, "user": {"tier": "gold"}}


class Weights:
    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=DA).astype(np.float32)  # per-action weights
        self.v = rng.normal(size=(DC, 1)).astype(np.float32)  # context weights
        self.u = rng.normal(size=DA).astype(np.float32)  # spread weights

    def expected(self, ctx: np.ndarray, acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """scores = actions·w + context·v (broadcast over actions); spread = |actions·u|."""
        scores = acts @ self.w + ctx @ self.v
        spread = np.abs(acts @ self.u)
        return scores, spread


def build_model(path: Path, weights: Weights) -> Path:
    """A real ONNX graph with the serving contract: context [B, Dc], actions [B, A, Da] → scores, spread."""
    context = helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", DC])
    actions = helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", "n_actions", DA])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "n_actions"])
    spread = helper.make_tensor_value_info("spread", TensorProto.FLOAT, ["batch", "n_actions"])
    inits = [
        numpy_helper.from_array(weights.w, "w"),
        numpy_helper.from_array(weights.v, "v"),
        numpy_helper.from_array(weights.u, "u"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
    ]
    nodes = [
        helper.make_node("Mul", ["actions", "w"], ["aw"]),
        helper.make_node("ReduceSum", ["aw", "last_axis"], ["action_part"], keepdims=0),
        helper.make_node("MatMul", ["context", "v"], ["context_part"]),  # [B, 1]
        helper.make_node("Add", ["action_part", "context_part"], ["scores"]),
        helper.make_node("Mul", ["actions", "u"], ["au"]),
        helper.make_node("ReduceSum", ["au", "last_axis"], ["spread_raw"], keepdims=0),
        helper.make_node("Abs", ["spread_raw"], ["spread"]),
    ]
    graph = helper.make_graph(nodes, "bandit", [context, actions], [scores, spread], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


SOFTMAX = ExplorationConfig(strategy="softmax", temperature=0.5, epsilon_min=0.05)
ROUTER = ExplorationConfig(strategy="squarecb", gamma=5.0, gamma_exponent=0.5)
FALLBACK = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.3, epsilon_min=0.01, default_action="medium")


def add_version(
    registry: Registry,
    tmp_path: Path,
    seed: int,
    exploration_cfg: ExplorationConfig = SOFTMAX,
    train_rows: int = 10,
) -> Manifest:
    src = build_model(tmp_path / f"model-{seed}-{len(registry.versions())}.onnx", Weights(seed))
    return registry.add(
        src,
        {
            "parent": None,
            "created": 1_700_000_000.0,
            "learner": "test",
            "features": SPEC,
            "exploration": exploration_cfg,
            "agent_exploration": {"router": ROUTER},
            "training": {"train_rows": train_rows},
        },
    )


def manifest_exploration(agent: str, manifest: Manifest | None) -> ExplorationConfig:
    """What the in-process client does: the live model's exploration, else the local fallback."""
    return manifest.exploration_for(agent) if manifest is not None else FALLBACK


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "models")
    reg.ensure()
    return reg


@pytest.fixture
def live(registry: Registry, tmp_path: Path) -> ModelSource:
    add_version(registry, tmp_path, seed=1)
    registry.promote("v0001")
    source = ModelSource(registry)
    assert source.refresh() is True
    return source


def hashed(ctx: dict[str, Any], actions: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    h = Hasher(SPEC)
    return h.context(ctx), h.actions(actions)


# ---- ModelSource ----------------------------------------------------------------------------


def test_refresh_with_nothing_promoted(registry: Registry) -> None:
    source = ModelSource(registry)
    assert source.refresh() is False
    assert source.scorer is None and source.error is None


def test_refresh_loads_and_is_idempotent(live: ModelSource) -> None:
    assert live.scorer is not None
    assert live.scorer.version == "v0001"
    assert live.error is None
    assert live.refresh() is False
    assert live.refresh() is False
    assert live.scorer.version == "v0001"


def test_refresh_picks_up_newly_promoted_version(live: ModelSource, registry: Registry, tmp_path: Path) -> None:
    old = live.scorer
    add_version(registry, tmp_path, seed=2)
    assert live.refresh() is False  # added but not promoted: nothing changes
    registry.promote("v0002")
    assert live.refresh() is True
    assert live.scorer is not None and live.scorer is not old
    assert live.scorer.version == "v0002"
    s_old, _ = old.score(CTX, ACTIONS)  # type: ignore[union-attr]
    s_new, _ = live.scorer.score(CTX, ACTIONS)
    assert not np.allclose(s_old, s_new)
    # and back again on rollback
    registry.rollback()
    assert live.refresh() is True
    assert live.scorer.version == "v0001"


def test_a_rollback_from_the_first_model_serves_none(live: ModelSource, registry: Registry) -> None:
    assert live.scorer is not None
    live.error = "a stale error"
    assert registry.rollback() is None
    assert live.refresh() is True  # the pointer emptied: the model is dropped
    assert live.scorer is None and live.error is None
    assert live.refresh() is False
    registry.promote("v0001")  # and picked up again when promoted again
    assert live.refresh() is True and live.scorer is not None and live.scorer.version == "v0001"


def test_a_chooser_rolled_back_to_no_model_decides_with_the_head_alone(live: ModelSource, registry: Registry) -> None:
    """Its online head starts over with no model, from the newest rewards as they were learned,
    and the exploration clock goes on from the decisions made."""
    head = OnlineHead(OnlineConfig())
    alone_cfg = msgspec.structs.replace(FALLBACK, default_action=None)  # no default to serve until a model
    chooser = Chooser(live, lambda agent, manifest: manifest.exploration_for(agent) if manifest else alone_cfg, 0, head)
    learned = []
    for i in range(40):
        context = {**CTX, "i": i % 4}
        choice = chooser.choose("agent", context, ACTIONS)
        assert choice.model_version == "v0001"
        reward = 1.0 if choice.action == "small" else 0.0
        assert chooser.learn(choice.id, reward)
        learned.append((context, choice.action, reward))
    assert head.base == "v0001"
    registry.rollback()
    live.refresh()
    # relearned as the model was dropped, on the thread that dropped it, not on the next decision's
    assert head._prepared is not None and head._prepared[0] is None and head._prepared[1][1] == 40
    choice = chooser.choose("agent", CTX, ACTIONS)
    assert choice.model_version is None and choice.strategy == "epsilon_greedy"  # the head's, not "default"
    assert head.base is None and head.stats()["warmed"] == 40
    alone = OnlineHead(OnlineConfig())  # what a head with no model learns from the same rewards
    for i, (context, action, reward) in enumerate(learned):
        alone.remember(f"d{i}", "agent", action, alone.features(context), None)
        alone.learn(f"d{i}", reward)
    names = ["small", "medium", "large"]
    x = head.features(CTX)
    np.testing.assert_allclose(head.means("agent", x, names), alone.means("agent", x, names), atol=1e-9)
    assert chooser._clock(None) >= 41


def test_tampered_new_version_keeps_last_good(live: ModelSource, registry: Registry, tmp_path: Path) -> None:
    add_version(registry, tmp_path, seed=2)
    registry.promote("v0002")
    model = registry.root / "v0002" / MODEL_FILE
    model.write_bytes(model.read_bytes() + b"tampered")
    assert live.refresh() is False
    assert live.scorer is not None and live.scorer.version == "v0001"
    assert live.error is not None and "v0002" in live.error
    # the last good model still scores
    scores, spread = live.scorer.score(CTX, ACTIONS)
    assert scores.shape == (3,) and spread.shape == (3,)


def test_unloadable_onnx_keeps_last_good(live: ModelSource, registry: Registry, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not an onnx graph")
    registry.add(
        junk,
        {"parent": None, "created": 0.0, "learner": "test", "features": SPEC, "exploration": SOFTMAX},
    )
    registry.promote("v0002")  # the sha256 matches, so the registry accepts it
    assert live.refresh() is False
    assert live.scorer is not None and live.scorer.version == "v0001"
    assert live.error is not None and "v0002" in live.error


def test_a_model_hashed_with_another_feature_scheme_is_refused(live: ModelSource, registry: Registry, tmp_path: Path) -> None:
    # scoring it with this version's hashing would feed it inputs it was never trained on
    src = build_model(tmp_path / "old-scheme.onnx", Weights(3))
    old = msgspec.structs.replace(SPEC, scheme="crc32-signed-log1p-v1")
    registry.add(src, {"parent": None, "created": 0.0, "learner": "test", "features": old, "exploration": SOFTMAX})
    with pytest.raises(ModelIntegrityError, match="crc32-signed-log1p-v1"):
        registry.promote("v0002")
    # the pointer an older reflexd left behind, as after an upgrade
    (registry.root / CURRENT_FILE).write_text("v0002\n")
    assert live.refresh() is False
    assert live.scorer is not None and live.scorer.version == "v0001"
    assert live.error is not None and "v0002" in live.error and "crc32-signed-log1p-v1" in live.error


def test_error_clears_when_pointer_returns_to_the_live_model(
    live: ModelSource, registry: Registry, tmp_path: Path
) -> None:
    add_version(registry, tmp_path, seed=2)
    registry.promote("v0002")
    model = registry.root / "v0002" / MODEL_FILE
    model.write_bytes(model.read_bytes() + b"tampered")
    live.refresh()
    assert live.error is not None
    registry.rollback()  # CURRENT points at v0001 again: the model in use is the live one
    live.refresh()
    assert live.scorer is not None and live.scorer.version == "v0001"
    assert live.error is None, live.error


# ---- Scorer -------------------------------------------------------------------------------------


def test_scores_match_the_graph_arithmetic(live: ModelSource) -> None:
    ctx, acts = hashed(CTX, ACTIONS)
    scores, spread = live.scorer.score(CTX, ACTIONS)  # type: ignore[union-attr]
    want_scores, want_spread = Weights(1).expected(ctx, acts)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(spread, want_spread, rtol=1e-5, atol=1e-5)
    assert np.ptp(scores) > 0  # the actions really are told apart


def test_score_and_score_batch_agree(live: ModelSource) -> None:
    scorer = live.scorer
    assert scorer is not None
    rng = np.random.default_rng(0)
    contexts = [
        {"task": f"job {i}", "n": int(rng.integers(0, 1000)), "flag": bool(i % 2), "tags": ["a", "b"][: i % 3]}
        for i in range(20)
    ]
    h = Hasher(SPEC)
    ctx_m = np.stack([h.context(c) for c in contexts])
    act_m = np.stack([h.actions(ACTIONS) for _ in contexts])
    b_scores, b_spread = scorer.score_batch(ctx_m, act_m)
    assert b_scores.shape == (20, 3) and b_spread.shape == (20, 3)
    for i, c in enumerate(contexts):
        s, sp = scorer.score(c, ACTIONS)
        np.testing.assert_allclose(b_scores[i], s, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b_spread[i], sp, rtol=1e-6, atol=1e-6)


def test_threads_deciding_at_once_each_get_their_own_scores(live: ModelSource) -> None:
    scorer = live.scorer
    assert scorer is not None
    contexts = [{"task": f"job {i}", "n": i} for i in range(200)]
    want = [scorer.score(c, ACTIONS)[0].copy() for c in contexts]
    got: dict[int, list[np.ndarray]] = {}

    def work(t: int) -> None:
        got[t] = [scorer.score(c, ACTIONS)[0].copy() for c in contexts]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for results in got.values():
        for w, g in zip(want, results):
            np.testing.assert_array_equal(w, g)


def test_score_batch_chunks_and_empty(live: ModelSource) -> None:
    scorer = live.scorer
    assert scorer is not None
    n = BATCH_ROWS + 5
    rng = np.random.default_rng(1)
    ctx_m = rng.normal(size=(n, DC)).astype(np.float32)
    act_m = rng.normal(size=(n, 2, DA)).astype(np.float32)
    scores, spread = scorer.score_batch(ctx_m, act_m)
    assert scores.shape == (n, 2) and spread.shape == (n, 2)
    want, want_spread = Weights(1).expected(ctx_m, act_m)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(spread, want_spread, rtol=1e-4, atol=1e-4)
    empty, empty_spread = scorer.score_batch(ctx_m[:0], act_m[:0])
    assert empty.shape == (0, 2) and empty_spread.shape == (0, 2)


def test_unseen_context_keys_still_score(live: ModelSource) -> None:
    odd = {"never_seen_before": "x y z", "deep": {"list": [1, "b", {"c": None}]}, "nan": float("nan")}
    scores, spread = live.scorer.score(odd, ACTIONS)  # type: ignore[union-attr]
    assert np.isfinite(scores).all() and np.isfinite(spread).all()
    scores, _ = live.scorer.score({}, ACTIONS)  # type: ignore[union-attr]
    assert scores.shape == (3,)


# ---- Chooser ------------------------------------------------------------------------------------


def test_chooser_uses_manifest_exploration(live: ModelSource) -> None:
    chooser = Chooser(live, manifest_exploration, seed=0)
    choice = chooser.choose("agent", CTX, ACTIONS, decision_id="d1")
    assert choice.id == "d1"
    assert choice.model_version == "v0001"
    assert choice.strategy == "softmax"
    scores, spread = live.scorer.score(CTX, ACTIONS)  # type: ignore[union-attr]
    want = exploring.probabilities(SOFTMAX, scores.astype(np.float64), spread.astype(np.float64), 10)
    np.testing.assert_allclose(choice.probs, want, rtol=1e-12)
    assert choice.prob == choice.probs[choice.index]
    assert choice.action == ["small", "medium", "large"][choice.index]


def test_chooser_uses_per_agent_exploration_and_training_rows(live: ModelSource) -> None:
    chooser = Chooser(live, manifest_exploration, seed=0)
    scores, spread = live.scorer.score(CTX, ACTIONS)  # type: ignore[union-attr]
    for t in (10, 11, 12):  # train_rows (10) plus the decisions made since the model went live
        choice = chooser.choose("router", CTX, ACTIONS)
        assert choice.strategy == "squarecb"
        want = exploring.probabilities(ROUTER, scores.astype(np.float64), spread.astype(np.float64), t)
        np.testing.assert_allclose(choice.probs, want, rtol=1e-12)


def test_decay_counter_restarts_with_a_new_model(registry: Registry, tmp_path: Path) -> None:
    decaying = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.5, epsilon_min=0.0, decay=1.0)
    add_version(registry, tmp_path, seed=1, exploration_cfg=decaying, train_rows=0)
    add_version(registry, tmp_path, seed=2, exploration_cfg=decaying, train_rows=0)
    registry.promote("v0001")
    source = ModelSource(registry)
    source.refresh()
    chooser = Chooser(source, manifest_exploration, seed=0)

    def eps_of(probs: list[float]) -> float:
        return min(probs) * len(probs)

    assert [eps_of(chooser.choose("a", CTX, ACTIONS).probs) for _ in range(3)] == pytest.approx([0.5, 0.25, 0.5 / 3])
    registry.promote("v0002")
    assert source.refresh() is True
    assert eps_of(chooser.choose("a", CTX, ACTIONS).probs) == pytest.approx(0.5)


def test_chooser_without_model_uses_default_action() -> None:
    chooser = Chooser(None, manifest_exploration, seed=0)
    choice = chooser.choose("agent", CTX, ACTIONS)
    assert choice.model_version is None
    assert choice.strategy == "default"
    np.testing.assert_allclose(choice.probs, [0.1, 0.8, 0.1], rtol=1e-12)  # medium is the default
    assert choice.prob == choice.probs[choice.index]


def test_chooser_with_empty_registry_uses_fallback(registry: Registry) -> None:
    source = ModelSource(registry)
    source.refresh()
    chooser = Chooser(source, manifest_exploration, seed=0)
    choice = chooser.choose("agent", CTX, ["a", "b", "c", "d"])  # default "medium" absent: uniform
    assert choice.strategy == "default" and choice.model_version is None
    assert choice.probs == [0.25] * 4
    assert choice.prob == 0.25


def test_chooser_is_reproducible_with_a_seed(live: ModelSource) -> None:
    a = Chooser(live, manifest_exploration, seed=42)
    b = Chooser(live, manifest_exploration, seed=42)
    picks_a = [a.choose("agent", CTX, ACTIONS, decision_id=str(i)) for i in range(50)]
    picks_b = [b.choose("agent", CTX, ACTIONS, decision_id=str(i)) for i in range(50)]
    assert picks_a == picks_b
    assert len({c.action for c in picks_a}) > 1  # it does explore


@pytest.mark.parametrize(
    "explore",
    [
        SOFTMAX,
        ExplorationConfig(strategy="epsilon_greedy", epsilon=0.5, decay=0.001, epsilon_min=0.05),
        ExplorationConfig(strategy="ucb", epsilon=0.3, ucb_c=2.0),
        ExplorationConfig(strategy="squarecb", gamma=0.5, gamma_exponent=0.5),
    ],
    ids=lambda c: c.strategy,
)
def test_chooser_frequencies_match_logged_probabilities(live: ModelSource, explore: ExplorationConfig) -> None:
    # through the real decision path (ONNX scores, the strategy, sampling): each choice's logged
    # probability is its drawn action's in the distribution it logged, and over many decisions
    # the actions come up as often as those distributions say (they change with t as decay and
    # SquareCB's gamma move, so the expected counts are their sums)
    chooser = Chooser(live, lambda agent, manifest: explore, seed=123)
    n = 6000
    counts = np.zeros(3)
    expected = np.zeros(3)
    for _ in range(n):
        choice = chooser.choose("agent", CTX, ACTIONS)
        assert choice.prob == choice.probs[choice.index]
        counts[choice.index] += 1
        expected += choice.probs
    assert (expected > 50).all(), expected  # every action explored enough for the test to mean something
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < 13.816, (stat, counts / n, expected / n)  # chi-square, 2 dof, 0.999 quantile


def test_chooser_handles_unseen_context_and_action_forms(live: ModelSource) -> None:
    from reflexd.wire.protocol import Action

    chooser = Chooser(live, manifest_exploration, seed=0)
    actions = ["small", Action(id="new_tool", features={"latency": 0.3}), {"id": "brand_new"}]
    choice = chooser.choose("agent", {"a_key_never_seen": 1, "text": "hello there"}, actions)
    assert choice.action in {"small", "new_tool", "brand_new"}
    assert sum(choice.probs) == pytest.approx(1.0)
    assert all(p > 0 for p in choice.probs)
    assert choice.prob == choice.probs[choice.index]


def test_a_model_that_fails_while_deciding_falls_back_to_the_default_policy(live: ModelSource) -> None:
    class Broken:
        version = "v9999"
        manifest = live.scorer.manifest  # type: ignore[union-attr]

        def score(self, context, actions):  # a graph that loads but cannot run
            raise RuntimeError("onnxruntime: invalid dimensions")

    live.scorer = Broken()  # type: ignore[assignment]
    chooser = Chooser(live, manifest_exploration, seed=0)
    choice = chooser.choose("a", CTX, ACTIONS)
    assert choice.model_version is None and choice.strategy == "default"
    assert choice.probs[choice.index] == choice.prob
    assert "v9999 failed while deciding" in (live.error or "")


def test_a_model_scoring_nan_falls_back_to_the_default_policy(live: ModelSource) -> None:
    class NaNs:
        version = "v0042"
        manifest = live.scorer.manifest  # type: ignore[union-attr]  # softmax: NaN scores give NaN probabilities

        def score(self, context, actions):
            n = len(actions)
            return np.full(n, np.nan, dtype=np.float32), np.zeros(n, dtype=np.float32)

    live.scorer = NaNs()  # type: ignore[assignment]
    choice = Chooser(live, manifest_exploration, seed=0).choose("a", CTX, ACTIONS)
    assert choice.model_version is None and choice.strategy == "default"
    assert choice.probs == [1 / 3] * 3 and choice.prob == choice.probs[choice.index]  # the manifest names no default
    assert "v0042 failed while deciding (non-finite scores)" in (live.error or "")


def test_choices_carry_plain_floats(live: ModelSource) -> None:
    choice = Chooser(live, manifest_exploration, seed=0).choose("a", CTX, ACTIONS)
    assert type(choice.prob) is float and all(type(p) is float for p in choice.probs)
    assert msgspec.json.decode(msgspec.json.encode(choice), type=type(choice)) == choice


def test_a_malformed_request_is_refused_before_the_model_is_asked(live: ModelSource) -> None:
    """A caller's mistake is refused as such, not run through the model and blamed on it."""
    chooser = Chooser(live, manifest_exploration, 0, OnlineHead(OnlineConfig()))
    with pytest.raises(TypeError, match="context must be a dict"):
        chooser.score("agent", "code", ["small", "large"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offered twice"):
        chooser.score_many([("agent", CTX, ["small", "large"]), ("agent", CTX, ["small", "small"])])
    assert live.error is None and live.scorer is not None

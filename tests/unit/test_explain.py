"""Explaining and scoring without logging, in-process: known truth on hand-built ONNX models.

One model's scores depend on the context's ``task`` key alone (every other slot is masked out),
so occlusion must put ``task`` first, give it the whole score and margin, and give every other
key exactly 0. Another model mixes every slot non-linearly: there each key's effect must equal
scoring the context rebuilt without that key (the additive shortcut is checked against it).
Scoring and explaining must log nothing and leave exploration's clock where it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnx
from onnx import TensorProto, helper, numpy_helper
from reflexd.config import ExplorationConfig, OnlineConfig, parse_config
from reflexd.deciding import exploring
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.explaining import explain, key_name, leaves, render, without
from reflexd.deciding.online import OnlineHead
from reflexd.deciding.scoring import ModelSource, Scorer
from reflexd.features import FeatureSpec, Hasher
from reflexd.manifest import Manifest
from reflexd.registry import Registry
from reflexd.service.redact import Redactor
from reflexd.wire.protocol import Decide, Decided, Decision, Explain, Explanation, Scored

DC, DA = 64, 8
SOFTMAX = ExplorationConfig(strategy="softmax", temperature=0.5, epsilon_min=0.05)
ACTIONS: list[Any] = ["small", "medium", {"id": "large", "features": {"cost": 3.0}}, "tools"]
TASKS = ("code", "chat", "math", "search")


def context(i: int) -> dict[str, Any]:
    """A context of every shape the hasher knows: nested mapping, list, text, number, bool, None."""
    return {
        "task": TASKS[i % 4],
        "lang": ("en", "de", "ja")[i % 3],
        "tokens": 100 * i + 7,
        "retry": i % 2 == 0,
        "user": {"tier": ("free", "pro")[i % 2], "age_days": 3 * i},
        "tags": ["urgent", "beta"][: 1 + i % 2],
        "note": "please be quick",
        "missing": None,
    }


def _spec() -> FeatureSpec:
    """A seed under which ``task``'s slots are shared with no other key's: the mask is then exact."""
    for seed in range(200):
        spec = FeatureSpec(context_dim=DC, action_dim=DA, seed=seed)
        hasher = Hasher(spec)
        task = {int(j) for t in TASKS for j in np.flatnonzero(hasher.context({"task": t}))}
        rest = {int(j) for i in range(8) for j in np.flatnonzero(hasher.context({**context(i), "task": None}))}
        if len(task) == len(TASKS) and not task & rest:
            return spec
    raise AssertionError("no seed keeps task's slots apart")


SPEC = _spec()
TASK_SLOTS = np.zeros(DC, dtype=np.float32)
for _t in TASKS:
    TASK_SLOTS[np.flatnonzero(Hasher(SPEC).context({"task": _t}))] = 1.0


def write_model(path: Path, rng: np.random.Generator, mask: np.ndarray | None) -> Path:
    """scores[b, a] = actions[b, a] · tanh(M @ (context[b] ⊙ mask) + c); spread = |actions · u|.

    With ``mask`` only the masked-in slots reach the scores; without, every slot does, and tanh
    makes the effects of keys interact.
    """
    mask = np.ones(DC, dtype=np.float32) if mask is None else mask
    inputs = [
        helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", DC]),
        helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", "n_actions", DA]),
    ]
    outputs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "n_actions"]),
        helper.make_tensor_value_info("spread", TensorProto.FLOAT, ["batch", "n_actions"]),
    ]
    inits = [
        numpy_helper.from_array(mask.astype(np.float32), "mask"),
        numpy_helper.from_array(rng.normal(size=(DC, DA)).astype(np.float32), "m"),
        numpy_helper.from_array(np.float32(0.1) * rng.normal(size=DA).astype(np.float32), "c"),
        numpy_helper.from_array(rng.normal(size=DA).astype(np.float32), "u"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
    ]
    nodes = [
        helper.make_node("Mul", ["context", "mask"], ["masked"]),
        helper.make_node("MatMul", ["masked", "m"], ["mixed"]),
        helper.make_node("Add", ["mixed", "c"], ["shifted"]),
        helper.make_node("Tanh", ["shifted"], ["hidden"]),  # [B, Da]
        helper.make_node("Unsqueeze", ["hidden", "one"], ["hidden3"]),  # [B, 1, Da]
        helper.make_node("Mul", ["actions", "hidden3"], ["ah"]),
        helper.make_node("ReduceSum", ["ah", "last"], ["scores"], keepdims=0),
        helper.make_node("Mul", ["actions", "u"], ["au"]),
        helper.make_node("ReduceSum", ["au", "last"], ["spread_raw"], keepdims=0),
        helper.make_node("Abs", ["spread_raw"], ["spread"]),
    ]
    graph = helper.make_graph(nodes, "explain", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


def manifest_fields(exploration: ExplorationConfig = SOFTMAX, rows: int = 0) -> dict[str, Any]:
    return {
        "parent": None,
        "created": 1_700_000_000.0,
        "learner": "test",
        "features": SPEC,
        "exploration": exploration,
        "training": {"train_rows": rows},
    }


def make_scorer(tmp_path: Path, seed: int, mask: np.ndarray | None) -> Scorer:
    registry = Registry(tmp_path / f"models-{seed}")
    registry.ensure()
    registry.add(write_model(tmp_path / f"m{seed}.onnx", np.random.default_rng(seed), mask), manifest_fields())
    manifest, model = registry.load("v0001")
    return Scorer(manifest, model)


@pytest.fixture(scope="module")
def task_only(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    return make_scorer(tmp_path_factory.mktemp("task"), seed=1, mask=TASK_SLOTS)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    return make_scorer(tmp_path_factory.mktemp("dense"), seed=2, mask=None)


class Counting:
    """A session that counts its runs."""

    def __init__(self, session: Any) -> None:
        self.session, self.runs = session, 0

    def run(self, *args: Any, **kw: Any) -> Any:
        self.runs += 1
        return self.session.run(*args, **kw)


# ---- the context's keys --------------------------------------------------------------------


def test_leaves_are_dotted_paths_with_lists_whole_and_none_left_out() -> None:
    ctx = {"a": 1, "user": {"tier": "pro", "geo": {"cc": "de"}, "empty": {}}, "tags": ["x", {"y": 1}], "gone": None}
    assert [(key_name(p), v) for p, v in leaves(ctx)] == [
        ("a", 1),
        ("user.tier", "pro"),
        ("user.geo.cc", "de"),
        ("tags", ["x", {"y": 1}]),
    ]


def test_without_removes_one_leaf_and_leaves_the_input_alone() -> None:
    ctx = {"a": 1, "user": {"tier": "pro", "geo": {"cc": "de"}}}
    assert without(ctx, ("user", "geo", "cc")) == {"a": 1, "user": {"tier": "pro", "geo": {}}}
    assert without(ctx, ("a",)) == {"user": {"tier": "pro", "geo": {"cc": "de"}}}
    assert ctx == {"a": 1, "user": {"tier": "pro", "geo": {"cc": "de"}}}


def test_leaves_stop_where_the_hasher_stops() -> None:
    deep: dict[str, Any] = {"v": 1}
    for _ in range(100):
        deep = {"n": deep}
    found = leaves({"deep": deep, "x": 2})
    assert len(found) == 2 and len(found[0][0]) <= 34 and found[1] == (("x",), 2)


# ---- known truth: only task matters ----------------------------------------------------------


@pytest.mark.parametrize("i", range(8))
def test_the_one_key_that_moves_the_scores_comes_first_and_the_rest_give_nothing(task_only: Scorer, i: int) -> None:
    ctx = context(i)
    e = explain(task_only, SOFTMAX, "agent", ctx, ACTIONS)
    scores = [a.score for a in e.actions]
    ids = ["small", "medium", "large", "tools"]
    assert e.chosen == ids[int(np.argmax(scores))] and e.runner_up is not None
    assert e.keys[0].key == "task"
    expected_keys = {"task", "lang", "tokens", "retry", "user.tier", "user.age_days", "tags", "note"}
    assert {k.key for k in e.keys} == expected_keys  # "missing" (None) has no features
    # without task the masked context is all zeros: every action scores actions · tanh(c)
    both, _ = task_only.score_many([ctx, {**ctx, "task": None}], [ACTIONS] * 2)
    chosen, runner = ids.index(e.chosen), ids.index(e.runner_up)
    bare = both[1].astype(np.float64)
    task = e.keys[0]
    assert task.score == pytest.approx(scores[chosen] - float(bare[chosen]), abs=1e-6)
    margin = (scores[chosen] - scores[runner]) - float(bare[chosen] - bare[runner])
    assert task.margin == pytest.approx(margin, abs=1e-6) and task.margin != 0
    assert all(k.score == 0.0 and k.margin == 0.0 and k.best_without == e.chosen for k in e.keys[1:])


def test_probabilities_are_explorations_on_the_same_scores(task_only: Scorer) -> None:
    e = explain(task_only, SOFTMAX, "agent", context(3), ACTIONS, t=40)
    scores = [a.score for a in e.actions]
    spread = [a.spread for a in e.actions]
    assert [a.prob for a in e.actions] == pytest.approx(exploring.distribution(SOFTMAX, scores, spread, 40))
    direct, direct_spread = task_only.score(context(3), ACTIONS)
    assert scores == pytest.approx(direct.tolist(), abs=1e-6)
    assert spread == pytest.approx(direct_spread.tolist(), abs=1e-6)
    assert (e.model_version, e.strategy, e.agent) == ("v0001", "softmax", "agent")


# ---- known truth: every key matters, non-linearly ------------------------------------------


@pytest.mark.parametrize("i", range(6))
def test_each_effect_is_the_score_of_the_context_rebuilt_without_the_key(dense: Scorer, i: int) -> None:
    ctx = context(i)
    e = explain(dense, SOFTMAX, "agent", ctx, ACTIONS)
    ids = ["small", "medium", "large", "tools"]
    chosen, runner = ids.index(e.chosen), ids.index(e.runner_up or "")
    full = dense.score(ctx, ACTIONS)[0].astype(np.float64).copy()
    by_key = {key_name(p): p for p, _ in leaves(ctx)}
    assert len(e.keys) == len(by_key)
    for k in e.keys:
        occluded = dense.score(without(ctx, by_key[k.key]), ACTIONS)[0].astype(np.float64)
        assert k.score == pytest.approx(full[chosen] - occluded[chosen], abs=2e-5)
        margin = (full[chosen] - full[runner]) - (occluded[chosen] - occluded[runner])
        assert k.margin == pytest.approx(margin, abs=2e-5)
        assert k.best_without == ids[int(np.argmax(occluded))]
    magnitudes = [abs(k.margin or 0.0) for k in e.keys]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert sum(m > 1e-3 for m in magnitudes) >= 3  # the dense model does use several keys


def test_explain_is_one_model_run_and_top_keeps_the_largest(dense: Scorer) -> None:
    counting = Counting(dense.session)
    dense.session = counting  # type: ignore[assignment]
    try:
        full = explain(dense, SOFTMAX, "agent", context(5), ACTIONS)
        assert counting.runs == 1
        top = explain(dense, SOFTMAX, "agent", context(5), ACTIONS, top=3)
        assert counting.runs == 2
    finally:
        dense.session = counting.session
    assert top.keys == full.keys[:3] and top.actions == full.actions


def test_one_action_has_no_runner_up_and_an_empty_context_no_keys(dense: Scorer) -> None:
    e = explain(dense, SOFTMAX, "agent", context(1), ["solo"])
    assert e.runner_up is None and e.actions[0].prob == 1.0 and e.keys
    assert all(k.margin is None for k in e.keys)
    scores = [abs(k.score) for k in e.keys]
    assert scores == sorted(scores, reverse=True)
    empty = explain(dense, SOFTMAX, "agent", {}, ACTIONS)
    assert empty.keys == [] and len(empty.actions) == 4


def test_without_a_model_the_default_policy_and_no_keys() -> None:
    cfg = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.4, epsilon_min=0.0, decay=1.0, default_action="medium")
    e = explain(None, cfg, "agent", context(0), ACTIONS, t=1)
    assert (e.model_version, e.strategy, e.chosen, e.runner_up, e.keys) == (None, "default", "medium", None, [])
    assert [a.prob for a in e.actions] == pytest.approx([0.05, 0.85, 0.05, 0.05])  # epsilon 0.4 / (1 + 1)
    assert all(a.score is None and a.spread is None for a in e.actions)
    assert "no model" in render(e)


@pytest.mark.parametrize("strategy", ["squarecb", "thompson"])
def test_without_a_model_a_head_that_has_learned_is_explained_as_it_decides(strategy: str) -> None:
    cfg = ExplorationConfig(strategy=strategy)
    head = OnlineHead(OnlineConfig(), _spec())
    chooser = Chooser(None, lambda agent, manifest: cfg, seed=3, online=head)
    best = dict(zip(TASKS, ("small", "medium", "large", "tools")))

    def seen(i: int) -> dict[str, Any]:
        return {"task": TASKS[i % 4], "user": {"tier": ("free", "pro")[i % 3 == 0]}}

    for i in range(200):  # the task alone decides which action earns
        made = chooser.choose("agent", seen(i), ACTIONS)
        chooser.learn(made.id, float(made.action == best[seen(i)["task"]]))
    for i in range(4):
        explained = chooser.explain("agent", seen(i), ACTIONS)
        scored = chooser.score("agent", seen(i), ACTIONS)  # what a decision would sample from now
        assert (explained.model_version, explained.strategy) == (None, strategy)
        assert [a.prob for a in explained.actions] == pytest.approx(scored.probs)
        assert [a.score for a in explained.actions] == pytest.approx(scored.scores)
        assert explained.chosen == best[seen(i)["task"]] and explained.keys[0].key == "task"
        # each key's effect is the head's means for the context rebuilt without it
        for effect in explained.keys:
            path = next(path for path, _ in leaves(seen(i)) if key_name(path) == effect.key)
            means = head.means("agent", head.features(without(seen(i), path)), scored.actions)
            chosen = scored.actions.index(explained.chosen)
            assert effect.score == pytest.approx(scored.scores[chosen] - means[chosen], abs=1e-6)
    assert "no model live: the online head (" + strategy + ") scores" in render(explained)
    # apprentice mode: the agent's own choice is served until a model is live, and explained as served
    served = chooser.explain("agent", seen(0), ACTIONS, default="tools")
    assert served.strategy == "default" and served.keys == [] and served.chosen == "tools"
    assert [a.prob for a in served.actions] == pytest.approx(chooser.score("agent", seen(0), ACTIONS, "tools").probs)
    with pytest.raises(ValueError, match="default 'nope' is not among the actions"):
        chooser.explain("agent", seen(0), ACTIONS, default="nope")
    # nothing learned for these actions: the default policy's, as a decision's
    assert chooser.explain("agent", seen(0), ["x", "y"]).strategy == "default"


def test_render_names_the_chosen_action_and_every_key(task_only: Scorer) -> None:
    e = explain(task_only, SOFTMAX, "agent", context(2), ACTIONS)
    text = render(e)
    assert f"scores {e.chosen} highest" in text and "user.tier" in text and "tags" in text
    assert text.splitlines()[-len(e.keys)].split()[0] == "task"


# ---- the chooser and the client: nothing logged, the clock left alone ------------------------


def live_source(tmp_path: Path, exploration: ExplorationConfig, rows: int = 0) -> ModelSource:
    registry = Registry(tmp_path / "models")
    registry.ensure()
    registry.add(write_model(tmp_path / "m.onnx", np.random.default_rng(1), TASK_SLOTS), manifest_fields(exploration, rows))
    registry.promote("v0001")
    source = ModelSource(registry)
    assert source.refresh()
    return source


def by_manifest(agent: str, manifest: Manifest | None) -> ExplorationConfig:
    return manifest.exploration_for(agent) if manifest is not None else ExplorationConfig()


def test_scoring_and_explaining_leave_the_clock_where_deciding_left_it(tmp_path: Path) -> None:
    squarecb = ExplorationConfig(strategy="squarecb", gamma=5.0, gamma_exponent=0.5)
    chooser = Chooser(live_source(tmp_path, squarecb, rows=100), by_manifest, seed=1)
    first = chooser.score("agent", context(1), ACTIONS)
    for i in range(20):
        chooser.score_many([("agent", context(i), ACTIONS), ("b", context(i), ACTIONS[:2])])
        chooser.explain("agent", context(i), ACTIONS)
    assert chooser._since_load == 0 and chooser.score("agent", context(1), ACTIONS) == first
    assert first.probs == pytest.approx(exploring.distribution(squarecb, first.scores, first.spread, 100))
    chooser.choose("agent", context(1), ACTIONS)
    moved = chooser.score("agent", context(1), ACTIONS)
    assert chooser._since_load == 1
    assert moved.probs == pytest.approx(exploring.distribution(squarecb, first.scores, first.spread, 101))
    assert moved.probs != pytest.approx(first.probs)  # SquareCB's gamma grows with t


def test_scoring_without_a_model_gives_the_default_policy_at_the_current_clock() -> None:
    cfg = ExplorationConfig(epsilon=0.5, epsilon_min=0.0, decay=1.0, default_action="medium")
    chooser = Chooser(None, lambda agent, manifest: cfg, seed=1)
    scored = chooser.score("agent", context(0), ACTIONS)
    assert scored.actions == ["small", "medium", "large", "tools"]
    assert scored.probs == pytest.approx([0.125, 0.625, 0.125, 0.125])
    assert (scored.scores, scored.spread, scored.model_version, scored.strategy) == (None, None, None, "default")
    chooser.choose("agent", context(0), ACTIONS)
    assert chooser.score("agent", context(0), ACTIONS).probs == pytest.approx([0.0625, 0.8125, 0.0625, 0.0625])  # epsilon 0.5 / (1 + 1)


def test_policy_score_and_explain_send_nothing(tmp_path: Path) -> None:
    from reflexd import Policy

    live_source(tmp_path, SOFTMAX)
    policy = Policy("agent", socket=str(tmp_path / "absent.sock"), state_dir=tmp_path, seed=1)
    try:
        scored = policy.score(context(2), ACTIONS)
        explained = policy.explain(context(2), ACTIONS, top=2)
        assert isinstance(scored, Scored) and scored.model_version == "v0001" and scored.scores is not None
        assert isinstance(explained, Explanation) and [k.key for k in explained.keys][:1] == ["task"]
        assert len(explained.keys) == 2
        assert scored.probs == pytest.approx([a.prob for a in explained.actions])
        assert policy.stats()["enqueued"] == 0 and policy._chooser._since_load == 0
        policy.decide(context(2), ACTIONS)
        assert policy.stats()["enqueued"] == 1 and policy._chooser._since_load == 1
    finally:
        policy._sender.stop()


# ---- the daemon's answers, without a socket --------------------------------------------------


def test_a_batch_mixing_logged_and_unlogged_decides_logs_and_counts_only_the_logged(tmp_path: Path) -> None:
    from reflexd.service.daemon import Daemon

    config = parse_config(
        f"state_dir: {tmp_path / 'state'}\nexploration: {{epsilon: 0.5, epsilon_min: 0.0, decay: 1.0, default_action: q}}\n"
    )
    daemon = Daemon(config)
    msgs = [
        Decide(agent="a", context={"n": 1}, actions=["p", "q"], id="d1", req=1),
        Decide(agent="a", context={"n": 2}, actions=["p", "q"], id="s1", req=2, log=False),
        Decide(agent="a", context={"n": 3}, actions=["p", "q", "r"], req=3),
        Decide(agent="a", context={"n": 4}, actions=["p", "q"], req=4, log=False),
    ]
    answers = daemon.decide(msgs)
    assert [type(a) for a in answers] == [tuple, Scored, tuple, Scored]
    assert all(isinstance(a[0], Decided) and [type(d) for d in a[1]] == [Decision] for a in answers if type(a) is tuple)
    assert [answers[1].id, answers[1].req, answers[3].id, answers[3].req] == ["s1", 2, None, 4]  # type: ignore[union-attr]
    assert daemon.lines.for_agent("a").chooser._since_load == 2
    # both unlogged requests saw the clock after the batch's two decisions: epsilon 0.5 / (1 + 2)
    assert answers[1].probs == pytest.approx([1 / 12, 11 / 12])  # type: ignore[union-attr]
    only_unlogged = daemon.decide([msgs[1], msgs[3]])
    assert [type(a) for a in only_unlogged] == [Scored, Scored] and daemon.lines.for_agent("a").chooser._since_load == 2


def test_explain_requests_are_redacted_like_decides() -> None:
    redactor = Redactor(drop=["user.email"])
    msg = Explain(agent="a", context={"user": {"email": "x@y", "tier": "pro"}}, actions=["p"])
    assert redactor.apply(msg).context == {"user": {"tier": "pro"}}

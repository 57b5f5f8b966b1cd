"""A new live model and the online head: the head starts afresh beside it and first relearns the
newest rewards, each beside the new model's score of its decision (``online.warm_rows``). A real
registry and a real ONNX model run by onnxruntime."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from reflexd.config import OnlineConfig
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.online import OnlineHead
from reflexd.deciding.scoring import ModelSource
from reflexd.registry import Registry
from test_serving import ACTIONS, CTX, SPEC, add_version, manifest_exploration

IDS = ["small", "medium", "large"]


def test_a_promoted_model_scores_the_remembered_decisions_and_the_head_relearns_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path / "models")
    add_version(registry, tmp_path, seed=1)
    source = ModelSource(registry)
    head = OnlineHead(OnlineConfig(warm_rows=25), SPEC)
    chooser = Chooser(source, manifest_exploration, 5, head)
    rng = random.Random(2)
    # one dict and one list, changed after every decision, as an agent may reuse them
    context, offered = dict(CTX), list(reversed(ACTIONS))
    made = []
    for i in range(40):
        offered.reverse()  # back in order: each decision is offered ACTIONS
        context["tokens"], context["lang"] = 100 * i, rng.choice(["en", "de"])
        choice = chooser.choose("agent", context, offered, decision_id=f"d{i}")
        reward = rng.random()
        assert head.learn(choice.id, reward)
        made.append((dict(context), choice.index, reward))
        # after the decision: what the head relearns is what was decided on
        context["tokens"] = -1
        offered.reverse()
    assert choice.model_version is None and head.stats()["warmed"] == 0

    registry.promote("v0001")
    assert source.refresh()  # the loading thread relearns, before the model is served
    assert head.base is None
    # the decision that first sees the model relearns nothing itself: it starts with what was prepared
    monkeypatch.setattr(head, "_relearned", lambda *a: pytest.fail("relearned on a decision's thread"))
    after = chooser.choose("agent", CTX, ACTIONS, decision_id="first")
    assert after.model_version == "v0001"
    assert head.base == "v0001" and head.stats()["warmed"] == 25

    scorer = source.scorer
    assert scorer is not None
    beside = OnlineHead(OnlineConfig(warm_rows=0), SPEC)
    beside.follow("v0001")
    for i, (ctx, index, reward) in enumerate(made[-25:]):
        scores, _ = scorer.score(ctx, ACTIONS)
        beside.remember(f"r{i}", "agent", IDS[index], beside.features(ctx), float(scores[index]))
        beside.learn(f"r{i}", reward)
    for ctx, *_ in made[:5]:
        scores = scorer.score(ctx, ACTIONS)[0].tolist()
        x = head.features(ctx)
        assert head.means("agent", x, IDS, scores) == pytest.approx(beside.means("agent", x, IDS, scores), abs=1e-9)

"""Explain on a real model: the MLP learner trained where one key decides, exported to ONNX.

Synthetic decisions, logged uniformly at random: the context's ``task`` alone says which action
pays (action i for task i); ``lang``, ``tokens``, ``user.tier``, ``retry``, ``tags`` and ``note``
are noise. The learner and exporter are the daemon's own (found by entry point), the model is
served from a registry as agents are served, and ``Policy.explain`` must name ``task`` as the key
that moved the choice, for contexts it has not seen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reflexd.config import ExplorationConfig, TrainerConfig
from reflexd.deciding.explaining import explain, key_name, leaves, without
from reflexd.deciding.scoring import ModelSource
from reflexd.extensions import load_exporter, load_learner
from reflexd.features import FeatureSpec, Hasher
from reflexd.learning.dataset import from_records
from reflexd.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

SPEC = FeatureSpec()  # the daemon's default widths
TASKS = ("code", "chat", "math", "search")
ROWS = 8000
ACTIONS = ["coder", "chatter", "solver", "searcher"]  # ACTIONS[i] pays for TASKS[i]
SETTINGS = TrainerConfig(epochs=8, min_steps=400, batch_size=128, learning_rate=0.01, hidden_size=32, ensemble=2)
WORDS = ("please", "quickly", "now", "thanks", "asap", "maybe")
# not "free": under the default seed user.tier=free hashes to task=code's slot with the opposite
# sign, so {task: code, tier: free} looks to any model like neither, and explain rightly says tier
# moved the choice there (test_no_noise_feature_shares_a_slot_with_the_task keeps this true)
TIERS = ("basic", "pro", "team")


def noisy_context(rng: np.random.Generator, task: str) -> dict[str, Any]:
    return {
        "task": task,
        "lang": str(rng.choice(["en", "de", "ja"])),
        "tokens": int(rng.integers(10, 5000)),
        "user": {"tier": str(rng.choice(TIERS))},
        "retry": bool(rng.integers(2)),
        "tags": [str(t) for t in rng.choice(["a", "b", "c", "d"], size=int(rng.integers(0, 3)), replace=False)],
        "note": " ".join(str(w) for w in rng.choice(WORDS, size=3)),
    }


def logged(n: int, seed: int) -> list[dict[str, Any]]:
    """Each key is missing from a fifth of the contexts, as agents leave out what they do not know:
    the model then learns what a missing key means (for ``task``: no action is known to pay),
    which is what occlusion asks it. Trained only on complete contexts, its answer to a missing key
    would be extrapolation (docs/learning.md, Explaining)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(len(TASKS)))
        chosen = int(rng.integers(len(ACTIONS)))
        context = {key: v for key, v in noisy_context(rng, TASKS[k]).items() if rng.random() >= 0.2}
        if "task" not in context:
            k = int(rng.integers(len(TASKS)))  # the task unknown: which action pays is too
        rows.append(
            {
                "id": f"d{i}",
                "agent": "router",
                "received_at": float(i),
                "context": context,
                "actions": ACTIONS,
                "chosen": ACTIONS[chosen],
                "prob": 1.0 / len(ACTIONS),
                "reward": float(chosen == k) + 0.1 * float(rng.normal()),
            }
        )
    return rows


def test_no_noise_feature_shares_a_slot_with_the_task() -> None:
    hasher = Hasher(SPEC)
    task = {int(j) for t in TASKS for j in np.flatnonzero(hasher.context({"task": t}))}
    noise = {
        "lang": ["en", "de", "ja"], "tokens": 1, "retry": True, "user": {"tier": list(TIERS)},
        "tags": ["a", "b", "c", "d"], "note": " ".join(WORDS),
    }
    assert len(task) == len(TASKS) and not task & {int(j) for j in np.flatnonzero(hasher.context(noise))}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    tmp = tmp_path_factory.mktemp("explain-model")
    module = load_learner("mlp").fit(from_records(logged(ROWS, seed=0), SPEC), SETTINGS, seed=1)
    path = tmp / "policy.onnx"
    load_exporter("onnx").export(module, SPEC.context_dim, SPEC.action_dim, path)
    registry = Registry(tmp / "models")
    registry.ensure()
    registry.add(
        path,
        {
            "parent": None,
            "created": time.time(),
            "learner": "mlp",
            "features": SPEC,
            "exploration": ExplorationConfig(strategy="squarecb"),
            "training": {"train_rows": ROWS},
        },
    )
    registry.promote("v0001")
    source = ModelSource(registry)
    assert source.refresh()
    return source


def test_explain_finds_the_key_that_decides_the_best_action(served: ModelSource, tmp_path: Path) -> None:
    from reflexd import Policy

    policy = Policy("router", socket=str(tmp_path / "absent.sock"), models=served.registry.root, seed=1)
    rng = np.random.default_rng(99)  # contexts the model never saw
    try:
        for k in list(range(len(TASKS))) * 3:
            ctx = noisy_context(rng, TASKS[k])
            e = policy.explain(ctx, ACTIONS)
            assert e.model_version == "v0001" and e.strategy == "squarecb"
            assert e.chosen == ACTIONS[k], e  # the model learned the task → action rule
            top, rest = e.keys[0], e.keys[1:]
            assert top.key == "task", e
            assert top.margin is not None and top.margin > 0.3  # the rewards differ by 1
            assert all(abs(other.margin or 0.0) < top.margin / 3 for other in rest), e
            assert {other.key for other in rest} == {"lang", "tokens", "user.tier", "retry", "note"} | (
                {"tags"} if ctx["tags"] else set()
            )
            probs = [a.prob for a in e.actions]
            assert probs.index(max(probs)) == k
        assert policy.stats()["enqueued"] == 0
    finally:
        policy._sender.stop()


def test_explain_costs_one_model_run_on_a_wide_context(served: ModelSource) -> None:
    """10 actions and 20 keys: the explanation matches per-key re-scoring, at about the cost of a
    few decisions (printed; compare ``decide``)."""
    scorer = served.scorer
    assert scorer is not None
    rng = np.random.default_rng(5)
    ctx = {**noisy_context(rng, "math"), "tags": ["a", "c"], **{f"extra{i}": float(rng.normal()) for i in range(13)}}
    assert len(leaves(ctx)) == 20
    actions = ACTIONS + [f"spare{i}" for i in range(6)]
    cfg = ExplorationConfig(strategy="squarecb")
    e = explain(scorer, cfg, "router", ctx, actions)
    assert e.keys[0].key == "task" and len(e.keys) == 20
    full = scorer.score(ctx, actions)[0].astype(np.float64).copy()
    chosen = actions.index(e.chosen)
    for k in e.keys:  # each effect is the context rebuilt without the key, scored on its own
        path = next(p for p, _ in leaves(ctx) if key_name(p) == k.key)
        assert k.score == pytest.approx(full[chosen] - float(scorer.score(without(ctx, path), actions)[0][chosen]), abs=1e-5)
    for _ in range(50):
        explain(scorer, cfg, "router", ctx, actions)
    n = 500
    started = time.perf_counter()
    for _ in range(n):
        explain(scorer, cfg, "router", ctx, actions)
    per_explain = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for _ in range(n):
        scorer.score(ctx, actions)
    per_score = (time.perf_counter() - started) / n
    print(f"\nexplain: {per_explain * 1e6:.0f} µs; one scoring: {per_score * 1e6:.0f} µs (10 actions, 20 keys)")

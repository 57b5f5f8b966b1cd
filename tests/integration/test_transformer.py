"""The transformer learner: per-action features, variable action sets, padding, ONNX, the trainer."""

from __future__ import annotations

import msgspec
import numpy as np
import onnxruntime as ort
import pytest
import torch

from reflexd.config import (
    Config,
    FeatureConfig,
    GateConfig,
    TrainerConfig,
    parse_config,
)
from reflexd.errors import ConfigError, TrainingError
from reflexd.exporters.onnx import export_onnx, parity
from reflexd.extensions import load_learner
from reflexd.features import FeatureSpec, Hasher
from reflexd.learning.dataset import from_records
from reflexd.plugins.learners.mlp import MLPLearner
from reflexd.plugins.learners.transformer import RewardTransformer, TransformerLearner
from reflexd.trainer.result import read_result

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

SPEC = FeatureSpec(context_dim=32, action_dim=16, seed=3)
SETTINGS = TrainerConfig(epochs=10, batch_size=64, learning_rate=0.01, hidden_size=32, ensemble=4)
SPEEDS = ("fast", "medium", "slow")




def best_speed(context):
    return "fast" if context["urgent"] else "slow"


def decisions(n, seed):
    """2–5 of eight tools per decision, each with a speed; the best tool is the fast one when the
    task is urgent and the slow one otherwise (an interaction of a context and an action feature).
    Tool ids carry no information: the model must read the action's features."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        context = {"urgent": bool(rng.random() < 0.5), "noise": float(rng.normal())}
        k = int(rng.integers(2, 6))
        tools = rng.permutation(8)[:k]
        actions = [{"id": f"tool{t}", "features": {"speed": str(rng.choice(SPEEDS))}} for t in tools]
        c = int(rng.integers(k))
        good = actions[c]["features"]["speed"] == best_speed(context)
        rows.append(
            {
                "id": f"d{i}",
                "agent": "agent-1",
                "received_at": float(i),
                "context": context,
                "actions": actions,
                "chosen": actions[c]["id"],
                "prob": 1.0 / k,
                "reward": float(good) + 0.3 * float(rng.normal()),
            }
        )
    return rows


def accuracy(model, rows):
    """Share of decisions (holding a best action at all) where the top-scored action is a best one."""
    hasher = Hasher(SPEC)
    hits = total = 0
    for r in rows:
        speeds = [a["features"]["speed"] for a in r["actions"]]
        want = best_speed(r["context"])
        if want not in speeds:
            continue
        context = torch.tensor(hasher.context(r["context"]))[None]
        actions = torch.tensor(hasher.actions(r["actions"]))[None]
        with torch.inference_mode():
            scores, _ = model(context, actions)
        hits += speeds[int(scores[0].argmax())] == want
        total += 1
    return hits / total


@pytest.fixture(scope="module")
def train_set():
    return from_records(decisions(3000, seed=0), SPEC)


@pytest.fixture(scope="module")
def fitted(train_set):
    return TransformerLearner().fit(train_set, SETTINGS, seed=1)


def test_learns_the_best_action_from_per_action_features(fitted, train_set):
    test_rows = decisions(500, seed=9)
    got = accuracy(fitted, test_rows)
    assert got > 0.95, got
    # the MLP, on the same data, for comparison (reported by -rP; both should solve it)
    mlp = accuracy(MLPLearner().fit(train_set, SETTINGS, seed=1), test_rows)
    print(f"best-action accuracy: transformer {got:.3f}, mlp {mlp:.3f}")


def test_variable_action_counts_are_padded_and_scored_per_action(fitted, train_set):
    assert train_set.mask.sum(axis=1).min() == 2 and train_set.actions.shape[1] == 5
    with torch.inference_mode():
        scores, spread = fitted(torch.from_numpy(train_set.context[:10]), torch.from_numpy(train_set.actions[:10]))
    assert scores.shape == spread.shape == (10, 5)
    assert torch.isfinite(scores).all() and (spread >= 0).all()


def test_padding_does_not_change_real_actions_scores(fitted):
    hasher = Hasher(SPEC)
    context = torch.from_numpy(hasher.context({"urgent": True, "noise": 0.3}))[None]
    real = torch.from_numpy(hasher.actions([{"id": "tool1", "features": {"speed": "fast"}}, "tool2", "tool3"]).copy())[None]
    with torch.inference_mode():
        alone, alone_spread = fitted(context, real)
        zeros, _ = fitted(context, torch.cat([real, torch.zeros(1, 4, SPEC.action_dim)], dim=1))
        noise = torch.randn(1, 4, SPEC.action_dim, generator=torch.Generator().manual_seed(0)) * 5
        other, other_spread = fitted(context, torch.cat([real, noise], dim=1))
        # and the same actions in another order keep their scores
        flipped, _ = fitted(context, real.flip(1))
    torch.testing.assert_close(zeros[:, :3], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(other[:, :3], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(other_spread[:, :3], alone_spread, rtol=0, atol=1e-6)
    torch.testing.assert_close(flipped.flip(1), alone, rtol=0, atol=1e-6)


def test_onnx_export_matches_torch_across_batch_sizes_and_action_counts(fitted, tmp_path):
    path = tmp_path / "policy.onnx"
    export_onnx(fitted, SPEC.context_dim, SPEC.action_dim, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["context", "actions"]
    assert [o.name for o in session.get_outputs()] == ["scores", "spread"]
    rng = np.random.default_rng(0)
    for batch, n_actions in [(1, 1), (1, 7), (2, 3), (5, 2), (64, 9), (3, 40)]:
        context = rng.normal(size=(batch, SPEC.context_dim)).astype(np.float32)
        actions = rng.normal(size=(batch, n_actions, SPEC.action_dim)).astype(np.float32)
        assert parity(fitted, path, context, actions) <= 1e-5, (batch, n_actions)
        scores, spread = session.run(None, {"context": context, "actions": actions})
        assert scores.shape == spread.shape == (batch, n_actions)


def test_same_seed_same_model_and_load_by_entry_point(train_set):
    small = TrainerConfig(epochs=1, transformer_dim=16, transformer_heads=2, transformer_layers=1, ensemble=2)
    first = TransformerLearner().fit(train_set.take(range(300)), small, seed=5).state_dict()
    again = TransformerLearner().fit(train_set.take(range(300)), small, seed=5).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    learner = load_learner("transformer")
    assert isinstance(learner, TransformerLearner) and learner.name == "transformer"


def test_single_head_has_zero_spread(train_set):
    model = TransformerLearner().fit(train_set.take(range(200)), TrainerConfig(epochs=1, ensemble=1), seed=0)
    assert isinstance(model, RewardTransformer)
    with torch.inference_mode():
        _, spread = model(torch.from_numpy(train_set.context[:4]), torch.from_numpy(train_set.actions[:4]))
    assert float(spread.abs().max()) == 0.0


def test_dim_must_divide_into_heads():
    with pytest.raises(TrainingError, match="multiple of trainer.transformer_heads"):
        TransformerLearner().fit(
            from_records(decisions(20, 0), SPEC), TrainerConfig(transformer_dim=30, transformer_heads=4), seed=0
        )
    with pytest.raises(ConfigError) as info:
        parse_config("trainer:\n  learner: transformer\n  transformer_dim: 30\n  transformer_heads: 4\n")
    assert info.value.problems == ["trainer.transformer_dim: must be a multiple of trainer.transformer_heads (4)"]


def test_trainer_subprocess_with_the_transformer_learner_ranks_correctly(tmp_path):
    from test_trainer import run_trainer, write_snapshot

    config = Config(
        features=FeatureConfig(context_dim=32, action_dim=8, seed=11),
        trainer=TrainerConfig(learner="transformer", epochs=12, batch_size=64, learning_rate=0.01, ensemble=3),
        gate=GateConfig(parity_tolerance=1e-5),
    )
    out = tmp_path / "run"
    done = run_trainer(write_snapshot(tmp_path / "snap.parquet", 800), out, msgspec.json.encode(config).decode())
    assert done.returncode == 0, done.stderr
    result = read_result(out)
    assert result.learner == "transformer"
    assert result.parity_ok and result.parity_diff <= 1e-5
    assert 0 < result.train_loss < 0.2

    session = ort.InferenceSession(str(out / "policy.onnx"), providers=["CPUExecutionProvider"])
    hasher = Hasher(FeatureSpec(context_dim=32, action_dim=8, seed=11))
    actions = ["search", "calc", {"id": "ask_human", "features": {"cost": 10}}]
    for task, best in [("question", 0), ("arithmetic", 1)]:
        context = hasher.context({"task": task, "length": 50})[None]
        scores, spread = session.run(None, {"context": context, "actions": hasher.actions(actions)[None]})
        assert int(np.argmax(scores[0])) == best, (task, scores)
        assert np.sort(scores[0])[-1] - np.sort(scores[0])[-2] > 0.5

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reflexd.config import TrainerConfig
from reflexd.errors import TrainingError
from reflexd.extensions import UnknownLearner, load_learner
from reflexd.features import FeatureSpec, Hasher
from reflexd.learning.dataset import from_records
from reflexd.plugins.learners._heads import Adam
from reflexd.plugins.learners.mlp import MLPLearner, RewardMLP

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

SPEC = FeatureSpec(context_dim=32, action_dim=16, seed=3)
SETTINGS = TrainerConfig(epochs=15, min_steps=1, batch_size=64, learning_rate=0.01, hidden_size=16, ensemble=4)
# rewards in an awkward unit, to check the model learns and answers in that unit
BASE, GAIN, NOISE = 1000.0, 500.0, 150.0




def known_problem(n=1200, seed=0):
    """Action x is best for kind a, y for kind b; z, offered in half the decisions, is never best."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = str(rng.choice(["a", "b"]))
        actions = ["x", "y", "z"] if i % 2 else ["x", "y"]
        chosen = str(rng.choice(actions))
        best = (kind, chosen) in {("a", "x"), ("b", "y")}
        rows.append(
            {
                "id": f"d{i}",
                "agent": "agent-1",
                "received_at": float(i),
                "context": {"kind": kind, "noise": float(rng.normal())},
                "actions": actions,
                "chosen": chosen,
                "prob": 1.0 / len(actions),
                "reward": BASE + GAIN * best + NOISE * float(rng.normal()),
            }
        )
    return from_records(rows, SPEC)


@pytest.fixture(scope="module")
def problem():
    return known_problem()


@pytest.fixture(scope="module")
def fitted(problem):
    return MLPLearner().fit(problem, SETTINGS, seed=1)


def score(model, kind, actions):
    hasher = Hasher(SPEC)
    context = torch.from_numpy(hasher.context({"kind": kind, "noise": 0.0})).unsqueeze(0)
    acts = torch.from_numpy(hasher.actions(actions).copy()).unsqueeze(0)
    with torch.inference_mode():
        scores, spread = model(context, acts)
    return scores[0].numpy(), spread[0].numpy()


@pytest.mark.parametrize(("kind", "best"), [("a", "x"), ("b", "y")])
def test_learns_the_best_action_per_context_in_reward_units(fitted, kind, best):
    actions = ["x", "y", "z"]
    scores, _ = score(fitted, kind, actions)
    order = np.argsort(scores)[::-1]
    assert actions[order[0]] == best
    assert scores[order[0]] - scores[order[1]] > GAIN / 2
    assert abs(scores[order[0]] - (BASE + GAIN)) < GAIN / 4
    assert abs(scores[order[1]] - BASE) < GAIN / 4


def test_ensemble_spread_is_positive_and_zero_for_a_single_head(problem, fitted):
    _, spread = score(fitted, "a", ["x", "y"])
    assert (spread > 0).all()
    single = MLPLearner().fit(problem, TrainerConfig(epochs=1, ensemble=1, hidden_size=8), seed=1)
    _, spread = score(single, "a", ["x", "y"])
    np.testing.assert_array_equal(spread, 0.0)


@pytest.mark.parametrize("learner", ["mlp", "transformer"])
def test_scores_stay_within_the_rewards_fit_where_the_heads_extrapolate(problem, learner):
    settings = TrainerConfig(epochs=3, min_steps=1, hidden_size=8, ensemble=3)
    model = load_learner(learner).fit(problem, settings, seed=1)
    low, high = float(problem.reward.min()), float(problem.reward.max())
    assert (float(model.reward_low), float(model.reward_high)) == pytest.approx((low, high))
    # inputs far outside the training data, where the MLP's heads' own mean leaves the reward
    # range (the transformer's layer norms make it blind to their scale)
    context = torch.from_numpy(problem.context[:8]) * 1e3
    actions = torch.from_numpy(problem.actions[:8])
    with torch.inference_mode():
        raw = model.head_outputs(context, actions).mean(-1)
        if learner == "transformer":
            # its predictions stay in range here, so narrow the range to make the clamp bite
            high = float(raw.median())
            model.reward_high.fill_(high)
        scores, _ = model(context, actions)
    assert ((raw < low) | (raw > high)).any()
    assert ((scores >= np.float32(low)) & (scores <= np.float32(high))).all()
    np.testing.assert_allclose(scores, raw.clamp(low, high), rtol=1e-6)


def test_scores_have_one_column_per_action_including_padding(problem, fitted):
    context = torch.from_numpy(problem.context[:5])
    actions = torch.from_numpy(problem.actions[:5])
    with torch.inference_mode():
        scores, spread = fitted(context, actions)
    assert scores.shape == spread.shape == (5, problem.actions.shape[1])


def test_same_seed_same_model_other_seed_other_model(problem):
    settings = TrainerConfig(epochs=2, hidden_size=8, ensemble=3)
    first = MLPLearner().fit(problem, settings, seed=5).state_dict()
    again = MLPLearner().fit(problem, settings, seed=5).state_dict()
    other = MLPLearner().fit(problem, settings, seed=6).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_progress_reports_every_epoch_and_the_loss_falls(problem):
    seen = []
    MLPLearner().fit(problem, SETTINGS, seed=1, progress=lambda *args: seen.append(args))
    assert [(e, n) for e, n, _ in seen] == [(i, SETTINGS.epochs) for i in range(1, SETTINGS.epochs + 1)]
    losses = [loss for _, _, loss in seen]
    assert losses[-1] < losses[0]
    # a model that learned the problem is left with about the noise variance, in reward units
    assert losses[-1] < 2 * NOISE**2


def test_small_data_still_gets_min_steps_gradient_steps(problem):
    seen = []
    settings = TrainerConfig(epochs=2, min_steps=50, batch_size=len(problem), hidden_size=8, ensemble=2)
    MLPLearner().fit(problem, settings, seed=1, progress=lambda *args: seen.append(args))
    # one step per epoch here, so 50 steps take 50 epochs, not the configured 2
    assert len(seen) == 50 and seen[-1][1] == 50


def test_load_learner_finds_the_builtin_by_entry_point():
    learner = load_learner("mlp")
    assert isinstance(learner, MLPLearner) and learner.name == "mlp"


def test_unknown_learner_lists_the_available_ones():
    with pytest.raises(UnknownLearner, match=r"unknown learner 'transformerz'; available: .*mlp") as info:
        load_learner("transformerz")
    assert isinstance(info.value, TrainingError)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (dict(weight_decay=0.0), lambda p: torch.optim.Adam(p, lr=0.01, fused=True)),
        (dict(weight_decay=0.01), lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01, fused=True)),
        (dict(weight_decay=0.01, decoupled=True), lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01, fused=True)),
    ],
    ids=["adam", "adam-l2", "adamw"],
)
def test_adam_takes_exactly_torchs_steps(ours, theirs):
    torch.manual_seed(0)
    model = RewardMLP(6, 3, 8, 2)
    twin = copy.deepcopy(model)
    steppers = [(model, Adam(model.parameters(), 0.01, **ours)), (twin, theirs(twin.parameters()))]
    for _ in range(25):
        context, actions = torch.randn(4, 6), torch.randn(4, 3)
        for net, optimizer in steppers:
            optimizer.zero_grad()
            net.head_outputs(context, actions).square().mean().backward()
            optimizer.step()
    for mine, reference in zip(model.parameters(), twin.parameters()):
        assert torch.equal(mine, reference)
    assert not torch.equal(model.heads.weight, RewardMLP(6, 3, 8, 2).heads.weight)


def test_fitting_leaves_torchs_compiler_unimported():
    # torch.optim's own step imports torch._dynamo, a second of a run that needs none of it
    code = (
        "import sys, tests.integration.test_learner as t\n"
        "from reflexd.extensions import load_learner\n"
        "for name in ('mlp', 'transformer'):\n"
        "    load_learner(name).fit(t.known_problem(200), t.SETTINGS, seed=0)\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr


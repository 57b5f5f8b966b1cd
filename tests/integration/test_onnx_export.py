import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

import onnx
from reflexd.errors import ExportError, TrainingError
from reflexd.exporters.onnx import export_onnx, graph_key, parity
from reflexd.plugins.learners.mlp import RewardMLP
from reflexd.plugins.learners.transformer import RewardTransformer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

CONTEXT_DIM, ACTION_DIM = 24, 8




def with_bilinear(module):
    """A trained MLP's bilinear term is not zero, as a fresh one's is: give it weights to export."""
    torch.nn.init.normal_(module.bilinear.weight, std=0.05)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    module = with_bilinear(RewardMLP(CONTEXT_DIM, ACTION_DIM, hidden=16, heads=4))
    path = tmp_path_factory.mktemp("onnx") / "policy.onnx"
    exported = export_onnx(module, CONTEXT_DIM, ACTION_DIM, path)
    return module, path, exported


def random_inputs(batch, n_actions, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(batch, CONTEXT_DIM)).astype(np.float32),
        rng.normal(size=(batch, n_actions, ACTION_DIM)).astype(np.float32),
    )


@pytest.mark.parametrize(("batch", "n_actions"), [(1, 1), (2, 3), (17, 5), (300, 40)])
def test_parity_holds_for_any_batch_and_action_count(exported, batch, n_actions):
    module, path, _ = exported
    context, actions = random_inputs(batch, n_actions, seed=batch)
    assert parity(module, path, context, actions) <= 1e-5


def test_parity_detects_a_model_that_differs_from_the_file(exported, tmp_path):
    module, path, _ = exported
    changed = RewardMLP(CONTEXT_DIM, ACTION_DIM, hidden=16, heads=4)
    changed.load_state_dict(module.state_dict())
    with torch.no_grad():
        changed.heads.bias.add_(0.01)
    assert parity(changed, path, *random_inputs(4, 3, seed=0)) == pytest.approx(0.01, rel=1e-3)


def test_parity_is_relative_beyond_one(tmp_path):
    """Scores in the thousands (rewards in such units) pass however float32 rounds them, and a
    change of one part in ten thousand is still seen."""
    torch.manual_seed(0)
    module = with_bilinear(RewardMLP(CONTEXT_DIM, ACTION_DIM, hidden=16, heads=4))
    with torch.no_grad():
        module.heads.weight.mul_(1000.0)
        module.bilinear.weight.mul_(1000.0)
        module.heads.bias.add_(5000.0)
    export_onnx(module, CONTEXT_DIM, ACTION_DIM, tmp_path / "large.onnx")
    inputs = random_inputs(64, 5, seed=1)
    assert parity(module, tmp_path / "large.onnx", *inputs) <= 1e-5
    with torch.no_grad():
        module.heads.bias.mul_(1.0001)
    assert parity(module, tmp_path / "large.onnx", *inputs) > 5e-5


def test_graph_names_shapes_and_outputs(exported):
    module, path, result = exported
    assert result.seconds > 0 and not result.reused
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert list(inputs) == ["context", "actions"]
    assert inputs["context"][1] == CONTEXT_DIM and isinstance(inputs["context"][0], str)
    assert inputs["actions"][2] == ACTION_DIM and all(isinstance(d, str) for d in inputs["actions"][:2])
    assert [o.name for o in session.get_outputs()] == ["scores", "spread"]
    scores, spread = session.run(None, dict(zip(["context", "actions"], random_inputs(6, 9, seed=1))))
    assert scores.shape == spread.shape == (6, 9)
    assert (spread >= 0).all()


def test_file_is_self_contained_and_valid(exported):
    _, path, _ = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["policy.onnx"]
    model = onnx.load(str(path), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)


def test_unwritable_destination_is_an_export_error(tmp_path):
    module = RewardMLP(CONTEXT_DIM, ACTION_DIM, hidden=4, heads=1)
    with pytest.raises(ExportError) as info:
        export_onnx(module, CONTEXT_DIM, ACTION_DIM, tmp_path / "missing-dir" / "policy.onnx")
    assert isinstance(info.value, TrainingError)


# ---- graphs reused across models of one architecture -------------------------------------


class TanhMLP(RewardMLP):
    """The MLP's parameters exactly, and another function of them."""

    def head_outputs(self, context, actions):
        ctx = self.context_layer(context)
        if actions.dim() == 3:
            ctx = ctx.unsqueeze(1)
        return self.heads(torch.tanh(ctx + self.action_layer(actions))) + self.bilinear_term(context, actions)


def mlp(seed, hidden=16, heads=4, cls=RewardMLP, context_dim=CONTEXT_DIM):
    torch.manual_seed(seed)
    return with_bilinear(cls(context_dim, ACTION_DIM, hidden=hidden, heads=heads))


def transformer(seed, heads=4):
    torch.manual_seed(seed)
    return RewardTransformer(CONTEXT_DIM, ACTION_DIM, d_model=16, layers=1, heads=heads, ensemble=3)


@pytest.mark.parametrize("make", [mlp, transformer], ids=["mlp", "transformer"])
def test_a_cached_graph_takes_new_weights_and_equals_a_fresh_export(make, tmp_path):
    graphs = tmp_path / "graphs"
    first, second = make(0), make(1)
    # the reward bounds are weights like any other: the second model's must reach the graph
    second.reward_low.fill_(-0.05)
    second.reward_high.fill_(0.05)
    assert not export_onnx(first, CONTEXT_DIM, ACTION_DIM, tmp_path / "first.onnx", graphs).reused
    (template,) = graphs.iterdir()
    # the template keeps the graph, not the weights of the model it came from
    kept = onnx.load(str(template))
    weights = {name for name, _ in (*first.named_parameters(), *first.named_buffers())}
    assert {t.name for t in kept.graph.initializer} == weights
    assert all(not t.raw_data and not t.float_data for t in kept.graph.initializer)

    reused = export_onnx(second, CONTEXT_DIM, ACTION_DIM, tmp_path / "reused.onnx", graphs)
    fresh = export_onnx(second, CONTEXT_DIM, ACTION_DIM, tmp_path / "fresh.onnx")
    assert reused.reused and not fresh.reused
    assert (tmp_path / "reused.onnx").read_bytes() == (tmp_path / "fresh.onnx").read_bytes()
    onnx.checker.check_model(str(tmp_path / "reused.onnx"), full_check=True)
    for batch, n_actions in [(1, 1), (7, 5)]:
        inputs = random_inputs(batch, n_actions, seed=batch)
        assert parity(second, tmp_path / "reused.onnx", *inputs) <= 1e-5
        assert parity(first, tmp_path / "reused.onnx", *inputs) > 1e-3  # the weights really changed


@pytest.mark.parametrize(
    "other",
    [
        lambda: mlp(1, hidden=8),  # other parameter shapes
        lambda: mlp(1, heads=2),
        lambda: mlp(1, cls=TanhMLP),  # same parameters, another forward
        lambda: mlp(1, context_dim=CONTEXT_DIM + 1),
    ],
    ids=["hidden", "heads", "class", "inputs"],
)
def test_a_graph_of_another_architecture_is_never_reused(other, tmp_path):
    graphs = tmp_path / "graphs"
    export_onnx(mlp(0), CONTEXT_DIM, ACTION_DIM, tmp_path / "first.onnx", graphs)
    module = other()
    dim = module.context_layer.in_features
    assert not export_onnx(module, dim, ACTION_DIM, tmp_path / "other.onnx", graphs).reused
    assert len(list(graphs.iterdir())) == 2
    rng = np.random.default_rng(0)
    context = rng.normal(size=(5, dim)).astype(np.float32)
    actions = rng.normal(size=(5, 3, ACTION_DIM)).astype(np.float32)
    assert parity(module, tmp_path / "other.onnx", context, actions) <= 1e-5


def test_plain_attributes_are_part_of_the_key():
    # attention heads split the same weights differently: same parameter shapes, another graph
    assert graph_key(transformer(0, heads=4), CONTEXT_DIM, ACTION_DIM) != graph_key(
        transformer(0, heads=2), CONTEXT_DIM, ACTION_DIM
    )
    assert graph_key(transformer(0), CONTEXT_DIM, ACTION_DIM) == graph_key(transformer(1), CONTEXT_DIM, ACTION_DIM)


def test_an_unreadable_template_is_traced_again_and_replaced(tmp_path):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    template = graphs / f"{graph_key(mlp(0), CONTEXT_DIM, ACTION_DIM)}.onnx"
    template.write_bytes(b"not an onnx graph")
    assert not export_onnx(mlp(0), CONTEXT_DIM, ACTION_DIM, tmp_path / "a.onnx", graphs).reused
    assert parity(mlp(0), tmp_path / "a.onnx", *random_inputs(3, 2, seed=0)) <= 1e-5
    assert export_onnx(mlp(1), CONTEXT_DIM, ACTION_DIM, tmp_path / "b.onnx", graphs).reused



def test_only_the_most_recently_used_templates_are_kept(tmp_path):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    for i in range(20):  # stand-ins for the templates of past architectures, oldest first
        old = graphs / f"{i:032x}.onnx"
        old.write_bytes(b"")
        os.utime(old, (1_000_000 + i, 1_000_000 + i))
    os.utime(graphs / f"{0:032x}.onnx")  # the oldest, just used
    export_onnx(mlp(0), CONTEXT_DIM, ACTION_DIM, tmp_path / "a.onnx", graphs)
    kept = {p.name for p in graphs.iterdir()}
    assert len(kept) == 16
    assert f"{graph_key(mlp(0), CONTEXT_DIM, ACTION_DIM)}.onnx" in kept and f"{0:032x}.onnx" in kept
    assert kept >= {f"{i:032x}.onnx" for i in range(6, 20)} and f"{5:032x}.onnx" not in kept

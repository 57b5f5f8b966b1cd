import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from reflexd.errors import TrainingError
from reflexd.exporters.onnx import ExportError, export_onnx, parity
from reflexd.plugins.learners.mlp import RewardMLP

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

CONTEXT_DIM, ACTION_DIM = 24, 8




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    module = RewardMLP(CONTEXT_DIM, ACTION_DIM, hidden=16, heads=4)
    path = tmp_path_factory.mktemp("onnx") / "policy.onnx"
    seconds = export_onnx(module, CONTEXT_DIM, ACTION_DIM, path)
    return module, path, seconds


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


def test_graph_names_shapes_and_outputs(exported):
    module, path, seconds = exported
    assert seconds > 0
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

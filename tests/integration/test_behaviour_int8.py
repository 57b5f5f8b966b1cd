"""The behaviour model's int8 step graph: written beside the float one by the training run, kept
in the registry with its own sha256, run by the early-warning client unless it asks for full
precision. Real torch training of a small model, real ONNX files, real onnxruntime; one model is
trained for the whole module."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

import onnx
from reflexd.client.watch import EpisodeWatch
from reflexd.deciding.behaviour import BEHAVIOUR_DIR, BehaviourModel, BehaviourRegistry, read_behaviour_run
from reflexd.errors import ModelIntegrityError
from reflexd.learning.agentsim import ToolAgent
from reflexd.manifest import BEHAVIOUR_INT8_FILE, MANIFEST_FILE, BehaviourManifest, decode_behaviour_manifest
from reflexd.registry import sha256_of

SMALL = {"hidden": 32, "layers": 2, "embedding": 8, "head_hidden": 32, "epochs": 8, "context_dim": 32,
         "optimizer": "adam", "learning_rate": 3e-3, "batch_episodes": 64}
TINY = {"hidden": 8, "layers": 1, "embedding": 4, "head_hidden": 8, "epochs": 1, "context_dim": 16}


class Trained(msgspec.Struct):
    out: Path
    manifest: BehaviourManifest
    net: object
    test: list  # fresh episodes the model never saw


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from reflexd.trainer.behaviour import BehaviourSettings, train_model

    out = tmp_path_factory.mktemp("behaviour-int8") / "run"
    manifest, net = train_model(ToolAgent(seed=1).episodes(800), out, BehaviourSettings(**SMALL), seed=0)
    return Trained(out, manifest, net, ToolAgent(seed=2).episodes(40, prefix="t"))


def _publish(trained: Trained, models: Path) -> BehaviourRegistry:
    registry = BehaviourRegistry(models / BEHAVIOUR_DIR)
    registry.promote(registry.add_run(trained.out).version)
    return registry


def _run(watch: EpisodeWatch, episodes: list) -> tuple[np.ndarray, np.ndarray]:
    """(success [S], action probabilities [S, V]) of every step of ``episodes``, interleaved step by
    step so each episode's state is kept apart."""
    assert watch.model is not None
    vocab = watch.model.vocabulary
    rows: dict[tuple[int, int], tuple[float, list[float]]] = {}
    for t in range(max(len(ep) for ep in episodes)):
        for i, ep in enumerate(episodes):
            if t < len(ep):
                p = watch.step(ep.episode, ep.observations[t], ep.actions[t], ep.rewards[t])
                rows[i, t] = (p.success, [p.next_action_probs[a] for a in vocab])
    keys = sorted(rows)
    return np.array([rows[k][0] for k in keys]), np.array([rows[k][1] for k in keys])


def _torch(trained: Trained, episodes: list) -> tuple[np.ndarray, np.ndarray]:
    from reflexd.trainer.behaviour import predict, sequences

    m = trained.manifest
    probs, success = predict(trained.net, sequences(episodes, m.vocabulary, m.features, m.max_steps))
    return success, probs


def test_the_run_writes_an_int8_graph_the_manifest_and_registry_carry(trained: Trained, tmp_path: Path) -> None:
    from reflexd.trainer.behaviour import INT8_PARITY_TOLERANCE

    m, path = trained.manifest, trained.out / BEHAVIOUR_INT8_FILE
    assert m.int8 is not None and m.int8.file == BEHAVIOUR_INT8_FILE and path.is_file()
    assert m.int8.sha256 == sha256_of(path) != m.sha256
    assert m.int8.parity_tolerance == INT8_PARITY_TOLERANCE
    assert m.training.int8_parity_ok and m.training.int8_refused is None
    assert 0 < m.int8.parity_diff == m.training.int8_parity_diff <= INT8_PARITY_TOLERANCE
    assert m.training.parity_ok and m.training.parity_diff <= 1e-5  # the float graph's check is unchanged
    assert read_behaviour_run(trained.out) == m
    # int8 weights: the matrix products run on integers but the step input's, and the file is smaller
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulInteger") >= 2 * SMALL["layers"] - 1 and ops.count("MatMul") == 1
    assert "MatMulInteger" not in {n.op_type for n in onnx.load(str(trained.out / m.file)).graph.node}
    assert path.stat().st_size < (trained.out / m.file).stat().st_size

    registry = _publish(trained, tmp_path)
    live = registry.manifest("v0001")
    assert live.int8 is not None and live.int8.sha256 == m.int8.sha256
    assert sha256_of(registry.root / "v0001" / BEHAVIOUR_INT8_FILE) == live.int8.sha256
    assert registry.load("v0001", int8=True)[1] == path.read_bytes()
    assert registry.load("v0001")[1] == (trained.out / m.file).read_bytes()


def test_the_watch_runs_int8_by_default_and_the_float_graph_when_asked(trained: Trained, tmp_path: Path) -> None:
    _publish(trained, tmp_path)
    fast, full = EpisodeWatch(tmp_path), EpisodeWatch(tmp_path, full_precision=True)
    assert (fast.precision, full.precision) == ("int8", "fp32")
    assert (fast.model.precision, full.model.precision) == ("int8", "fp32")
    assert fast.model.version == full.model.version == "v0001"
    episodes = trained.test
    s8, p8 = _run(fast, episodes)
    s32, p32 = _run(full, episodes)
    ts, tp = _torch(trained, episodes)
    # the float graph is torch's to float32 rounding; the int8 one within its tolerance of both
    assert max(np.abs(s32 - ts).max(), np.abs(p32 - tp).max()) < 1e-5
    tolerance = trained.manifest.int8.parity_tolerance
    deviation = max(np.abs(s8 - s32).max(), np.abs(p8 - p32).max())
    assert 1e-6 < deviation <= tolerance, deviation  # a different graph, close to the float one
    assert max(np.abs(s8 - ts).max(), np.abs(p8 - tp).max()) <= tolerance
    np.testing.assert_allclose(p8.sum(1), 1.0, atol=1e-5)
    # a fixed model is run as it is
    assert EpisodeWatch(BehaviourModel.from_dir(trained.out, int8=True)).precision == "int8"
    assert EpisodeWatch(BehaviourModel.from_dir(trained.out)).precision == "fp32"


def test_a_changed_int8_file_is_refused(trained: Trained, tmp_path: Path) -> None:
    registry = _publish(trained, tmp_path)
    path = registry.root / "v0001" / BEHAVIOUR_INT8_FILE
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match=r"model v0001 refused: model\.int8\.onnx: sha256 .* does not match manifest"):
        registry.load("v0001", int8=True)
    with pytest.raises(ModelIntegrityError, match="model.int8.onnx"):
        registry.promote("v0001")
    # never quietly run on the float graph instead: the version is refused, and the watch says why
    watch = EpisodeWatch(tmp_path)
    assert watch.model is None and watch.precision is None
    assert watch.step("e", {"task": "math"}, "calculator") is None
    assert watch.error is not None and "model.int8.onnx: sha256" in watch.error
    # the float graph is intact: asking for it runs
    assert EpisodeWatch(tmp_path, full_precision=True).precision == "fp32"
    with pytest.raises(ModelIntegrityError, match="model.int8.onnx"):
        BehaviourModel.from_dir(registry.root / "v0001", int8=True)


def test_a_manifest_written_before_int8_still_loads_and_runs_the_float_graph(trained: Trained, tmp_path: Path) -> None:
    registry = _publish(trained, tmp_path)
    version = registry.root / "v0001"
    # as a version published before the int8 graph existed: no int8 key, no int8 file
    old = msgspec.to_builtins(registry.manifest("v0001"))
    del old["int8"]
    old["training"] = {k: v for k, v in old["training"].items() if not k.startswith("int8_")}
    (version / MANIFEST_FILE).write_bytes(msgspec.json.encode(old))
    (version / BEHAVIOUR_INT8_FILE).unlink()
    assert b"int8" not in (version / MANIFEST_FILE).read_bytes()
    manifest = decode_behaviour_manifest((version / MANIFEST_FILE).read_bytes())
    assert manifest.int8 is None and manifest.training.int8_parity_ok is None
    assert registry.load("v0001", int8=True)[1] == (version / manifest.file).read_bytes()
    registry.promote("v0001")
    watch = EpisodeWatch(tmp_path)
    assert watch.precision == "fp32" and watch.error is None
    s, p = _run(watch, trained.test[:10])
    ts, tp = _torch(trained, trained.test[:10])
    assert max(np.abs(s - ts).max(), np.abs(p - tp).max()) < 1e-5


def test_an_int8_graph_that_fails_its_check_is_not_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reflexd.trainer import behaviour as trainer

    episodes = ToolAgent(seed=4).episodes(60)
    # a tolerance nothing quantised can meet stands in for a quantisation gone wrong
    monkeypatch.setattr(trainer, "INT8_PARITY_TOLERANCE", 1e-9)
    out = tmp_path / "run"
    manifest = trainer.train(episodes, out, trainer.BehaviourSettings(**TINY))
    t = manifest.training
    assert manifest.int8 is None and not (out / BEHAVIOUR_INT8_FILE).exists()
    assert t.int8_parity_ok is False and t.int8_parity_diff is not None and t.int8_parity_diff > 1e-9
    assert "above the int8 tolerance" in t.int8_refused
    assert t.parity_ok  # the model itself is still fit to publish, with its float graph alone
    registry = BehaviourRegistry(tmp_path / "models" / BEHAVIOUR_DIR)
    registry.promote(registry.add_run(out).version)
    assert sorted(p.name for p in (registry.root / "v0001").iterdir()) == [MANIFEST_FILE, manifest.file]
    assert EpisodeWatch(tmp_path / "models").precision == "fp32"

    # a quantiser that fails outright: the same, with its error recorded
    def broken(path: Path, out: Path) -> float:
        out.write_bytes(b"half a file")
        raise RuntimeError("no quantiser today")

    monkeypatch.setattr(trainer, "quantize", broken)
    out = tmp_path / "run2"
    manifest = trainer.train(episodes, out, trainer.BehaviourSettings(**TINY))
    assert manifest.int8 is None and not (out / BEHAVIOUR_INT8_FILE).exists()
    assert manifest.training.int8_refused == "quantisation failed: RuntimeError: no quantiser today"
    assert manifest.training.parity_ok


def test_a_run_copied_with_a_changed_int8_file_is_not_added(trained: Trained, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained.out, run)
    (run / BEHAVIOUR_INT8_FILE).write_bytes((run / BEHAVIOUR_INT8_FILE).read_bytes()[:-1])
    registry = BehaviourRegistry(tmp_path / "models" / BEHAVIOUR_DIR)
    with pytest.raises(ModelIntegrityError, match="int8 sha256"):
        registry.add_run(run)
    assert registry.versions() == [] and list(registry.root.iterdir()) == []

"""The model registry: versions with manifests, sha256 checks, and promote/rollback history."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

import onnx
from onnx import TensorProto, helper
from reflexd.config import ExplorationConfig
from reflexd.errors import ModelIntegrityError, ModelNotFound, PointerMoved
from reflexd.features import FeatureSpec
from reflexd.manifest import FORMAT, MANIFEST_FILE, MODEL_FILE, Manifest, Training
from reflexd.registry import CURRENT_FILE, HISTORY_FILE, Registry


def identity_model(path: Path, name: str = "identity") -> Path:
    """A tiny real ONNX file: y = Identity(x). ``name`` makes files with different bytes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], name, [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def fields(**extra: Any) -> dict[str, Any]:
    return {
        "parent": None,
        "created": 1_700_000_000.0,
        "learner": "mlp",
        "features": FeatureSpec(context_dim=8, action_dim=4, seed=1),
        "exploration": ExplorationConfig(strategy="softmax"),
        "training": {"train_rows": 10},
        **extra,
    }


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def add_n(registry: Registry, tmp_path: Path, n: int) -> list[Manifest]:
    out = []
    for i in range(n):
        src = identity_model(tmp_path / f"src{i}.onnx", name=f"m{i}")
        out.append(registry.add(src, fields(parent=out[-1].version if out else None)))
    return out


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def experience(training: dict[str, Any]) -> int:
    return msgspec.convert(training, Training).experience


def fit_rows(training: dict[str, Any]) -> int:
    return msgspec.convert(training, Training).fit_rows


# ---- adding --------------------------------------------------------------------------------


def test_experience_counts_the_run_and_fit_rows_what_the_model_saw() -> None:
    candidate = {"train_rows": 80, "holdout_rows": 20, "refit": False}
    refit = {**candidate, "refit": True}
    assert experience(candidate) == experience(refit) == 100
    assert fit_rows(candidate) == 80 and fit_rows(refit) == 100
    # manifests written before refits: no refit key
    assert experience({"train_rows": 80, "holdout_rows": 20}) == 100 and fit_rows({"train_rows": 80}) == 80


def test_a_manifest_written_by_0_1_0_still_loads(registry: Registry, tmp_path: Path) -> None:
    # 0.1.0 wrote no format key and kept the trainer's whole result, untyped, under training
    added = registry.add(identity_model(tmp_path / "m.onnx"), fields())
    path = registry.root / added.version / MANIFEST_FILE
    old = json.loads(path.read_text())
    del old["format"]
    old["training"] = {
        "learner": "mlp", "features": {"context_dim": 8, "action_dim": 4, "seed": 1}, "seed": 0,
        "train_rows": 80, "holdout_rows": 20, "dropped_rows": 0, "refitted": True, "window_start": 1.0,
        "window_end": 2.0, "epochs": 5, "train_loss": 0.1, "torch_version": "2.13.0", "cross_fitted": False,
        "refit": True, "candidate_sha256": "ab" * 32,
    }
    path.write_text(json.dumps(old))
    manifest = registry.manifest(added.version)
    assert manifest.format == 1 and added.format == FORMAT > 1
    assert manifest.training.fit_rows == 100 and manifest.training.window_end == 2.0
    assert manifest.training.candidate_sha256 == "ab" * 32


def test_empty_registry(registry: Registry) -> None:
    assert registry.versions() == []
    assert registry.current() is None
    assert registry.current_stamp() is None
    assert registry.history() == []
    assert registry.next_version() == "v0001"


def test_add_two_versions_writes_model_and_manifest(registry: Registry, tmp_path: Path) -> None:
    src1 = identity_model(tmp_path / "a.onnx", "a")
    src2 = identity_model(tmp_path / "b.onnx", "b")
    m1 = registry.add(src1, fields())
    m2 = registry.add(src2, fields(parent="v0001", version="ignored"))
    assert (m1.version, m2.version) == ("v0001", "v0002")
    assert registry.versions() == ["v0001", "v0002"]
    assert m2.parent == "v0001"
    for m, src in [(m1, src1), (m2, src2)]:
        folder = registry.root / m.version
        assert (folder / MODEL_FILE).read_bytes() == src.read_bytes()
        assert m.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
        on_disk = json.loads((folder / MANIFEST_FILE).read_text())
        assert on_disk["sha256"] == m.sha256
        assert on_disk["version"] == m.version
        assert on_disk["file"] == MODEL_FILE
        assert registry.manifest(m.version) == m
    assert m1.sha256 != m2.sha256
    assert registry.manifest("v0002").features == FeatureSpec(context_dim=8, action_dim=4, seed=1)
    assert registry.manifest("v0002").exploration.strategy == "softmax"
    assert leftovers(registry.root) == []  # no staging directories left behind


def test_load_returns_exact_bytes(registry: Registry, tmp_path: Path) -> None:
    src = identity_model(tmp_path / "a.onnx")
    registry.add(src, fields())
    manifest, data = registry.load("v0001")
    assert data == src.read_bytes()
    assert manifest.version == "v0001"
    onnx.checker.check_model(onnx.load_from_string(data))


def test_versions_sorted_numerically(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 1)
    one = registry.root / "v0001"
    for name in ["v10000", "v0010", "v0002", "v0999"]:
        (registry.root / name).mkdir()
        (registry.root / name / MANIFEST_FILE).write_bytes((one / MANIFEST_FILE).read_bytes())
    # not versions: no manifest, bad names, staging leftovers
    (registry.root / "v0003").mkdir()
    (registry.root / "x0004").mkdir()
    (registry.root / ".staging-v0005-1").mkdir()
    assert registry.versions() == ["v0001", "v0002", "v0010", "v0999", "v10000"]
    assert registry.next_version() == "v10001"


# ---- promote / rollback ----------------------------------------------------------------------


def test_promote_and_rollback_history(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 3)
    for v in ["v0001", "v0002", "v0003"]:
        assert registry.promote(v).version == v
        assert registry.current() == v
    assert registry.history() == ["v0001", "v0002", "v0003"]
    assert registry.rollback() == "v0002"
    assert registry.current() == "v0002"
    assert registry.history() == ["v0001", "v0002"]
    assert registry.rollback() == "v0001"
    assert registry.current() == "v0001"
    assert registry.history() == ["v0001"]
    assert registry.rollback() is None  # from the first model, back to none
    assert registry.current() is None and registry.history() == []
    assert (registry.root / CURRENT_FILE).read_bytes() == b""
    with pytest.raises(ModelNotFound, match="no model is live"):
        registry.rollback()
    assert registry.current() is None  # a refused rollback changes nothing
    assert registry.history() == []
    assert registry.promote("v0002").version == "v0002"  # and the line goes on from there
    assert registry.history() == ["v0002"] and registry.predecessor() == ("v0002", None)


def test_promoting_the_live_version_again_does_not_grow_history(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 2)
    registry.promote("v0001")
    registry.promote("v0001")
    registry.promote("v0002")
    assert registry.history() == ["v0001", "v0002"]
    assert registry.rollback() == "v0001"


def test_rollback_with_nothing_promoted_raises(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 1)
    with pytest.raises(ModelNotFound, match="nothing to roll back"):
        registry.rollback()
    assert registry.current() is None


def test_rollback_from_a_first_model_not_in_history(registry: Registry, tmp_path: Path) -> None:
    """A CURRENT written by hand with no history (or a history lost) is still the first model."""
    add_n(registry, tmp_path, 1)
    registry.ensure()
    (registry.root / CURRENT_FILE).write_text("v0001\n")
    with pytest.raises(PointerMoved):
        registry.rollback(expect="v0002")
    assert registry.rollback(expect="v0001") is None
    assert registry.current() is None


def test_current_replaced_atomically(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 2)
    registry.promote("v0001")
    stamp1 = registry.current_stamp()
    ino1 = os.stat(registry.root / CURRENT_FILE).st_ino
    registry.promote("v0002")
    stamp2 = registry.current_stamp()
    assert stamp1 is not None and stamp2 is not None and stamp1 != stamp2
    # a rename puts a new file in place; it is never rewritten in place
    assert os.stat(registry.root / CURRENT_FILE).st_ino != ino1
    assert (registry.root / CURRENT_FILE).read_text() == "v0002\n"
    assert json.loads((registry.root / HISTORY_FILE).read_text()) == ["v0001", "v0002"]
    registry.rollback()
    assert leftovers(registry.root) == []  # no temp files left


def test_current_tolerates_whitespace_and_empty_pointer(registry: Registry, tmp_path: Path) -> None:
    registry.ensure()
    (registry.root / CURRENT_FILE).write_text("")
    assert registry.current() is None
    (registry.root / CURRENT_FILE).write_text("  v0007 \n")
    assert registry.current() == "v0007"


# ---- integrity -------------------------------------------------------------------------------


def test_tampered_model_refused(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 2)
    registry.promote("v0001")
    model = registry.root / "v0002" / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError) as info:
        registry.load("v0002")
    assert info.value.version == "v0002"
    assert "sha256" in str(info.value)
    with pytest.raises(ModelIntegrityError):
        registry.promote("v0002")
    assert registry.current() == "v0001"
    assert registry.history() == ["v0001"]


def test_missing_model_file_refused(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 1)
    (registry.root / "v0001" / MODEL_FILE).unlink()
    with pytest.raises(ModelIntegrityError):
        registry.load("v0001")


def test_unreadable_manifest_refused(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 1)
    (registry.root / "v0001" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelIntegrityError):
        registry.manifest("v0001")
    summary = registry.summary()
    assert summary[0]["version"] == "v0001" and "error" in summary[0]


def test_rollback_refuses_tampered_target(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 2)
    registry.promote("v0001")
    registry.promote("v0002")
    (registry.root / "v0001" / MODEL_FILE).write_bytes(b"not the model")
    with pytest.raises(ModelIntegrityError):
        registry.rollback()
    assert registry.current() == "v0002"
    assert registry.history() == ["v0001", "v0002"]


def test_a_model_of_another_feature_scheme_is_never_made_live(registry: Registry, tmp_path: Path) -> None:
    """After an upgrade, history can name a model hashed the old way: agents would refuse it, so
    neither promote nor rollback points at it."""
    old = msgspec.structs.replace(FeatureSpec(context_dim=8, action_dim=4, seed=1), scheme="crc32-signed-log1p-v1")
    registry.add(identity_model(tmp_path / "old.onnx", name="old"), fields(features=old))
    add_n(registry, tmp_path, 1)
    # the pointer and history an older reflexd left behind
    (registry.root / HISTORY_FILE).write_text('["v0001"]')
    (registry.root / CURRENT_FILE).write_text("v0001\n")
    registry.promote("v0002")
    with pytest.raises(ModelIntegrityError, match="scheme 'crc32-signed-log1p-v1'") as info:
        registry.rollback()
    assert info.value.version == "v0001"
    assert registry.current() == "v0002"
    assert registry.history() == ["v0001", "v0002"]
    with pytest.raises(ModelIntegrityError, match="train a new model"):
        registry.promote("v0001")
    assert registry.manifest("v0001").features == old  # still listed, with what it was


@pytest.mark.parametrize("version", ["v0009", "v1", "latest", "", "V0001"])
def test_unknown_version(registry: Registry, tmp_path: Path, version: str) -> None:
    add_n(registry, tmp_path, 1)
    for call in (registry.manifest, registry.load, registry.promote):
        with pytest.raises(ModelNotFound):
            call(version)
    assert registry.current() is None


@pytest.mark.parametrize("version", ["../x", "../models/v0001", "v0001/..", "v0001/../v0001", "/etc", "..", "."])
def test_path_traversal_is_not_found(registry: Registry, tmp_path: Path, version: str) -> None:
    add_n(registry, tmp_path, 1)
    # a real manifest and model outside the registry, where "../x" would point
    outside = registry.root.parent / "x"
    outside.mkdir()
    (outside / MANIFEST_FILE).write_bytes((registry.root / "v0001" / MANIFEST_FILE).read_bytes())
    (outside / MODEL_FILE).write_bytes((registry.root / "v0001" / MODEL_FILE).read_bytes())
    for call in (registry.manifest, registry.load, registry.promote):
        with pytest.raises(ModelNotFound):
            call(version)
    assert registry.current() is None


def test_summary_lists_manifests(registry: Registry, tmp_path: Path) -> None:
    add_n(registry, tmp_path, 2)
    summary = registry.summary()
    assert [s["version"] for s in summary] == ["v0001", "v0002"]
    assert summary[1]["parent"] == "v0001"
    assert msgspec.convert(summary[0], Manifest) == registry.manifest("v0001")


def test_manifest_exploration_for_agent(registry: Registry, tmp_path: Path) -> None:
    src = identity_model(tmp_path / "a.onnx")
    special = ExplorationConfig(strategy="squarecb", gamma=3.0)
    m = registry.add(src, fields(agent_exploration={"router": special}))
    loaded = registry.manifest(m.version)
    assert loaded.exploration_for("router") == special
    assert loaded.exploration_for("other") == ExplorationConfig(strategy="softmax")


def test_add_copies_and_leaves_source_untouched(registry: Registry, tmp_path: Path) -> None:
    src = identity_model(tmp_path / "a.onnx")
    before = src.read_bytes()
    registry.add(src, fields())
    assert src.read_bytes() == before
    src.write_bytes(b"changed afterwards")
    assert registry.load("v0001")[1] == before

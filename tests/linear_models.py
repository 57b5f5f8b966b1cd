"""Hand-made models for tests that need known scores: tiny ONNX graphs with the scoring contract
(inputs context [B, Dc] and actions [B, A, Da]; outputs scores and spread [B, A]), registered as
model versions the way the scheduler registers a trained one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np

import onnx
from onnx import helper, numpy_helper
from reflexd.features import FeatureSpec, Hasher
from reflexd.manifest import Manifest
from reflexd.registry import Registry


def action_weights(spec: FeatureSpec, scores: dict[str, float]) -> np.ndarray:
    """Weights under which each action id's hashed vector scores ``scores[id]`` (least squares: exact
    while the ids' vectors are independent, which the test checks by scoring)."""
    vectors = Hasher(spec).actions(list(scores)).astype(np.float64)
    found, *_ = np.linalg.lstsq(vectors, np.array(list(scores.values()), dtype=np.float64), rcond=None)
    return found


def linear_model(spec: FeatureSpec, scores: dict[str, float], spread: float = 0.0) -> bytes:
    """An ONNX model scoring each action by its id alone, ``scores[id]``, whatever the context."""
    wa = action_weights(spec, scores).astype(np.float32).reshape(spec.action_dim, 1)
    wc = np.zeros((spec.context_dim, 1), dtype=np.float32)
    inputs = [
        helper.make_tensor_value_info("context", onnx.TensorProto.FLOAT, ["B", spec.context_dim]),
        helper.make_tensor_value_info("actions", onnx.TensorProto.FLOAT, ["B", "A", spec.action_dim]),
    ]
    outputs = [
        helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["B", "A"]),
        helper.make_tensor_value_info("spread", onnx.TensorProto.FLOAT, ["B", "A"]),
    ]
    inits = [
        numpy_helper.from_array(wa, "wa"),
        numpy_helper.from_array(wc, "wc"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "last"),
        numpy_helper.from_array(np.array(spread, dtype=np.float32), "width"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["actions", "wa"], ["by_action3"]),
        helper.make_node("Squeeze", ["by_action3", "last"], ["by_action"]),
        helper.make_node("MatMul", ["context", "wc"], ["by_context"]),  # [B, 1], zero: the context is read
        helper.make_node("Add", ["by_action", "by_context"], ["scores"]),
        helper.make_node("Mul", ["scores", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "width"], ["spread"]),
    ]
    graph = helper.make_graph(nodes, "linear", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def register(
    registry: Registry,
    tmp: Path,
    spec: FeatureSpec,
    scores: dict[str, float],
    exploration: dict[str, Any],
    experience: int = 100,
    **fields: Any,
) -> Manifest:
    """Add a linear model as the registry's next version (not promoted)."""
    path = tmp / f"model-{registry.next_version()}.onnx"
    path.write_bytes(linear_model(spec, scores))
    return registry.add(
        path,
        {
            "parent": None, "created": 1.0, "learner": "mlp", "features": msgspec.to_builtins(spec),
            "exploration": exploration, "training": {"train_rows": experience}, **fields,
        },
    )

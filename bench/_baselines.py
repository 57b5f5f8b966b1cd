"""What a decision costs elsewhere, on the same decisions: the bare model, and Vowpal Wabbit.

- ``NumpyGraph``: the served ONNX graph executed node by node with numpy (no onnxruntime), checked
  to give onnxruntime's scores.
- ``VowpalWabbit``: contextual-bandit prediction with ``--cb_explore_adf`` (one ``shared`` line
  for the context and one line per action), the agent-side model a reader would otherwise reach
  for, trained briefly on the same kind of decisions so its weights are not all zero.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import vowpalwabbit

import onnx
from onnx import numpy_helper

# ---- numpy ---------------------------------------------------------------------------------------

_ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "MatMul": np.matmul, "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Pow": np.power, "Sqrt": np.sqrt, "Tanh": np.tanh, "Relu": lambda a: np.maximum(a, 0.0),
    "Max": np.maximum, "Min": np.minimum, "CastLike": lambda a, like: a.astype(like.dtype),
}


def _compile(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> Callable[..., np.ndarray]:
    """One numpy function per node, called with every input; axes and shapes are read once here."""
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    second = consts.get(node.input[1]) if len(node.input) > 1 else None  # opset 13+: axes or shape
    if op in _ELEMENTWISE:
        return _ELEMENTWISE[op]
    if op == "Constant":
        value = next(iter(attrs.values()))
        array = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.array(value)
        return lambda: array
    if op == "Gemm":
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)

        def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
            y = (a.T if trans_a else a) @ (b.T if trans_b else b)
            y = y * alpha if alpha != 1.0 else y
            return y if c is None else y + (c * beta if beta != 1.0 else c)

        return gemm
    if op == "Transpose":
        perm = attrs.get("perm")
        return lambda a: np.transpose(a, perm)
    if op == "Concat":
        axis = attrs["axis"]
        return lambda *parts: np.concatenate(parts, axis=axis)
    if op == "Unsqueeze":
        axes = tuple(int(x) for x in (second if second is not None else attrs["axes"]))
        return lambda a, *_: np.expand_dims(a, axes)
    if op == "ReduceMean":
        axes = tuple(int(x) for x in (second if second is not None else attrs.get("axes", ()))) or None
        keep = bool(attrs.get("keepdims", 1))
        return lambda a, *_: a.mean(axis=axes, keepdims=keep)
    if op == "Shape":  # a dynamic batch's size, read at run time
        start, end = attrs.get("start", 0), attrs.get("end")
        return lambda a: np.array(a.shape[start:end], dtype=np.int64)
    if op == "Squeeze":
        axes = second if second is not None else attrs.get("axes")
        squeeze_axes = None if axes is None else tuple(int(x) for x in np.atleast_1d(axes))
        return lambda a, *_: np.squeeze(a, axis=squeeze_axes)
    if op == "Reshape":
        allowzero = attrs.get("allowzero", 0)

        def reshape(a: np.ndarray, shape: np.ndarray) -> np.ndarray:
            dims = [a.shape[i] if d == 0 and not allowzero else int(d) for i, d in enumerate(shape)]
            return a.reshape(dims)

        return reshape
    raise NotImplementedError(f"numpy reference: no {op} (the learner exported an op it does not know)")


class NumpyGraph:
    """The ONNX graph as a list of numpy calls: compiled once, nodes on constants folded away."""

    def __init__(self, model: bytes) -> None:
        graph = onnx.load_from_string(model).graph
        consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.steps = []
        for node in graph.node:
            fn = _compile(node, consts)
            if all(name in consts for name in node.input):  # weights transposed, axes reshaped...
                consts[node.output[0]] = fn(*[consts[name] for name in node.input])
            else:
                self.steps.append((fn, [(name, consts.get(name)) for name in node.input], node.output[0]))
        self.outputs = [o.name for o in graph.output]

    def run(self, context: np.ndarray, actions: np.ndarray) -> list[np.ndarray]:
        env: dict[str, Any] = {"context": context, "actions": actions}
        for fn, inputs, out in self.steps:
            env[out] = fn(*[env[name] if const is None else const for name, const in inputs])
        return [env[name] for name in self.outputs]


# ---- Vowpal Wabbit -------------------------------------------------------------------------------

VW_ARGS = "--cb_explore_adf -q CA --epsilon 0.1 --quiet"  # -q CA: context × action, as the MLP sees them
VW_TRAIN = 2000


def _vw_features(values: dict[str, Any]) -> str:
    """VW's text form of a flat mapping: strings categorical (``k=v``), numbers and booleans valued."""
    out = []
    for key, value in values.items():
        if isinstance(value, str):
            out.append(f"{key}={value}")
        else:
            out.append(f"{key}:{float(value):g}")
    return " ".join(out)


def vw_lines(context: dict[str, Any], actions: list[dict[str, Any]]) -> list[str]:
    """One ``shared`` line (namespace C) and one line per action (namespace A)."""
    return [f"shared |C {_vw_features(context)}"] + [
        f"|A id={a['id']} {_vw_features(a['features'])}" for a in actions
    ]


class VowpalWabbit:
    def __init__(self, contexts: list[dict[str, Any]], actions: list[dict[str, Any]], seed: int = 0) -> None:
        self.ws = vowpalwabbit.Workspace(VW_ARGS)
        rng = random.Random(seed)
        n = len(actions)
        for context in contexts[:VW_TRAIN]:  # logged by a uniform policy, a made-up cost
            lines = vw_lines(context, actions)
            k = rng.randrange(n)
            lines[1 + k] = f"0:{rng.random():.3f}:{1.0 / n:.4f} {lines[1 + k]}"
            self.ws.learn(lines)

    def predict(self, examples: Any) -> list[float]:
        """The action distribution (VW's PMF) for a parsed decision or its text lines."""
        return self.ws.predict(examples)

    def parse(self, lines: list[str]) -> Any:
        return self.ws.parse(lines)

    def close(self) -> None:
        self.ws.finish()

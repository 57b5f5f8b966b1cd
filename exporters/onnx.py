"""ONNX export of a trained reward model, and the parity check that gates it.

The exported graph has inputs ``context`` [batch, Dc] and ``actions`` [batch, n_actions, Da]
(float32) and outputs ``scores`` and ``spread`` [batch, n_actions], with batch and n_actions
dynamic, in one self-contained file. Torch is imported inside the functions: torch-free code
(the daemon, the client) may import this package.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from reflexd.errors import TrainingError

if TYPE_CHECKING:
    import torch

INPUTS = ("context", "actions")
OUTPUTS = ("scores", "spread")

# Example sizes of 2 and 3, not 1: torch.export specialises a dimension it sees as 0 or 1 into a
# constant, which would make that axis static in the graph.
_EXAMPLE_BATCH = 2
_EXAMPLE_ACTIONS = 3


class ExportError(TrainingError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"ONNX export to {path} failed: {reason}")


def export_onnx(module: torch.nn.Module, context_dim: int, action_dim: int, path: str | Path) -> float:
    """Write ``module`` to ``path`` as ONNX, check the file, and return the seconds it took.

    The torch.export-based exporter (dynamo=True) is used. Measured on the default model
    (128+32 → 64 → 4 heads, torch 2.13, one thread): it takes ~2.6 s cold (~0.9 s warm) against
    ~0.04 s for the legacy TorchScript exporter; both graphs match torch to ≤ 2e-7 and serve at
    the same onnxruntime latency (13 µs p50 for 10 actions). The trainer exports once per run,
    in a background process, so the seconds are cheap, while the legacy exporter is deprecated
    and announced for removal: taking it would trade a pinned-version speed-up for a break on
    the next torch upgrade.
    """
    import torch
    from torch.export import Dim

    path = str(path)
    started = time.perf_counter()
    batch, n_actions = Dim("batch"), Dim("n_actions")
    example = (
        torch.zeros(_EXAMPLE_BATCH, context_dim),
        torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_ACTIONS, action_dim),
    )
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    # the exporter logs one warning per missing optional library (torchvision ops) and warns
    # about its own internals; none of it concerns this model, and parity checks the result
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                module.eval(),
                example,
                path,
                dynamo=True,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_shapes={"context": {0: batch}, "actions": {0: batch, 1: n_actions}},
                external_data=False,
                verbose=False,
            )
    except (torch.onnx.OnnxExporterError, OSError) as exc:
        raise ExportError(path, " ".join(str(exc).split())[:500] or type(exc).__name__) from exc
    finally:
        onnx_logger.setLevel(level)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(path, f"onnx.checker: {exc}") from exc
    return time.perf_counter() - started


def parity(module: torch.nn.Module, path: str | Path, context: np.ndarray, actions: np.ndarray) -> float:
    """Largest absolute difference between torch and onnxruntime over both outputs."""
    import onnxruntime as ort
    import torch

    context = np.ascontiguousarray(context, dtype=np.float32)
    actions = np.ascontiguousarray(actions, dtype=np.float32)
    options = ort.SessionOptions()
    # one thread, as agents serve it, so parity is checked on the kernels they will run
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), {"context": context, "actions": actions})
    with torch.inference_mode():
        want = module.eval()(torch.from_numpy(context), torch.from_numpy(actions))
    return max(float(np.max(np.abs(g - w.numpy()), initial=0.0)) for g, w in zip(got, want))

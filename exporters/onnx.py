"""ONNX export of a trained reward model, and the parity check that gates it.

The exported graph has inputs ``context`` [batch, Dc] and ``actions`` [batch, n_actions, Da]
(float32) and outputs ``scores`` and ``spread`` [batch, n_actions], with batch and n_actions
dynamic, in one self-contained file. Torch is imported inside the functions: torch-free code
(the daemon, the client) may import this package.

Tracing a model with torch.export costs seconds (and importing torch's compiler another second
or more), while a retrained model of the same architecture differs only in its weights. So
``export_onnx`` can keep each architecture's graph as a template in a cache directory and, for
a later model of that architecture, write the new weights into the template's initializers
(milliseconds). The graph is exported unoptimised for that: each initializer is then exactly
one parameter or buffer, named after it, whereas the exporter's optimiser folds transposes of weights
into new constants and merges initializers that happen to be equal (fresh layer norms), which
would tie the graph to one model's values. onnxruntime applies the same folding when it loads
the model, so serving costs the same. The parity check still runs on every model, cached or not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.message import DecodeError

import onnx
from onnx import numpy_helper
from reflexd.errors import ExportError
from reflexd.extensions import Exported

if TYPE_CHECKING:
    import torch

INPUTS = ("context", "actions")
OUTPUTS = ("scores", "spread")

# Example sizes of 2 and 3, not 1: torch.export specialises a dimension it sees as 0 or 1 into a
# constant, which would make that axis static in the graph.
_EXAMPLE_BATCH = 2
_EXAMPLE_ACTIONS = 3
# part of every template's key: change it whenever the way graphs are exported changes
_TEMPLATE_FORMAT = "dynamo-unoptimized-v1"
# templates kept, the most recently used first: a code upgrade or a new model size leaves the
# old ones behind (tens to hundreds of KB each)
_KEEP_TEMPLATES = 16




def export_onnx(
    module: torch.nn.Module,
    context_dim: int,
    action_dim: int,
    path: str | Path,
    graphs: str | Path | None = None,
    *,
    reuse: bool = True,
) -> Exported:
    """Write ``module`` to ``path`` as ONNX, check the file, and say how long it took.

    With ``graphs`` (a directory), a template of this architecture found there takes the
    module's weights, if ``reuse``; otherwise the module is traced with the torch.export-based
    exporter (dynamo=True) and its graph kept there as the architecture's template. The
    template is keyed by everything that can shape the graph (see ``graph_key``) and holds no
    weights. A template that cannot be used (unreadable, or not this module's parameters and buffers) is
    ignored and replaced. Without ``graphs`` every export is traced afresh.

    The legacy TorchScript exporter would take ~0.05 s instead of seconds, but it is deprecated
    and announced for removal; a cached template gets the same speed on the supported exporter.
    """
    path = str(path)
    started = time.perf_counter()
    template = Path(graphs) / f"{graph_key(module, context_dim, action_dim)}.onnx" if graphs is not None else None
    reused = reuse and template is not None and _fill(template, module, path)
    if not reused:
        _trace(module, context_dim, action_dim, path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(path, f"onnx.checker: {exc}") from exc
    if template is not None and not reused:
        _keep_template(path, template, module)
    return Exported(time.perf_counter() - started, reused)


def graph_key(module: torch.nn.Module, context_dim: int, action_dim: int) -> str:
    """A digest of everything that shapes ``module``'s exported graph, its weights' values aside.

    The input widths; the torch, onnx and onnxscript versions; each submodule's class and its
    plain attributes (a head count or a layer norm's eps changes the graph without changing a
    parameter's shape); every parameter's and buffer's name, shape and dtype; and the source of
    the package defining each class outside torch (the forward code, and the helpers beside it).
    """
    import torch

    h = hashlib.sha256()

    def add(*parts: object) -> None:
        h.update(repr(parts).encode())

    add(_TEMPLATE_FORMAT, context_dim, action_dim, torch.__version__, onnx.__version__, _version("onnxscript"))
    sources: set[str] = set()
    for name, sub in module.named_modules():
        cls = type(sub)
        attrs = sorted(
            (k, v) for k, v in vars(sub).items()
            if k != "training" and isinstance(v, (bool, int, float, str, tuple, type(None)))
        )
        add(name, cls.__module__, cls.__qualname__, attrs)
        if not cls.__module__.startswith("torch."):
            sources.update(_package_sources(cls.__module__))
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        add(name, tuple(tensor.shape), str(tensor.dtype))
    for source in sorted(sources):
        add(source)
        try:
            h.update(Path(source).read_bytes())
        except OSError:
            add("unreadable")
    return h.hexdigest()[:32]


def parity(module: torch.nn.Module, path: str | Path, context: np.ndarray, actions: np.ndarray) -> float:
    """Largest difference between torch and onnxruntime over both outputs, like ``numpy.isclose``
    with equal absolute and relative tolerance: absolute where the torch value is within ±1,
    relative to it beyond. float32 keeps about seven significant digits, so scores in the
    thousands (rewards in such units) differ by about 1e-4 however exact the export is."""
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
    return max(
        float(np.max(np.abs(g - w) / np.maximum(1.0, np.abs(w)), initial=0.0))
        for g, w in zip(got, (w.numpy() for w in want))
    )


def _trace(module: torch.nn.Module, context_dim: int, action_dim: int, path: str) -> None:
    import torch
    from torch.export import Dim

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
                optimize=False,  # one initializer per parameter, so the graph can be a template
                verbose=False,
            )
    except (torch.onnx.OnnxExporterError, OSError) as exc:
        raise ExportError(path, " ".join(str(exc).split())[:500] or type(exc).__name__) from exc
    finally:
        onnx_logger.setLevel(level)


def _weights(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy() for name, t in (*module.named_parameters(), *module.named_buffers())}


def _fill(template: Path, module: torch.nn.Module, path: str) -> bool:
    """Write ``module``'s weights into ``template`` and save it as ``path``; False if it does not fit."""
    try:
        model = onnx.load(str(template))
    except (OSError, DecodeError):
        return False
    weights = _weights(module)
    initializers = {init.name: init for init in model.graph.initializer}
    if not weights.keys() <= initializers.keys():
        return False
    for name, value in weights.items():
        init = initializers[name]
        if tuple(init.dims) != value.shape or init.data_type != onnx.helper.np_dtype_to_tensor_dtype(value.dtype):
            return False
        init.CopyFrom(numpy_helper.from_array(value, name))
    try:
        onnx.save_model(model, path)
    except OSError as exc:
        raise ExportError(path, str(exc)) from exc
    try:
        os.utime(template)  # recently used: kept when old templates are pruned
    except OSError:
        pass
    return True


def _keep_template(path: str, template: Path, module: torch.nn.Module) -> None:
    """Save the graph at ``path`` as ``template``, its weights emptied; a failure only costs speed."""
    model = onnx.load(path)
    weights = _weights(module)
    initializers = {init.name: init for init in model.graph.initializer}
    if not weights.keys() <= initializers.keys():
        return  # some parameter was folded into another constant: not reusable
    for name in weights:
        # the template keeps the tensors' names, types and shapes, and no trace of the data
        # this model was trained on
        init = initializers[name]
        init.CopyFrom(onnx.TensorProto(name=name, data_type=init.data_type, dims=init.dims))
    try:
        template.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, template)
        kept = sorted(template.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[_KEEP_TEMPLATES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _package_sources(module_name: str) -> list[str]:
    """The .py files of the package holding ``module_name`` (or its own file, outside a package)."""
    mod = sys.modules.get(module_name)
    file = getattr(mod, "__file__", None)
    if not file:
        return []
    if not getattr(mod, "__package__", None):
        return [file]
    return [str(p) for p in Path(file).parent.glob("*.py")]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


class OnnxExporter:
    """The ``onnx`` entry of the ``reflexd.exporters`` group: the format clients load."""

    name = "onnx"

    def export(
        self, module: torch.nn.Module, context_dim: int, action_dim: int, path: str | Path,
        graphs: Path | None = None, reuse: bool = True,
    ) -> Exported:
        return export_onnx(module, context_dim, action_dim, path, graphs, reuse=reuse)

    def parity(self, module: torch.nn.Module, path: str | Path, context: np.ndarray, actions: np.ndarray) -> float:
        return parity(module, path, context, actions)

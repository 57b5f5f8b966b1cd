"""What the trainer subprocess hands the daemon: its files, its result, its exit statuses.

The daemon reaches the trainer only through this module (``python -m reflexd.trainer`` is run,
never imported), so it imports nothing heavier than msgspec.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from reflexd.config import agent_exploration
from reflexd.errors import TrainingError
from reflexd.features import FeatureSpec
from reflexd.manifest import MODEL_FILE, GateResult, Manifest, Training
from reflexd.registry import sha256_of

if TYPE_CHECKING:
    from reflexd.config import Config

RESULT_FILE = "result.json"
REFIT_FILE = "refit.onnx"
EXIT_OUT_OF_MEMORY = 3
# how allocation failures read once the address-space limit is hit: numpy and Python
# (MemoryError, "Unable to allocate"), pyarrow ("malloc of size"), torch's allocator ("can't
# allocate memory"), onnxruntime ("failed to allocate memory"), the dynamic loader ("failed to
# map segment"), C++ (std::bad_alloc)
_MEMORY_MARKERS = (
    "cannot allocate memory",
    "can't allocate memory",
    "unable to allocate",
    "out of memory",
    "failed to map segment",
    "bad_alloc",
    "malloc of size",
    "failed to allocate memory",
    "memoryerror",
)


class CrossFit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A cross-fitted run's out-of-fold predictions, row for row in the snapshot's order (as
    ``dataset.load_snapshot`` reads it): row i's scores and spread [A_max] for its actions, 0 on
    padded slots, from the learner fit without row i (``cross_fit``)."""

    ids: list[str]
    scores: list[list[float]]
    spread: list[list[float]]


class TrainResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    learner: str
    features: FeatureSpec
    seed: int
    # the candidate (MODEL_FILE) was fit on these; a refit on these and the holdout; a cross-fitted
    # run's on every row
    train_rows: int
    holdout_rows: int
    dropped_rows: int
    # REFIT_FILE holds the same learner fit on every row, and passed the parity check (False for a
    # cross-fitted run, whose MODEL_FILE is fit on every row: its manifest says refit all the same)
    refitted: bool
    window_start: float  # received_at of the oldest row in the snapshot (train and holdout)
    window_end: float  # received_at of the newest
    epochs: int  # the candidate's
    # the candidate's mean over its last epoch, in squared reward units; None if not reported
    train_loss: float | None
    load_seconds: float  # reading and hashing the snapshot
    import_seconds: float  # torch and the learner
    fit_seconds: float  # the candidate's and the refit's, or a cross-fitted run's with its folds
    export_seconds: float
    graph_reused: bool  # every export wrote its weights into a cached graph (see --graph-cache)
    parity_seconds: float
    cpu_seconds: float  # the run's CPU time so far; at SCHED_IDLE its wall time depends on other load
    parity_diff: float  # the candidate's
    parity_ok: bool
    refit_parity_diff: float | None  # None when no refit was fit
    torch_version: str
    cross_fit: CrossFit | None = None  # a cross-fitted run's (holdout_rows is then 0)
    # The gate's verdict, reached in the trainer, which already holds the holdout and the
    # candidate, so that the daemon's memory does not grow with the experience (None when the
    # export failed its parity check: the daemon rejects such a candidate before any gate).
    gate: GateResult | None = None
    judged_against: str | None = None  # the live model's version the candidate was judged against
    deploy: str = MODEL_FILE  # the file that goes live if the gate passed: MODEL_FILE or REFIT_FILE


def run_manifests(config: Config, result: TrainResult, out_dir: Path, parent: str | None) -> tuple[Manifest, Manifest | None]:
    """The manifests of a run's candidate (``MODEL_FILE``) and of its refit (``REFIT_FILE``, None
    when there is none), as the registry will hold them once given a version."""
    # the out-of-fold predictions and the verdict are the gate's, not the model's description
    # (Training ignores them); a cross-fitted model was fit on every row of its snapshot, as a refit is
    cross_fitted = result.cross_fit is not None
    training = msgspec.convert(
        {**msgspec.to_builtins(result), "cross_fitted": cross_fitted, "refit": cross_fitted}, Training
    )
    manifest = Manifest(
        version="candidate",
        parent=parent,
        created=time.time(),
        learner=result.learner,
        features=result.features,
        exploration=config.exploration,
        agent_exploration=agent_exploration(config),
        training=training,
        sha256=sha256_of(out_dir / MODEL_FILE),
    )
    if not result.refitted:
        return manifest, None
    refit = msgspec.structs.replace(
        manifest,
        # the candidate's file is pruned with its run; its digest says which model was judged
        training=msgspec.structs.replace(manifest.training, refit=True, candidate_sha256=manifest.sha256),
        sha256=sha256_of(out_dir / REFIT_FILE),
    )
    return manifest, refit


class Failure(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    error: str


_result_decoder = msgspec.json.Decoder(dict[str, Any])


def read_result(out_dir: str | os.PathLike[str]) -> TrainResult:
    """The run's result, or TrainingError with the trainer's own error message."""
    path = Path(out_dir) / RESULT_FILE
    try:
        found = _result_decoder.decode(path.read_bytes())
        if "error" in found:
            raise TrainingError(msgspec.convert(found, Failure).error)
        return msgspec.convert(found, TrainResult)
    except FileNotFoundError:
        raise TrainingError(f"trainer wrote no {path} (killed, or crashed before starting)") from None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise TrainingError(f"unreadable trainer result {path}: {exc}") from None


def write_result(out_dir: Path, result: TrainResult | Failure) -> None:
    # written whole then renamed, so the daemon never reads half a result
    tmp = out_dir / (RESULT_FILE + ".tmp")
    tmp.write_bytes(msgspec.json.encode(result))
    os.replace(tmp, out_dir / RESULT_FILE)


def memory_exhausted(text: str) -> bool:
    """True when an error message (or a trainer log) reads as an allocation failure."""
    lowered = text.lower()
    return any(marker in lowered for marker in _MEMORY_MARKERS)

"""The trainer subprocess: snapshot → fit → ONNX export → parity check → result.json.

    python -m reflexd.trainer SNAPSHOT OUT_DIR --config CONFIG_JSON [--seed N] [--graph-cache DIR]
        [--incumbent MODEL_DIR]

CONFIG_JSON is ``msgspec.json.encode(config)`` of a ``reflexd.config.Config``, given inline or as
the path of a file holding it (the daemon writes a file, which keeps it out of ``ps``). The run
writes ``OUT_DIR/policy.onnx``, the candidate fit on all but the holdout, which the gate judges;
below ``trainer.refit_below`` rows, ``OUT_DIR/refit.onnx``, the same learner fit on every row,
which goes live if the candidate passes; and ``OUT_DIR/result.json`` (a ``TrainResult``, or
``{"error": ...}``).

The run also judges its candidate (``reflexd.trainer.judge``) on the holdout: against the live
model in the folder ``--incumbent`` names (its manifest and file as the daemon serves them,
checked against its sha256), or without one against the policy that logged the holdout. The
verdict is ``TrainResult.gate``; the daemon registers it.

A snapshot too small to hold any rows out (``reflexd.split.cross_fitted``) is cross-fitted
instead: the learner is fit once per row on all the others (at most ``split.MAX_FOLDS`` times,
on all but a fold of consecutive rows), each row's scores from the fit that did not see it go to
``TrainResult.cross_fit`` for the gate to judge the learner by, and ``policy.onnx`` is the
learner fit on every row, which goes live if they pass.

Exit status: 0 when a model was produced (even if parity failed: ``parity_ok`` says so and the
daemon rejects it), 2 for a training failure (one line on stderr), 3 when the run ran out of
memory (``trainer.max_memory_mb``), 1 for a bug (traceback).

``--graph-cache`` names a directory where each model architecture's ONNX graph is kept once
traced, so a later run of the same architecture writes its weights into that graph instead of
tracing again (``reflexd.exporters.onnx``). Should such a model ever fail the parity check, it is
traced afresh and checked again before the run gives up on it.

The process caps its own address space (RLIMIT_AS) at ``trainer.max_memory_mb`` before torch is
imported, so a runaway run fails here with an allocation error instead of taking the host's
memory. The limit is set in this process rather than by the daemon at spawn time because
anyio's ``open_process`` has no ``preexec_fn`` (and a pre-exec hook is unsafe in the daemon,
which runs threads), and setting it after spawn with ``prlimit`` would race the imports.

Training runs in its own process so torch's memory returns to the host when it exits, and at
the lowest CPU priority so it only uses cycles the agents leave idle. The daemon imports only
``reflexd.trainer.result``; torch is imported inside ``train``, after the memory cap is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from reflexd import worker
from reflexd.config import Config, TrainerConfig, feature_spec
from reflexd.errors import TrainingError
from reflexd.extensions import load_exporter, load_learner
from reflexd.features import FeatureSpec
from reflexd.learning.dataset import Batch, load_snapshot, split_holdout
from reflexd.manifest import MODEL_FILE
from reflexd.split import cross_fitted, first_run_rows, folds, holdout_run_rows
from reflexd.trainer.judge import judge, load_incumbent
from reflexd.trainer.result import (
    EXIT_OUT_OF_MEMORY,
    REFIT_FILE,
    CrossFit,
    Failure,
    TrainResult,
    memory_exhausted,
    write_result,
)
from reflexd.worker import event_logger

MAX_PARITY_ROWS = 2000
_log = event_logger("reflexd.trainer")


def limit_memory(max_mb: int) -> int | None:
    """Cap this process's address space at ``max_mb`` MiB (``reflexd.worker.limit_memory``)."""
    return worker.limit_memory(max_mb, _log)


def _out_of_memory(exc: BaseException, limit: int | None) -> bool:
    return worker.out_of_memory(exc, limit, memory_exhausted)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reflexd.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", help="training snapshot (Parquet)")
    parser.add_argument("out_dir", help="directory for policy.onnx, refit.onnx and result.json")
    parser.add_argument("--config", required=True, help="the daemon's Config as JSON, or a file holding it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--graph-cache", default=None, help="directory of exported graphs to reuse across runs")
    parser.add_argument(
        "--incumbent",
        default=None,
        help="a folder holding the live model (manifest.json and its file), to judge the candidate against",
    )
    return parser.parse_args(argv)


def _read_config(arg: str) -> Config:
    text = arg if arg.lstrip().startswith("{") else Path(arg).read_bytes()
    return msgspec.json.decode(text, type=Config)


def train(
    snapshot: str, out_dir: Path, config: Config, seed: int, graphs: Path | None = None, incumbent: Path | None = None
) -> TrainResult:
    settings = config.trainer
    spec = feature_spec(config)
    started = run_started = time.perf_counter()
    # loaded first, so an unreadable live model fails the run before any work is done
    live = load_incumbent(incumbent, settings.max_threads) if incumbent is not None else None
    # loaded before torch is imported, so a bad or empty snapshot fails in a fraction of a second
    batch = load_snapshot(snapshot, spec)
    needed = first_run_rows(config)
    crossed = cross_fitted(config, len(batch))
    if crossed:
        train_set, holdout = batch, batch.take(slice(0, 0))
    else:
        train_set, holdout = split_holdout(batch, settings.holdout_fraction)
    load_seconds = time.perf_counter() - started
    _log(
        "loaded",
        rows=len(batch),
        train=len(train_set),
        holdout=len(holdout),
        dropped=batch.dropped,
        cross_fitted=crossed,
        seconds=load_seconds,
    )
    if len(batch) < needed:
        how = "(trainer.cross_fit_from)" if needed < holdout_run_rows(config) else "to hold some out for the gate"
        raise TrainingError(
            f"snapshot {snapshot} has {len(batch)} usable rows after dropping {batch.dropped}; "
            f"a run needs at least {needed} {how}"
        )

    started = time.perf_counter()
    import torch

    torch.set_num_threads(settings.max_threads)
    learner = load_learner(settings.learner)
    import_seconds = time.perf_counter() - started
    _log("imported", seconds=import_seconds)
    losses: list[float] = []

    def progress(epoch: int, epochs: int, loss: float) -> None:
        losses.append(loss)
        if epoch == epochs or epoch % max(1, epochs // 10) == 0:
            _log("epoch", epoch=f"{epoch}/{epochs}", loss=loss)

    started = time.perf_counter()
    model = learner.fit(train_set, settings, seed, progress)
    seconds = time.perf_counter() - started
    epochs_run = len(losses) or settings.epochs  # min_steps may have asked for more than epochs
    train_loss = losses[-1] if losses else None
    _log("fitted", learner=learner.name, seconds=seconds, samples_per_s=len(train_set) * epochs_run / seconds)
    refit = None
    out_of_fold = None
    if crossed:
        folds_started = time.perf_counter()
        out_of_fold = cross_fit(learner, batch, settings, seed)
        _log("cross_fitted", folds=folds(len(batch)), seconds=time.perf_counter() - folds_started)
    # on a large snapshot the newest fifth changes the model less than a second fit costs (and a
    # cross-fitted run's model was fit on every row)
    wanted = len(batch) < settings.refit_below and not crossed
    if wanted and time.perf_counter() - run_started + 1.5 * seconds > settings.max_wall_time:
        # a second fit on 25% more rows would likely overrun the limit and take the candidate with it
        _log("refit_skipped", reason="max_wall_time", fit_seconds=seconds)
    elif wanted:
        # the gate can only judge a model on rows it was not fit on, so it judges the candidate
        # fit without the holdout; what goes live is the same learner, seed and settings fit on
        # every row, the newest included, which are the most like those it will face next
        refit_started = time.perf_counter()
        refit = learner.fit(batch, settings, seed, None)
        _log("refitted", rows=len(batch), seconds=time.perf_counter() - refit_started)
    fit_seconds = time.perf_counter() - started

    tolerance = config.gate.parity_tolerance
    # a cross-fitted run holds nothing out, so its export is checked on the rows it was fit on
    checked = train_set if crossed else holdout
    check = checked.take(range(min(len(checked), MAX_PARITY_ROWS)))
    exported = export_checked(model, out_dir / MODEL_FILE, spec, check, tolerance, graphs)
    parity_ok = exported.diff <= tolerance
    refit_diff = None
    if refit is not None:
        refit_export = export_checked(refit, out_dir / REFIT_FILE, spec, check, tolerance, graphs)
        refit_diff = refit_export.diff
        if not refit_export.diff <= tolerance:  # NaN included
            # the candidate stands on its own: it goes live instead, if it passes
            _log("refit_failed_parity", parity_diff=refit_export.diff)
            (out_dir / REFIT_FILE).unlink()
            refit = None
        # the costs of both exports; the parity difference stays the candidate's
        exported = exported._replace(
            seconds=exported.seconds + refit_export.seconds,
            reused=exported.reused and refit_export.reused,
            parity_seconds=exported.parity_seconds + refit_export.parity_seconds,
        )
    _log(
        "exported",
        seconds=exported.seconds,
        graph_reused=exported.reused,
        parity_diff=exported.diff,
        parity_ok=parity_ok,
        refit_parity_diff=refit_diff,
        parity_seconds=exported.parity_seconds,
    )

    result = TrainResult(
        learner=learner.name,
        features=spec,
        seed=seed,
        train_rows=len(train_set),
        holdout_rows=len(holdout),
        dropped_rows=batch.dropped,
        refitted=refit is not None,
        window_start=float(batch.received_at.min()),
        window_end=float(batch.received_at.max()),
        epochs=epochs_run,
        train_loss=train_loss,
        load_seconds=load_seconds,
        import_seconds=import_seconds,
        fit_seconds=fit_seconds,
        export_seconds=exported.seconds,
        graph_reused=exported.reused,
        parity_seconds=exported.parity_seconds,
        parity_diff=exported.diff,
        parity_ok=parity_ok,
        refit_parity_diff=refit_diff,
        cpu_seconds=time.process_time(),
        torch_version=str(torch.__version__),  # torch's TorchVersion is a str subclass msgspec refuses
        cross_fit=out_of_fold,
    )
    if not parity_ok:
        return result  # the daemon rejects it without a gate
    started = time.perf_counter()
    result = judge(config, out_dir, result, snapshot, batch, holdout, live)
    _log("judged", passed=result.gate.passed, against=result.judged_against, seconds=time.perf_counter() - started)
    return result


def cross_fit(learner: Any, batch: Batch, settings: TrainerConfig, seed: int) -> CrossFit:
    """Out-of-fold predictions: each row scored by the learner, with the run's settings and
    seed, fit on every other row (leave-one-out), or beyond ``split.MAX_FOLDS`` rows on every row
    outside its fold of consecutive rows (``split.folds``). On the few rows a run has before it
    can hold any out, each fit costs a fraction of a second; the gate can then judge the learner
    on every row."""
    import numpy as np
    import torch

    everyone = np.arange(len(batch))
    actions = batch.actions
    scores = np.zeros(batch.mask.shape)
    spread = np.zeros(batch.mask.shape)
    for fold in np.array_split(everyone, folds(len(batch))):
        model = learner.fit(batch.take(np.setdiff1d(everyone, fold)), settings, seed, None)
        with torch.inference_mode():
            fold_scores, fold_spread = model.eval()(
                torch.from_numpy(batch.context[fold]), torch.from_numpy(actions[fold])
            )
        scores[fold], spread[fold] = fold_scores.numpy(), fold_spread.numpy()
    # whatever a model makes of a padded slot is never used
    scores, spread = np.where(batch.mask, scores, 0.0), np.where(batch.mask, spread, 0.0)
    broken = int((~np.isfinite(scores) | ~np.isfinite(spread)).any(axis=1).sum())
    if broken:
        raise TrainingError(f"the learner's out-of-fold predictions are not finite on {broken} of {len(batch)} rows")
    return CrossFit(ids=list(batch.ids), scores=scores.tolist(), spread=spread.tolist())


class Export(NamedTuple):
    seconds: float
    reused: bool
    parity_seconds: float
    diff: float


def export_checked(
    model: Any, path: Path, spec: FeatureSpec, check: Any, tolerance: float, graphs: Path | None
) -> Export:
    """Export ``model`` to ``path`` and measure how far onnxruntime's scores are from torch's on ``check``."""
    exporter = load_exporter("onnx")
    exported = exporter.export(model, spec.context_dim, spec.action_dim, path, graphs)
    seconds = exported.seconds
    started = time.perf_counter()
    diff = exporter.parity(model, path, check.context, check.actions)
    parity_seconds = time.perf_counter() - started
    if diff > tolerance and exported.reused:
        # the cached graph does not compute this model (its code changed in a way the key
        # missed): trace it afresh, which also replaces the cached graph
        _log("cached_graph_failed_parity", parity_diff=diff)
        exported = exporter.export(model, spec.context_dim, spec.action_dim, path, graphs, reuse=False)
        seconds += exported.seconds
        started = time.perf_counter()
        diff = exporter.parity(model, path, check.context, check.actions)
        parity_seconds += time.perf_counter() - started
    return Export(seconds, exported.reused, parity_seconds, diff)


def main(argv: list[str] | None = None) -> int:
    worker.lower_priority()
    args = _parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"reflexd.trainer: error: cannot create {out_dir}: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        config = _read_config(args.config)
    except OSError as exc:
        return _fail(out_dir, f"cannot read --config file: {exc}")
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _fail(out_dir, f"invalid --config: {exc}")
    threads = str(config.trainer.max_threads)
    # read by the OpenMP/MKL runtimes when torch loads, so they must be set before its import
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    max_mb = config.trainer.max_memory_mb
    limit = limit_memory(max_mb)  # before torch is imported, so its mappings count too
    try:
        graphs = Path(args.graph_cache) if args.graph_cache else None
        incumbent = Path(args.incumbent) if args.incumbent else None
        write_result(out_dir, train(args.snapshot, out_dir, config, args.seed, graphs, incumbent))
    except Exception as exc:
        # a TrainingError says what went wrong; only its text can tell of an allocation failure
        if _out_of_memory(exc, None if isinstance(exc, TrainingError) else limit):
            traceback.print_exc()
            detail = f"{type(exc).__name__}: {exc}"
            return _fail(out_dir, f"trainer ran out of memory (max_memory_mb={max_mb}): {detail}", EXIT_OUT_OF_MEMORY)
        if isinstance(exc, TrainingError):
            return _fail(out_dir, str(exc))
        traceback.print_exc()
        write_result(out_dir, Failure(f"trainer bug: {type(exc).__name__}: {exc}"))
        return 1
    return 0


def _fail(out_dir: Path, message: str, status: int = 2) -> int:
    message = " ".join(message.split())  # the daemon and operators read it as one line
    print(f"reflexd.trainer: error: {message}", file=sys.stderr, flush=True)
    try:
        write_result(out_dir, Failure(message))
    except (OSError, MemoryError):
        pass  # the exit status and the line above still tell the daemon
    return status


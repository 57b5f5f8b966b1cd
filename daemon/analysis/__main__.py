"""``python -m reflexd.analysis``: the knowledge-extraction subprocess the daemon starts.

    python -m reflexd.analysis SNAPSHOT OUT_DIR --inputs INPUTS_JSON [--config CONFIG] [--model-dir DIR] [--seed N]

SNAPSHOT is a Parquet file as ``rewards.snapshot`` writes it; INPUTS_JSON a file holding
``findings.ExtractionInputs`` (``result.encode_inputs``); CONFIG the daemon's YAML file, or its
``Config`` as JSON (inline, or a ``.json`` file, as the trainer takes it), defaults if absent;
DIR a model directory (``policy.onnx`` and ``manifest.json``, as in the registry) whose scores
are the reward model of the pseudo-outcomes (``insights.reward_model: auto``). The run writes
``OUT_DIR/insights.json``: ``findings.Insights``, or ``{"error": ...}``, whole or not at all.

Exit status: 0 with insights written; 2 when the inputs, snapshot, model or config cannot be
used (one line on stderr); 3 when the run ran out of memory (``insights.max_memory_mb``, the
address-space cap it sets on itself before loading anything large); 1 for a bug (traceback).

It runs at the lowest CPU priority (nice 19, SCHED_IDLE), as the trainer does, so it only uses
cycles the agents leave idle, on one thread: OpenMP threads spinning on each other at idle
priority on a busy host cost far more than they save (``reflexd.analysis.outcomes``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import msgspec

from reflexd.analysis.result import EXIT_FAILED, EXIT_OUT_OF_MEMORY, Failure, read_inputs, write_insights
from reflexd.config import Config, load_config
from reflexd.errors import AnalysisError, ReflexdError
from reflexd.worker import event_logger, limit_memory, lower_priority, out_of_memory, status_bytes

_log = event_logger("reflexd.analysis")


def _return_freed_memory() -> None:
    """Have glibc map every allocation from 64 KiB up on its own, so freeing it returns it.

    By default glibc raises that threshold to the size of the largest block freed (up to 32 MiB)
    and keeps such blocks in its heap: a run that makes and drops a few hundred MiB of batches
    and arrays then holds them all. Measured on a million decisions: peak resident memory 430
    MiB with this, 500–585 MiB without. Elsewhere than glibc nothing changes.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD; setting it also ends its dynamic raising
    except (OSError, AttributeError):
        pass


def _read_config(arg: str | None) -> Config:
    if arg is None:
        return Config()
    text = arg.lstrip()
    try:
        if text.startswith("{"):
            return msgspec.json.decode(arg, type=Config)
        if arg.endswith(".json"):
            return msgspec.json.decode(Path(arg).read_bytes(), type=Config)
        return load_config(arg)
    except OSError as exc:
        raise AnalysisError(f"cannot read --config {arg}: {exc.strerror or exc}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise AnalysisError(f"invalid --config: {exc}") from None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reflexd.analysis", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("snapshot", help="snapshot of matured decisions (Parquet)")
    parser.add_argument("out_dir", help="directory for insights.json")
    parser.add_argument("--inputs", required=True, help="ExtractionInputs as a JSON file")
    parser.add_argument("--config", default=None, help="the daemon's YAML config, or its Config as JSON")
    parser.add_argument("--model-dir", default=None, help="the live model's directory (policy.onnx, manifest.json)")
    parser.add_argument("--steps", default=None, help="a snapshot of the steps (Parquet), for unusual trajectories")
    parser.add_argument("--behaviour-dir", default=None, help="the live behaviour model's directory")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, limit: list[int | None]) -> None:
    started = time.perf_counter()
    config = _read_config(args.config)
    settings = config.insights
    limit.append(limit_memory(settings.max_memory_mb, _log))
    inputs = read_inputs(args.inputs)
    scorer = None
    if args.model_dir is not None and settings.reward_model == "auto":
        from reflexd.deciding.scoring import Scorer
        from reflexd.registry import read_model_dir

        manifest, _, model = read_model_dir(args.model_dir)
        scorer = Scorer(manifest, model, threads=1)
    import pyarrow as pa

    from reflexd.analysis import experience
    from reflexd.analysis.extraction import analyse

    # Arrow's default allocator keeps what a batch freed for the next; the system allocator hands
    # it back, which keeps the run's peak (what insights.max_memory_mb caps) near what is in use
    pa.set_memory_pool(pa.system_memory_pool())

    exp = experience.from_parquet(args.snapshot, scorer)
    version = None if scorer is None else scorer.version
    del scorer  # its scores are in exp: the session's memory goes back before the finders run
    _log("loaded", rows=len(exp), dropped=exp.dropped, features=len(exp.features), seconds=time.perf_counter() - started)
    insights = analyse(exp, inputs, settings, version, args.seed)
    del exp
    if args.steps is not None:
        insights = with_trajectories(insights, args.steps, args.behaviour_dir, inputs.now)
    insights = msgspec.structs.replace(insights, seconds=time.perf_counter() - started)
    write_insights(Path(args.out_dir), insights)
    peak = status_bytes("VmHWM")  # this process's own: exec started it afresh
    _log(
        "done",
        rules=insights.counts.rules_published,
        candidates=insights.counts.rules_candidate,
        anomalies=insights.counts.anomalies,
        seconds=insights.seconds,
        peak_rss_mb=round(peak / 2**20, 1) if peak is not None else "unknown",
    )


MAX_TRAJECTORIES = 50  # reported per run, the newest; the rest are counted in the notes


def with_trajectories(insights: Any, steps: str, behaviour_dir: str | None, now: float) -> Any:
    """``insights`` with the unusual trajectories among ``steps`` as anomalies: loops and repeated
    failing calls always, sequences the behaviour model finds unlikely when there is one."""
    from reflexd.analysis.findings import Anomaly
    from reflexd.learning.propensity import unusual
    from reflexd.learning.steps import load_steps

    model = None
    if behaviour_dir is not None:
        from reflexd.deciding.behaviour import BehaviourModel

        model = BehaviourModel.from_dir(behaviour_dir)  # sha256 checked, as every model is
    episodes = {(e.agent, e.episode): e for e in load_steps(steps)}
    found = unusual(list(episodes.values()), model)
    found.sort(key=lambda u: episodes[(u.agent, u.episode)].received_at or now, reverse=True)
    shown = [
        Anomaly(
            kind="unusual_trajectory",
            agent=u.agent,
            action=u.action,
            at=episodes[(u.agent, u.episode)].received_at or now,
            size=float(u.score),
            summary=f"episode {u.episode}: {u.detail}",
            evidence={"episode": u.episode, "pattern": u.kind, "first_index": float(u.first_index),
                      "last_index": float(u.last_index), "count": float(u.count), "threshold": float(u.threshold)},
        )
        for u in found[:MAX_TRAJECTORIES]
    ]
    notes = list(insights.notes)
    if len(found) > MAX_TRAJECTORIES:
        notes.append(f"{len(found) - MAX_TRAJECTORIES} more unusual trajectories than the {MAX_TRAJECTORIES} newest shown")
    if model is None:
        notes.append("unlikely sequences not looked for: no behaviour model is live yet")
    anomalies = sorted([*insights.anomalies, *shown], key=lambda a: a.at, reverse=True)
    counts = msgspec.structs.replace(insights.counts, anomalies=len(anomalies))
    return msgspec.structs.replace(insights, anomalies=anomalies, counts=counts, notes=notes)


def main(argv: list[str] | None = None) -> int:
    lower_priority()
    _return_freed_memory()
    # read when the OpenMP runtime loads (with scikit-learn), so set before anything imports it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = _parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"reflexd.analysis: error: cannot create {out_dir}: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    limit: list[int | None] = []  # the cap, once run has read the config and set it
    try:
        run(args, limit)
    except Exception as exc:  # noqa: BLE001 -- a bug too must leave a result the daemon can read
        if out_of_memory(exc, limit[0] if limit and not isinstance(exc, ReflexdError) else None):
            traceback.print_exc()
            return _fail(out_dir, f"the extraction ran out of memory (insights.max_memory_mb): {type(exc).__name__}: {exc}",
                         EXIT_OUT_OF_MEMORY)
        if isinstance(exc, ReflexdError):
            return _fail(out_dir, str(exc))
        traceback.print_exc()
        _fail(out_dir, f"extraction bug: {type(exc).__name__}: {exc}", 1)
        return 1
    return 0


def _fail(out_dir: Path, message: str, status: int = EXIT_FAILED) -> int:
    message = " ".join(message.split())  # the daemon and operators read it as one line
    if status != 1:
        print(f"reflexd.analysis: error: {message}", file=sys.stderr, flush=True)
    try:
        write_insights(out_dir, Failure(message))
    except (OSError, MemoryError):
        pass  # the exit status and the line above still tell the daemon
    return status


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the result is written: skipping the interpreter's teardown of scikit-learn and scipy hands
    # the daemon, which waits for this process to exit, its insights that much sooner
    os._exit(status)

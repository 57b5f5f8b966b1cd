"""``reflexd fleet train``: many hosts' archives → one model, trained on Ray, gated, written for pull.

1. **Read** (Ray tasks, one per host): ``archive.read_host`` reads the host's Parquet archive and
   joins decisions and rewards as the host's own snapshot does. Each host's newest
   ``trainer.holdout_fraction`` of experiences goes to the pooled holdout, the rest to training,
   so every host is judged on its own newest rows, whatever its clock and its share of the data.
2. **Train** (Ray Train, ``TorchTrainer`` on ``workers`` CPU workers): the training rows are dealt
   round-robin into one shard per worker, passed through Ray's object store; each worker hashes its
   shard (``dataset.from_table``) and fits the configured learner (``trainer.learner``) on it,
   data-parallel over gloo: the built-in learners' loop averages gradients across the workers each
   step (``reflexd.plugins.learners._heads``), so all workers end with one model, trained as one
   process would train it on all the rows. A learner that does not train data-parallel is found
   out (the workers' models differ) and refused. Rank 0 exports the model to ONNX with the trainer's
   own exporter and parity check (``trainer.fit.export_checked``) and hands it back as a Ray Train
   checkpoint.
3. **Gate**: the model is judged on the pooled holdout by ``learning.runs.judge_run`` against the
   logging policy (the first-model rule: there is no fleet incumbent), as a host judges a run.
4. **Write** ``OUT/policy.onnx`` and ``OUT/manifest.json`` (``manifest.build_manifest``), the files a
   host's registry holds; the manifest's ``fleet`` says which hosts, how many rows, how many workers
   and the pooled verdict. ``reflexd models pull OUT`` brings it into a host, whose own gate decides.

Ray is imported here only inside functions, so ``reflexd.fleet.train`` imports without it and
``require_ray`` can say how to install it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np
import pyarrow as pa

from reflexd.config import Config, feature_spec
from reflexd.durable import atomic_write
from reflexd.errors import FleetError, ReflexdError
from reflexd.features import FeatureSpec
from reflexd.fleet.archive import HostRows, open_archive, public_path, read_host
from reflexd.learning import runs
from reflexd.learning.dataset import from_table
from reflexd.manifest import MANIFEST_FILE, MODEL_FILE, FleetHost, FleetOrigin, GateResult, Manifest, build_manifest
from reflexd.registry import sha256_of
from reflexd.split import holdout_rows

RESULT_FILE = "fleet-result.json"  # in the checkpoint rank 0 hands back, beside the model
MAX_PARITY_ROWS = 2000
INSTALL_HINT = "pip install 'reflexd[fleet]'"


def require_ray() -> str:
    """Ray's version; FleetError saying how to install the fleet extra when Ray is missing."""
    try:
        import ray
        import ray.train.torch  # Ray Train, which the extra (ray[train]) brings
    except ImportError as exc:
        raise FleetError(f"reflexd fleet needs Ray, the optional fleet extra ({exc}): {INSTALL_HINT}") from None
    return str(ray.__version__)


@dataclass
class Progress:
    """What the command line shows while a fleet run goes: each stage's callbacks (all optional)."""

    hosts: Callable[[int], None] | None = None  # the number of hosts, before reading
    host_read: Callable[[HostRows], None] | None = None  # each host as its read finishes
    epochs: Callable[[int, int, float], None] | None = None  # (epoch, epochs, loss) as rank 0 fits
    stage: Callable[[str], None] | None = None  # "reading", "training", "exporting", "gating", "writing"


@dataclass
class FleetRun:
    """What a fleet run did: where it wrote, what it read, what it cost, how the gate judged."""

    out: str
    manifest: Manifest
    hosts: list[FleetHost]
    rows: int
    train_rows: int
    holdout_rows: int
    dropped_rows: int
    workers: int
    read_seconds: float
    train_seconds: float
    gate_seconds: float
    seconds: float
    verdict: GateResult
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "model": str(Path(self.out) / MODEL_FILE),
            "manifest": str(Path(self.out) / MANIFEST_FILE),
            "sha256": self.manifest.sha256,
            "version": self.manifest.version,
            "passed": self.verdict.passed,
            "gate": self.verdict.reason,
            "hosts": [msgspec.to_builtins(h) for h in self.hosts],
            "rows": self.rows,
            "train_rows": self.train_rows,
            "holdout_rows": self.holdout_rows,
            "dropped_rows": self.dropped_rows,
            "workers": self.workers,
            "read_seconds": round(self.read_seconds, 3),
            "train_seconds": round(self.train_seconds, 3),
            "gate_seconds": round(self.gate_seconds, 3),
            "seconds": round(self.seconds, 3),
            **{k: round(v, 3) for k, v in self.timings.items()},
        }


def _spec(config: Config) -> FeatureSpec:
    return feature_spec(config)  # as the host judging the model hashes, so it can serve it


def split_host(rows: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(train, holdout) of one host's experiences, oldest first: its newest ``fraction`` held out."""
    n = rows.num_rows
    cut = n - holdout_rows(n, fraction)
    return rows.slice(0, cut), rows.slice(cut)


def shards(table: pa.Table, workers: int) -> list[pa.Table]:
    """``table``'s rows dealt round-robin into ``workers`` shards (hosts and times mixed in each)."""
    return [table.take(pa.array(np.arange(k, table.num_rows, workers))) for k in range(workers)]


def train_fleet(
    paths: list[str],
    out: str | os.PathLike[str],
    config: Config,
    *,
    workers: int = 2,
    address: str | None = None,
    seed: int = 0,
    max_rows: int | None = None,
    agent: str | None = None,
    since: float | None = None,
    storage: str | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
) -> FleetRun:
    """Read ``paths`` (hosts' archives), train one model on Ray, gate it on the pooled holdout and
    write it to ``out``. ``address`` is a Ray cluster's (``ray.init(address=...)``; default: start a
    new local one with this machine's CPUs, stopped at the end: ``_init_ray``). ``storage`` is where Ray Train keeps
    the checkpoint it hands back (default: a temporary folder; on a multi-node cluster, a shared
    path or a URI every node reaches). FleetError for what the operator can fix."""
    ray_version = require_ray()
    import ray

    if workers < 1:
        raise FleetError(f"--workers must be at least 1, not {workers}")
    if not paths:
        raise FleetError("name at least one host's archive")
    progress = progress or Progress()
    started = time.perf_counter()
    for path in paths:  # a wrong path is told before a cluster is started
        open_archive(path)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = _spec(config)
    started_ray = False
    if not ray.is_initialized():
        _init_ray(ray, address, workers, verbose)
        started_ray = True
    scratch = Path(tempfile.mkdtemp(prefix="reflexd-fleet-"))
    try:
        timings: dict[str, float] = {}
        # 1. read and join every host, a Ray task each
        _stage(progress, "reading")
        t = time.perf_counter()
        hosts = _read_hosts(ray, paths, config, max_rows, agent, since, progress)
        read_seconds = time.perf_counter() - t
        parts = [split_host(h.table, config.trainer.holdout_fraction) for h in hosts]
        train_table = pa.concat_tables([p[0] for p in parts]) if parts else None
        holdout_table = pa.concat_tables([p[1] for p in parts]) if parts else None
        rows = sum(h.table.num_rows for h in hosts)
        if train_table is None or train_table.num_rows < max(workers, 2) or holdout_table.num_rows < 2:
            raise FleetError(
                f"the {len(paths)} archives hold {rows} matured experiences: too few to train on "
                f"{workers} workers and hold some out for the gate"
            )
        # the pooled holdout, hashed here: the gate needs it whole
        t = time.perf_counter()
        holdout = from_table(holdout_table, spec, "the pooled holdout")
        timings["holdout_hash_seconds"] = time.perf_counter() - t

        # 2. train data-parallel on Ray Train's workers
        _stage(progress, "training")
        t = time.perf_counter()
        checkpoint_dir, fitted = _train(
            ray, train_table, holdout_table.slice(0, MAX_PARITY_ROWS), config, workers, seed, scratch, storage, progress
        )
        train_seconds = time.perf_counter() - t
        timings.update({k: v for k, v in fitted.items() if k.endswith("_seconds") and isinstance(v, float)})
        if not fitted["parity_ok"]:
            raise FleetError(
                f"the ONNX export differs from torch by {fitted['parity_diff']:.2e} (tolerance "
                f"{config.gate.parity_tolerance:.0e}): the fleet model is not written"
            )

        # 3. the gate, on the pooled holdout, by a host's own rule
        _stage(progress, "gating")
        t = time.perf_counter()
        model_file = checkpoint_dir / MODEL_FILE
        fleet_hosts = [
            FleetHost(
                path=h.path,  # credentials in a URI left out (archive.public_path)
                rows=h.table.num_rows,
                train_rows=p[0].num_rows,
                holdout_rows=p[1].num_rows,
                window_start=_window(h.table, min),
                window_end=_window(h.table, max),
            )
            for h, p in zip(hosts, parts)
        ]
        dropped = int(sum(fitted["shard_dropped"])) + holdout.dropped
        manifest = build_manifest(
            {
                "version": f"fleet-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}",
                "parent": None,
                "created": time.time(),
                "learner": fitted["learner"],
                "features": spec,
                "exploration": config.exploration,
                "agent_exploration": {a: c.exploration for a, c in config.agents.items()},
                "training": {
                    "train_rows": train_table.num_rows - int(sum(fitted["shard_dropped"])),
                    "holdout_rows": len(holdout),
                    "dropped_rows": dropped,
                    "refit": False,
                    "window_start": _window(pa.concat_tables([h.table for h in hosts]), min),
                    "window_end": _window(pa.concat_tables([h.table for h in hosts]), max),
                    "seed": seed,
                    "epochs": fitted["epochs"],
                    "train_loss": fitted["train_loss"],
                    "load_seconds": fitted["load_seconds"],
                    "import_seconds": fitted["import_seconds"],
                    "fit_seconds": fitted["fit_seconds"],
                    "export_seconds": fitted["export_seconds"],
                    "graph_reused": False,
                    "parity_seconds": fitted["parity_seconds"],
                    "parity_diff": fitted["parity_diff"],
                    "parity_ok": True,
                    "torch_version": fitted["torch_version"],
                },
                "sha256": sha256_of(model_file),
            }
        )
        from reflexd.deciding.scoring import Scorer  # onnxruntime: only once there is a model to judge

        candidate = Scorer(manifest, model_file.read_bytes())
        judged = runs.judge_run(candidate, None, holdout, manifest.exploration_for, config.gate, online=config.online)
        verdict = judged.verdict
        gate_seconds = time.perf_counter() - t

        # 4. the files a host's registry holds: the model, then its manifest (whose presence says
        # the pair is whole)
        _stage(progress, "writing")
        origin = FleetOrigin(
            hosts=fleet_hosts,
            rows=rows,
            train_rows=manifest.training.train_rows,
            holdout_rows=len(holdout),
            workers=workers,
            gate=verdict,
            ray_version=ray_version,
        )
        manifest = msgspec.structs.replace(manifest, gate=verdict, fleet=origin)
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        atomic_write(out_dir / MODEL_FILE, model_file.read_bytes())
        atomic_write(out_dir / MANIFEST_FILE, msgspec.json.format(msgspec.json.encode(manifest)))
        return FleetRun(
            out=str(out_dir),
            manifest=manifest,
            hosts=fleet_hosts,
            rows=rows,
            train_rows=manifest.training.train_rows,
            holdout_rows=len(holdout),
            dropped_rows=dropped,
            workers=workers,
            read_seconds=read_seconds,
            train_seconds=train_seconds,
            gate_seconds=gate_seconds,
            seconds=time.perf_counter() - started,
            verdict=verdict,
            timings=timings,
        )
    except ray.exceptions.RayError as exc:  # the cluster failed under a step (a node lost, the object store full)
        raise FleetError(f"Ray failed: {_root_cause(exc)}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if started_ray:
            ray.shutdown()


def _init_ray(ray: Any, address: str | None, workers: int, verbose: bool) -> None:
    """Connect to the cluster at ``address``, or start a local one of this machine's CPUs.

    Without ``address`` the cluster is always a new local one (``address="local"``): plain
    ``ray.init()`` would join a cluster already running on this machine (or named by
    ``RAY_ADDRESS``), which refuses the ``num_cpus`` given here. Ray's own failures become
    FleetError, saying which cluster could not be used.
    """
    import logging

    try:
        ray.init(
            address=address or "local",
            num_cpus=None if address else max(workers, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
    except Exception as exc:  # ValueError, ConnectionError, RuntimeError, Ray's own: all mean no cluster
        what = f"connect to the Ray cluster at {address!r} (--address)" if address else "start a local Ray cluster"
        raise FleetError(f"cannot {what}: {_root_cause(exc)}") from None


def _stage(progress: Progress, name: str) -> None:
    if progress.stage is not None:
        progress.stage(name)


def _window(table: pa.Table, pick: Callable[..., Any]) -> float | None:
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return None
    found = (pc.min if pick is min else pc.max)(table.column("received_at")).as_py()
    return float(found) if found is not None and math.isfinite(found) else None


def _read_hosts(
    ray: Any,
    paths: list[str],
    config: Config,
    max_rows: int | None,
    agent: str | None,
    since: float | None,
    progress: Progress,
) -> list[HostRows]:
    """Every host's joined experiences, read by one Ray task each, in the order of ``paths``."""
    task = ray.remote(num_cpus=1, max_retries=0)(read_host)
    now = time.time()
    pending = {
        task.remote(path, config, now=now, max_rows=max_rows, agent=agent, since=since): i for i, path in enumerate(paths)
    }
    if progress.hosts is not None:
        progress.hosts(len(paths))
    found: dict[int, HostRows] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        try:
            host = ray.get(done[0])
        except Exception as exc:  # RayTaskError wraps what the task raised
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ReflexdError):
                raise FleetError(str(cause)) from None
            raise FleetError(f"reading {public_path(paths[i])} failed: {exc}") from None
        found[i] = host
        if progress.host_read is not None:
            progress.host_read(host)
    return [found[i] for i in range(len(paths))]


def _train(
    ray: Any,
    train_table: pa.Table,
    parity_table: pa.Table,
    config: Config,
    workers: int,
    seed: int,
    scratch: Path,
    storage: str | None,
    progress: Progress,
) -> tuple[Path, dict[str, Any]]:
    """Fit on Ray Train's workers; (a local folder holding rank 0's policy.onnx, what it reported)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # the process group's collectives (gloo) and torch's own threads share the worker's CPU
    reporter = _EpochReporter.options(num_cpus=0).remote() if progress.epochs is not None else None
    loop_config = {
        "shards": [ray.put(s) for s in shards(train_table, workers)],
        "parity": ray.put(parity_table),
        "config": msgspec.json.encode(config),
        "seed": seed,
        "reporter": reporter,
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="reflexd-fleet", storage_path=storage or str(scratch / "ray-train")),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    runner = threading.Thread(target=fit, name="reflexd-fleet-fit", daemon=True)
    runner.start()
    seen = 0
    while runner.is_alive():
        runner.join(timeout=0.5)
        if reporter is not None:
            for epoch, epochs, loss in ray.get(reporter.take.remote()):
                if epoch > seen:
                    seen = epoch
                    progress.epochs(epoch, epochs, loss)
    if reporter is not None:
        for epoch, epochs, loss in ray.get(reporter.take.remote()):
            if epoch > seen:
                seen = epoch
                progress.epochs(epoch, epochs, loss)
    if "error" in outcome:
        raise FleetError(f"training on Ray failed: {_root_cause(outcome['error'])}") from None
    result = outcome["result"]
    error = getattr(result, "error", None)
    if error is not None:
        raise FleetError(f"training on Ray failed: {_root_cause(error)}")
    if result.checkpoint is None:
        raise FleetError("training on Ray ended without rank 0's model (no checkpoint was reported)")
    local = scratch / "model"
    result.checkpoint.to_directory(str(local))
    fitted = msgspec.json.decode((local / RESULT_FILE).read_bytes())
    return local, fitted


def _root_cause(exc: BaseException) -> str:
    """The innermost error a Ray failure wraps, as one line."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ReflexdError) else str(exc)
    return " ".join(text.split())[:2000]


class _EpochReporterImpl:
    """Rank 0's epochs, queued for the driver's progress bar (a Ray actor: ``_EpochReporter``)."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, int, float]] = []

    def put(self, epoch: int, epochs: int, loss: float) -> None:
        self.queue.append((epoch, epochs, loss))

    def take(self) -> list[tuple[int, int, float]]:
        found, self.queue = self.queue, []
        return found


class _LazyActor:
    """``ray.remote(cls)``, made on first use, so that importing this module does not import Ray."""

    def __init__(self, cls: type) -> None:
        self._cls = cls
        self._remote: Any = None

    def _actor(self) -> Any:
        if self._remote is None:
            import ray

            self._remote = ray.remote(self._cls)
        return self._remote

    def options(self, **kw: Any) -> Any:
        return self._actor().options(**kw)

    def remote(self, *args: Any) -> Any:
        return self._actor().remote(*args)


_EpochReporter = _LazyActor(_EpochReporterImpl)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: hash its shard, fit data-parallel, check every worker holds the same
    model; rank 0 exports it with the parity check and reports it as the checkpoint."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from reflexd.extensions import load_learner
    from reflexd.trainer.fit import export_checked

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = msgspec.json.decode(loop_config["config"], type=Config)
    settings = config.trainer
    torch.set_num_threads(settings.max_threads)
    spec = _spec(config)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    shard = from_table(ray.get(loop_config["shards"][rank]), spec, f"shard {rank}")
    timings["load_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    learner = load_learner(settings.learner)
    timings["import_seconds"] = time.perf_counter() - t
    reporter = loop_config["reporter"]
    losses: list[float] = []

    def progress(epoch: int, epochs: int, loss: float) -> None:
        losses.append(loss)
        if rank == 0 and reporter is not None:
            reporter.put.remote(epoch, epochs, loss)

    t = time.perf_counter()
    model = learner.fit(shard, settings, loop_config["seed"], progress)
    timings["fit_seconds"] = time.perf_counter() - t
    # every worker must hold the same model, or the learner did not train data-parallel
    if world > 1:
        flat = torch.cat([v.detach().reshape(-1).double() for v in model.state_dict().values() if v.is_floating_point()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        diff = (flat - reference).abs().nan_to_num(nan=math.inf).max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        rows = torch.tensor([len(shard), shard.dropped], dtype=torch.float64)
        gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(gathered, rows)
        if float(diff) > 1e-6:
            raise FleetError(
                f"learner {learner.name!r} does not train data-parallel: its {world} workers ended with models "
                f"differing by up to {float(diff):.3g} (a learner must average its gradients across a "
                "torch.distributed group, as the built-in learners' loop does)"
            )
        shard_dropped = [int(g[1]) for g in gathered]
    else:
        shard_dropped = [shard.dropped]
    if rank != 0:
        ray.train.report({"rank": rank})
        return
    out = Path(tempfile.mkdtemp(prefix="reflexd-fleet-rank0-"))
    try:
        check = from_table(ray.get(loop_config["parity"]), spec, "the parity rows")
        exported = export_checked(model, out / MODEL_FILE, spec, check, config.gate.parity_tolerance, None)
        fitted = {
            "learner": learner.name,
            "epochs": len(losses) or settings.epochs,
            "train_loss": losses[-1] if losses else None,
            "export_seconds": exported.seconds,
            "parity_seconds": exported.parity_seconds,
            "parity_diff": exported.diff,
            "parity_ok": bool(exported.diff <= config.gate.parity_tolerance),
            "torch_version": str(torch.__version__),
            "shard_dropped": shard_dropped,
            **timings,
        }
        (out / RESULT_FILE).write_bytes(msgspec.json.encode(fitted))
        ray.train.report(
            {"parity_diff": exported.diff}, checkpoint=ray.train.Checkpoint.from_directory(str(out))
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)

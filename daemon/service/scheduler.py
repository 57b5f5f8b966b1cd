"""When and how a training run happens: snapshot → trainer subprocess → gate → registry.

The daemon never imports torch: training runs in ``python -m reflexd.trainer``, at the lowest
CPU priority, with a wall-time limit, on a Parquet snapshot rather than the live database.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np

from reflexd import log

from reflexd.learning import gate
from reflexd.config import Config, TrainerConfig
from reflexd.learning.dataset import load_holdout, load_snapshot
from reflexd.errors import ReflexdError, TrainerFault, TrainingError
from reflexd.registry import GateResult, Manifest, Registry, experience, sha256_of
from reflexd.deciding.scoring import Scorer
from reflexd.split import first_run_rows
from reflexd.trainer.fit import EXIT_OUT_OF_MEMORY, MODEL_FILE, REFIT_FILE, TrainResult, memory_exhausted, read_result

_log = log.get("reflexd.scheduler")
KEEP_RUNS = 3
GRAPHS_DIR = "graphs"  # under state_dir, beside runs/ (whose old entries are pruned)


def due_after(cfg: TrainerConfig, trained_on: int, first: int) -> int:
    """How many new matured experiences make a run due, when the last run's snapshot held ``trained_on``.

    ``min_new_examples``, or fewer while experience is scarce: once it has grown by
    ``cfg.growth`` since the last run, and the first run as soon as there are ``first``
    (``first_run_rows``). Learning early and often is what an agent with little experience gains
    most from; as experience grows the gaps widen geometrically until ``min_new_examples``
    governs. A snapshot as large as ``max_examples`` means experience is no longer scarce,
    however small that cap. Never fewer than ``first`` in all: a run on fewer would only fail.
    """
    needed = max(first - trained_on, 1)
    if cfg.growth <= 0 or trained_on >= cfg.max_examples:
        return max(cfg.min_new_examples, needed)
    # rounded up, less a hair, so 0.07 × 100 asks for 7 and not the 8 of its float (7.000000000000001)
    grown = math.ceil(cfg.growth * trained_on - 1e-9)
    return max(min(cfg.min_new_examples, grown), needed)


def run_points(cfg: TrainerConfig, below: int, first: int) -> list[int]:
    """The experience totals under ``below`` at which ``due_after`` makes runs due, each run
    training on everything so far: 6, 8, 10, 13, 17, 22, 28, ... with the defaults."""
    points, total = [], 0
    while (total := total + due_after(cfg, total, first)) < below:
        points.append(total)
    return points


def cpu_idle(threshold: float) -> bool:
    """True when the 1-minute load average per core is below ``threshold``."""
    return os.getloadavg()[0] / (os.cpu_count() or 1) < threshold


@dataclass
class TrainerStatus:
    state: str = "idle"
    runs: int = 0
    promoted: int = 0
    rejected: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_run: dict[str, Any] | None = None
    next_attempt: float = 0.0
    cutoff: float = 0.0  # newest experience the last snapshot held
    trained_on: int = 0  # experiences the last snapshot held (train and holdout)
    trainer_pid: int | None = None  # the running trainer subprocess, if any

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Scheduler:
    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.status = TrainerStatus()
        self._lock = anyio.Lock()
        self._run_seq = 0

    @property
    def config(self) -> Any:
        return self.daemon.config

    @property
    def runs_dir(self) -> Path:
        return self.config.state_path / "runs"

    def start_from(self, manifest: Manifest | None) -> None:
        if manifest is not None:
            training = manifest.training
            self.status.cutoff = float(training.get("window_end", 0.0))
            self.status.trained_on = experience(training)

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.config.trainer.check_interval)
            if await self._due():
                await self.train_once("new experience")

    async def _due(self) -> bool:
        cfg = self.config.trainer
        now = time.time()
        if now < self.status.next_attempt or not cpu_idle(cfg.idle_load):
            return False
        new = await anyio.to_thread.run_sync(self.daemon.store.matured_count, self.status.cutoff, now, self.config)
        return new >= due_after(cfg, self.status.trained_on, first_run_rows(self.config))

    async def train_once(self, reason: str) -> dict[str, Any]:
        async with self._lock:
            self.status.runs += 1
            started = time.time()
            run_dir = self._new_run_dir()
            try:
                summary = await self._train(run_dir, reason)
            except ReflexdError as exc:
                return self._failed(exc, started)
            except Exception as exc:  # a bug must cost one run, never the daemon
                _log.exception("training run failed unexpectedly")
                return self._failed(TrainingError(f"training run failed unexpectedly: {type(exc).__name__}: {exc}"), started)
            finally:
                self.status.state = "idle"
                self._prune_runs()
            self.status.consecutive_failures = 0
            self.status.last_error = None
            summary["seconds"] = round(time.time() - started, 3)
            self.status.last_run = summary
            return summary

    def _failed(self, exc: Exception, started: float) -> dict[str, Any]:
        s = self.status
        s.failures += 1
        s.consecutive_failures += 1
        s.last_error = str(exc)
        backoff = min(self.config.trainer.retry_backoff * 2 ** (s.consecutive_failures - 1), 3600.0)
        finished = time.time()
        s.next_attempt = finished + backoff
        s.last_run = {"outcome": "failed", "error": str(exc), "at": started, "finished": finished, "retry_in": backoff}
        if isinstance(exc, TrainerFault):
            s.last_run.update(fault=exc.kind, returncode=exc.returncode)
        _log.error(
            "training run failed",
            error=str(exc),
            fault=getattr(exc, "kind", None),
            consecutive=s.consecutive_failures,
            retry_in=round(backoff, 1),
        )
        return s.last_run

    def _new_run_dir(self) -> Path:
        self._run_seq += 1
        path = self.runs_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{self._run_seq}"
        path.mkdir(parents=True, mode=0o750)
        return path

    def _prune_runs(self) -> None:
        runs = sorted(self.runs_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in runs[:-KEEP_RUNS]:
            shutil.rmtree(old, ignore_errors=True)

    async def _train(self, run_dir: Path, reason: str) -> dict[str, Any]:
        cfg = self.config
        self.status.state = "snapshot"
        await self.daemon.ingest.barrier(loaded=True)  # what was acknowledged is in the snapshot
        snapshot = run_dir / "snapshot.parquet"
        info = await anyio.to_thread.run_sync(
            self.daemon.store.snapshot, snapshot, time.time(), cfg, cfg.trainer.max_examples
        )
        needed = first_run_rows(cfg)
        if info.rows < needed:
            raise TrainingError(f"only {info.rows} joined experiences so far; need at least {needed}")
        _log.info("training started", reason=reason, rows=info.rows)
        self.status.state = "training"
        out = run_dir / "out"
        out.mkdir()
        await self._run_trainer(run_dir, snapshot, out)
        result = read_result(out)
        if not result.parity_ok:
            raise TrainingError(
                f"ONNX export differs from torch by {result.parity_diff:.2e} "
                f"(tolerance {cfg.gate.parity_tolerance:.0e}); candidate rejected"
            )
        self.status.state = "gating"
        model_file, manifest, verdict = await anyio.to_thread.run_sync(self._gate, snapshot, out, result)
        self.status.cutoff = max(self.status.cutoff, info.window_end)
        self.status.trained_on = info.rows
        return await anyio.to_thread.run_sync(self._register, model_file, manifest, verdict)

    async def _run_trainer(self, run_dir: Path, snapshot: Path, out: Path) -> None:
        cfg = self.config
        config_file = run_dir / "config.json"
        config_file.write_bytes(msgspec.json.encode(cfg))
        threads = str(cfg.trainer.max_threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        cmd = [sys.executable, "-m", "reflexd.trainer", str(snapshot), str(out), "--config", str(config_file)]
        # each architecture's ONNX graph is traced once and reused by later runs (seconds each)
        cmd += ["--graph-cache", str(self.config.state_path / GRAPHS_DIR)]
        with open(run_dir / "trainer.log", "wb") as errlog:
            proc = await anyio.open_process(cmd, stdin=None, stdout=errlog, stderr=errlog, env=env)
            self.status.trainer_pid = proc.pid
            try:
                with anyio.move_on_after(cfg.trainer.max_wall_time) as limit:
                    await proc.wait()
            finally:
                self.status.trainer_pid = None
                if proc.returncode is None:  # over the wall-time limit, or the daemon is stopping
                    proc.kill()
                    with anyio.CancelScope(shield=True):
                        await proc.wait()
        if limit.cancelled_caught:
            raise TrainerFault(
                "timeout",
                f"trainer exceeded max_wall_time ({cfg.trainer.max_wall_time:g} s) and was killed",
                proc.returncode,
            )
        if proc.returncode != 0:
            raise self._trainer_fault(proc.returncode, run_dir / "trainer.log", out)

    def _trainer_fault(self, code: int, log_file: Path, out: Path) -> TrainerFault:
        """Why the trainer exited with ``code``, in words an operator can act on."""
        log_text = log_file.read_text(errors="replace").strip()
        tail = (log_text.splitlines() or ["no output"])[-1]
        max_mb = self.config.trainer.max_memory_mb
        try:
            read_result(out)
            reported = None
        except TrainingError as exc:
            reported = str(exc) if (out / "result.json").exists() else None
        if code == EXIT_OUT_OF_MEMORY:
            return TrainerFault("out_of_memory", reported or f"trainer ran out of memory (max_memory_mb={max_mb})", code)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            if memory_exhausted(log_text[-4000:]):  # what it printed last, not a whole run's chatter
                # an allocation failure some native code could not survive (std::bad_alloc → SIGABRT)
                return TrainerFault(
                    "out_of_memory", f"trainer ran out of memory (max_memory_mb={max_mb}) and was killed by {name}", code
                )
            who = " (by another process, or the kernel's OOM killer)" if -code == signal.SIGKILL else ""
            return TrainerFault("killed", f"trainer was killed by {name}{who}, exit status {code}; last output: {tail}", code)
        return TrainerFault("exit", f"trainer exited with status {code}: {reported or tail}", code)

    def _gate(self, snapshot: Path, out: Path, result: Any) -> tuple[Path, Manifest, Any]:
        """(the model file to register, its manifest, the gate's verdict) for the trainer's ``result``.

        The candidate fit without the holdout is judged on it (against a refit incumbent, only on
        the rows newer than its snapshot). When it passes and the trainer also refit it on every
        row (``trainer.refit_below``), the refit goes live unless it went wrong
        (``gate.check_refit``); otherwise the candidate itself does. A cross-fitted run's model,
        fit on every row, goes live if its learner's out-of-fold predictions pass
        (``gate.evaluate_cross_fit``).
        """
        cfg = self.config
        incumbent = self.daemon.models.scorer
        model_file = out / MODEL_FILE
        training = msgspec.to_builtins(result)
        # the out-of-fold predictions are the gate's evidence, not the model's description
        training["cross_fitted"] = training.pop("cross_fit", None) is not None
        manifest = Manifest(
            version="candidate",
            parent=incumbent.version if incumbent else None,
            created=time.time(),
            learner=result.learner,
            features=result.features,
            exploration=cfg.exploration,
            agent_exploration={a: c.exploration for a, c in cfg.agents.items()},
            # a cross-fitted model was fit on every row of its snapshot, as a refit is
            training={**training, "refit": result.cross_fit is not None},
            sha256=sha256_of(model_file),
        )
        if result.cross_fit is not None:
            return model_file, manifest, self._gate_cross_fit(snapshot, result)
        holdout = load_holdout(snapshot, result.features, cfg.trainer.holdout_fraction)
        incumbent_holdout = None
        if incumbent is not None and incumbent.manifest.features != result.features:
            incumbent_holdout = load_holdout(snapshot, incumbent.manifest.features, cfg.trainer.holdout_fraction)
        held = len(holdout)
        unseen = gate.unseen_rows(incumbent.manifest.training, holdout.received_at) if incumbent else None
        if unseen is not None and len(unseen) < held:
            holdout = holdout.take(unseen)
            incumbent_holdout = incumbent_holdout.take(unseen) if incumbent_holdout is not None else None

        candidate = Scorer(manifest, model_file.read_bytes())
        verdict = gate.evaluate(
            candidate,
            incumbent,
            holdout,
            cfg.exploration,
            cfg.gate,
            incumbent_holdout,
            incumbent.manifest.exploration if incumbent is not None else None,
        )
        if incumbent is not None and len(holdout) < held:
            note = f" (on the {len(holdout)} of {held} holdout rows newer than what {incumbent.version} was fit on)"
            verdict = msgspec.structs.replace(verdict, reason=verdict.reason + note)
        if not (verdict.passed and result.refitted):
            return model_file, manifest, verdict
        refit_file = out / REFIT_FILE
        refit = msgspec.structs.replace(
            manifest,
            # the candidate's file is pruned with its run; its digest says which model was judged
            training={**manifest.training, "refit": True, "candidate_sha256": manifest.sha256},
            sha256=sha256_of(refit_file),
        )
        check = gate.check_refit(Scorer(refit, refit_file.read_bytes()), candidate, holdout, cfg.exploration, cfg.gate)
        verdict = gate.with_refit(verdict, check, result.train_rows + result.holdout_rows)
        return (refit_file, refit, verdict) if check.passed else (model_file, manifest, verdict)

    def _gate_cross_fit(self, snapshot: Path, result: TrainResult) -> GateResult:
        """The gate's verdict on a cross-fitted run's learner (``gate.evaluate_cross_fit``)."""
        rows = load_snapshot(snapshot, result.features)
        found = result.cross_fit
        if list(rows.ids) != found.ids:
            raise TrainingError(
                f"the trainer's out-of-fold predictions cover {len(found.ids)} rows that are not the "
                f"{len(rows)} of snapshot {snapshot}, row for row"
            )
        scores, spread = np.asarray(found.scores, dtype=np.float64), np.asarray(found.spread, dtype=np.float64)
        if scores.shape != rows.mask.shape or spread.shape != rows.mask.shape:
            raise TrainingError(
                f"the trainer's out-of-fold predictions are {scores.shape} and {spread.shape}, "
                f"not one per action of each row {rows.mask.shape}"
            )
        return gate.evaluate_cross_fit(
            rows, scores, spread, self.config.exploration, self.config.gate, self.daemon.models.scorer
        )

    def _register(self, model_file: Path, manifest: Manifest, verdict: Any) -> dict[str, Any]:
        registry: Registry = self.daemon.registry
        fields = msgspec.structs.asdict(manifest)
        fields["gate"] = verdict
        added = registry.add(model_file, fields)
        store = self.daemon.store
        store.record_model_event(added.version, "registered", msgspec.to_builtins(verdict), time.time())
        if verdict.passed:
            registry.promote(added.version)
            store.record_model_event(added.version, "promoted", {"reason": verdict.reason}, time.time())
            self.status.promoted += 1
            _log.info("model promoted", version=added.version, gate=verdict.reason)
            self.daemon.models.refresh()
        else:
            self.status.rejected += 1
            _log.info("candidate rejected by the gate", version=added.version, gate=verdict.reason)
        return {
            "outcome": "promoted" if verdict.passed else "rejected",
            "version": added.version,
            "gate": verdict.reason,
            "train_rows": added.training.get("train_rows"),
            "at": added.created,
        }

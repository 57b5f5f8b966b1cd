"""When and how the behaviour model is trained: steps snapshot → subprocess → registry.

Like a reward-model run: a Parquet snapshot of the steps, ``python -m reflexd.trainer.behaviour``
at idle priority under a wall-time limit, never torch in the daemon. A model whose ONNX export
matches torch is added to its own registry line (``models/behaviour/``) and made live; there is
no gate, since nothing decides with it: its calibration, measured on held-out episodes, is in its
manifest and in ``status``.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from reflexd import log
from reflexd.config import Config
from reflexd.deciding.behaviour import BEHAVIOUR_DIR, BehaviourRegistry, read_behaviour_run
from reflexd.errors import ReflexdError, TrainingError
from reflexd.service.child import prune, run_child
from reflexd.service.store import Store

_log = log.get("reflexd.behaviour")
RUNS_DIR = "behaviour-runs"
KEEP_RUN_DIRS = 2


class BehaviourStatus(msgspec.Struct, kw_only=True):
    state: str = "idle"  # idle, snapshot, training
    runs: int = 0
    failures: int = 0
    last_run: dict[str, Any] | None = None
    waiting: str | None = None  # why no run started at the last check


class BehaviourTrainer:
    """Trains a behaviour model when ``behaviour.min_new_episodes`` more episodes have ended."""

    def __init__(self, settings: Callable[[], Config], store: Store, lock: anyio.Lock) -> None:
        self._settings = settings
        self.store = store
        self.status = BehaviourStatus()
        self._lock = lock  # the training lock: one heavy subprocess at a time, none while forgetting
        self._trained_on = 0  # ended episodes the last run saw
        self._failed_at = 0.0

    @property
    def config(self) -> Config:
        return self._settings()

    @property
    def registry(self) -> BehaviourRegistry:
        return BehaviourRegistry(self.config.models_path / BEHAVIOUR_DIR)

    @property
    def runs_dir(self) -> Path:
        return self.config.state_path / RUNS_DIR

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.config.trainer.check_interval)
            try:
                due = await self._due()
            except (ReflexdError, OSError) as exc:  # a failing store costs a check, never the daemon
                self.status.waiting = f"cannot tell whether a behaviour run is due: {exc}"
                continue
            if due:
                await self.train_once()

    async def _due(self) -> bool:
        cfg = self.config.behaviour
        if not cfg.enabled:
            self.status.waiting = "behaviour.enabled is false"
            return False
        if time.time() - self._failed_at < self.config.trainer.retry_backoff:
            self.status.waiting = "backing off after a failed run"
            return False
        ended = await anyio.to_thread.run_sync(self.store.ended_episodes)
        needed = self._trained_on + cfg.min_new_episodes
        if ended < needed:
            self.status.waiting = f"{ended} ended episodes of the {needed} the next run needs (behaviour.min_new_episodes)"
            return False
        self.status.waiting = None
        return True

    async def train_once(self) -> dict[str, Any]:
        async with self._lock:
            self.status.runs += 1
            started = time.time()
            try:
                run_dir = self.runs_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
                await anyio.to_thread.run_sync(lambda: run_dir.mkdir(parents=True, mode=0o750))
                try:
                    summary = await self._train(run_dir)
                finally:
                    await anyio.to_thread.run_sync(prune, self.runs_dir, KEEP_RUN_DIRS)
            except (ReflexdError, OSError) as exc:
                self.status.failures += 1
                self._failed_at = time.time()
                self.status.last_run = {"outcome": "failed", "error": str(exc), "at": started}
                _log.error("behaviour run failed", error=str(exc))
                return self.status.last_run
            finally:
                self.status.state = "idle"
        summary.update(at=started, seconds=round(time.time() - started, 3))
        self.status.last_run = summary
        _log.info("behaviour model trained", **{k: v for k, v in summary.items() if not isinstance(v, dict)})
        return summary

    async def _train(self, run_dir: Path) -> dict[str, Any]:
        cfg = self.config
        self.status.state = "snapshot"
        ended = await anyio.to_thread.run_sync(self.store.ended_episodes)
        snapshot = run_dir / "steps.parquet"
        await anyio.to_thread.run_sync(self.store.steps_snapshot, snapshot)
        settings = run_dir / "behaviour.json"
        await anyio.to_thread.run_sync(settings.write_bytes, msgspec.json.encode(cfg.behaviour))
        out = run_dir / "out"
        cmd = [sys.executable, "-m", "reflexd.trainer.behaviour", str(snapshot), str(out), "--config", str(settings)]
        threads = str(cfg.behaviour.max_threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        self.status.state = "training"
        done = await run_child(cmd, run_dir / "behaviour.log", env, cfg.behaviour.max_wall_time)
        if done.timed_out:
            raise TrainingError(f"behaviour run exceeded behaviour.max_wall_time ({cfg.behaviour.max_wall_time:g} s) and was killed")
        manifest = await anyio.to_thread.run_sync(read_behaviour_run, out)  # TrainingError with the trainer's message
        self._trained_on = ended
        training = manifest.training
        if not training.parity_ok:
            return {"outcome": "rejected", "reason": f"its ONNX export differs from torch by {training.parity_diff}"}

        def publish() -> str:
            registry = self.registry
            registry.ensure()
            version = registry.add_run(out).version
            registry.promote(version)
            return version

        version = await anyio.to_thread.run_sync(publish)
        cal = manifest.calibration
        return {
            "outcome": "published",
            "version": version,
            "episodes": ended,
            "calibration": {
                "brier": cal.brier, "accuracy": cal.accuracy, "success_brier": cal.success_brier,
                "episodes": cal.episodes, "held_out": cal.held_out,
            },
        }

    def summary(self) -> dict[str, Any]:
        s = self.status
        out: dict[str, Any] = {"state": s.state, "runs": s.runs, "failures": s.failures, "last_run": s.last_run}
        if s.waiting and s.state == "idle":
            out["waiting"] = s.waiting
        live = self.registry.current()
        out["live"] = live
        return out

"""When and how a knowledge extraction happens: snapshot → extraction subprocess → store.

As training does, an extraction reads a Parquet snapshot of the matured experience, in a
subprocess at idle priority (``python -m reflexd.analysis``) under a wall-time and memory limit,
never in the event loop; numpy and scikit-learn never enter the daemon. What it found is stored
with the window it read (``store.findings``), and the newest run answers ``insights`` requests.
The previous run's rules go back into the next, so each rule keeps its history.
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
from reflexd.analysis.findings import ExtractionInputs, ModelRecord, Rule
from reflexd.analysis.findings import Insights as Found
from reflexd.analysis.result import EXIT_FAILED, EXIT_OUT_OF_MEMORY, encode_inputs, read_insights
from reflexd.config import Config
from reflexd.deciding.behaviour import BEHAVIOUR_DIR, BehaviourRegistry
from reflexd.errors import AnalysisError, ReflexdError
from reflexd.manifest import GateResult
from reflexd.registry import Registry
from reflexd.service.child import prune, run_child
from reflexd.service.ingest import Ingest
from reflexd.service.store import Store
from reflexd.service.store.findings import KINDS, Run
from reflexd.wire.protocol import Insights, InsightsRequest

_log = log.get("reflexd.insights")
RUNS_DIR = "insights"
KEEP_RUN_DIRS = 2  # a failed run's files stay for a look, beside the newest


def predicted(gate: GateResult) -> dict[str, float]:
    """What a promoted model's gate predicted it would earn: ``predicted`` with ``predicted_low``
    and ``predicted_high`` (a ``ModelRecord``'s).

    The gate judged the difference with the incumbent; its half-widths bound the candidate's own.
    A first model confirmed on the decisions made during its run (``runs.confirm_first``) was
    judged there on more and newer rows, logged by the policy it replaced: that estimate.
    """
    value, difference, lower, upper = gate.candidate_value, gate.difference, gate.lower, gate.upper
    found = gate.estimates
    if gate.passed and "confirmed_value" in found:  # a refused one's may be of the refit, not of the file kept
        value, difference = found["confirmed_value"], found["confirmed_difference"]
        lower, upper = found["confirmed_lower"], found["confirmed_upper"]
    low, high = value - (difference - lower), value + (upper - difference)
    return {"predicted": value, "predicted_low": low, "predicted_high": high}


class ExtractionStatus(msgspec.Struct, kw_only=True):
    state: str = "idle"  # idle, snapshot, extracting
    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_run: dict[str, Any] | None = None
    last_error: str | None = None
    next_attempt: float = 0.0  # after a failure: not before (backoff)
    waiting: str | None = None  # why no extraction started at the last check


class Extractor:
    """Runs extractions when due (``insights.interval``, with new experience) or when asked."""

    def __init__(
        self,
        settings: Callable[[], Config],
        store: Store,
        ingest: Ingest,
        lines: Callable[[], list[tuple[Registry, list[str] | None]]],
        lock: anyio.Lock,
    ) -> None:
        self._settings = settings
        self.store = store
        self.ingest = ingest
        self.lines = lines  # every model line's registry, and its agents (None: every agent; reflexd.lines)
        self.status = ExtractionStatus()
        self._lock = lock  # the training lock: one heavy subprocess at a time, none while forgetting
        self._last_end = 0.0  # newest experience the last extraction read
        self._last_at = 0.0
        self._gist: dict[str, Any] = {}  # the newest run's, for status

    @property
    def config(self) -> Config:
        return self._settings()

    @property
    def runs_dir(self) -> Path:
        return self.config.state_path / RUNS_DIR

    async def start(self) -> None:
        """Take up where the stored runs left off: the interval counts from the newest, or from the
        daemon's start when there is none (a start is busy enough without an extraction)."""
        self._last_at = time.time()
        latest = await anyio.to_thread.run_sync(self.store.latest_insights, None)
        if latest is not None:
            run, found = latest
            self._last_at, self._last_end = run.at, run.window_end or 0.0
            self._gist = _gist(found["rules"], found["anomalies"])

    async def run(self) -> None:
        await self.start()
        while True:
            await anyio.sleep(self.config.trainer.check_interval)
            try:
                due = await self._due()
            except (ReflexdError, OSError) as exc:  # a failing store costs a check, never the daemon
                self.status.waiting = f"cannot tell whether an extraction is due: {exc}"
                continue
            if due:
                await self.extract_once("due")

    async def _due(self) -> bool:
        cfg = self.config.insights
        status = self.status
        now = time.time()
        if not cfg.enabled:
            status.waiting = "insights.enabled is false"
            return False
        if now < status.next_attempt:
            status.waiting = f"backing off after a failed extraction, {status.next_attempt - now:.0f} s more"
            return False
        if now - self._last_at < cfg.interval:
            status.waiting = f"next extraction in {cfg.interval - (now - self._last_at):.0f} s (insights.interval)"
            return False
        new = await anyio.to_thread.run_sync(self.store.matured_count, self._last_end, now, self.config)
        if new < cfg.min_new:
            status.waiting = f"{new} new matured experiences of the {cfg.min_new} an extraction needs (insights.min_new)"
            return False
        status.waiting = None
        return True

    async def extract_once(self, reason: str) -> dict[str, Any]:
        """Run one extraction now; its summary (``outcome`` ok or failed)."""
        async with self._lock:
            self.status.runs += 1
            started = time.time()
            try:
                run_dir = await anyio.to_thread.run_sync(self._new_run_dir)
                try:
                    found = await self._extract(run_dir, reason)
                finally:
                    await anyio.to_thread.run_sync(self._prune_runs)
            except ReflexdError as exc:
                return self._failed(exc, started)
            except OSError as exc:  # its run folder: a full disk, a damaged state directory
                return self._failed(AnalysisError(f"extraction's files under {self.runs_dir}: {exc}"), started)
            except Exception as exc:  # a bug must cost one extraction, never the daemon
                _log.exception("extraction failed unexpectedly")
                return self._failed(AnalysisError(f"extraction failed unexpectedly: {type(exc).__name__}: {exc}"), started)
            finally:
                self.status.state = "idle"
        s = self.status
        s.consecutive_failures, s.last_error = 0, None
        self._last_at, self._last_end = started, found.window[1] if found.window else self._last_end
        self._gist = _gist(msgspec.to_builtins(found.rules), msgspec.to_builtins(found.anomalies))
        s.last_run = {
            "outcome": "ok",
            "at": started,
            "seconds": round(time.time() - started, 3),
            "rows": found.rows,
            **msgspec.to_builtins(found.counts),
        }
        _log.info("extraction finished", reason=reason, **s.last_run)
        return s.last_run

    def _failed(self, exc: Exception, started: float) -> dict[str, Any]:
        s = self.status
        s.failures += 1
        s.consecutive_failures += 1
        s.last_error = str(exc)
        backoff = min(self.config.trainer.retry_backoff * 2 ** (s.consecutive_failures - 1), 3600.0)
        s.next_attempt = time.time() + backoff
        s.last_run = {"outcome": "failed", "error": str(exc), "at": started, "retry_in": backoff}
        _log.error("extraction failed", error=str(exc), consecutive=s.consecutive_failures, retry_in=round(backoff, 1))
        return s.last_run

    def _new_run_dir(self) -> Path:
        path = self.runs_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True, mode=0o750)
        return path

    def _prune_runs(self) -> None:
        prune(self.runs_dir, KEEP_RUN_DIRS)

    async def _extract(self, run_dir: Path, reason: str) -> Found:
        cfg = self.config
        self.status.state = "snapshot"
        # what was acknowledged is in the snapshot
        await self.ingest.barrier_within(cfg.socket.request_timeout, "insights: the store did not take in the events", loaded=True)
        snapshot = run_dir / "snapshot.parquet"
        now = time.time()
        info = await anyio.to_thread.run_sync(self.store.snapshot, snapshot, now, cfg, cfg.insights.max_examples)
        if info.rows == 0:
            raise AnalysisError("no matured experience to extract insights from yet")
        model_dir = await anyio.to_thread.run_sync(self._write_inputs, run_dir, now)
        trajectories = await anyio.to_thread.run_sync(self._write_steps, run_dir)
        out = run_dir / "out"
        cmd = [sys.executable, "-m", "reflexd.analysis", str(snapshot), str(out), "--inputs", str(run_dir / "inputs.json")]
        cmd += ["--config", str(run_dir / "config.json")]
        if model_dir is not None:
            cmd += ["--model-dir", str(model_dir)]
        cmd += trajectories
        threads = str(cfg.trainer.max_threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        _log.info("extraction started", reason=reason, rows=info.rows)
        self.status.state = "extracting"
        done = await run_child(cmd, run_dir / "analysis.log", env, cfg.insights.max_wall_time)
        if done.timed_out:
            raise AnalysisError(f"extraction exceeded insights.max_wall_time ({cfg.insights.max_wall_time:g} s) and was killed")
        if done.returncode != 0:
            raise await anyio.to_thread.run_sync(_fault, done.returncode, run_dir / "analysis.log", out, cfg.insights.max_memory_mb)
        found = await anyio.to_thread.run_sync(read_insights, out)
        run = Run(
            id=run_dir.name,
            at=found.generated_at,
            window_start=found.window[0] if found.window else None,
            window_end=found.window[1] if found.window else None,
            experiences=found.rows,
            summary={  # counts are not kept: they are counted from the findings left (forget)
                "reason": reason,
                "reward_model": found.reward_model,
                "confidence": found.confidence,
                "find_window": found.find_window,
                "check_window": found.check_window,
                "notes": found.notes,
                "seconds": found.seconds,
                # what a pattern, rule or check rests on in this run, for telling a run too small for any
                "min_support": cfg.insights.min_support,
            },
        )
        lists = {kind: msgspec.to_builtins(getattr(found, kind)) for kind in KINDS}
        await anyio.to_thread.run_sync(self.store.save_insights, run, lists, cfg.insights.keep_runs)
        return found

    def _write_inputs(self, run_dir: Path, now: float) -> Path | None:
        """Write the run's ``inputs.json`` and ``config.json`` (and make ``out/``); the live model's
        registry folder, if there is one."""
        inputs, model_dir = self._inputs(now)
        (run_dir / "inputs.json").write_bytes(encode_inputs(inputs))
        (run_dir / "config.json").write_bytes(msgspec.json.encode(self.config))
        (run_dir / "out").mkdir()
        return model_dir

    def _write_steps(self, run_dir: Path) -> list[str]:
        """The steps as a snapshot, and the live behaviour model, for unusual trajectories: the
        extraction's arguments naming them (none while no episode has ended)."""
        if not self.store.ended_episodes():
            return []
        steps = run_dir / "steps.parquet"
        self.store.steps_snapshot(steps)
        behaviour = BehaviourRegistry(self.config.models_path / BEHAVIOUR_DIR)
        live = behaviour.current()
        return ["--steps", str(steps)] + (["--behaviour-dir", str(behaviour.root / live)] if live else [])

    def _inputs(self, now: float) -> tuple[ExtractionInputs, Path | None]:
        """What the extraction needs beside the snapshot: the last rules (their history), the models
        and what the gate predicted for them, the live model's training window, dead letters and
        error events; and the live model's registry folder, for DR's reward model."""
        latest = self.store.latest_insights(None)
        rules = [msgspec.convert(r, Rule) for r in latest[1]["rules"]] if latest else []
        since = now - self.config.insights.keep_days * 86400
        promoted = {e["version"]: e["at"] for e in reversed(self.store.model_events(limit=500)) if e["event"] == "promoted"}
        models: list[ModelRecord] = []
        lines = self.lines()
        for registry, agents, version in ((r, a, v) for r, a in lines for v in r.versions()):
            try:
                manifest = registry.manifest(version)
            except ReflexdError:
                continue  # a broken version folder: status names it
            gate = manifest.gate
            if version not in promoted or gate is None:
                continue
            # a line of one agent's model is judged on that agent's rewards; a group's or the shared
            # line's on every agent's (a record names one agent or none)
            only = agents[0] if agents is not None and len(agents) == 1 else None
            models.append(ModelRecord(version=version, live_from=promoted[version], agent=only, **predicted(gate)))
        # each line's live model's training window, for its own agents' drift ("": every agent's);
        # and with one line only, the live model's folder (DR's reward model), since one model
        # then scores every agent's decisions
        windows: dict[str, list[float]] = {}
        model_dir = None
        for registry, agents in lines:
            current = registry.current()
            if current is None:
                continue
            try:
                training = registry.manifest(current).training
            except ReflexdError:
                continue  # a broken version folder: status names it
            if training.window_start is not None and training.window_end is not None:
                windows.update(dict.fromkeys([""] if agents is None else agents, [training.window_start, training.window_end]))
            if len(lines) == 1:
                model_dir = registry.root / current
        dead, errors = self.store.trouble_times(since)
        return ExtractionInputs(now=now, rules=rules, models=models, training_windows=windows, dead_letters=dead, errors=errors), model_dir

    async def answer(self, msg: InsightsRequest) -> Insights:
        if msg.now:
            summary = await self.extract_once("requested")
            if summary.get("outcome") == "failed":
                raise AnalysisError(summary["error"])
        latest = await anyio.to_thread.run_sync(self.store.latest_insights, msg.agent)
        if latest is None:
            return Insights(run=None, summary=self.summary(), req=msg.req)
        run, found = latest
        if msg.since is not None:
            found["anomalies"] = [a for a in found["anomalies"] if (a.get("at") or 0) >= msg.since]
            found["trends"] = [t for t in found["trends"] if (t.get("end") or 0) >= msg.since]
        described = {"id": run.id, "at": run.at, "window_start": run.window_start, "window_end": run.window_end,
                     "experiences": run.experiences, **run.summary}
        # what is said about the findings is said of those in the reply: one agent's, when asked so
        summary = {**self.summary(), **_gist(found["rules"], found["anomalies"]), **_counts(found)}
        # runs stored before their own min_support was kept are read against the present setting
        summary["min_support"] = self.config.insights.min_support
        if msg.agent is not None:
            # an agent never seen still gets the findings about no one agent: say it is unknown
            agents = await anyio.to_thread.run_sync(self.store.agents)
            summary["agent"], summary["agent_has_decisions"] = msg.agent, msg.agent in agents
        return Insights(run=described, summary=summary, req=msg.req, **found)

    async def forgotten(self) -> None:
        """After ``forget``: the status line is counted again from the findings left."""
        latest = await anyio.to_thread.run_sync(self.store.latest_insights, None)
        self._gist = _gist(latest[1]["rules"], latest[1]["anomalies"]) if latest else {}

    def summary(self) -> dict[str, Any]:
        """For ``status``: the state, the last run, and its one-line gist."""
        s = self.status
        out: dict[str, Any] = {"state": s.state, "runs": s.runs, "failures": s.failures, "last_run": s.last_run, **self._gist}
        if s.last_error:
            out["last_error"] = s.last_error
        if s.waiting and s.state == "idle":
            out["waiting"] = s.waiting
        return out


def _gist(rules: list[dict[str, Any]], anomalies: list[dict[str, Any]]) -> dict[str, Any]:
    newest = max(anomalies, key=lambda a: a.get("at") or 0, default=None)
    return {
        "rules_published": sum(r.get("status") == "published" for r in rules),
        "anomalies": len(anomalies),
        "newest_anomaly": None if newest is None else {k: newest.get(k) for k in ("kind", "at", "agent", "summary")},
    }


def _counts(found: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    rules = found["rules"]
    return {
        "rules_candidate": sum(r.get("status") == "candidate" for r in rules),
        "rules_retired": sum(r.get("status") == "retired" for r in rules),
        "patterns": len(found["patterns"]),
        "trends": len(found["trends"]),
    }


def _fault(code: int, log_file: Path, out: Path, max_mb: int) -> AnalysisError:
    """Why the extraction exited with ``code``, in words an operator can act on."""
    text = log_file.read_text(errors="replace").strip()
    tail = (text.splitlines() or ["no output"])[-1]
    if code == EXIT_OUT_OF_MEMORY:
        return AnalysisError(f"extraction ran out of memory (insights.max_memory_mb={max_mb})")
    if code == EXIT_FAILED:
        try:
            read_insights(out)
        except AnalysisError as exc:
            return exc
    if code < 0:
        return AnalysisError(f"extraction was killed by signal {-code}; last output: {tail}")
    return AnalysisError(f"extraction exited with status {code}: {tail}")

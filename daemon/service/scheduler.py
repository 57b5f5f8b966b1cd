"""When and how a training run happens: snapshot → trainer subprocess → gate → registry.

The daemon never imports torch: training runs in ``python -m reflexd.trainer``, at the lowest
CPU priority, with a wall-time limit, on a Parquet snapshot rather than the live database.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anyio
import msgspec

from reflexd import log
from reflexd.config import Config, agent_exploration, feature_spec
from reflexd.deciding.scoring import ModelSource, Scorer
from reflexd.durable import atomic_write
from reflexd.errors import (
    DuplicateModel,
    FeatureMismatch,
    ModelIntegrityError,
    ReflexdError,
    RequestTimeout,
    TooFewExperiences,
    TrainerFault,
    TrainingError,
)
from reflexd.learning import runs
from reflexd.learning.dataset import load_holdout
from reflexd.learning.gate import LOGGED_POLICY
from reflexd.lines import SHARED, folder_name
from reflexd.manifest import MANIFEST_FILE, MODEL_FILE, GateResult, Manifest, decode_manifest
from reflexd.registry import Registry, check_model
from reflexd.service.child import prune, run_child
from reflexd.service.ingest import Ingest
from reflexd.service.store import Store
from reflexd.split import first_run_rows, holdout_rows
from reflexd.trainer.result import (
    EXIT_OUT_OF_MEMORY,
    REFIT_FILE,
    TrainResult,
    memory_exhausted,
    read_result,
    run_manifests,
)

_log = log.get("reflexd.scheduler")
HOLD_FILE = "HOLD"  # in a model line's registry folder: why its automatic runs go live no more (``Scheduler.hold``)
KEEP_RUNS = 3
KEEP_REFUSALS = 5  # gate refusals kept in status
RUNS_DIR = "runs"  # under state_dir: a folder per run, of every model line, the newest KEEP_RUNS kept
GRAPHS_DIR = "graphs"  # under state_dir, beside runs/ (whose old entries are pruned)

# what a run leaves to register: the model file, its manifest, the gate's verdict
Gated = tuple[Path, Manifest, GateResult]


def cpu_load() -> float:
    """The 1-minute load average per core."""
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def cpu_idle(threshold: float) -> bool:
    """True when the 1-minute load average per core is below ``threshold``."""
    return cpu_load() < threshold


def run_tag(line: str) -> str:
    """What a run folder's name carries of its model line: nothing for the shared line."""
    return "" if line == SHARED else "-" + folder_name(line.replace(":", "-"))


_AGENT_RUN = re.compile(r"\d{8}T\d{6}-\d+(?P<tag>-agent-.+)-\d+")


def may_hold(run: str, agent: str) -> bool:
    """Could the run folder named ``run`` hold rows of ``agent``? Not if another agent's own line
    made it (its snapshot holds that agent's rows alone); a shared or a group line's may, whatever
    the scope is now."""
    found = _AGENT_RUN.fullmatch(run)
    return found is None or found["tag"] == run_tag(f"agent:{agent}")


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
    waiting: str | None = None  # why no run has started, as of the last check
    pulled: int = 0  # models brought in from elsewhere (adopt), promoted or rejected; counted in those too
    # candidates refused since the last promotion, and the last few refusals (version, when, the
    # gate's numbers): a gate that refuses run after run says here why
    refused_in_a_row: int = 0
    refusals: list[dict[str, Any]] = field(default_factory=list)
    # of the rejected: first models that passed on their holdout and were refused on the decisions
    # made while their run trained (runs.confirm_first), the head having learned past them
    unconfirmed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "refusals": list(self.refusals)}

    def refused(self, version: str, verdict: GateResult) -> None:
        self.refused_in_a_row += 1
        self.refusals = [
            *self.refusals[-(KEEP_REFUSALS - 1) :],
            {
                "version": version,
                "at": time.time(),
                "holdout_rows": verdict.holdout_rows,
                "difference": verdict.difference,
                "lower": verdict.lower,
                "upper": verdict.upper,
                "reason": verdict.reason,
            },
        ]


class Scheduler:
    """Starts training runs when they are due, gates their candidates, registers the verdicts."""

    def __init__(
        self,
        settings: Callable[[], Config],
        store: Store,
        ingest: Ingest,
        registry: Registry,
        models: ModelSource,
        lock: anyio.Lock,
        agents: Callable[[], list[str] | None] = lambda: None,
        line: str = "shared",
    ) -> None:
        self._settings = settings  # read afresh each time: a reload takes effect at the next run
        self.store = store
        self.ingest = ingest
        self.registry = registry
        self.models = models
        # the model line this scheduler trains (reflexd.lines), and its agents (None: every agent)
        self.line = line
        self._agents = agents
        self.status = TrainerStatus()
        self._lock = lock  # one run at a time, and none while an agent is being forgotten
        self._run_seq = 0
        self._due_since: float | None = None  # when the data first made a run due, while the CPU is busy
        self._clock: Callable[[], float] = time.monotonic
        self.started = False  # by ``start_from``: until then its live model's cutoff is unknown, and no run is due
        # why automatic runs wait (a rollback by hand), until a version is promoted or a run asked for
        self.held: str | None = None
        self._due_from: float | None = None  # the cutoff the last check found a run due from

    @property
    def config(self) -> Config:
        return self._settings()

    @property
    def runs_dir(self) -> Path:
        return self.config.state_path / RUNS_DIR

    def start_from(self, manifest: Manifest | None) -> None:
        if manifest is not None:
            self.status.cutoff = manifest.training.window_end or 0.0
            self.status.trained_on = manifest.training.experience
        self.started = True

    def hold(self, why: str) -> None:
        """No automatic run goes live until ``release``: an operator who rolled a model back by hand
        keeps it back, rather than see the next run promote a model of the kind just withdrawn. Kept
        in the line's registry folder (``HOLD_FILE``), so that a restart keeps it (blocking)."""
        self.held = why
        self.registry.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.registry.root / HOLD_FILE, why.encode())

    def release(self) -> None:
        """End a ``hold`` (blocking): a version promoted or adopted, or a run asked for."""
        (self.registry.root / HOLD_FILE).unlink(missing_ok=True)
        self.held = None

    def recall_hold(self) -> None:
        """The line's ``hold`` as a restart found it (blocking)."""
        try:
            self.held = (self.registry.root / HOLD_FILE).read_text(errors="replace").strip() or "held"
        except FileNotFoundError:
            self.held = None

    def counted(self) -> tuple[float, list[str] | None]:
        """What ``Store.matured_counts`` counts for this line: its experience since its last run's
        (its cutoff), and its agents (None: every agent's)."""
        return self.status.cutoff, self._agents()

    async def _due(self) -> str | None:
        """Why a run should start now, or None (and ``status.waiting`` says why not), its new
        experience counted by itself (``schedule`` counts every line's at once)."""
        since, agents = self.counted()
        new = await anyio.to_thread.run_sync(self.store.matured_count, since, time.time(), self.config, agents)
        return self.due_given(new)

    def due_given(self, new: int) -> str | None:
        """``_due`` given the line's ``new`` matured experience since its last run."""
        cfg = self.config.trainer
        status = self.status
        now = time.time()
        if now < status.next_attempt:
            status.waiting = f"backing off after a failed run, {status.next_attempt - now:.0f} s more"
            return None
        if self.held is not None:
            status.waiting = (
                f"held: {self.held}; automatic runs wait until a version is promoted (`reflexd models promote`)"
                " or a run is asked for (`reflexd train`)"
            )
            return None
        needed = runs.due_after(cfg, status.trained_on, first_run_rows(self.config))
        if new < needed:
            status.waiting = f"{new} new matured experiences of the {needed} the next run needs"
            self._due_since = None
            return None
        since = self._clock()  # monotonic: a step of the wall clock neither skips nor stretches the wait
        if self._due_since is None:
            self._due_since = since
        load = cpu_load()
        if load >= cfg.idle_load:
            waited = since - self._due_since
            busy = f"load {load:.2f} per core, trainer.idle_load {cfg.idle_load:g}"
            if not cfg.max_idle_wait:
                status.waiting = f"waiting for idle CPU: {busy}"
                return None
            if waited < cfg.max_idle_wait:
                left = cfg.max_idle_wait - waited
                status.waiting = f"waiting for idle CPU: {busy}; starts anyway in {left:.0f} s (trainer.max_idle_wait)"
                return None
            _log.info("training on a busy host", load=round(load, 2), waited=round(waited, 1))
            reason = f"new experience; waited {waited:.0f} s for idle CPU ({busy})"
        else:
            reason = "new experience"
        self._due_since = None
        status.waiting = None
        self._due_from = status.cutoff
        return reason

    def waits_its_turn(self, reason: str) -> None:
        self.status.waiting = (
            f"due ({reason}), waiting its turn: runs take turns (every line's, extractions, the behaviour"
            " model's, and a forget)"
        )

    async def train_once(self, reason: str) -> dict[str, Any]:
        self._due_since = None  # a run asked for by hand ends any wait for idle CPU too
        if reason == "requested":
            await anyio.to_thread.run_sync(self.release)  # and a hold: the operator asks for a model again
        if self._lock.locked():
            self.waits_its_turn(reason)
        async with self._lock:
            self.status.waiting = None
            if reason != "requested" and (
                self.held is not None or (self._due_from is not None and self.status.cutoff != self._due_from)
            ):
                # held since it was found due, or a run asked for meanwhile trained on what made it
                # due: the next check decides anew
                return {}
            self.status.runs += 1
            started = time.time()
            run_dir = self._new_run_dir()
            try:
                summary = await self._train(run_dir, reason)
            except TooFewExperiences as exc:  # nothing went wrong: said, with no backoff
                self.status.last_run = {
                    "outcome": "failed", "error": str(exc), "code": exc.code, "at": started, "finished": time.time()
                }
                _log.warning("training run not started", line=self.line, error=str(exc))
                return self.status.last_run
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
        s.waiting = f"backing off after a failed run, {backoff:.0f} s more"  # as ``_due`` will say until then
        s.last_run = {"outcome": "failed", "error": str(exc), "at": started, "finished": finished, "retry_in": backoff}
        if isinstance(exc, TrainerFault):
            s.last_run.update(fault=exc.kind, returncode=exc.returncode)
        _log.error(
            "training run failed",
            line=self.line,
            error=str(exc),
            fault=getattr(exc, "kind", None),
            consecutive=s.consecutive_failures,
            retry_in=round(backoff, 1),
        )
        return s.last_run

    def _new_run_dir(self) -> Path:
        self._run_seq += 1
        # lines run one at a time but number their runs apart: the line's name keeps the folders apart
        path = self.runs_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}{run_tag(self.line)}-{self._run_seq}"
        path.mkdir(parents=True, mode=0o750)
        return path

    def _prune_runs(self) -> None:
        prune(self.runs_dir, KEEP_RUNS)

    async def _train(self, run_dir: Path, reason: str) -> dict[str, Any]:
        cfg = self.config
        self.status.state = "snapshot"
        # what was acknowledged is in the snapshot
        await self.ingest.barrier_within(cfg.socket.request_timeout, "training: the store did not take in the events", loaded=True)
        snapshot = run_dir / "snapshot.parquet"
        agents = self._agents()
        info = await anyio.to_thread.run_sync(
            lambda: self.store.snapshot(snapshot, time.time(), cfg, cfg.trainer.max_examples, agents=agents)
        )
        needed = first_run_rows(cfg)
        if info.rows < needed:
            raise TooFewExperiences(
                f"only {info.rows} joined experiences so far; need at least {needed} (a decision joins its reward once"
                f" its wait window has passed: rewards.wait_window, {cfg.rewards.wait_window:g} s, or its agent's own)"
            )
        _log.info("training started", line=self.line, reason=reason, rows=info.rows)
        self.status.state = "training"
        out = run_dir / "out"
        out.mkdir()
        live = await anyio.to_thread.run_sync(self._live_copy, run_dir)
        await self._run_trainer(run_dir, snapshot, out, cfg, live)
        result = read_result(out)
        if not result.parity_ok:
            raise TrainingError(
                f"ONNX export differs from torch by {result.parity_diff:.2e} "
                f"(tolerance {cfg.gate.parity_tolerance:.0e}); candidate rejected"
            )
        gated = await anyio.to_thread.run_sync(self._gate, out, result, cfg)
        model_file, manifest, verdict = await self._confirm(run_dir, out, result, cfg, info.window_end, gated)
        self.status.cutoff = max(self.status.cutoff, info.window_end)
        self.status.trained_on = info.rows
        return await anyio.to_thread.run_sync(self._register, model_file, manifest, verdict)

    def _live_copy(self, run_dir: Path) -> Path | None:
        """The live model as it is served, written into ``run_dir`` for the trainer to judge its
        candidate against: the copy loaded and checked, even if the registry's file changed since
        (the daemon goes on serving that copy, so a run must still be able to replace it)."""
        live = self.models.scorer
        if live is None:
            return None
        return _model_folder(run_dir / "live", live.model, live.manifest)

    def _child_started(self, pid: int | None) -> None:
        self.status.trainer_pid = pid  # the running subprocess in status, trainer or confirmation; None once it ended

    async def _run_trainer(self, run_dir: Path, snapshot: Path, out: Path, cfg: Config, live: Path | None) -> None:
        config_file = run_dir / "config.json"
        config_file.write_bytes(msgspec.json.encode(cfg))
        env = _child_env(cfg)
        cmd = [sys.executable, "-m", "reflexd.trainer", str(snapshot), str(out), "--config", str(config_file)]
        # each architecture's ONNX graph is traced once and reused by later runs (seconds each)
        cmd += ["--graph-cache", str(cfg.state_path / GRAPHS_DIR)]
        if live is not None:  # the trainer judges its candidate against it
            cmd += ["--incumbent", str(live)]

        done = await run_child(cmd, run_dir / "trainer.log", env, cfg.trainer.max_wall_time, self._child_started)
        if done.timed_out:
            raise TrainerFault(
                "timeout",
                f"trainer exceeded max_wall_time ({cfg.trainer.max_wall_time:g} s) and was killed",
                done.returncode,
            )
        if done.returncode != 0:
            raise trainer_fault(done.returncode, run_dir / "trainer.log", out, cfg.trainer.max_memory_mb)

    async def adopt(self, manifest_data: bytes, model: bytes, source: str | None = None) -> dict[str, Any]:
        """Judge a model trained elsewhere (a fleet model: ``reflexd models pull``) as this host judges
        its own runs, and register it, promoted or rejected; its summary as ``train_once`` gives one.

        ``manifest_data`` and ``model`` are what the sender read (the daemon opens no path a peer
        names; ``source`` is only recorded). First, in a worker thread and before anything is
        waited for or written: the model must match its manifest's sha256, hash features exactly as
        this host does (FeatureMismatch otherwise), load in onnxruntime with inputs of those widths,
        and not be in the registry already (DuplicateModel, naming the version). Then, under the
        training lock, waited for at most ``socket.request_timeout`` (RequestTimeout: a run or a
        forget is in progress), a fresh snapshot's holdout judges it against the live model by
        ``runs.judge_run``, the rule a run's candidate goes live by (``_judge``); it explores as
        this host's config says, whatever the fleet's did. A holdout too small for the gate to
        decide anything registers nothing (TrainingError: pull again once new experience has come in).

        The registered manifest's ``training`` rows and window are the host's judging snapshot,
        where its exploration clock starts and its scheduler counts new experience from, as for a
        run of its own on that snapshot; its other fields (epochs, loss, costs) and ``fleet`` are
        the fleet run's.
        """
        name = source or "the pulled model"
        pulled = await anyio.to_thread.run_sync(check_pulled, self.config, manifest_data, model, name)
        await anyio.to_thread.run_sync(self._refuse_duplicate, pulled, name)
        limit = self.config.socket.request_timeout
        with anyio.move_on_after(limit) as waited:
            await self._lock.acquire()
        if waited.cancelled_caught:
            raise RequestTimeout(
                "pull: a training run (or a forget) is in progress, pull again once it has ended; it was still running", limit
            )
        try:
            await anyio.to_thread.run_sync(self._refuse_duplicate, pulled, name)  # the same model, pulled meanwhile
            await anyio.to_thread.run_sync(self.release)  # an operator's pull: a hold ends, the gate decides
            run_dir = self._new_run_dir()
            try:
                return await self._adopt(run_dir, pulled, model, source)
            finally:
                self.status.state = "idle"
                self._prune_runs()
        finally:
            self._lock.release()

    def _refuse_duplicate(self, pulled: Manifest, name: str) -> None:
        """DuplicateModel if a version in the registry is the pulled model's file (its sha256)."""
        for version in self.registry.versions():
            try:
                found = self.registry.manifest(version)
            except ReflexdError:
                continue
            if found.sha256 != pulled.sha256:
                continue
            same = f"{name} is already registered as {version} (sha256 {pulled.sha256[:12]}…), and a model is registered once"
            if self.registry.current() == version:
                raise DuplicateModel(version, f"{same}: {version} is the live version, so nothing was done")
            verdict = found.gate
            judged = f"; this host's gate {'passed' if verdict.passed else 'rejected'} it: {verdict.reason}" if verdict else ""
            raise DuplicateModel(
                version, f"{same}{judged}. Nothing was done; `reflexd models promote {version}` serves it without a new verdict"
            )

    async def _adopt(self, run_dir: Path, pulled: Manifest, model: bytes, source: str | None) -> dict[str, Any]:
        cfg = self.config
        started = time.time()
        name = source or "the pulled model"
        model_file = run_dir / MODEL_FILE
        await anyio.to_thread.run_sync(model_file.write_bytes, model)
        self.status.state = "snapshot"
        await self.ingest.barrier_within(cfg.socket.request_timeout, "pull: the store did not take in the events", loaded=True)
        snapshot = run_dir / "snapshot.parquet"
        agents = self._agents()
        info = await anyio.to_thread.run_sync(
            lambda: self.store.snapshot(snapshot, time.time(), cfg, cfg.trainer.max_examples, agents=agents)
        )
        if info.rows == 0:
            raise TrainingError(f"no joined experiences yet to judge {name} on: this host's gate needs a holdout")
        held = holdout_rows(info.rows, cfg.trainer.holdout_fraction)
        incumbent = self.models.scorer
        manifest = msgspec.structs.replace(
            pulled,
            version="candidate",
            parent=incumbent.version if incumbent is not None else None,
            created=started,
            exploration=cfg.exploration,
            agent_exploration=agent_exploration(cfg),
            gate=None,
            # the host's judging snapshot, as a run of its own on it would say: the exploration clock
            # starts at its rows, and the scheduler counts new experience from its window (start_from);
            # the fleet's rows and windows stay in `fleet`
            training=msgspec.structs.replace(
                pulled.training,
                train_rows=info.rows - held,
                holdout_rows=held,
                dropped_rows=0,
                window_start=info.window_start,
                window_end=info.window_end,
                refit=False,  # fit on none of this snapshot's rows, let alone all of them
                cross_fitted=False,
                candidate_sha256=None,
            ),
        )
        self.status.state = "gating"
        verdict = await anyio.to_thread.run_sync(lambda: self._judge(snapshot, Scorer(manifest, model)))
        needed = max(cfg.gate.min_holdout if incumbent is not None else cfg.gate.first_min_holdout, 2)
        if not verdict.passed and verdict.holdout_rows < needed:
            raise TrainingError(
                f"{name} cannot be judged yet: {verdict.reason}; nothing was registered: pull again once new "
                "experience has come in"
            )
        origin = {"pulled_from": source, "pulled_version": pulled.version, "pulled_sha256": pulled.sha256}
        summary = await anyio.to_thread.run_sync(self._register, model_file, manifest, verdict, origin)
        self.status.pulled += 1
        if verdict.passed:  # as after a restart (start_from the live manifest): counted from the judging snapshot
            self.status.cutoff = max(self.status.cutoff, info.window_end)
            self.status.trained_on = info.rows
        _log.info("pulled model judged", source=source, version=summary["version"], outcome=summary["outcome"])
        return {**summary, "pulled_from": source, "holdout_rows": verdict.holdout_rows, "seconds": round(time.time() - started, 3)}

    def _gate(self, out: Path, result: TrainResult, cfg: Config) -> Gated:
        """(the model file to register, its manifest, the gate's verdict) for the trainer's ``result``.

        The trainer judged its candidate (``reflexd.trainer.judge``) against the model live when
        the run started: fit without the holdout, on it, and when it passed and was also refit on
        every row (``trainer.refit_below``), the refit goes live unless it went wrong; a
        cross-fitted run's model, fit on every row, if its out-of-fold predictions passed. A
        verdict against a model that is no longer live (a rollback or a promotion during the run)
        is not one on the live model: the candidate judged is refused and the next run judges
        afresh (and a first model that passed is judged again: ``_confirm``). ``cfg`` is the
        config the run was started with, which the gate judged by.
        """
        live_version = self.registry.current()  # what agents serve, even before this daemon reloads it
        manifest, refit = run_manifests(cfg, result, out, live_version)
        verdict = result.gate
        if verdict is None:
            raise TrainingError(f"the trainer's result in {out} holds no gate verdict")
        if result.judged_against != live_version:
            return out / MODEL_FILE, manifest, _changed(verdict, result.judged_against, live_version)
        if result.deploy == REFIT_FILE and refit is not None:
            return out / REFIT_FILE, refit, verdict
        return out / MODEL_FILE, manifest, verdict

    async def _confirm(
        self, run_dir: Path, out: Path, result: TrainResult, cfg: Config, snapshot_end: float, gated: Gated
    ) -> Gated:
        """``gated`` (what ``_gate`` made of the run) with a first model that passed judged again on
        the line's decisions received after ``snapshot_end`` (``runs.confirm_first``), by a
        ``reflexd.trainer.confirm`` subprocess: refused, what is registered is the candidate judged,
        not its refit. The verdict stands as it is if they cannot be read or judged: the
        confirmation is a second look (and a store that fails it fails the next run's snapshot too).
        """
        model_file, live, verdict = gated
        if not (verdict.passed and verdict.baseline == LOGGED_POLICY):
            return gated
        self.status.state = "confirming"
        fresh = run_dir / "fresh.parquet"
        try:
            wanted = runs.confirm_needs(verdict)
            written = await anyio.to_thread.run_sync(
                self._confirmation_inputs, run_dir, fresh, gated, cfg, snapshot_end, wanted
            )
            if not written:
                return gated  # too few to tell: no subprocess for nothing
            cmd = [
                sys.executable, "-m", "reflexd.trainer.confirm", str(fresh), str(run_dir / "deployed"),
                str(run_dir / "verdict.json"), str(run_dir / "confirmed.json"),
                "--config", str(run_dir / "config.json"),
            ]
            wall = cfg.trainer.max_wall_time
            done = await run_child(cmd, run_dir / "confirm.log", _child_env(cfg), wall, self._child_started)
            if done.returncode != 0:
                log_file = run_dir / "confirm.log"
                said = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                how = f"exited {done.returncode}"
                if done.timed_out:
                    how = f"timed out after trainer.max_wall_time ({wall:g} s)"
                raise TrainingError(f"the confirmation {how}: {said[0]}")
            confirmed = msgspec.json.decode((run_dir / "confirmed.json").read_bytes(), type=GateResult)
        except (ReflexdError, OSError, msgspec.MsgspecError) as exc:
            what = "cannot confirm a first model on the decisions made during its run"
            _log.warning(what, line=self.line, error=str(exc))
            return gated
        finally:
            fresh.unlink(missing_ok=True)
        live_version = self.registry.current()
        if live_version != result.judged_against:  # promoted or rolled back by hand meanwhile
            confirmed = _changed(verdict, result.judged_against, live_version)
        if confirmed.passed:
            return model_file, live, confirmed
        candidate = await anyio.to_thread.run_sync(run_manifests, cfg, result, out, result.judged_against)
        return out / MODEL_FILE, candidate[0], confirmed

    def _confirmation_inputs(
        self, run_dir: Path, fresh: Path, gated: Gated, cfg: Config, snapshot_end: float, least: int
    ) -> bool:
        """Write what ``reflexd.trainer.confirm`` reads into ``run_dir``: the decisions received
        after ``snapshot_end`` (``fresh``), the model about to go live and its manifest, the
        verdict; False (nothing but ``fresh`` written) if there are fewer than ``least``."""
        model_file, live, verdict = gated
        agents = self._agents()
        info = self.store.snapshot(fresh, time.time(), cfg, runs.CONFIRM_ROWS, agents=agents, after=snapshot_end)
        if info.rows < least:
            return False
        _model_folder(run_dir / "deployed", model_file.read_bytes(), live)
        (run_dir / "verdict.json").write_bytes(msgspec.json.encode(verdict))
        return True

    def _judge(self, snapshot: Path, candidate: Scorer) -> GateResult:
        """A model pulled in from elsewhere (``adopt``) judged on ``snapshot``'s holdout against the
        live model by ``runs.judge_run``, the rule a run's candidate goes live by."""
        cfg = self.config
        incumbent = self.models.scorer
        features = candidate.manifest.features
        holdout = load_holdout(snapshot, features, cfg.trainer.holdout_fraction)
        incumbent_holdout = None
        if incumbent is not None and incumbent.manifest.features != features:
            incumbent_holdout = load_holdout(snapshot, incumbent.manifest.features, cfg.trainer.holdout_fraction)
        return runs.judge_run(
            candidate,
            incumbent,
            holdout,
            candidate.manifest.exploration_for,  # each agent's rows as its clients will explore them
            cfg.gate,
            None,
            incumbent_holdout,
            incumbent.manifest.exploration_for if incumbent is not None else None,
            lambda agent: cfg.for_agent(agent).rewards,
            cfg.online,
        ).verdict

    def _register(
        self, model_file: Path, manifest: Manifest, verdict: Any, origin: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        registry = self.registry
        fields = msgspec.structs.asdict(manifest)
        fields["gate"] = verdict
        added = registry.add(model_file, fields)
        store = self.store
        # origin: where a model brought in from elsewhere came from (adopt)
        detail = {**msgspec.to_builtins(verdict), **(origin or {})}
        store.record_model_event(added.version, "registered", detail, time.time())
        if verdict.passed and self.held is not None:  # rolled back by hand while this run trained
            self.status.rejected += 1
            _log.info("candidate passed, not promoted: the line is held", line=self.line, version=added.version,
                      held=self.held)
            return {
                "outcome": "held", "version": added.version, "gate": f"{verdict.reason}; not promoted: {self.held}",
                "train_rows": added.training.train_rows, "at": added.created,
            }
        if verdict.passed:
            registry.promote(added.version)
            store.record_model_event(added.version, "promoted", {"reason": verdict.reason}, time.time())
            self.status.promoted += 1
            self.status.refused_in_a_row = 0
            _log.info("model promoted", line=self.line, version=added.version, gate=verdict.reason)
            self.models.refresh()
        else:
            self.status.rejected += 1
            self.status.unconfirmed += "confirmed_rows" in verdict.estimates
            self.status.refused(added.version, verdict)
            _log.info("candidate rejected by the gate", line=self.line, version=added.version, gate=verdict.reason)
        return {
            "outcome": "promoted" if verdict.passed else "rejected",
            "version": added.version,
            "gate": verdict.reason,
            "train_rows": added.training.train_rows,
            "at": added.created,
        }


async def schedule(schedulers: Callable[[], list[Scheduler]], store: Store, settings: Callable[[], Config]) -> None:
    """Every line's training runs: each ``trainer.check_interval`` one query counts every line's new
    matured experience (``Store.matured_counts``), and each line a run is due for trains in turn.
    One check for all lines, not a loop and a query per line: a host with thousands of agents'
    lines would otherwise spend a core on counting, its store busy for every other request."""
    failed: str | None = None
    while True:
        await anyio.sleep(settings().trainer.check_interval)
        lines = [s for s in schedulers() if s.started]
        if not lines:
            continue
        try:
            counts = await anyio.to_thread.run_sync(store.matured_counts, [s.counted() for s in lines], time.time(), settings())
        except Exception as exc:  # a failing store costs a check, never the daemon
            if str(exc) != failed:
                _log.error("cannot tell whether a training run is due", error=str(exc))
            failed = str(exc)
            continue
        failed = None
        due = []
        for line, n in zip(lines, counts):
            try:
                reason = line.due_given(n)
            except Exception:  # a bug costs this line its check, never every line's loop (and the daemon)
                _log.exception("cannot tell whether a training run is due", line=line.line)
                continue
            if reason is not None:
                due.append((line, reason))
        for line, reason in due[1:]:
            line.waits_its_turn(reason)
        for line, reason in due:
            try:
                await line.train_once(reason)
            except Exception:  # e.g. its runs folder cannot be made: the next check tries again
                _log.exception("the training run could not start", line=line.line)


def _model_folder(folder: Path, model: bytes, manifest: Manifest) -> Path:
    """``folder``, made, holding ``model`` and its ``manifest`` for a subprocess to load: under the
    one name the daemon chooses, never a name read from a manifest."""
    folder.mkdir()
    (folder / MODEL_FILE).write_bytes(model)
    (folder / MANIFEST_FILE).write_bytes(msgspec.json.encode(msgspec.structs.replace(manifest, file=MODEL_FILE)))
    return folder


def _child_env(cfg: Config) -> dict[str, str]:
    """The environment of a trainer or confirmation subprocess: the daemon's, its math libraries
    held to ``trainer.max_threads``."""
    threads = str(cfg.trainer.max_threads)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _changed(verdict: GateResult, judged_against: str | None, live: str | None) -> GateResult:
    """``verdict`` refused: it was reached against ``judged_against``, and ``live`` is live now."""
    before, now = judged_against or "no model", live or "no model"
    reason = f"the live model changed during the run ({before} -> {now}): not judged against it; rejected"
    return msgspec.structs.replace(verdict, passed=False, reason=reason, refit_rows=0)


def check_pulled(cfg: Config, manifest_data: bytes, model: bytes, name: str) -> Manifest:
    """The pulled model's manifest, once the model matches it and fits this host (see ``Scheduler.adopt``)."""
    try:
        pulled = decode_manifest(manifest_data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelIntegrityError(name, f"unreadable manifest: {exc}") from None
    check_model(pulled, model, name)
    host = feature_spec(cfg)
    if pulled.features != host:
        theirs, ours = msgspec.to_builtins(pulled.features), msgspec.to_builtins(host)
        differ = ", ".join(f"{k} {theirs[k]!r} (this host: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k])
        raise FeatureMismatch(
            f"{name} hashes features differently from this host: {differ}; train it with this host's "
            "features section (reflexd fleet train --config), or change the host's"
        )
    candidate = Scorer(msgspec.structs.replace(pulled, version=name), model)  # ModelIntegrityError if onnxruntime cannot load it
    widths = {i.name: i.shape for i in candidate.session.get_inputs()}
    expected = {"context": host.context_dim, "actions": host.action_dim}
    if any(not isinstance(widths.get(k, [None])[-1], int) or widths[k][-1] != w for k, w in expected.items()):
        raise FeatureMismatch(
            f"{name}'s ONNX inputs {widths} are not context [batch, {host.context_dim}] and actions "
            f"[batch, n, {host.action_dim}], the widths its manifest and this host hash to"
        )
    return pulled


def trainer_fault(code: int, log_file: Path, out: Path, max_mb: int) -> TrainerFault:
    """Why the trainer exited with ``code``, in words an operator can act on."""
    log_text = log_file.read_text(errors="replace").strip()
    tail = (log_text.splitlines() or ["no output"])[-1]
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

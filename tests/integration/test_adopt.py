"""A pulled model (``adopt``) in the scheduler: checks before anything is written or waited for,
off the event loop; a bounded wait for the training lock; one registration per model; and the
registered manifest's training rows and window are the host's judging snapshot.

Real parts: a DuckDB store holding matured experiences, the registry, onnxruntime loading a
hand-made linear ONNX model (``tests/linear_models.py``), the gate. The ingest is a stand-in
(its barrier has nothing to wait for: the store is written directly).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from linear_models import linear_model
from reflexd.config import Config, parse_config
from reflexd.deciding.scoring import ModelSource
from reflexd.errors import DuplicateModel, FeatureMismatch, RequestTimeout, TrainingError
from reflexd.features import FeatureSpec
from reflexd.manifest import FORMAT, FleetHost, FleetOrigin, GateResult, Manifest, Training
from reflexd.registry import Registry
from reflexd.service import scheduler as scheduler_module
from reflexd.service.scheduler import Scheduler
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, Outcome

SPEC = FeatureSpec(context_dim=16, action_dim=8)
FLEET_END = 1_600_000_000.0  # the fleet's archives: long before this host's experience


class _Ingest:
    async def barrier_within(self, *args: Any, **kwargs: Any) -> None:
        return None


def _config(tmp_path: Path, **socket: Any) -> Config:
    return parse_config(
        msgspec.json.encode(
            {
                "state_dir": str(tmp_path / "state"),
                "features": {"context_dim": SPEC.context_dim, "action_dim": SPEC.action_dim},
                "rewards": {"wait_window": 0.0},
                "exploration": {"epsilon": 0.05, "epsilon_min": 0.05},
                "socket": socket,
            }
        )
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """200 matured experiences of an agent choosing uniformly between l and r; r always pays."""
    s = Store(tmp_path / "state" / "reflexd.duckdb")
    at = time.time() - 3600
    events: list[Decision | Outcome] = []
    for i in range(200):
        chosen = "lr"[i % 2]
        events.append(Decision(id=f"d{i}", agent="a", context={"x": i % 3}, actions=["l", "r"], chosen=chosen, prob=0.5, ts=at))
        events.append(Outcome(decision_id=f"d{i}", reward=1.0 if chosen == "r" else 0.0, ts=at))
    s.write(events, at)
    yield s
    s.close()


def _scheduler(config: Config, store: Store, lock: anyio.Lock | None = None) -> Scheduler:
    registry = Registry(config.state_path / "models")
    registry.ensure()
    return Scheduler(lambda: config, store, _Ingest(), registry, ModelSource(registry), lock or anyio.Lock())  # type: ignore[arg-type]


def _pulled(spec: FeatureSpec = SPEC, scores: dict[str, float] | None = None) -> tuple[bytes, bytes]:
    """A fleet model's manifest (as ``reflexd fleet train`` writes it) and model file."""
    model = linear_model(spec, scores or {"l": 0.0, "r": 1.0})
    verdict = GateResult(
        passed=True, reason="pooled", estimator="dr", baseline="logged policy", candidate_value=1.0, baseline_value=0.5,
        difference=0.5, lower=0.4, upper=0.6, confidence=0.8, margin=0.0, holdout_rows=600,
    )
    training = Training(train_rows=2400, holdout_rows=600, window_start=FLEET_END - 86400, window_end=FLEET_END, epochs=7)
    host = FleetHost(path="/srv/h1/archive", rows=3000, train_rows=2400, holdout_rows=600, window_start=FLEET_END - 86400, window_end=FLEET_END)
    manifest = Manifest(
        version="fleet-20261206T000000Z", parent=None, created=1.0, learner="mlp", features=spec,
        exploration=parse_config("exploration: {epsilon: 0.5}").exploration, training=training, gate=verdict,
        sha256=hashlib.sha256(model).hexdigest(), format=FORMAT,
        fleet=FleetOrigin(hosts=[host], rows=3000, train_rows=2400, holdout_rows=600, workers=2, gate=verdict, ray_version="2"),
    )
    return msgspec.json.encode(manifest), model


def _runs(config: Config) -> list[str]:
    runs = config.state_path / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def test_a_pull_is_registered_with_the_hosts_snapshot_as_its_training_and_the_fleets_in_fleet(tmp_path: Path, store: Store) -> None:
    config = _config(tmp_path)
    sched = _scheduler(config, store)
    manifest, model = _pulled()
    summary = anyio.run(sched.adopt, manifest, model, "/srv/fleet/m1")
    assert summary["outcome"] == "promoted", summary
    registered = sched.registry.manifest(summary["version"])
    snapshot = next((config.state_path / "runs").glob("*/snapshot.parquet"))
    import pyarrow.parquet as pq

    received = pq.read_table(snapshot).column("received_at").to_pylist()
    # the host's judging snapshot: 200 rows, 40 of them held out, and its window
    training = registered.training
    assert (training.train_rows, training.holdout_rows, training.experience) == (160, 40, 200)
    assert (training.window_start, training.window_end) == (min(received), max(received))
    assert training.epochs == 7 and not training.refit  # the fleet run's own numbers stay
    assert registered.fit_rows == 2400  # what it was fit on: the fleet's rows
    assert registered.fleet is not None and (registered.fleet.rows, registered.fleet.hosts[0].window_end) == (3000, FLEET_END)
    assert registered.exploration == config.exploration  # explores as the host says
    assert registered.gate is not None and registered.gate.holdout_rows == 40
    # the scheduler counts from the judging snapshot, now and after a restart
    assert (sched.status.cutoff, sched.status.trained_on) == (max(received), 200)
    again = _scheduler(config, store)
    again.start_from(registered)
    assert (again.status.cutoff, again.status.trained_on) == (max(received), 200)
    # and the exploration clock starts there
    sched.models.refresh()
    assert sched.models.scorer is not None and sched.models.scorer.manifest.training.experience == 200


def test_the_same_model_is_registered_once(tmp_path: Path, store: Store) -> None:
    sched = _scheduler(_config(tmp_path), store)
    manifest, model = _pulled()
    first = anyio.run(sched.adopt, manifest, model, "/srv/fleet/m1")
    runs = _runs(sched.config)
    with pytest.raises(DuplicateModel, match=rf"/srv/fleet/m1 is already registered as {first['version']} .*the live version"):
        anyio.run(sched.adopt, manifest, model, "/srv/fleet/m1")
    assert sched.registry.versions() == [first["version"]] and _runs(sched.config) == runs  # no run folder either
    # one the gate rejected: named with its verdict, and how to serve it anyway
    bad_manifest, bad_model = _pulled(scores={"l": 1.0, "r": 0.0})
    rejected = anyio.run(sched.adopt, bad_manifest, bad_model, "/srv/fleet/m2")
    assert rejected["outcome"] == "rejected"
    with pytest.raises(DuplicateModel, match=rf"gate rejected it: .*reflexd models promote {rejected['version']}"):
        anyio.run(sched.adopt, bad_manifest, bad_model, None)
    assert len(sched.registry.versions()) == 2


def test_a_pull_refused_at_its_checks_makes_no_run_folder_and_prunes_nothing(tmp_path: Path, store: Store) -> None:
    config = _config(tmp_path)
    sched = _scheduler(config, store)
    for i in range(scheduler_module.KEEP_RUNS):
        (config.state_path / "runs" / f"old-{i}").mkdir(parents=True)
    before = _runs(config)
    manifest, model = _pulled(spec=FeatureSpec(context_dim=32, action_dim=8))
    with pytest.raises(FeatureMismatch, match="context_dim 32 .this host: 16."):
        anyio.run(sched.adopt, manifest, model, "/srv/fleet/wide")
    manifest, model = _pulled()
    with pytest.raises(Exception, match="does not match manifest"):
        anyio.run(sched.adopt, manifest, model[:-1] + b"\0", "/srv/fleet/tampered")
    assert _runs(config) == before


def test_the_checks_and_the_write_run_off_the_event_loop(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    sched = _scheduler(_config(tmp_path), store)
    on_loop: dict[str, bool] = {}

    def spy(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            on_loop[name] = on_loop.get(name, False) or threading.current_thread() is threading.main_thread()
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(scheduler_module, "decode_manifest", spy("decode_manifest", scheduler_module.decode_manifest))
    monkeypatch.setattr(scheduler_module, "check_model", spy("check_model", scheduler_module.check_model))
    monkeypatch.setattr(scheduler_module, "Scorer", spy("Scorer", scheduler_module.Scorer))
    monkeypatch.setattr(Path, "write_bytes", spy("write_bytes", Path.write_bytes))
    manifest, model = _pulled()
    assert anyio.run(sched.adopt, manifest, model, None)["outcome"] == "promoted"
    assert on_loop == {"decode_manifest": False, "check_model": False, "Scorer": False, "write_bytes": False}


def test_a_pull_waits_for_a_training_run_at_most_request_timeout(tmp_path: Path, store: Store) -> None:
    config = _config(tmp_path, request_timeout=0.3)
    lock = anyio.Lock()
    sched = _scheduler(config, store, lock)
    manifest, model = _pulled()

    async def pull_during_a_run() -> float:
        held, done = anyio.Event(), anyio.Event()

        async def run() -> None:  # a training run holds the lock
            async with lock:
                held.set()
                await done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await held.wait()
            started = time.monotonic()
            with pytest.raises(RequestTimeout, match="a training run .or a forget. is in progress, pull again") as refused:
                await sched.adopt(manifest, model, None)
            waited = time.monotonic() - started
            done.set()
        assert "after 0.3 s (socket.request_timeout)" in str(refused.value)
        return waited

    assert anyio.run(pull_during_a_run) < 5
    assert sched.registry.versions() == [] and _runs(config) == []
    assert not lock.locked()
    assert anyio.run(sched.adopt, manifest, model, None)["outcome"] == "promoted"  # once the run is over


def test_a_holdout_too_small_to_decide_registers_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    s = Store(tmp_path / "state" / "reflexd.duckdb")
    try:
        at = time.time() - 3600
        s.write([Decision(id=f"d{i}", agent="a", context={}, actions=["l", "r"], chosen="r", prob=0.5, ts=at) for i in range(5)], at)
        sched = _scheduler(config, s)
        manifest, model = _pulled()
        with pytest.raises(TrainingError, match="cannot be judged yet: holdout has 1 rows.*nothing was registered: pull again"):
            anyio.run(sched.adopt, manifest, model, None)
        assert sched.registry.versions() == [] and sched.status.pulled == 0
    finally:
        s.close()

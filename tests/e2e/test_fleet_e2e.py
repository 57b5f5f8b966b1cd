"""``reflexd fleet train`` on a local Ray cluster with 2 workers, and ``reflexd models pull`` into live daemons.

Real parts throughout: three hosts' archives written by the store's own archive code, the command
line as a subprocess starting a local Ray cluster (2 CPUs, 2 Ray Train workers, torch DDP-style
training over gloo), onnxruntime loading the model, and daemons started as subprocesses judging
the pulled model with their own gate. The gate's verdicts are recomputed here from the files the
runs left, by the same rule, and must match.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import yaml

from conftest import DaemonProcess, line_registry, wait_for
from reflexd.config import load_config
from reflexd.features import Hasher
from reflexd.learning import runs
from reflexd.learning.dataset import from_table, load_holdout
from reflexd.registry import Registry, read_model_dir
from reflexd.wire.protocol import Train

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KINDS = ("code", "chat", "math")
ACTIONS = ["small", "large", "tools"]
BEST = {"code": "large", "chat": "small", "math": "tools"}
HOST_ROWS = 1000


def reward(rng: random.Random, kind: str, action: str) -> float:
    return 1.0 if rng.random() < (0.8 if BEST[kind] == action else 0.2) else 0.0


def write_host(root: Path, host: int, rows: int) -> Path:
    """A host's archive: its decisions (uniform logging policy) and outcomes stored and archived
    by the store's own code, as a host's retention leaves them."""
    from reflexd.service.store import Store  # the daemon's store, in this test process only

    rng = random.Random(host)
    store = Store(root / "reflexd.duckdb")
    start = 1_700_000_000.0 + 3600 * host
    for first in range(0, rows, 250):
        events: list[Any] = []
        for i in range(first, min(rows, first + 250)):
            from reflexd.wire.protocol import Decision, Outcome

            kind, action = rng.choice(KINDS), rng.choice(ACTIONS)
            events.append(
                Decision(id=f"h{host}-{i}", agent="router", context={"task": kind, "size": rng.random()},
                         actions=ACTIONS, chosen=action, prob=1 / 3, ts=start + i)
            )
            events.append(Outcome(decision_id=f"h{host}-{i}", reward=reward(rng, kind, action), ts=start + i + 1))
        store.write(events, received_at=start + first + 250)
    moved = store.archive(older_than=time.time(), root=root / "archive", compression="zstd")
    store.close()
    assert moved["decisions"] == rows
    return root / "archive"


def reflexd(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflexd", *args], check=False, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fleet run, shared by the tests: 3 hosts' archives → a model in OUT."""
    if importlib.util.find_spec("ray") is None:  # looked up, not imported: Ray stays out of this process
        pytest.skip("the fleet extra (Ray) is not installed; make test installs it")
    base = tmp_path_factory.mktemp("fleet")
    archives = [str(write_host(base / f"host{h}", h, HOST_ROWS)) for h in range(3)]
    config = base / "fleet.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(base / "unused")}))
    out = base / "model"
    # Ray keeps its session (sockets included, at most 107 bytes of path) under RAY_TMPDIR
    ray_tmp = tempfile.mkdtemp(prefix="ray-")
    try:
        started = time.perf_counter()
        done = reflexd(
            "fleet", "train", *archives, "--out", str(out), "--workers", "2", "--config", str(config), "--json",
            env={**os.environ, "RAY_TMPDIR": ray_tmp},
        )
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-6000:]
    print(f"fleet train: {seconds:.1f} s for {3 * HOST_ROWS} rows from 3 hosts on 2 Ray workers")
    return {"out": out, "archives": archives, "summary": json.loads(done.stdout), "config": config, "stderr": done.stderr}


def test_fleet_train_writes_a_model_onnxruntime_loads_whose_manifest_verifies(fleet: dict[str, Any]) -> None:
    import onnxruntime as ort

    out, summary = fleet["out"], fleet["summary"]
    manifest, _, model = read_model_dir(out)  # the sha256 and the feature scheme checked
    assert summary["sha256"] == manifest.sha256 and summary["workers"] == 2
    origin = manifest.fleet
    assert origin is not None and origin.workers == 2 and origin.rows == 3 * HOST_ROWS
    assert [h.path for h in origin.hosts] == fleet["archives"]
    assert all((h.rows, h.train_rows + h.holdout_rows) == (HOST_ROWS, HOST_ROWS) for h in origin.hosts)
    assert origin.holdout_rows == manifest.training.holdout_rows == sum(h.holdout_rows for h in origin.hosts) == 600
    assert manifest.training.train_rows == 2400 and not manifest.training.refit and manifest.training.parity_ok
    assert origin.gate == manifest.gate and summary["passed"] == manifest.gate.passed
    assert "reading archives" not in fleet["stderr"]  # --json off a terminal: no progress bars

    # onnxruntime loads it, and it learned which action each kind of task wants
    session = ort.InferenceSession(str(out / "policy.onnx"), providers=["CPUExecutionProvider"])
    hasher = Hasher(manifest.features)
    for kind in KINDS:
        context = np.zeros((1, manifest.features.context_dim), dtype=np.float32)
        hasher.context({"task": kind, "size": 0.5}, out=context[0])
        actions = hasher.actions(ACTIONS)[None].astype(np.float32)
        scores, _ = session.run(None, {"context": context, "actions": actions})
        assert ACTIONS[int(np.argmax(scores[0]))] == BEST[kind], (kind, scores)

    # the pooled verdict, recomputed from the archives by the same rule, is the manifest's
    from reflexd.deciding.scoring import Scorer
    from reflexd.fleet.archive import read_host
    from reflexd.fleet.train import split_host

    config = load_config(fleet["config"])
    held = [split_host(read_host(a, config).table, config.trainer.holdout_fraction)[1] for a in fleet["archives"]]
    import pyarrow as pa

    holdout = from_table(pa.concat_tables(held), manifest.features)
    candidate = Scorer(msgspec.structs.replace(manifest, gate=None, fleet=None), model)
    assert runs.judge_run(candidate, None, holdout, config.exploration, config.gate).verdict == manifest.gate


def _send(d: DaemonProcess, n: int, seed: int) -> None:
    """``n`` decisions logged by an agent choosing uniformly at random (its own policy, logged over
    the socket as any agent's), each with its outcome."""
    from reflexd.wire.connection import Connection
    from reflexd.wire.protocol import Decision, Flush, Outcome

    rng = random.Random(seed)
    before = d.status().experience["new_since_training"]
    events: list[Any] = []
    for i in range(n):
        kind, action = rng.choice(KINDS), rng.choice(ACTIONS)
        decision = f"s{seed}-{i}"
        events.append(
            Decision(id=decision, agent="router", context={"task": kind, "size": rng.random()}, actions=ACTIONS,
                     chosen=action, prob=1 / 3)
        )
        events.append(Outcome(decision_id=decision, reward=reward(rng, kind, action)))
    with Connection(d.socket, timeout=60) as conn:
        conn.send(events)
        conn.request(Flush(loaded=True))
    wait_for(lambda: d.status().experience["new_since_training"] >= before + n, 60, f"{n} matured experiences")


def _pull(d: DaemonProcess, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return reflexd("models", "pull", str(out), "--socket", d.socket, *extra)


def test_a_live_daemon_pulls_the_fleet_model_and_its_own_gate_decides(fleet: dict[str, Any], daemon_factory) -> None:
    d: DaemonProcess = daemon_factory()
    _send(d, 200, seed=11)
    trained = d.request(Train(), timeout=300)  # the host's own model: the pulled one must beat it
    assert trained.message.startswith(("promoted", "rejected")), trained.message
    _send(d, 150, seed=12)  # experience newer than what the host's model was refit on
    registry = line_registry(d, "router")
    before = registry.current()

    done = _pull(d, fleet["out"], "--json")
    assert done.returncode == 0, done.stderr + d.log_tail()
    pulled = json.loads(done.stdout)
    assert pulled["outcome"] in ("promoted", "rejected") and pulled["source"] == str(fleet["out"])
    version = pulled["version"]
    manifest, model = registry.load(version)
    fleet_manifest, _, fleet_model = read_model_dir(fleet["out"])
    assert model == fleet_model and manifest.fleet == fleet_manifest.fleet  # registered as it came
    config = load_config(d.config_path)
    assert manifest.exploration == config.exploration and manifest.parent == before  # it explores as the host says
    assert registry.current() == (version if pulled["outcome"] == "promoted" else before)
    assert d.status().trainer["pulled"] == 1

    # the host's verdict, recomputed from the snapshot the pull was judged on, by the rule its runs go live by
    from reflexd.deciding.scoring import Scorer

    snapshot = max((d.state_dir / "runs").glob("*/snapshot.parquet"), key=lambda p: p.stat().st_mtime)
    incumbent = Scorer(*registry.load(before)) if before else None
    holdout = load_holdout(snapshot, manifest.features, config.trainer.holdout_fraction)
    judged = runs.judge_run(
        Scorer(manifest, model), incumbent, holdout, config.exploration, config.gate,
        None, None, incumbent.manifest.exploration if incumbent else None,
    )
    assert judged.verdict == manifest.gate
    assert pulled["outcome"] == ("promoted" if judged.verdict.passed else "rejected")
    assert pulled["gate"] == judged.verdict.reason
    # its training rows and window are the judging snapshot's (the host's clock starts there); the fleet's stay in fleet
    import pyarrow.parquet as pq

    judged_on = pq.read_table(snapshot, columns=["received_at"]).column("received_at").to_pylist()
    assert manifest.training.experience == len(judged_on) and manifest.training.window_end == max(judged_on)
    assert manifest.fit_rows == fleet_manifest.training.train_rows == manifest.fleet.train_rows

    # the same model again: refused, naming the version, and nothing registered
    versions = registry.versions()
    again = _pull(d, fleet["out"])
    assert again.returncode == 1 and f"is already registered as {version}" in again.stderr, again.stderr
    assert registry.versions() == versions
    print(f"host model: {trained.message}; before={before}; host gate on the pulled fleet model: {pulled['outcome']}: {pulled['gate']}")

    # the model events, read from the store once the daemon has stopped
    from reflexd.service.store import Store

    d.stop()
    with Store(d.state_dir / "reflexd.duckdb", read_only=True) as store:
        events = [e for e in store.model_events() if e["version"] == version]
    kinds = sorted(e["event"] for e in events)
    assert kinds == (["promoted", "registered"] if judged.verdict.passed else ["registered"])
    (registered,) = [e for e in events if e["event"] == "registered"]
    assert registered["detail"]["pulled_from"] == str(fleet["out"])
    assert registered["detail"]["pulled_sha256"] == fleet_manifest.sha256
    assert registered["detail"]["passed"] == judged.verdict.passed


def test_a_host_whose_features_differ_refuses_the_fleet_model_clearly(fleet: dict[str, Any], daemon_factory) -> None:
    d: DaemonProcess = daemon_factory({"features": {"context_dim": 64}})
    done = _pull(d, fleet["out"])
    assert done.returncode == 1
    assert "hashes features differently from this host: context_dim 128 (this host: 64)" in done.stderr, done.stderr
    assert Registry(d.state_dir / "models").versions() == []


def test_a_model_over_the_daemons_frame_limit_is_refused_with_what_to_raise(fleet: dict[str, Any], daemon_factory) -> None:
    d: DaemonProcess = daemon_factory({"socket": {"max_frame_bytes": 20_000}})
    size = (fleet["out"] / "policy.onnx").stat().st_size
    assert size > 20_000
    # told here, before sending, when the daemon's config is named
    named = _pull(d, fleet["out"], "--config", str(d.config_path))
    assert named.returncode == 1
    assert "over the daemon's socket.max_frame_bytes (20000" in named.stderr, named.stderr
    # and by the daemon itself, when it is not
    unnamed = _pull(d, fleet["out"])
    assert unnamed.returncode == 1
    assert "socket.max_frame_bytes" in unnamed.stderr and "raise" in unnamed.stderr, unnamed.stderr
    assert Registry(d.state_dir / "models").versions() == []
    assert d.status()  # the daemon carries on
    # a tampered model is refused before anything is sent
    tampered = fleet["out"].parent / "tampered"
    shutil.copytree(fleet["out"], tampered)
    (tampered / "policy.onnx").write_bytes((tampered / "policy.onnx").read_bytes()[:-1] + b"\0")
    bad = _pull(d, tampered)
    assert bad.returncode == 1 and "does not match manifest" in bad.stderr, bad.stderr

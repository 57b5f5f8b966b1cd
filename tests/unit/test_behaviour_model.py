"""The behaviour model on a simulated tool-using agent whose behaviour policy is known
(``reflexd.learning.agentsim``): real torch training from a Parquet steps snapshot, a real ONNX
file, real onnxruntime. One small model is trained for the whole module (a few seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from reflexd.client.watch import EpisodeWatch
from reflexd.deciding.behaviour import BEHAVIOUR_DIR, BehaviourModel, BehaviourRegistry, read_behaviour_run
from reflexd.errors import ModelIntegrityError, TrainingError
from reflexd.learning.agentsim import POLICY, TASKS, TOOLS, ToolAgent, true_probs
from reflexd.learning.propensity import decision_propensities, estimate_propensities, unusual
from reflexd.learning.steps import load_steps, write_steps
from reflexd.manifest import BehaviourManifest

SMALL = {"hidden": 32, "layers": 1, "embedding": 8, "head_hidden": 32, "epochs": 15, "context_dim": 32,
         "optimizer": "adam", "learning_rate": 3e-3, "batch_episodes": 64}


class Trained(msgspec.Struct):
    out: Path
    manifest: BehaviourManifest
    net: object
    model: BehaviourModel
    test: list  # fresh normal episodes the model never saw


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from reflexd.trainer.behaviour import BehaviourSettings, train_model

    root = tmp_path_factory.mktemp("behaviour")
    snapshot = root / "steps.parquet"
    write_steps(str(snapshot), ToolAgent(seed=1).episodes(1500))
    out = root / "run"
    manifest, net = train_model(str(snapshot), out, BehaviourSettings(**SMALL), seed=0)
    return Trained(out, manifest, net, BehaviourModel.from_dir(out), ToolAgent(seed=2).episodes(400, prefix="t"))


def test_behaviour_snapshot_round_trip(tmp_path: Path) -> None:
    eps = ToolAgent(seed=9).episodes(20)
    write_steps(str(tmp_path / "s.parquet"), eps)
    back = load_steps(str(tmp_path / "s.parquet"))
    assert [(e.episode, e.actions, e.rewards, e.done) for e in back] == [(e.episode, e.actions, e.rewards, e.done) for e in eps]
    assert [e.observations for e in back] == [e.observations for e in eps]
    assert all(e.success is not None for e in back)


def test_behaviour_run_writes_a_checked_model_and_manifest(trained: Trained) -> None:
    m = trained.manifest
    assert (trained.out / "model.onnx").is_file()
    assert read_behaviour_run(trained.out) == m
    assert m.training.parity_ok and m.training.parity_diff is not None and m.training.parity_diff <= 1e-5
    assert m.vocabulary[0] == "" and set(m.vocabulary[1:]) == {*TOOLS, "answer"}
    assert m.calibration.held_out and m.calibration.episodes == 300
    assert m.architecture.layers == 1 and m.architecture.hidden == 32
    assert m.training.episodes == 1500 and m.training.complete_episodes == 1500


def test_behaviour_recovers_the_known_policy_and_its_propensities(trained: Trained) -> None:
    model = trained.model
    # the first step of each task: fresh state, the observation alone decides
    for task in TASKS:
        probs = model.distribution(model.run_episodes([_one_step(task)])[0][0][0])
        for tool, want in zip(TOOLS, POLICY[task]):
            assert abs(probs[tool] - want) < 0.08, (task, tool, probs[tool], want)
    # every step of fresh episodes: estimated against the true propensities
    estimated = estimate_propensities(model, trained.test)
    truth = [true_probs(obs)[a] for ep in trained.test for obs, a in zip(ep.observations, ep.actions)]
    got = np.array([e.prob for e in estimated])
    assert all(e.estimated for e in estimated) and len(got) == len(truth)
    error = np.abs(got - np.array(truth))
    assert error.mean() < 0.03 and np.quantile(error, 0.9) < 0.08, (error.mean(), np.quantile(error, 0.9))
    # calibration is reported, and close to what the true policy itself scores
    cal = trained.manifest.calibration
    true_brier = np.mean([
        sum((true_probs(o).get(v, 0.0) - (v == a)) ** 2 for v in trained.manifest.vocabulary[1:])
        for ep in trained.test for o, a in zip(ep.observations, ep.actions)
    ])
    assert cal.brier is not None and cal.brier < true_brier + 0.03, (cal.brier, true_brier)
    gaps = sum(b.count * abs(b.predicted - b.observed) for b in cal.bins) / sum(b.count for b in cal.bins)
    assert gaps < 0.03, cal.bins
    # renormalised over an offered set
    offered = {ep.ids[0]: ["search", "browser"] for ep in trained.test[:50] if ep.actions[0] in ("search", "browser")}
    over = [e for e in estimate_propensities(model, trained.test[:50], offered) if e.id in offered]
    for e in over:
        task = next(ep for ep in trained.test if ep.ids[0] == e.id).observations[0]["task"]
        p = dict(zip(TOOLS, POLICY[task]))
        assert abs(e.prob - p[e.action] / (p["search"] + p["browser"])) < 0.1
    # lone decisions (imported logs without episodes): the first step's context alone
    contexts = [{"task": t, "ready": False, "failures": 0} for t in TASKS]
    got = decision_propensities(model, contexts, [list(TOOLS)] * 3, ["calculator", "search", "code"])
    assert np.allclose(got, [POLICY["math"][1], POLICY["lookup"][0], POLICY["coding"][3]], atol=0.08), got


def test_behaviour_flags_planted_loops_and_repeated_failures_not_normal_episodes(trained: Trained) -> None:
    agent = ToolAgent(seed=3)
    loops, failing = agent.episodes(30, "loop", "l"), agent.episodes(30, "failures", "f")
    found = unusual([*loops, *failing, *trained.test])
    flagged = {(u.episode, u.kind) for u in found}
    assert all((ep.episode, "loop") in flagged for ep in loops)
    assert all((ep.episode, "repeated_failure") in flagged for ep in failing)
    normal = {u.episode for u in found if u.episode.startswith("t")}
    assert len(normal) <= 0.01 * len(trained.test), sorted(normal)
    record = msgspec.to_builtins(next(u for u in found if u.kind == "repeated_failure"))
    assert record["action"] and record["count"] >= 3 and "failed" in record["detail"]


def test_behaviour_flags_unlikely_sequences_against_the_calibrated_threshold(trained: Trained) -> None:
    strange = ToolAgent(seed=4).episodes(100, "unlikely", "u")
    found = unusual([*strange, *trained.test], trained.model)
    unlikely = {u.episode for u in found if u.kind == "unlikely"}
    caught = sum(ep.episode in unlikely for ep in strange)
    false = sum(ep.episode in unlikely for ep in trained.test)
    assert caught >= 70, caught
    assert false <= 0.05 * len(trained.test), false


def test_behaviour_watch_runs_the_published_model_step_by_step_like_torch(trained: Trained, tmp_path: Path) -> None:
    from reflexd.trainer.behaviour import predict, sequences

    registry = BehaviourRegistry(tmp_path / BEHAVIOUR_DIR)
    version = registry.add_run(trained.out).version
    registry.promote(version)
    watch = EpisodeWatch(tmp_path, full_precision=True)  # the float graph: torch's to 1e-5 (int8: test_behaviour_int8)
    assert watch.model is not None and watch.model.version == version == "v0001"
    episodes = trained.test[:40]
    seqs = sequences(episodes, trained.manifest.vocabulary, trained.manifest.features, 128)
    probs, success = predict(trained.net, seqs)
    vocab = trained.manifest.vocabulary
    # the episodes interleaved, step by step, so each one's state must be kept apart
    longest = max(len(ep) for ep in episodes)
    diff = 0.0
    for t in range(longest):
        for i, ep in enumerate(episodes):
            if t < len(ep):
                got = watch.episode(ep.episode).step(ep.observations[t], ep.actions[t], ep.rewards[t])
                row = seqs.rows(i).start + t
                diff = max(diff, abs(got.success - success[row]),
                           max(abs(got.next_action_probs[a] - probs[row, k]) for k, a in enumerate(vocab)))
                assert got.action_prob == got.next_action_probs[ep.actions[t]]
    assert diff < 1e-5, diff
    assert len(watch) == len(episodes)
    watch.end(episodes[0].episode)
    assert watch.success(episodes[0].episode) is None
    assert registry.rollback() is None  # from the first model to none: the watch drops it
    assert watch.refresh() is True and watch.model is None
    assert watch.episode(episodes[1].episode).step(episodes[1].observations[0], episodes[1].actions[0]) is None


def test_behaviour_predicted_success_rises_on_episodes_heading_to_success(trained: Trained) -> None:
    watch = EpisodeWatch(trained.model)
    first, before, after = {True: [], False: []}, {True: [], False: []}, {True: [], False: []}
    clean = []  # episodes heading to success: no failed call on the way
    for ep in trained.test:
        preds = [watch.step(ep.episode, o, a, r).success for o, a, r in zip(ep.observations, ep.actions, ep.rewards)]
        ok = bool(ep.success)
        # before: after the last step before the answer, when the outcome is not yet known
        first[ok].append(preds[0])
        before[ok].append(preds[-2] if len(preds) > 1 else preds[0])
        after[ok].append(preds[-1])
        if ok and len(preds) > 1 and min(ep.rewards) >= 0:
            clean.append(preds[-2] - preds[0])
    assert np.mean(clean) > 0.05, np.mean(clean)
    assert np.mean(before[False]) < np.mean(first[False]) - 0.1
    pos, neg = np.array(before[True]), np.array(before[False])
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.7, auc
    assert np.mean(after[True]) > 0.9 and np.mean(after[False]) < 0.2


def test_behaviour_watch_refuses_steps_that_would_poison_an_episode(trained: Trained) -> None:
    watch = EpisodeWatch(trained.model)
    ep = trained.test[0]
    handle = watch.episode("e")
    with pytest.raises(ValueError, match="reward must be a finite number, not nan"):
        handle.step(ep.observations[0], ep.actions[0], float("nan"))
    with pytest.raises(TypeError, match="observation must be a dict of keys to values, not list"):
        handle.step([1, 2], ep.actions[0])
    with pytest.raises(TypeError, match="observation must be a dict of keys to values, not list"):
        handle.expect([1, 2])
    assert handle.step(ep.observations[0], ep.actions[0], 0.0) is not None  # nothing refused was taken in
    handle.end()
    with pytest.raises(ValueError, match="episode 'e' has ended"):
        handle.step(ep.observations[0], ep.actions[0])
    with pytest.raises(ValueError, match="has ended already"):
        handle.end()


def test_behaviour_registry_refuses_a_changed_file(trained: Trained, tmp_path: Path) -> None:
    registry = BehaviourRegistry(tmp_path / BEHAVIOUR_DIR)
    version = registry.add_run(trained.out).version
    path = registry.root / version / "model.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError):
        registry.load(version)
    with pytest.raises(ModelIntegrityError):
        registry.promote(version)
    assert EpisodeWatch(tmp_path).model is None


def test_behaviour_cli_fails_cleanly_on_too_few_episodes(tmp_path: Path) -> None:
    write_steps(str(tmp_path / "s.parquet"), ToolAgent(seed=5).episodes(5))
    run = subprocess.run(
        [sys.executable, "-m", "reflexd.trainer.behaviour", str(tmp_path / "s.parquet"), str(tmp_path / "out"),
         "--config", '{"min_episodes": 20}'],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "needs 20" in run.stderr
    with pytest.raises(TrainingError, match="needs 20"):
        read_behaviour_run(tmp_path / "out")
    bad = subprocess.run(
        [sys.executable, "-m", "reflexd.trainer.behaviour", str(tmp_path / "s.parquet"), str(tmp_path / "out"),
         "--config", '{"hiden": 3}'], check=False, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "invalid --config" in bad.stderr


def _one_step(task: str):
    from reflexd.learning.steps import Episode

    return Episode("sim-agent", "probe", [{"task": task, "ready": False, "failures": 0}], ["search"], [0.0])


def test_behaviour_reads_the_steps_table_as_the_store_exports_it(tmp_path: Path) -> None:
    import duckdb

    from reflexd.service.store.db import SCHEMA, outside_select, sql_path

    eps = ToolAgent(seed=6).episodes(5)
    con = duckdb.connect(str(tmp_path / "store.duckdb"))
    con.execute(SCHEMA)
    for ep in eps:
        for t, (o, a, r) in enumerate(zip(ep.observations, ep.actions, ep.rewards)):
            con.execute(
                "INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [f"{ep.episode}/{t}", ep.agent, ep.episode, t, msgspec.json.encode(o).decode(), a, r,
                 t == len(ep) - 1, float(t), float(t)],
            )
    path = tmp_path / "steps.parquet"
    con.execute(f"COPY (SELECT {outside_select('steps')} FROM steps) TO {sql_path(path)} (FORMAT parquet)")
    back = {e.episode: e for e in load_steps(str(path))}
    for ep in eps:
        got = back[ep.episode]
        assert (got.actions, got.rewards, got.observations, got.success) == (ep.actions, ep.rewards, ep.observations, ep.success)


def test_behaviour_cli_trains_and_the_registry_publishes_it(tmp_path: Path) -> None:
    write_steps(str(tmp_path / "s.parquet"), ToolAgent(seed=8).episodes(60))
    settings = '{"hidden": 8, "layers": 2, "embedding": 4, "head_hidden": 8, "epochs": 1, "context_dim": 16}'
    run = subprocess.run(
        [sys.executable, "-m", "reflexd.trainer.behaviour", str(tmp_path / "s.parquet"), str(tmp_path / "out"),
         "--config", settings, "--seed", "3"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    manifest = read_behaviour_run(tmp_path / "out")
    assert manifest.training.parity_ok and manifest.training.seed == 3 and manifest.architecture.layers == 2
    registry = BehaviourRegistry(tmp_path / "models" / BEHAVIOUR_DIR)
    first = registry.add_run(tmp_path / "out")
    registry.promote(first.version)
    second = registry.add_run(tmp_path / "out")
    assert (first.version, second.version, second.parent) == ("v0001", "v0002", "v0001")
    assert registry.load(second.version)[0].sha256 == manifest.sha256
    assert EpisodeWatch(tmp_path / "models").model.version == "v0001"

"""The gate runs in the trainer subprocess (reflexd.trainer.judge), so the daemon never loads a holdout."""

import tempfile
from pathlib import Path

import anyio
import msgspec
import numpy as np
import pytest
from structlog.testing import capture_logs

from reflexd.config import AgentConfig, ExplorationConfig
from reflexd.deciding.scoring import Scorer
from reflexd.learning import runs
from reflexd.learning.dataset import load_holdout
from reflexd.manifest import MODEL_FILE
from reflexd.registry import Registry
from reflexd.service.scheduler import Scheduler
from reflexd.service.store import Store
from reflexd.trainer.result import REFIT_FILE, read_result, run_manifests
from reflexd.wire.protocol import Decision, EpisodeEnd, Outcome
from test_trainer import CONFIG, ROWS, run_trainer, write_snapshot

pytestmark = pytest.mark.slow


def test_the_verdict_is_the_rule_every_model_goes_live_by(tmp_path):
    snapshot = write_snapshot(tmp_path / "snap.parquet", ROWS)
    out = tmp_path / "run"
    done = run_trainer(snapshot, out)
    assert done.returncode == 0, done.stderr
    assert "reflexd.trainer event=judged" in done.stderr
    result = read_result(out)
    verdict = result.gate
    assert verdict is not None and result.judged_against is None
    assert verdict.baseline == "logged policy" and verdict.holdout_rows == result.holdout_rows
    # what the daemon computed itself before: the same files judged in this process
    manifest, refit = run_manifests(CONFIG, result, out, None)
    holdout = load_holdout(str(snapshot), manifest.features, CONFIG.trainer.holdout_fraction)
    judged = runs.judge_run(
        Scorer(manifest, (out / MODEL_FILE).read_bytes()), None, holdout, CONFIG.exploration, CONFIG.gate,
        lambda: Scorer(refit, (out / REFIT_FILE).read_bytes()),
        rewards_for=lambda agent: CONFIG.for_agent(agent).rewards,
    )
    assert judged.verdict == verdict
    # the snapshot's signal is plain: the candidate passes, and its refit on every row goes live
    assert verdict.passed and result.refitted and result.deploy == REFIT_FILE


def test_an_agents_own_exploration_is_what_its_rows_are_judged_by(tmp_path):
    """``agents.<id>.exploration``: the agent's clients explore by it, so the trainer's gate judges
    its rows by it, not by the global section."""
    own = msgspec.structs.replace(
        CONFIG, agents={"agent-1": AgentConfig(exploration=ExplorationConfig(strategy="epsilon_greedy", epsilon=1.0))}
    )
    snapshot = write_snapshot(tmp_path / "snap.parquet", ROWS)
    verdicts = {}
    for name, config in (("global", CONFIG), ("own", own)):
        done = run_trainer(snapshot, tmp_path / name, msgspec.json.encode(config).decode())
        assert done.returncode == 0, done.stderr
        verdicts[name] = read_result(tmp_path / name).gate
    # explored uniformly, as that agent's clients would, the candidate is worth the logging average
    assert verdicts["own"].candidate_value < verdicts["global"].candidate_value - 0.05
    result = read_result(tmp_path / "own")
    manifest, _ = run_manifests(own, result, tmp_path / "own", None)
    assert manifest.exploration_for("agent-1").epsilon == 1.0  # and deployed so
    holdout = load_holdout(str(snapshot), manifest.features, own.trainer.holdout_fraction)
    judged = runs.judge_run(
        Scorer(manifest, (tmp_path / "own" / MODEL_FILE).read_bytes()), None, holdout, manifest.exploration_for, own.gate,
        rewards_for=lambda agent: own.for_agent(agent).rewards,
    )
    assert judged.verdict.candidate_value == pytest.approx(verdicts["own"].candidate_value, abs=1e-9)


def registered(tmp_path, out):
    """The run in ``out`` registered and promoted in a registry under ``tmp_path``: its folder."""
    result = read_result(out)
    _, refit = run_manifests(CONFIG, result, out, None)
    registry = Registry(tmp_path / "models")
    added = registry.add(out / REFIT_FILE, {**msgspec.structs.asdict(refit), "gate": result.gate})
    registry.promote(added.version)
    return registry.root / added.version


def test_a_candidate_is_judged_against_the_live_model_it_is_given(tmp_path):
    first = tmp_path / "first"
    assert run_trainer(write_snapshot(tmp_path / "a.parquet", ROWS), first).returncode == 0
    live = registered(tmp_path, first)
    out = tmp_path / "second"
    done = run_trainer(write_snapshot(tmp_path / "b.parquet", ROWS, seed=1), out, None, "--incumbent", str(live))
    assert done.returncode == 0, done.stderr
    result = read_result(out)
    assert result.judged_against == live.name == "v0001"
    assert result.gate.baseline == "incumbent v0001"


def test_a_live_model_that_does_not_match_its_sha256_fails_the_run_before_training(tmp_path):
    first = tmp_path / "first"
    assert run_trainer(write_snapshot(tmp_path / "a.parquet", ROWS), first).returncode == 0
    live = registered(tmp_path, first)
    (live / MODEL_FILE).write_bytes((live / MODEL_FILE).read_bytes() + b"\0")
    done = run_trainer(tmp_path / "a.parquet", tmp_path / "second", None, "--incumbent", str(live))
    assert done.returncode == 2
    assert "cannot load the live model to judge the candidate against" in done.stderr and "sha256" in done.stderr
    assert "event=epoch" not in done.stderr  # refused before any training


class _LiveModel:
    """Stands in for the daemon's model source: only the model it serves matters here."""

    def __init__(self, scorer):
        self.scorer = scorer


def test_a_verdict_against_a_model_no_longer_live_refuses_the_candidate_judged(tmp_path):
    out = tmp_path / "run"
    assert run_trainer(write_snapshot(tmp_path / "a.parquet", ROWS), out).returncode == 0
    result = read_result(out)
    assert result.gate.passed and result.judged_against is None and result.deploy == REFIT_FILE
    # a model was promoted by hand while the run trained: the verdict was not on it
    promoted = Registry(registered(tmp_path, out).parent)
    scheduler = Scheduler(lambda: CONFIG, None, None, promoted, _LiveModel(None), None)
    model_file, manifest, verdict = scheduler._gate(out, result, CONFIG)
    assert not verdict.passed and verdict.refit_rows == 0
    assert "the live model changed during the run (no model -> v0001)" in verdict.reason
    # what is registered is the candidate judged, not its refit, which no gate saw
    assert model_file == out / MODEL_FILE and not manifest.training.refit
    # with the same model live as when the run started, the trainer's verdict stands; the manifest
    # is the config's the run was judged by, whatever the daemon's says now
    reloaded = msgspec.structs.replace(CONFIG, exploration=msgspec.structs.replace(CONFIG.exploration, epsilon=0.5))
    scheduler = Scheduler(lambda: reloaded, None, None, Registry(tmp_path / "empty"), _LiveModel(None), None)
    model_file, manifest, verdict = scheduler._gate(out, result, CONFIG)
    assert verdict == result.gate and model_file == out / REFIT_FILE and manifest.training.refit
    assert manifest.exploration == CONFIG.exploration != reloaded.exploration


def test_a_live_model_whose_file_changed_on_disk_is_judged_as_it_is_served(tmp_path):
    """The daemon goes on serving the copy it loaded when a model's file changes on disk: a run
    judges its candidate against that copy (``Scheduler._live_copy``), so it can replace it."""
    first = tmp_path / "first"
    assert run_trainer(write_snapshot(tmp_path / "a.parquet", ROWS), first).returncode == 0
    live = registered(tmp_path, first)
    manifest, data = Registry(tmp_path / "models").load(live.name)
    served = Scorer(manifest, data)
    (live / MODEL_FILE).write_bytes(b"damaged")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    scheduler = Scheduler(lambda: CONFIG, None, None, Registry(tmp_path / "models"), _LiveModel(served), None)
    copy = scheduler._live_copy(run_dir)
    done = run_trainer(tmp_path / "a.parquet", run_dir / "out", None, "--incumbent", str(copy))
    assert done.returncode == 0, done.stderr
    result = read_result(run_dir / "out")
    assert result.judged_against == "v0001" and result.gate.baseline == "incumbent v0001"



def _confirmed(scheduler, out, result, config, end, config_file=None, gated=None):
    """What a run in ``out`` leaves to register (``gated``: what the gate made of it), its first
    model judged again (by the ``reflexd.trainer.confirm`` subprocess) on the decisions received
    after ``end``."""
    run_dir = Path(tempfile.mkdtemp(dir=config.state_dir))
    (run_dir / "config.json").write_bytes(config_file or msgspec.json.encode(config))
    gated = gated or scheduler._gate(out, result, config)
    return anyio.run(scheduler._confirm, run_dir, out, result, config, end, gated)


def _decided(store, best_prob, n, start, seed):
    """``n`` decisions in the snapshot's world, received from ``start`` on, by a logging policy that
    picks the best tool with probability ``best_prob`` (1/3: uniform), each with its reward."""
    rng = np.random.default_rng(seed)
    decisions, outcomes = [], []
    for i in range(n):
        task = str(rng.choice(["question", "arithmetic"]))
        best = "search" if task == "question" else "calc"
        chosen = best if rng.random() < best_prob else str(rng.choice([a for a in ("search", "calc", "ask_human") if a != best]))
        decisions.append(Decision(
            id=f"fresh-{start:.0f}-{i}", agent="agent-1", context={"task": task, "length": int(rng.integers(1, 100))},
            actions=["search", "calc", {"id": "ask_human", "features": {"cost": 10}}], chosen=chosen,
            prob=best_prob if chosen == best else (1 - best_prob) / 2,
        ))
        outcomes.append(Outcome(decision_id=decisions[-1].id, reward=float(chosen == best) + 0.2 * float(rng.normal())))
    store.write(decisions, received_at=start)
    store.write(outcomes, received_at=start + 1)


def test_a_first_model_is_confirmed_on_the_decisions_made_while_its_run_trained(tmp_path):
    """An online head learns on while a run trains: a first model goes live only if it also beats
    the logging policy on the newest decisions made since the snapshot, which it never saw."""
    config = msgspec.structs.replace(CONFIG, state_dir=str(tmp_path))
    out = tmp_path / "run"
    assert run_trainer(write_snapshot(tmp_path / "a.parquet", ROWS), out).returncode == 0
    result = read_result(out)
    first = result.gate
    assert first.passed and first.baseline == "logged policy" and result.deploy == REFIT_FILE
    assert "went live refit" in first.reason
    end = 1_700_000_000.0 + ROWS - 1  # the snapshot's newest row
    # (logging policies one after another since the snapshot, each as the chance it picks the best tool)
    for name, since, promoted in (
        ("uniform", (1 / 3, 1 / 3), True),
        ("learnt", (1.0, 1.0), False),
        ("learnt-during-the-run", (1 / 3, 1.0), False),  # on average the refit still beats it
    ):
        with Store(tmp_path / f"{name}.duckdb") as store:
            _decided(store, 1 / 3, 300, end - 100, seed=1)  # in the snapshot's window: not judged again
            for k, best_prob in enumerate(since):
                _decided(store, best_prob, 200, end + 100 + 10 * k, seed=2 + k)
            scheduler = Scheduler(lambda: config, store, None, Registry(tmp_path / name), _LiveModel(None), None)
            model_file, manifest, verdict = _confirmed(scheduler, out, result, config, end)
            if not promoted:  # counted apart in status: the head learned past it
                assert scheduler._register(model_file, manifest, verdict)["outcome"] == "rejected"
                assert (scheduler.status.rejected, scheduler.status.unconfirmed) == (1, 1)
        assert verdict.passed is promoted, verdict.reason
        assert "on the newest 200 of the 400 decisions made since its snapshot, which it never saw" in verdict.reason
        # the verdict's own numbers stay the holdout's; the confirmation's are beside them
        assert (verdict.holdout_rows, verdict.difference, verdict.lower) == (first.holdout_rows, first.difference, first.lower)
        assert verdict.estimates["confirmed_rows"] == 200 and 0 < verdict.estimates["confirmed_value"] < 1.1
        assert (verdict.estimates["confirmed_lower"] > 0) is promoted
        if promoted:
            assert verdict.reason.startswith(first.reason + "; confirmed")
            assert model_file == out / REFIT_FILE and manifest.training.refit and verdict.refit_rows == first.refit_rows
            # a model promoted by hand while it was being confirmed: the verdict is not on it
            gated = scheduler._gate(out, result, config)
            registry = Registry(tmp_path / name)
            registry.promote(registry.add(model_file, {**msgspec.structs.asdict(manifest), "gate": verdict}).version)
            with Store(tmp_path / f"{name}.duckdb") as store:
                scheduler.store = store
                raced = _confirmed(scheduler, out, result, config, end, gated=gated)[2]
            assert not raced.passed and "the live model changed during the run (no model -> v0001)" in raced.reason
            assert "confirmed_rows" not in raced.estimates  # refused for the change, not counted as unconfirmed
        else:  # the newest decisions always pick the best tool: nothing can be clearly better
            assert "went live refit" not in verdict.reason and verdict.refit_rows == 0
            assert model_file == out / MODEL_FILE and not manifest.training.refit  # the candidate judged is registered
    assert not list(tmp_path.glob("*/fresh.parquet"))  # each run's copy of the decisions removed once judged
    with Store(tmp_path / "few.duckdb") as store:
        scheduler = Scheduler(lambda: config, store, None, Registry(tmp_path / "few"), _LiveModel(None), None)
        # the gate alone leaves the trainer's verdict as it is
        assert scheduler._gate(out, result, config)[2] == first
        # as it does on fewer decisions since than its holdout held
        _decided(store, 1.0, first.holdout_rows - 1, end + 100, seed=3)
        assert _confirmed(scheduler, out, result, config, end)[2] == first
        # and when the confirmation cannot be made: a second look, whose failure costs nothing
        _decided(store, 1.0, 400, end + 200, seed=4)
        assert not _confirmed(scheduler, out, result, config, end)[2].passed
        with capture_logs() as logs:
            assert _confirmed(scheduler, out, result, config, end, config_file=b"{")[2] == first
        [warned] = [e for e in logs if e["event"] == "cannot confirm a first model on the decisions made during its run"]
        assert "exited 2" in warned["error"] and "reflexd.trainer.confirm: error" in warned["error"]


def test_a_first_model_is_not_refused_for_want_of_episodes_ended_during_its_run(tmp_path):
    """With episode returns the confirmation is judged by episode: a run during which one episode
    ended cannot tell anything, so the verdict stands."""
    config = msgspec.structs.replace(
        CONFIG, state_dir=str(tmp_path), rewards=msgspec.structs.replace(CONFIG.rewards, episode_return=True)
    )
    out = tmp_path / "run"
    assert run_trainer(write_snapshot(tmp_path / "a.parquet", ROWS), out).returncode == 0
    result = read_result(out)
    end = 1_700_000_000.0 + ROWS - 1
    with Store(tmp_path / "one.duckdb") as store:
        store.write([
            Decision(id=f"e{i}", agent="agent-1", context={"task": "question"}, actions=["search", "calc"],
                     chosen="calc", prob=0.5, episode="only")
            for i in range(400)
        ], received_at=end + 100)
        store.write([EpisodeEnd(agent="agent-1", episode="only", reward=0.0)], received_at=end + 101)
        scheduler = Scheduler(lambda: config, store, None, Registry(tmp_path / "one"), _LiveModel(None), None)
        assert _confirmed(scheduler, out, result, config, end)[2] == result.gate

"""The gate runs in the trainer subprocess (reflexd.trainer.judge), so the daemon never loads a holdout."""

import msgspec
import pytest
from test_trainer import CONFIG, ROWS, run_trainer, write_snapshot

from reflexd.deciding.scoring import Scorer
from reflexd.learning import runs
from reflexd.learning.dataset import load_holdout
from reflexd.manifest import MODEL_FILE
from reflexd.registry import Registry
from reflexd.service.scheduler import Scheduler
from reflexd.trainer.result import REFIT_FILE, read_result, run_manifests

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
    """Stands in for the daemon's model source: only which model is live matters to ``_gate``."""

    def __init__(self, scorer):
        self.scorer = scorer


def test_a_verdict_against_a_model_no_longer_live_is_a_refusal(tmp_path):
    out = tmp_path / "run"
    assert run_trainer(write_snapshot(tmp_path / "a.parquet", ROWS), out).returncode == 0
    result = read_result(out)
    assert result.gate.passed and result.judged_against is None
    live_dir = registered(tmp_path, out)
    manifest, data = Registry(tmp_path / "models").load(live_dir.name)
    # a model was promoted by hand while the run trained: the verdict was not on it
    scheduler = Scheduler(lambda: CONFIG, None, None, None, _LiveModel(Scorer(manifest, data)), None)
    model_file, _, verdict = scheduler._gate(out, result)
    assert not verdict.passed and verdict.refit_rows == 0
    assert "the live model changed during the run (no model -> v0001)" in verdict.reason
    # with the same model live as when the run started, the trainer's verdict stands
    scheduler = Scheduler(lambda: CONFIG, None, None, None, _LiveModel(None), None)
    model_file, registered_manifest, verdict = scheduler._gate(out, result)
    assert verdict == result.gate and model_file == out / REFIT_FILE and registered_manifest.training.refit

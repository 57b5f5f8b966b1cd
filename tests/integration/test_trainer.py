import json
import subprocess
import sys

import msgspec
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import onnx
from conftest import wait_for
from reflexd.client.policy import Policy
from reflexd.config import Config, FeatureConfig, GateConfig, TrainerConfig
from reflexd.errors import TrainingError
from reflexd.exporters.onnx import export_onnx, graph_key
from reflexd.features import FeatureSpec, Hasher
from reflexd.learning.dataset import load_snapshot
from reflexd.plugins.learners.mlp import MLPLearner, RewardMLP
from reflexd.split import (
    MAX_FOLDS,
    MIN_TRAIN_ROWS,
    cross_fitted,
    first_run_rows,
    holdout_rows,
    holdout_run_rows,
)
from reflexd.trainer.result import read_result
from reflexd.wire.protocol import ModelsRequest, Train

pytestmark = pytest.mark.slow

CONFIG = Config(
    features=FeatureConfig(context_dim=32, action_dim=8, seed=11),
    trainer=TrainerConfig(epochs=12, min_steps=1, batch_size=64, learning_rate=0.01, hidden_size=16, ensemble=3),
    gate=GateConfig(parity_tolerance=1e-5),
)
SPEC = FeatureSpec(context_dim=32, action_dim=8, seed=11)
ROWS, UNUSABLE = 800, 5


def write_snapshot(path, n_rows, seed=0, unusable=UNUSABLE, ragged=False):
    """Tool 'search' is best for questions, 'calc' for arithmetic; rewards are noisy; a few rows
    name a chosen action that was not offered and must be dropped. ``ragged``: every other row
    offers two actions rather than three, so those rows are padded."""
    rng = np.random.default_rng(seed)
    columns = {name: [] for name in ("id", "agent", "received_at", "context", "actions", "chosen", "prob", "reward")}
    for i in range(n_rows):
        task = str(rng.choice(["question", "arithmetic"]))
        actions = ["search", "calc", {"id": "ask_human", "features": {"cost": 10}}]
        if ragged and i % 2:
            actions = actions[:2]
        chosen = "teleport" if i < unusable else str(rng.choice(["search", "calc", "ask_human"][: len(actions)]))
        best = (task, chosen) in {("question", "search"), ("arithmetic", "calc")}
        columns["id"].append(f"d{i}")
        columns["agent"].append("agent-1")
        columns["received_at"].append(1_700_000_000.0 + i)
        columns["context"].append(json.dumps({"task": task, "length": int(rng.integers(1, 100))}))
        columns["actions"].append(json.dumps(actions))
        columns["chosen"].append(chosen)
        columns["prob"].append(1 / 3)
        columns["reward"].append(float(best) + 0.2 * float(rng.normal()))
    table = pa.table(
        {
            **{k: pa.array(v, pa.float64() if k in ("received_at", "prob", "reward") else pa.string())
               for k, v in columns.items()},
            "model_version": pa.array([None] * n_rows, pa.string()),
            "outcomes": pa.array([1] * n_rows, pa.int32()),
        }
    )
    pq.write_table(table, path)
    return path


def run_trainer(snapshot, out_dir, config_arg=None, *extra):
    config_arg = config_arg or msgspec.json.encode(CONFIG).decode()
    return subprocess.run(
        [sys.executable, "-m", "reflexd.trainer", str(snapshot), str(out_dir), "--config", config_arg, "--seed", "3",
         *extra],
        capture_output=True, text=True, timeout=180,
    )


def test_trains_exports_and_the_model_ranks_the_best_action_first(tmp_path):
    out = tmp_path / "run"
    # the daemon passes the config as a file
    (tmp_path / "config.json").write_bytes(msgspec.json.encode(CONFIG))
    done = run_trainer(write_snapshot(tmp_path / "snap.parquet", ROWS), out, str(tmp_path / "config.json"))
    assert done.returncode == 0, done.stderr
    assert "reflexd.trainer event=epoch epoch=12/12 loss=" in done.stderr

    result = read_result(out)
    assert result == msgspec.json.decode((out / "result.json").read_bytes(), type=type(result))
    assert result.learner == "mlp" and result.seed == 3
    assert result.features == SPEC
    assert result.dropped_rows == UNUSABLE
    assert result.train_rows + result.holdout_rows == ROWS - UNUSABLE
    assert result.holdout_rows == round(0.2 * (ROWS - UNUSABLE))
    assert result.window_start == 1_700_000_000.0 + UNUSABLE
    assert result.window_end == 1_700_000_000.0 + ROWS - 1
    assert result.epochs == 12
    assert 0 < result.train_loss < 0.2  # noise variance is 0.04; predicting the mean would give ~0.25
    assert result.fit_seconds > 0 and result.export_seconds > 0 and not result.graph_reused
    assert result.load_seconds > 0 and result.import_seconds > 0 and result.parity_seconds > 0
    assert result.parity_ok and result.parity_diff <= 1e-5
    assert result.torch_version.startswith("2.13")

    # the candidate the gate judges, and the same learner refit on every row (trainer.refit_below)
    assert result.refitted and result.refit_parity_diff <= 1e-5
    hasher = Hasher(SPEC)
    actions = ["search", "calc", {"id": "ask_human", "features": {"cost": 10}}]
    found = {}
    for name in ("policy.onnx", "refit.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        for task, best in [("question", 0), ("arithmetic", 1)]:
            context = hasher.context({"task": task, "length": 50})[None]
            scores, spread = session.run(None, {"context": context, "actions": hasher.actions(actions)[None]})
            assert int(np.argmax(scores[0])) == best, (name, task, scores)
            assert np.sort(scores[0])[-1] - np.sort(scores[0])[-2] > 0.5
            assert spread.shape == (1, 3)
            found[name, task] = scores[0]
    # fit on more rows, the refit is another model
    assert not np.allclose(found["policy.onnx", "question"], found["refit.onnx", "question"])


def test_from_refit_below_rows_on_only_the_candidate_is_written(tmp_path):
    trainer = msgspec.structs.replace(CONFIG.trainer, refit_below=ROWS - UNUSABLE)
    config = msgspec.structs.replace(CONFIG, trainer=trainer)
    out = tmp_path / "run"
    done = run_trainer(write_snapshot(tmp_path / "snap.parquet", ROWS), out, msgspec.json.encode(config).decode())
    assert done.returncode == 0, done.stderr
    result = read_result(out)
    assert not result.refitted and result.refit_parity_diff is None and "event=refitted" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["policy.onnx", "result.json"]


def test_a_refit_that_would_overrun_max_wall_time_is_skipped_and_the_candidate_kept(tmp_path):
    # nothing kills a trainer run by hand: the limit here only shapes the trainer's own plan
    trainer = msgspec.structs.replace(CONFIG.trainer, max_wall_time=0.01)
    config = msgspec.structs.replace(CONFIG, trainer=trainer)
    out = tmp_path / "run"
    done = run_trainer(write_snapshot(tmp_path / "snap.parquet", ROWS), out, msgspec.json.encode(config).decode())
    assert done.returncode == 0, done.stderr
    assert "event=refit_skipped reason=max_wall_time" in done.stderr
    result = read_result(out)
    assert not result.refitted and result.parity_ok
    assert sorted(p.name for p in out.iterdir()) == ["policy.onnx", "result.json"]


class TanhMLP(RewardMLP):
    """The MLP's parameters exactly, and another function of them."""

    def head_outputs(self, context, actions):
        hidden = torch.tanh(self.context_layer(context).unsqueeze(1) + self.action_layer(actions))
        return self.heads(hidden) + self.bilinear_term(context, actions)


@pytest.mark.usefixtures("torch_one_thread")
def test_a_later_run_reuses_the_graph_and_a_wrong_one_is_traced_again(tmp_path):
    snapshot = write_snapshot(tmp_path / "snap.parquet", ROWS)
    graphs = tmp_path / "graphs"
    first = run_trainer(snapshot, tmp_path / "run1", None, "--graph-cache", str(graphs))
    assert first.returncode == 0, first.stderr
    assert not read_result(tmp_path / "run1").graph_reused
    (template,) = graphs.iterdir()
    traced = template.read_bytes()
    second = run_trainer(snapshot, tmp_path / "run2", None, "--graph-cache", str(graphs))
    assert second.returncode == 0, second.stderr
    result = read_result(tmp_path / "run2")
    assert result.graph_reused and result.parity_ok
    # the same seed and data give the same model, whichever way it was exported
    assert (tmp_path / "run1" / "policy.onnx").read_bytes() == (tmp_path / "run2" / "policy.onnx").read_bytes()

    # a graph computing something else under this architecture's key (as if its code had
    # changed unnoticed) fails parity, and the run traces the model afresh instead
    shape = dict(context_dim=SPEC.context_dim, action_dim=SPEC.action_dim, hidden=16, heads=3)
    assert template.name == f"{graph_key(RewardMLP(**shape), SPEC.context_dim, SPEC.action_dim)}.onnx"
    export_onnx(TanhMLP(**shape), SPEC.context_dim, SPEC.action_dim, tmp_path / "tanh.onnx", tmp_path / "other")
    (wrong,) = (tmp_path / "other").iterdir()
    wrong.replace(template)
    third = run_trainer(snapshot, tmp_path / "run3", None, "--graph-cache", str(graphs))
    assert third.returncode == 0, third.stderr
    assert "event=cached_graph_failed_parity" in third.stderr
    result = read_result(tmp_path / "run3")
    assert result.parity_ok and not result.graph_reused
    assert (tmp_path / "run3" / "policy.onnx").read_bytes() == (tmp_path / "run1" / "policy.onnx").read_bytes()
    assert template.read_bytes() == traced  # the cache was mended: the graph the second run reused


def test_empty_snapshot_fails_with_a_clear_message(tmp_path):
    out = tmp_path / "run"
    done = run_trainer(write_snapshot(tmp_path / "empty.parquet", 0), out)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("reflexd.trainer: error: ")
    assert "0 usable rows" in last and f"at least {first_run_rows(CONFIG)} (trainer.cross_fit_from)" in last
    assert json.loads((out / "result.json").read_text()) == {"error": last.removeprefix("reflexd.trainer: error: ")}
    assert not (out / "policy.onnx").exists()
    with pytest.raises(TrainingError, match="0 usable rows"):
        read_result(out)


def test_too_few_rows_fails(tmp_path):
    first = first_run_rows(CONFIG)
    done = run_trainer(write_snapshot(tmp_path / "small.parquet", UNUSABLE + first - 1), tmp_path / "run")
    assert done.returncode == 2
    assert f"{first - 1} usable rows after dropping 5; a run needs at least {first} (trainer.cross_fit_from)" in done.stderr
    # with cross-fitting off, a run needs enough rows to hold some out
    off = msgspec.structs.replace(CONFIG, trainer=msgspec.structs.replace(CONFIG.trainer, cross_fit_from=0))
    done = run_trainer(tmp_path / "small.parquet", tmp_path / "run2", msgspec.json.encode(off).decode())
    assert done.returncode == 2
    assert f"a run needs at least {holdout_run_rows(off)} to hold some out for the gate" in done.stderr
    # cross-fitting from no fewer rows than a holdout run needs is none at all
    late = msgspec.structs.replace(CONFIG, trainer=msgspec.structs.replace(CONFIG.trainer, cross_fit_from=20))
    done = run_trainer(tmp_path / "small.parquet", tmp_path / "run3", msgspec.json.encode(late).decode())
    assert f"a run needs at least {holdout_run_rows(late)} to hold some out for the gate" in done.stderr


@pytest.mark.parametrize("fraction, first_min_holdout", [(0.2, 3), (0.5, 6)])
def test_the_fewest_rows_a_holdout_run_needs_are_enough_to_train_and_gate(tmp_path, fraction, first_min_holdout):
    config = msgspec.structs.replace(
        CONFIG,
        trainer=msgspec.structs.replace(CONFIG.trainer, holdout_fraction=fraction),
        gate=msgspec.structs.replace(CONFIG.gate, first_min_holdout=first_min_holdout),
    )
    n = holdout_run_rows(config)
    # one fewer would leave the trainer or the first model's gate short of rows (and be cross-fitted)
    fewer = n - 1
    assert fewer - holdout_rows(fewer, fraction) < MIN_TRAIN_ROWS or holdout_rows(fewer, fraction) < first_min_holdout
    done = run_trainer(write_snapshot(tmp_path / "s.parquet", n, unusable=0), tmp_path / "run", msgspec.json.encode(config).decode())
    assert done.returncode == 0, done.stderr
    result = read_result(tmp_path / "run")
    assert result.train_rows >= MIN_TRAIN_ROWS and result.holdout_rows >= first_min_holdout
    assert result.train_rows + result.holdout_rows == n and result.cross_fit is None


@pytest.fixture
def one_thread():
    """The trainer fits on trainer.max_threads (1): so must a test that redoes its fits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scores_without(batch, fit_on, rows):
    """What the learner, with the trainer's seed, fit on rows ``fit_on`` predicts for ``rows``."""
    model = MLPLearner().fit(batch.take(fit_on), CONFIG.trainer, 3)
    with torch.inference_mode():
        return model(torch.from_numpy(batch.context[rows]), torch.from_numpy(batch.actions[rows]))[0].numpy()


def test_a_run_too_small_to_hold_rows_out_is_cross_fitted_leave_one_out(tmp_path, one_thread):
    n = first_run_rows(CONFIG)
    assert cross_fitted(CONFIG, n) and n < holdout_run_rows(CONFIG)
    snapshot = write_snapshot(tmp_path / "s.parquet", n, unusable=0, ragged=True)
    done = run_trainer(snapshot, tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert f"event=cross_fitted folds={n}" in done.stderr
    result = read_result(tmp_path / "run")
    assert (result.train_rows, result.holdout_rows, result.refitted) == (n, 0, False)
    assert result.parity_ok and not (tmp_path / "run" / "refit.onnx").exists()
    batch = load_snapshot(str(snapshot), SPEC)
    found = result.cross_fit
    assert found is not None and found.ids == batch.ids
    scores = np.asarray(found.scores)
    assert scores.shape == batch.mask.shape == np.asarray(found.spread).shape
    assert not batch.mask.all() and not scores[~batch.mask].any()  # padded slots are left at 0
    # row i's predictions come from the learner, seed and settings fit on every row but i ...
    for i in (0, n - 1):
        want = scores_without(batch, [j for j in range(n) if j != i], [i])[0]
        np.testing.assert_allclose(scores[i][batch.mask[i]], want[batch.mask[i]], rtol=1e-5, atol=1e-6)
    # ... and what goes live is that learner fit on every row
    want = scores_without(batch, range(n), range(n))
    session = ort.InferenceSession(str(tmp_path / "run" / "policy.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["scores"], {"context": batch.context, "actions": batch.actions})[0]
    np.testing.assert_allclose(got[batch.mask], want[batch.mask], rtol=1e-4, atol=1e-5)
    assert not np.allclose(scores[batch.mask], want[batch.mask], atol=1e-3)  # out of fold, not the full fit's


def test_a_cross_fitted_run_on_more_rows_than_max_folds_fits_folds_of_consecutive_rows(tmp_path, one_thread):
    # a tiny holdout fraction makes a holdout run wait for many rows; cross-fitting fills the gap
    config = msgspec.structs.replace(CONFIG, trainer=msgspec.structs.replace(CONFIG.trainer, holdout_fraction=0.05))
    n = MAX_FOLDS + 8
    assert cross_fitted(config, n)
    snapshot = write_snapshot(tmp_path / "s.parquet", n, unusable=0)
    done = run_trainer(snapshot, tmp_path / "run", msgspec.json.encode(config).decode())
    assert done.returncode == 0, done.stderr
    assert f"event=cross_fitted folds={MAX_FOLDS}" in done.stderr
    scores = np.asarray(read_result(tmp_path / "run").cross_fit.scores)
    batch = load_snapshot(str(snapshot), SPEC)
    # np.array_split: the first 8 folds hold two rows each, so rows 0 and 1 come from one fit
    np.testing.assert_allclose(scores[:2], scores_without(batch, range(2, n), [0, 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_file", [False, True])
def test_invalid_config_fails_with_the_key_path(tmp_path, in_file):
    config = '{"trainer": {"epochs": 0}}'
    if in_file:
        (tmp_path / "config.json").write_text(config)
        config = str(tmp_path / "config.json")
    done = run_trainer(write_snapshot(tmp_path / "snap.parquet", 20), tmp_path / "run", config)
    assert done.returncode == 2
    assert "invalid --config" in done.stderr and "$.trainer.epochs" in done.stderr
    with pytest.raises(TrainingError, match=r"\$\.trainer\.epochs"):
        read_result(tmp_path / "run")



def test_read_result_without_a_result_file(tmp_path):
    with pytest.raises(TrainingError, match="wrote no"):
        read_result(tmp_path)


@pytest.mark.e2e
def test_the_daemons_later_runs_reuse_the_first_runs_graph(daemon_factory):
    d = daemon_factory({"trainer": {"ensemble": 2}})
    rng = np.random.default_rng(0)
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=1) as policy:
        for _ in range(300):
            choice = policy.decide({"task": str(rng.choice(["question", "arithmetic"]))}, ["search", "calc"])
            policy.reward(choice.id, float(rng.random()))
        assert policy.flush(60)
    wait_for(lambda: d.status().experience["new_since_training"] >= 300, 60, "matured experience")

    versions = [d.request(Train(), timeout=300).message.split(":")[0].split()[1] for _ in range(2)]
    manifests = {m["version"]: m for m in d.request(ModelsRequest()).models}
    first, second = (manifests[v]["training"] for v in versions)
    assert not first["graph_reused"] and second["graph_reused"] and second["parity_ok"]
    (template,) = (d.state_dir / "graphs").iterdir()
    assert not any(t.raw_data for t in onnx.load(str(template)).graph.initializer)

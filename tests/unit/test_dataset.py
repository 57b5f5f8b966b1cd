import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reflexd.errors import SnapshotError, TrainingError
from reflexd.features import FeatureSpec, Hasher
from reflexd.learning.dataset import (
    Batch,
    from_records,
    load_holdout,
    load_snapshot,
    split_holdout,
)

SPEC = FeatureSpec(context_dim=16, action_dim=8, seed=7)


def write_snapshot(path, rows, row_group_size=None):
    """Rows with decoded context/actions, written the way the daemon writes snapshots (JSON text)."""
    table = pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "agent": pa.array([r.get("agent", "agent-1") for r in rows], pa.string()),
            "received_at": pa.array([r["received_at"] for r in rows], pa.float64()),
            "context": pa.array([r.get("context_json", json.dumps(r["context"])) for r in rows], pa.string()),
            "actions": pa.array([r.get("actions_json", json.dumps(r["actions"])) for r in rows], pa.string()),
            "chosen": pa.array([r["chosen"] for r in rows], pa.string()),
            "prob": pa.array([r.get("prob", 0.5) for r in rows], pa.float64()),
            "reward": pa.array([r.get("reward", 1.0) for r in rows], pa.float64()),
            "model_version": pa.array([None] * len(rows), pa.string()),
            "outcomes": pa.array([1] * len(rows), pa.int32()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


ROWS = [
    {
        "id": "d0",
        "received_at": 10.0,
        "context": {"user": {"tier": "gold", "age": 41}, "query": "cheap fast model", "tags": ["x", "y"]},
        "actions": ["small", "large", {"id": "tool", "features": {"cost": 2.5, "kind": "search"}}],
        "chosen": "tool",
        "reward": 0.25,
        "prob": 0.2,
    },
    {
        "id": "d1",
        "received_at": 11.0,
        "context": {"load": 0.9, "ok": True, "none": None},
        "actions": ["small"],
        "chosen": "small",
        "reward": -3.0,
        "prob": 1.0,
    },
    {
        "id": "d2",
        "received_at": 12.0,
        "context": {"series": [1.5, -2, 3]},
        "actions": ["large", "small"],
        "chosen": "small",
        "reward": 7.5,
        "prob": 0.9,
    },
]


def test_hashing_matches_features_hasher_exactly(tmp_path):
    batch = load_snapshot(write_snapshot(tmp_path / "s.parquet", ROWS), SPEC)
    hasher = Hasher(SPEC)
    assert len(batch) == 3
    for i, row in enumerate(ROWS):
        np.testing.assert_array_equal(batch.context[i], hasher.context(row["context"]))
        n = len(row["actions"])
        np.testing.assert_array_equal(batch.actions[i, :n], hasher.actions(row["actions"]))
    assert batch.context.dtype == np.float32 and batch.actions.dtype == np.float32


def test_padding_mask_and_chosen_index_with_varied_action_counts(tmp_path):
    batch = load_snapshot(write_snapshot(tmp_path / "s.parquet", ROWS), SPEC)
    assert batch.actions.shape == (3, 3, SPEC.action_dim)
    np.testing.assert_array_equal(batch.mask, [[True, True, True], [True, False, False], [True, True, False]])
    assert not batch.actions[~batch.mask].any()
    assert batch.action_ids == [["small", "large", "tool"], ["small"], ["large", "small"]]
    np.testing.assert_array_equal(batch.chosen, [2, 0, 1])
    assert batch.chosen.dtype == np.int64
    np.testing.assert_array_equal(batch.reward, [0.25, -3.0, 7.5])
    np.testing.assert_array_equal(batch.prob, [0.2, 1.0, 0.9])
    np.testing.assert_array_equal(batch.received_at, [10.0, 11.0, 12.0])
    assert batch.ids == ["d0", "d1", "d2"] and batch.agents == ["agent-1"] * 3
    assert batch.dropped == 0


def test_from_records_equals_load_snapshot(tmp_path):
    loaded = load_snapshot(write_snapshot(tmp_path / "s.parquet", ROWS), SPEC)
    built = from_records([{"agent": "agent-1", "prob": 0.5, **r} for r in ROWS], SPEC)
    np.testing.assert_array_equal(built.context, loaded.context)
    np.testing.assert_array_equal(built.actions, loaded.actions)
    np.testing.assert_array_equal(built.chosen, loaded.chosen)


def test_rows_that_cannot_be_learned_from_are_dropped_and_counted(tmp_path):
    rows = ROWS + [
        {"id": "bad-chosen", "received_at": 13.0, "context": {}, "actions": ["a", "b"], "chosen": "c"},
        {"id": "null-reward", "received_at": 14.0, "context": {}, "actions": ["a"], "chosen": "a", "reward": None},
        {"id": "zero-prob", "received_at": 15.0, "context": {}, "actions": ["a"], "chosen": "a", "prob": 0.0},
    ]
    batch = load_snapshot(write_snapshot(tmp_path / "s.parquet", rows), SPEC)
    assert batch.ids == ["d0", "d1", "d2"]
    assert batch.dropped == 3


def test_action_lists_across_row_groups_and_nulls(tmp_path):
    # each row group has a dictionary of its own; a list may recur in several, or in one only
    lists = [["a", "b"], ["b", {"id": "c", "features": {"cost": 3}}], ["a"], ["c", "a", "b"]]
    rows = [
        {"id": f"d{i}", "received_at": float(i), "context": {"i": i}, "actions": lists[i % 4 if i < 9 else 3],
         "chosen": lists[i % 4 if i < 9 else 3][0]}
        for i in range(12)
    ]
    rows[5]["actions_json"] = None  # null actions: dropped
    path = write_snapshot(tmp_path / "s.parquet", rows, row_group_size=5)
    assert pq.ParquetFile(path).num_row_groups == 3
    loaded = load_snapshot(path, SPEC)
    kept = [r for r in rows if r.get("actions_json", "") is not None]
    assert loaded.dropped == 1 and loaded.ids == [r["id"] for r in kept]
    built = from_records([{"agent": "agent-1", "prob": 0.5, "reward": 1.0, **r} for r in kept], SPEC)
    assert_same_batch(loaded, Batch(**{**built.__dict__, "dropped": 1}))
    bad = [*rows[:7], dict(rows[7], id="late", actions_json="[not json")]
    with pytest.raises(SnapshotError, match="row 'late': actions is not valid JSON"):
        load_snapshot(write_snapshot(tmp_path / "bad.parquet", bad, row_group_size=5), SPEC)


def test_invalid_json_names_the_row(tmp_path):
    rows = [dict(ROWS[0], id="broken", context_json="{not json")]
    with pytest.raises(SnapshotError, match="row 'broken': context is not valid JSON") as info:
        load_snapshot(write_snapshot(tmp_path / "s.parquet", rows), SPEC)
    assert isinstance(info.value, TrainingError)


def test_each_distinct_action_list_is_held_once(tmp_path):
    rows = [dict(ROWS[i % 3], id=f"d{i}", received_at=float(i)) for i in range(30)]
    batch = load_snapshot(write_snapshot(tmp_path / "s.parquet", rows, row_group_size=7), SPEC)
    assert batch.action_sets.shape == (3, 3, SPEC.action_dim)
    np.testing.assert_array_equal(batch.action_set, np.arange(30) % 3)
    hasher = Hasher(SPEC)
    for i, row in enumerate(rows):
        n = len(row["actions"])
        np.testing.assert_array_equal(batch.actions[i, :n], hasher.actions(row["actions"]))
        assert not batch.actions[i, n:].any()
    np.testing.assert_array_equal(batch.chosen_actions, batch.actions[np.arange(30), batch.chosen])


def test_missing_file_is_a_snapshot_error(tmp_path):
    with pytest.raises(SnapshotError, match="absent.parquet: no such file"):
        load_snapshot(tmp_path / "absent.parquet", SPEC)


def test_missing_columns_are_named(tmp_path):
    pq.write_table(pa.table({"id": ["d0"], "agent": ["a"], "context": ["{}"]}), tmp_path / "s.parquet")
    with pytest.raises(SnapshotError, match="missing column.s. received_at, actions, chosen, prob, reward$"):
        load_snapshot(tmp_path / "s.parquet", SPEC)


def test_empty_snapshot_gives_empty_batch(tmp_path):
    batch = load_snapshot(write_snapshot(tmp_path / "s.parquet", []), SPEC)
    assert len(batch) == 0
    assert batch.context.shape == (0, SPEC.context_dim)
    assert batch.actions.shape == (0, 0, SPEC.action_dim)


def _timed(times):
    return from_records(
        [
            {"id": f"d{i}", "agent": "a", "received_at": t, "context": {}, "actions": ["x"], "chosen": "x",
             "prob": 1.0, "reward": float(i)}
            for i, t in enumerate(times)
        ],
        SPEC,
    )


def test_split_holdout_holds_out_the_newest_rows():
    times = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.0]
    train, holdout = split_holdout(_timed(times), 0.3)
    assert list(holdout.received_at) == [7.0, 8.0, 9.0]
    assert list(train.received_at) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # rows travel whole: the reward logged with t=9 was row 2's
    assert holdout.reward[-1] == 2.0 and holdout.ids[-1] == "d2"


def test_split_holdout_of_time_ordered_rows_shares_memory():
    batch = _timed([float(i) for i in range(10)])
    train, holdout = split_holdout(batch, 0.2)
    assert train.ids == [f"d{i}" for i in range(8)] and holdout.ids == ["d8", "d9"]
    assert np.shares_memory(train.context, batch.context) and np.shares_memory(holdout.action_set, batch.action_set)
    assert holdout.action_sets is batch.action_sets


@pytest.mark.parametrize(("n", "fraction", "expected"), [(2, 0.01, 1), (3, 0.99, 2), (1, 0.5, 0), (0, 0.5, 0)])
def test_split_holdout_sizes(n, fraction, expected):
    train, holdout = split_holdout(_timed([float(i) for i in range(n)]), fraction)
    assert len(holdout) == expected
    assert len(train) == n - expected


def assert_same_batch(got, want):
    for name in ("context", "actions", "mask", "chosen", "prob", "reward", "received_at"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert (got.ids, got.agents, got.action_ids, got.dropped) == (want.ids, want.agents, want.action_ids, want.dropped)


@pytest.mark.parametrize("ordered", [True, False])
def test_load_holdout_equals_the_holdout_of_a_full_load(tmp_path, ordered):
    rng = np.random.default_rng(0)
    times = np.arange(40.0) if ordered else rng.permutation(40).astype(float)
    rows = [
        {
            "id": f"d{i}",
            "received_at": float(t),
            "context": {"n": int(rng.integers(100)), "kind": str(rng.choice(["a", "b"]))},
            "actions": ["x", "y", {"id": "z", "features": {"cost": i}}][: 2 + i % 2],
            # every fifth row cannot be learned from
            "chosen": "w" if i % 5 == 0 else str(rng.choice(["x", "y"])),
            "reward": float(i),
        }
        for i, t in enumerate(times)
    ]
    path = write_snapshot(tmp_path / "s.parquet", rows)
    _, want = split_holdout(load_snapshot(path, SPEC), 0.25)
    got = load_holdout(path, SPEC, 0.25)
    assert len(got) == 8 and got.dropped == 8
    assert_same_batch(got, want)


def test_load_holdout_hashes_only_the_held_out_contexts(tmp_path):
    rows = [dict(ROWS[0], id="old", received_at=1.0, context_json="{not json"), ROWS[1], ROWS[2]]
    path = write_snapshot(tmp_path / "s.parquet", rows)
    with pytest.raises(SnapshotError, match="row 'old': context is not valid JSON"):
        load_snapshot(path, SPEC)
    assert load_holdout(path, SPEC, 0.5).ids == ["d1", "d2"]


def test_take_keeps_rows_aligned_and_the_load_drop_count():
    batch = _timed([0.0, 1.0, 2.0])
    batch = Batch(**{**batch.__dict__, "dropped": 4})
    sub = batch.take([2, 0])
    assert sub.ids == ["d2", "d0"]
    np.testing.assert_array_equal(sub.reward, [2.0, 0.0])
    assert sub.dropped == 4


def test_torch_free_modules_do_not_import_torch():
    code = (
        "import reflexd.learning.dataset, reflexd.trainer.fit, reflexd.plugins.learners, reflexd.exporters.onnx, sys; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

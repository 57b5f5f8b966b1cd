"""Knowledge extraction's inputs and vocabulary: snapshot rows flattened into readable features,
segments as conditions (their masks, their words, their ids), the result and inputs files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pytest

from reflexd.analysis import experience, segments
from reflexd.analysis.findings import Condition, ExtractionInputs
from reflexd.analysis.result import Failure, read_inputs, read_insights, write_insights
from reflexd.errors import AnalysisError


def _row(i: int, context: Any, **over: Any) -> dict[str, Any]:
    row = {
        "id": f"d{i}",
        "agent": "a",
        "received_at": float(i),
        "context": context if isinstance(context, str) else json.dumps(context),
        "actions": '["x", "y"]',
        "chosen": "x",
        "prob": 0.5,
        "reward": 1.0,
        "model_version": None,
        "outcomes": 1,
        "slot": None,
        "slate": None,
    }
    return row | over


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def test_contexts_are_flattened_into_numbers_and_categories() -> None:
    exp = experience.from_table(
        _table(
            [
                _row(0, {"task": "code", "difficulty": 0.5, "pro": True, "user": {"age": 30}, "tags": ["a", "b"]}),
                _row(1, {"task": "chat", "difficulty": 1, "pro": False}),
                _row(2, {"task": "chat"}),
            ]
        )
    )
    assert sorted(exp.features) == ["difficulty", "pro", "task", "user.age"]  # the list is left out
    task = exp.features["task"]
    assert [task.categories[c] for c in task.values] == ["code", "chat", "chat"]
    assert task.categories == ("chat", "code")  # most frequent first
    assert np.isnan(exp.features["difficulty"].values[2])
    assert exp.features["difficulty"].values[:2].tolist() == [0.5, 1.0]
    pro = exp.features["pro"]
    assert [pro.categories[c] if c >= 0 else None for c in pro.values] == ["true", "false", None]
    assert exp.features["user.age"].values[0] == 30


def test_unusable_rows_are_dropped_and_counted() -> None:
    exp = experience.from_table(
        _table(
            [
                _row(0, {"k": "v"}),
                _row(1, {"k": "v"}, chosen="z"),  # not among its actions
                _row(2, {"k": "v"}, prob=0.0),
                _row(3, {"k": "v"}, reward=float("nan")),
                _row(4, {"k": "v"}, slot=1, slate="s"),  # a slate's later slot
                _row(5, {"k": "v"}, slot=0, slate="s"),  # its first slot is a decision like any
                _row(6, "[1, 2]"),  # not an object
                _row(7, {"k": "v"}, actions="not json"),
                {**_row(8, {}), "context": None},
            ]
        )
    )
    assert len(exp) == 2 and exp.dropped == 7
    assert exp.received_at.tolist() == [0.0, 5.0]


def test_a_key_holding_numbers_and_text_is_categorical_and_the_run_says_so() -> None:
    exp = experience.from_table(_table([_row(0, {"k": 3}), _row(1, {"k": "three"}), _row(2, {"k": 0.5})]))
    k = exp.features["k"]
    assert sorted(k.categories or ()) == ["0.5", "3", "three"]
    assert any("flattened one by one" in note for note in exp.notes)


def test_identifiers_are_left_out_as_segments_nobody_could_act_on() -> None:
    rows = [_row(i, {"request_id": f"r{i}", "task": "code" if i % 2 else "chat"}) for i in range(300)]
    exp = experience.from_table(_table(rows))
    assert "request_id" not in exp.features and "task" in exp.features
    assert any("request_id" in note for note in exp.notes)


def test_agents_are_grouped_each_in_time_order() -> None:
    rows = [_row(i, {"k": "v"}, agent="b" if i % 2 else "a", received_at=float(10 - i)) for i in range(6)]
    exp = experience.from_table(_table(rows))
    for index in range(len(exp.agents)):
        t = exp.received_at[exp.rows_of(index)]
        assert len(t) == 3 and np.all(np.diff(t) >= 0)


def test_a_snapshot_file_that_is_missing_or_incomplete_is_an_analysis_error(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    with pytest.raises(AnalysisError, match="no such file"):
        experience.from_parquet(str(tmp_path / "nope.parquet"))
    pq.write_table(pa.table({"agent": ["a"]}), tmp_path / "thin.parquet")
    with pytest.raises(AnalysisError, match="missing column"):
        experience.from_parquet(str(tmp_path / "thin.parquet"))


# ---- segments ------------------------------------------------------------------------------


def _features() -> dict[str, experience.Feature]:
    exp = experience.from_table(
        _table(
            [
                _row(0, {"tier": "pro", "x": 0.6}),
                _row(1, {"tier": "free", "x": 0.7}),
                _row(2, {"x": 0.1}),
                _row(3, {"tier": "free"}),
            ]
        )
    )
    return exp.features


def test_a_condition_never_holds_where_the_feature_is_absent() -> None:
    f = _features()
    assert segments.mask([Condition("tier", "!=", "pro")], f, 4).tolist() == [False, True, False, True]
    assert segments.mask([Condition("x", "<=", 0.6)], f, 4).tolist() == [True, False, True, False]
    assert segments.mask([Condition("x", ">", 0.6)], f, 4).tolist() == [False, True, False, False]
    assert segments.mask([Condition("missing", "!=", "a")], f, 4).tolist() == [False] * 4
    assert segments.mask([Condition("tier", "in", ["pro", "free"]), Condition("x", ">", 0.5)], f, 4).tolist() == [
        True, True, False, False,
    ]
    assert segments.mask([], f, 4).all()


def test_a_tree_path_reads_the_short_way_round() -> None:
    tier = segments.Column("tier", "free", ("free", "pro"))
    task = segments.Column("task", "code", ("chat", "code", "math", "search"))
    task2 = segments.Column("task", "chat", ("chat", "code", "math", "search"))
    x = segments.Column("x")
    path = [(tier, True, 0.5), (x, False, 0.60012), (x, False, 0.2), (x, True, 0.91), (task, True, 0.5), (task2, True, 0.5)]
    assert segments.simplify(path) == [
        Condition("task", "not in", ["chat", "code"]),
        Condition("tier", "==", "pro"),
        Condition("x", ">", 0.6),
        Condition("x", "<=", 0.91),
    ]
    assert segments.describe(segments.simplify(path)) == "task not in {chat, code} and tier = pro and x > 0.6 and x <= 0.91"
    assert segments.describe([]) == "everywhere"


def test_rule_ids_are_stable_and_ignore_the_order_of_conditions() -> None:
    a = [Condition("x", ">", 0.5), Condition("task", "==", "code")]
    assert segments.rule_id("ag", "a", "b", a) == segments.rule_id("ag", "a", "b", list(reversed(a)))
    assert segments.rule_id("ag", "a", "b", a) != segments.rule_id("ag", "b", "a", a)
    # stored with each rule and compared across runs and versions: a change here orphans every rule
    assert segments.rule_id("ag", "a", "b", a) == "b0e3b9633394a85e"


# ---- files ---------------------------------------------------------------------------------


def test_a_failure_written_as_the_result_is_read_back_as_an_analysis_error(tmp_path: Path) -> None:
    write_insights(tmp_path, Failure("snapshot x: no such file"))
    with pytest.raises(AnalysisError, match="no such file"):
        read_insights(tmp_path)
    with pytest.raises(AnalysisError, match="wrote no"):
        read_insights(tmp_path / "empty")


def test_inputs_that_do_not_decode_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "inputs.json"
    path.write_bytes(msgspec.json.encode({"now": 1.0, "rules": [], "surprise": 1}))
    with pytest.raises(AnalysisError, match="surprise"):
        read_inputs(path)
    path.write_bytes(msgspec.json.encode(ExtractionInputs(now=5.0, dead_letters=[1.0, 2.0])))
    assert read_inputs(path).dead_letters == [1.0, 2.0]

"""``reflexd query`` and ``reflexd export`` on a real DuckDB file opened read-only (the daemon
stopped), with its Parquet archive: results as table, JSON and CSV, SQL that is refused and why,
the three export formats, and the DSJSON export read by the real Vowpal Wabbit."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import vowpalwabbit

from reflexd.config import Config, parse_config
from reflexd.errors import QueryError, StoreInUse, UsageError
from reflexd.service.store import Store
from reflexd.tools import exporter, readout
from reflexd.tools.importer import Record, parse_dsjson, parse_ndjson
from reflexd.wire.protocol import Decision, Outcome, Step

DAY = 86400.0
NOW = 100 * DAY

# contexts VW's JSON parser trips on unless the export rewrites them: keys it reads as its own,
# lists of strings, nested and mixed lists, booleans in lists
AWKWARD = [
    {"task": "code", "user": {"tier": "pro", "age": 31}, "tokens": [812, 40]},
    {"_label_cost": 99, "_multi": 1, "_text": "a b", "ok": True},
    {"tags": ["red", "_blue"], "grid": [[1, 2], [3]], "mixed": [1, "a", None, {"z": 1}, True], "none": None},
    {"flags": [True, False], "empty": [], "deep": {"a": {"b": {"c": [{"d": "e f"}]}}}, "unicode": "ä|b:c d"},
    {},
]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse_config(f"state_dir: {tmp_path / 'state'}\nrewards: {{wait_window: 60, default: -0.5}}\n")


def fill(config: Config) -> dict[str, Any]:
    """Decisions over awkward contexts: archived ones (day 10), live ones (day 99.9) and one still in
    its wait window; two outcomes for one decision, none for another."""
    with Store(config.db_path) as store:
        old = [
            Decision(id=f"old{i}", agent="a", context=AWKWARD[i % len(AWKWARD)], actions=["x", "y", "z"], chosen="y",
                     prob=0.2, probs=[0.5, 0.2, 0.3], ts=10 * DAY + i, model_version="v0001")
            for i in range(5)
        ]
        store.write(old + [Outcome(decision_id=d.id, reward=float(i), id=f"o-old{i}") for i, d in enumerate(old)],
                    received_at=10 * DAY)
        live = [
            Decision(id=f"new{i}", agent="b" if i % 2 else "a", context=AWKWARD[i % len(AWKWARD)],
                     actions=[{"id": "x", "features": {"cost": 1, "_internal": "k", "id": "shadowed"}}, "y"],
                     chosen="x", prob=0.9, ts=99.9 * DAY + i)
            for i in range(5)
        ]
        outcomes = [Outcome(decision_id="new0", reward=1.0, id="o-a"), Outcome(decision_id="new0", reward=2.0, id="o-b"),
                    Outcome(decision_id="new2", reward=0.25, id="o-c"), Outcome(decision_id="gone", reward=3.0, id="o-orphan", agent="a", ts=99.9 * DAY)]
        store.write(live + outcomes + [Step(agent="a", episode="e", index=4, observation={"o": 1}, action="up", id="s1")],
                    received_at=99.9 * DAY)
        store.write([Decision(id="fresh", agent="a", context={}, actions=["x", "y"], chosen="x", prob=0.5, ts=NOW)],
                    received_at=NOW - 10)  # its 60 s wait window is not over at NOW
        store.record_model_event("v0001", "promoted", {"reason": "test"}, at=5.0)
        assert store.archive(50 * DAY, config.archive_path, "zstd")["decisions"] == 5
        return {"live": live, "old": old}


@pytest.fixture
def source(config: Config):
    fill(config)
    with readout.from_store(config) as found:
        found.now = NOW  # as if read at NOW, so the wait windows are what the test says
        yield found


def query(source: readout.Source, sql: str, shape: str = "json") -> Any:
    out = io.StringIO()
    result = readout.run_query(source, sql)
    if shape == "json":
        readout.write_json(result, out)
        return json.loads(out.getvalue())
    if shape == "csv":
        readout.write_csv(result, out)
        return list(csv.reader(io.StringIO(out.getvalue())))
    readout.write_table(result, out, max_rows=3, width=12)
    return out.getvalue()


# ---- query -----------------------------------------------------------------------------------


def test_the_views_hold_live_and_archived_rows_once_in_the_outside_form(source: readout.Source) -> None:
    rows = query(source, "SELECT id, agent, context, probs FROM decisions ORDER BY id")
    assert [r["id"] for r in rows] == ["fresh", *(f"new{i}" for i in range(5)), *(f"old{i}" for i in range(5))]
    old0 = next(r for r in rows if r["id"] == "old0")
    assert old0["context"] == AWKWARD[0] and old0["probs"] == [0.5, 0.2, 0.3]  # JSON nested, not text
    described = {r["column_name"]: r["column_type"] for r in query(source, "DESCRIBE steps")}
    assert described["index"] == "INTEGER" and described["observation"] == "JSON" and "idx" not in described
    assert query(source, "SELECT context->>'task' AS task FROM decisions WHERE id = 'old0'") == [{"task": "code"}]
    assert query(source, 'SELECT count(*) AS n FROM outcomes') == [{"n": 9}]
    assert query(source, "SELECT version, detail FROM models") == [{"version": "v0001", "detail": {"reason": "test"}}]


def test_query_prints_a_table_and_csv(source: readout.Source) -> None:
    table = query(source, "SELECT id, context, model_version FROM decisions ORDER BY id", shape="table")
    lines = table.splitlines()
    assert lines[0].split() == ["id", "context", "model_version"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split()[0] == "fresh" and "NULL" in lines[2]
    assert "…" in table  # cells cut at the width
    assert lines[-1] == "(11 rows, the first 3 shown (--max-rows, or --csv / --json for all))"
    rows = query(source, "SELECT id, model_version, context FROM decisions WHERE id IN ('new4', 'old1') ORDER BY id", "csv")
    assert rows[0] == ["id", "model_version", "context"]
    assert rows[1] == ["new4", "", json.dumps(AWKWARD[4], separators=(",", ":"))]
    assert rows[2][:2] == ["old1", "v0001"] and json.loads(rows[2][2]) == AWKWARD[1]


@pytest.mark.parametrize(
    "sql, says",
    [
        ("SELECT * FROM decision", ['Table with name decision does not exist', 'Did you mean "decisions"', "tables: decisions, outcomes"]),
        ("SELECT nope FROM decisions", ['Referenced column "nope" not found']),
        ("SELEC 1", ["syntax error", "SELEC"]),
        ("DELETE FROM decisions", ["not DELETE", "queries only"]),
        ("DROP VIEW decisions", ["not DROP"]),
        ("COPY decisions TO '/tmp/x.csv'", ["not COPY"]),
        ("ATTACH '/tmp/other.duckdb'", ["not ATTACH"]),
        ("INSTALL httpfs", ["not LOAD"]),
        ("LOAD httpfs", ["not LOAD"]),
        ("SET enable_external_access = true", ["not SET"]),
        ("SELECT 1; SELECT 2", ["one statement at a time"]),
        ("", ["no SQL statement"]),
        # EXPLAIN ANALYZE runs what it explains: only a query may follow EXPLAIN
        ("EXPLAIN ANALYZE COPY (SELECT 'v9999' AS x) TO '{out}' (FORMAT csv, HEADER false)", ["not EXPLAIN of COPY"]),
        ("/* ä */ explain  analyse  -- a comment\n COPY decisions TO '{out}'", ["not EXPLAIN of COPY"]),
        ("EXPLAIN (ANALYZE, FORMAT json) COPY decisions TO '{out}'", ["not EXPLAIN of COPY"]),
        ("EXPLAIN COPY decisions TO '{out}'", ["not EXPLAIN of COPY"]),
        ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", ["not EXPLAIN of CREATE"]),
        ("EXPLAIN ANALYZE VERBOSE COPY decisions TO '{out}'", ["cannot be read"]),
        # what a query reads is the Source's own files, nothing else
        ("SELECT * FROM read_csv('/etc/passwd')", ["Permission Error", "/etc/passwd", "and no other file"]),
        ("SELECT * FROM read_text('{out}')", ["Permission Error", "and no other file"]),
        ("SELECT * FROM read_text('{state}/spool/x')", ["Permission Error"]),
        ("SELECT * FROM read_parquet('{archive}/../../x/*.parquet')", ["Permission Error"]),
        ("SELECT * FROM glob('/etc/*')", ["Permission Error"]),
    ],
)
def test_sql_that_is_refused_says_why(source: readout.Source, sql: str, says: list[str], tmp_path: Path) -> None:
    out = tmp_path / "CURRENT"
    out.write_text("v0001\n")
    sql = sql.replace("{out}", str(out)).replace("{state}", str(tmp_path / "state"))
    sql = sql.replace("{archive}", str(tmp_path / "state" / "archive" / "decisions"))
    with pytest.raises(QueryError) as refused:
        readout.run_query(source, sql)
    assert all(part in str(refused.value) for part in says), str(refused.value)
    assert out.read_text() == "v0001\n" and sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "state"]


def test_explain_of_a_query_runs_and_the_locked_down_source_still_reads(source: readout.Source) -> None:
    assert query(source, "EXPLAIN SELECT count(*) FROM decisions", "csv")[0] == ["explain_key", "explain_value"]
    plan = query(source, "EXPLAIN ANALYZE SELECT count(*) FROM decisions")
    assert plan and source.locked
    assert query(source, "SELECT count(*) AS n FROM decisions") == [{"n": 11}]  # the archive's files too
    assert query(source, "EXPLAIN (FORMAT json) SELECT 1") != []


def test_reading_leaves_the_database_file_as_it_was(config: Config) -> None:
    fill(config)
    before = hashlib.sha256(config.db_path.read_bytes()).hexdigest()
    with readout.from_store(config) as found:
        query(found, "SELECT count(*) FROM decisions")
        with pytest.raises(QueryError):
            readout.run_query(found, "INSERT INTO decisions SELECT * FROM decisions")
    assert hashlib.sha256(config.db_path.read_bytes()).hexdigest() == before


def test_a_store_another_process_holds_is_named(config: Config) -> None:
    fill(config)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(config.db_path)!r}); print('open', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreInUse, match=rf"pid {holder.pid}"):
            readout.from_store(config)
    finally:
        holder.communicate("", timeout=60)
    with pytest.raises(QueryError, match="no store at"):
        readout.from_store(parse_config(f"state_dir: {config.state_path / 'elsewhere'}"))


# ---- export ----------------------------------------------------------------------------------


def test_ndjson_export_is_what_import_reads(source: readout.Source, tmp_path: Path) -> None:
    out = tmp_path / "all.ndjson"
    counts = exporter.export(source, "ndjson", str(out), exporter.Window())
    assert counts == {"decisions": 11, "outcomes": 9}
    records = [i for i in parse_ndjson(out) if isinstance(i, Record)]
    assert len(records) == 20
    decisions = {r.message.id: r.message for r in records if isinstance(r.message, Decision)}
    stored = query(source, "SELECT * FROM decisions")
    for row in stored:
        d = decisions[row["id"]]
        assert (d.agent, d.context, d.chosen, d.prob, d.probs, d.model_version, d.ts, d.slot) == (
            row["agent"], row["context"], row["chosen"], row["prob"], row["probs"], row["model_version"], row["ts"], row["slot"]
        )
        assert msgspec_plain(d.actions) == row["actions"]
    outcomes = {r.message.id: r.message for r in records if isinstance(r.message, Outcome)}
    assert {o: (m.decision_id, m.reward) for o, m in outcomes.items()} == {
        r["id"]: (r["decision_id"], r["reward"]) for r in query(source, "SELECT * FROM outcomes")
    }
    # one agent's, from a time on: its outcomes come along, and the orphan by its own agent and time
    window = exporter.Window(agent="a", since=99 * DAY)
    counts = exporter.export(source, "ndjson", str(tmp_path / "a.ndjson"), window)
    assert counts == {"decisions": 4, "outcomes": 4}  # new0, new2, new4, fresh; o-a, o-b, o-c, o-orphan


def msgspec_plain(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value)


def test_parquet_export_writes_a_file_per_table_with_string_json(source: readout.Source, tmp_path: Path) -> None:
    out = tmp_path / "pq"
    counts = exporter.export(source, "parquet", str(out), exporter.Window())
    assert counts == {"decisions": 11, "outcomes": 9, "steps": 1, "events": 0, "dead_letters": 0, "models": 1}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}.parquet" for t in counts)
    decisions = pq.read_table(out / "decisions.parquet")
    assert decisions.schema.field("context").type == pa.string() and decisions.num_rows == 11
    assert pq.read_table(out / "steps.parquet").column("index").to_pylist() == [4]

    one = exporter.export(source, "parquet", str(tmp_path / "pq-a"), exporter.Window(agent="b"))
    assert one == {"decisions": 2, "outcomes": 0, "steps": 0, "events": 0}  # no dead letters or model events
    with pytest.raises(UsageError, match="new or empty folder"):
        exporter.export(source, "parquet", str(out), exporter.Window())


def vw_reads(path: Path) -> list[list[tuple[int, float, float]]]:
    """Each line parsed by Vowpal Wabbit (a parse error raises) and learned from: the CB labels of
    its examples, the shared one first."""
    vw = vowpalwabbit.Workspace("--cb_explore_adf --dsjson --quiet --strict_parse")
    labels = []
    try:
        for line in path.read_text().splitlines():
            examples = vw.parse(line)
            labels.append(
                [(c.action, c.cost, c.probability) for e in examples
                 for c in e.get_label(vowpalwabbit.LabelType.CONTEXTUAL_BANDIT).costs]
            )
            labels[-1].append(len(examples))  # type: ignore[arg-type]
            vw.learn(examples)
            vw.finish_example(examples)
    finally:
        vw.finish()
    return labels


def test_dsjson_export_is_read_by_vowpal_wabbit_with_costs_and_probabilities(source: readout.Source, tmp_path: Path) -> None:
    out = tmp_path / "all.dsjson"
    counts = exporter.export(source, "dsjson", str(out), exporter.Window())
    assert counts == {"decisions": 10, "not_matured": 1}  # fresh is still in its wait window
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["EventId"] for line in lines] == [*(f"old{i}" for i in range(5)), *(f"new{i}" for i in range(5))]

    # the reward joined as training joins it: sum within the wait window, else the default (-0.5)
    expected = {f"old{i}": float(i) for i in range(5)} | {"new0": 3.0, "new1": -0.5, "new2": 0.25, "new3": -0.5, "new4": -0.5}
    labels = vw_reads(out)
    for line, label in zip(lines, labels):
        n_actions = len(line["c"]["_multi"])
        assert label[-1] == n_actions + 1, f"VW did not read all of {line['EventId']}: {label}"
        shared, chosen = label[0], label[1]
        assert shared[2] == -1.0  # VW's mark of the shared example
        action, cost, probability = chosen
        assert action == line["_labelIndex"] + 1 == line["_label_Action"]
        assert cost == pytest.approx(-expected[line["EventId"]]) and line["_label_cost"] == -expected[line["EventId"]]
        assert probability == pytest.approx(0.2 if line["EventId"].startswith("old") else 0.9)
    old0, new0 = lines[0], lines[5]
    assert old0["a"] == [2, 1, 3] and old0["p"] == [0.2, 0.5, 0.3] and old0["VWState"] == {"m": "v0001"}
    assert old0["Timestamp"] == "1970-01-11T00:00:00.0000000Z" and [o["v"] for o in old0["o"]] == [0.0]
    assert new0["a"] == [1] and new0["p"] == [0.9] and "VWState" not in new0 and [o["v"] for o in new0["o"]] == [1.0, 2.0]
    # VW's own keys in a context are escaped; the action's id is its "id" feature
    assert lines[1]["c"]["x_label_cost"] == 99 and lines[1]["c"]["x_multi"] == 1 and "_text" not in lines[1]["c"]
    assert new0["c"]["_multi"][0] == {"id": "x", "cost": 1, "x_internal": "k", "x_id": "shadowed"}
    assert lines[2]["c"]["tags"] == {"red": True, "x_blue": True}

    # VW reads the whole file too, every line an example
    vw = vowpalwabbit.Workspace(f"--cb_explore_adf --dsjson --quiet -d {out}")
    try:
        vw.run_parser()
        assert vw.get_weighted_examples() == 10
    finally:
        vw.finish()

    # and reflexd reads it back: the same decisions, chosen actions, probabilities and rewards
    items = [i for i in parse_dsjson(out, agent="again") if isinstance(i, Record)]
    back = {i.message.id: i.message for i in items if isinstance(i.message, Decision)}
    rewards = {i.message.decision_id: i.message.reward for i in items if isinstance(i.message, Outcome)}
    assert rewards == expected
    assert back["old0"].chosen == "y" and back["old0"].probs == [0.5, 0.2, 0.3] and back["new0"].chosen == "x"


def test_export_refuses_what_it_cannot_write(source: readout.Source, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--out DIR"):
        exporter.export(source, "parquet", "-", exporter.Window())
    with pytest.raises(UsageError, match="unknown format"):
        exporter.export(source, "csv", str(tmp_path / "x"), exporter.Window())
    assert not (tmp_path / "x").exists()


def test_archive_files_of_earlier_versions_read_beside_new_ones(config: Config) -> None:
    """Files written before this version: JSON columns typed JSON, steps' idx, no slot and slate."""
    fill(config)
    steps = config.archive_path / "steps" / "agent=a" / "date=1970-01-02"
    steps.mkdir(parents=True)
    duckdb.sql(
        "COPY (SELECT 'old-step' AS id, 'e' AS episode, 3::INTEGER AS idx, '{\"o\": 2}'::JSON AS observation, 'x' AS action,"
        f" 0.0 AS reward, false AS done, 1.0 AS ts, 1.0 AS received_at) TO '{steps}/part-old.parquet' (FORMAT parquet)"
    )
    decisions = config.archive_path / "decisions" / "agent=a" / "date=1970-01-02"
    decisions.mkdir(parents=True)
    duckdb.sql(
        "COPY (SELECT 'old-decision' AS id, 1.0 AS ts, 1.0 AS received_at, '{\"k\": 1}'::JSON AS context,"
        " '[\"x\"]'::JSON AS actions, 'x' AS chosen, 1.0 AS prob, NULL::JSON AS probs, NULL AS model_version,"
        f" NULL AS strategy) TO '{decisions}/part-old.parquet' (FORMAT parquet)"
    )
    with readout.from_store(config) as found:
        assert query(found, 'SELECT id, "index", observation FROM steps ORDER BY id') == [
            {"id": "old-step", "index": 3, "observation": {"o": 2}}, {"id": "s1", "index": 4, "observation": {"o": 1}}
        ]
        old = query(found, "SELECT context, slot, slate FROM decisions WHERE id = 'old-decision'")
        assert old == [{"context": {"k": 1}, "slot": None, "slate": None}]

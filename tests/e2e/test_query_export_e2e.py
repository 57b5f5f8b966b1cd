"""Getting the data out of a running daemon: ``reflexd query`` while it holds its DuckDB file and
archives, ``reflexd export`` round trips through ``reflexd import`` and Vowpal Wabbit, the
snapshots it keeps, and archive pruning where archiving runs. Real daemons, the real command line."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import vowpalwabbit

from conftest import DaemonProcess, wait_for
from reflexd.errors import RequestFailed
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Decision, Flush, Forget, Outcome, Snapshot

pytestmark = pytest.mark.e2e

VW_LOG = Path(__file__).resolve().parents[1] / "data" / "vw" / "dsjson_cb_part1.json"


def reflexd(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "reflexd", *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == code, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done


def query(d: DaemonProcess, sql: str, *flags: str) -> Any:
    done = reflexd("query", "--socket", d.socket, "--json", *flags, sql)
    assert done.stderr == "", done.stderr
    return json.loads(done.stdout)


def send(d: DaemonProcess, events: list[Any]) -> None:
    with Connection(d.socket, timeout=60) as conn:
        conn.send([*events, Flush(loaded=True)])
        conn.receive()


def experience(prefix: str, n: int, agent: str = "router") -> list[Any]:
    events: list[Any] = []
    for i in range(n):
        did = f"{prefix}{i}"
        events.append(
            Decision(id=did, agent=agent if i % 3 else "feed", context={"task": ["code", "chat"][i % 2], "n": i},
                     actions=["small", {"id": "large", "features": {"cost": 10}}], chosen="large" if i % 2 else "small",
                     prob=0.6 if i % 2 else 0.4, probs=[0.4, 0.6], model_version=None if i % 4 else "v0001",
                     strategy="squarecb", ts=1_767_225_600.0 + i)
        )
        events += [Outcome(decision_id=did, reward=float(i % 2), id=f"o-{did}"),
                   Outcome(decision_id=did, reward=0.5, id=f"o2-{did}", agent=agent)][: 1 + i % 2]
    return events


def snapshot_folders(d: DaemonProcess) -> list[str]:
    folder = d.state_dir / "snapshots"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_query_reads_the_running_daemon_each_row_once_while_it_archives(daemon_factory: Any) -> None:
    # rows move to the archive under a second after they arrive, so queries race the archiving
    d = daemon_factory({"retention": {"days": 1e-5, "check_interval": 0.1}})
    send(d, experience("a", 30))
    wait_for(lambda: list((d.state_dir / "archive" / "decisions").rglob("*.parquet")), 30, "rows to be archived")
    send(d, experience("b", 20))
    for _ in range(5):
        assert query(d, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM decisions") == [{"n": 50, "ids": 50}]
        assert query(d, "SELECT count(*) AS n FROM outcomes") == [{"n": 75}]
    assert snapshot_folders(d) == []  # each query released its snapshot

    rows = query(d, "SELECT id, agent, context, actions, probs, model_version FROM decisions WHERE id IN ('a1', 'b4') ORDER BY id")
    assert rows == [
        {"id": "a1", "agent": "router", "context": {"task": "chat", "n": 1},
         "actions": ["small", {"id": "large", "features": {"cost": 10}}], "probs": [0.4, 0.6], "model_version": None},
        {"id": "b4", "agent": "router", "context": {"task": "code", "n": 4},
         "actions": ["small", {"id": "large", "features": {"cost": 10}}], "probs": [0.4, 0.6], "model_version": "v0001"},
    ]
    # without the archive: only what DuckDB still holds
    live = query(d, "SELECT count(*) AS n FROM decisions", "--no-archive")[0]["n"]
    assert live < 50

    table = reflexd("query", "--socket", d.socket, "SELECT agent, count(*) AS n FROM decisions GROUP BY agent ORDER BY agent")
    assert table.stdout.splitlines() == ["agent   n", "------  --", "feed    17", "router  33", "(2 rows)"]
    csv_out = reflexd("query", "--socket", d.socket, "--csv", "SELECT id, reward FROM outcomes WHERE id = 'o-a3'")
    assert csv_out.stdout == "id,reward\no-a3,1.0\n"


def test_bad_sql_is_named_and_nothing_is_left_behind(daemon: DaemonProcess) -> None:
    bad = reflexd("query", "--socket", daemon.socket, "SELECT * FROM decisons", code=1)
    assert bad.stdout == "" and "decisons does not exist" in bad.stderr and 'Did you mean "decisions"' in bad.stderr
    refused = reflexd("query", "--socket", daemon.socket, "DELETE FROM decisions", code=1)
    assert "not DELETE" in refused.stderr
    # EXPLAIN ANALYZE runs what it explains: a COPY that would rewrite the registry's pointer is refused
    pointer = daemon.state_dir / "models" / "CURRENT"
    before = pointer.read_bytes() if pointer.exists() else None
    sneaky = f"EXPLAIN ANALYZE COPY (SELECT 'v9999' AS x) TO '{pointer}' (FORMAT csv, HEADER false)"
    assert "not EXPLAIN of COPY" in reflexd("query", "--socket", daemon.socket, sneaky, code=1).stderr
    assert (pointer.read_bytes() if pointer.exists() else None) == before
    outside = reflexd("query", "--socket", daemon.socket, "SELECT * FROM read_csv('/etc/passwd')", code=1)
    assert "Permission Error" in outside.stderr and outside.stdout == ""
    assert snapshot_folders(daemon) == []


def test_snapshots_are_bounded_group_readable_and_forgotten(daemon: DaemonProcess) -> None:
    send(daemon, experience("d", 6))
    taken = [daemon.request(Snapshot()) for _ in range(4)]
    assert all(t.rows["decisions"] == 6 for t in taken)
    assert sorted(t.id for t in taken) == snapshot_folders(daemon)
    assert all(Path(f).stat().st_mode & 0o777 == 0o640 for f in taken[0].tables.values())
    with pytest.raises(RequestFailed) as refused:
        daemon.request(Snapshot())
    assert refused.value.code == "snapshot_refused"
    # forget: no snapshot may keep the agent's rows
    done = daemon.request(Forget(agent="router"), timeout=120)
    assert "4 query snapshots" in done.message
    assert snapshot_folders(daemon) == []
    assert query(daemon, "SELECT DISTINCT agent FROM decisions") == [{"agent": "feed"}]


def stored(d: DaemonProcess) -> tuple[list[Any], list[Any]]:
    decisions = query(d, "SELECT * EXCLUDE (received_at) FROM decisions ORDER BY id")
    outcomes = query(d, "SELECT * EXCLUDE (received_at) FROM outcomes ORDER BY id")
    return decisions, outcomes


def test_an_ndjson_export_imported_into_a_fresh_daemon_gives_the_same_data(daemon_factory: Any, tmp_path: Path) -> None:
    first = daemon_factory()
    send(first, experience("e", 40))
    out = tmp_path / "experience.ndjson"
    summary = json.loads(reflexd("export", "--socket", first.socket, "--format", "ndjson", "--out", str(out), "--json").stdout)
    assert summary == {"format": "ndjson", "out": str(out), "counts": {"decisions": 40, "outcomes": 60}}

    second = daemon_factory()
    imported = json.loads(reflexd("import", str(out), "--socket", second.socket, "--json").stdout)
    assert imported["decisions"] == 40 and imported["outcomes"] == 60 and imported["rejected_lines"] == 0
    decisions, outcomes = stored(first)
    assert len(decisions) == 40 and len(outcomes) == 60
    assert stored(second) == (decisions, outcomes)

    # to stdout, one agent's: what import reads too
    piped = reflexd("export", "--socket", first.socket, "--agent", "feed")
    lines = [json.loads(line) for line in piped.stdout.splitlines()]
    assert {line["type"] for line in lines} == {"decision", "outcome"}
    assert sum(line["type"] == "decision" for line in lines) == 14 and "exported 14 decisions" in piped.stderr


def test_a_vw_log_imported_comes_back_out_as_dsjson_vw_reads(daemon: DaemonProcess, tmp_path: Path) -> None:
    reflexd("import", str(VW_LOG), "--socket", daemon.socket, "--agent", "coffee")
    logged = {line["EventId"]: line for line in map(json.loads, VW_LOG.read_text().splitlines())}
    out = tmp_path / "coffee.dsjson"

    def exported() -> dict[str, int] | None:
        done = reflexd("export", "--socket", daemon.socket, "--format", "dsjson", "--agent", "coffee", "--out", str(out), "--json")
        counts = json.loads(done.stdout)["counts"]
        return counts if counts["decisions"] == len(logged) else None  # once every wait window is over

    assert wait_for(exported, 60, "the imported decisions to mature") == {"decisions": 12, "not_matured": 0}
    vw = vowpalwabbit.Workspace("--cb_explore_adf --dsjson --quiet --strict_parse")
    try:
        for raw in out.read_text().splitlines():
            line = json.loads(raw)
            original = logged[line["EventId"]]
            examples = vw.parse(raw)
            assert len(examples) == 1 + len(original["c"]["_multi"])
            [label] = [c for e in examples[1:] for c in e.get_label(vowpalwabbit.LabelType.CONTEXTUAL_BANDIT).costs]
            assert (label.action, label.cost) == (original["_label_Action"], original["_label_cost"])
            assert label.probability == pytest.approx(original["_label_probability"], rel=1e-6)
            # the chosen action first, each action with its logged probability (the rest of VW's ranking
            # is not stored: reflexd lists them likeliest first)
            assert line["a"][0] == original["a"][0]
            assert dict(zip(line["a"], line["p"])) == dict(zip(original["a"], original["p"]))
            vw.learn(examples)
            vw.finish_example(examples)
    finally:
        vw.finish()


def test_pruning_runs_where_archiving_runs_and_is_logged(daemon_factory: Any) -> None:
    d = daemon_factory({"retention": {"check_interval": 3600}})  # the first pass, then an hour's wait
    state = d.state_dir
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    table = pa.table({"id": ["x"], "ts": [1.0]})
    for day in ("2000-01-01", today, "2026-02-30"):  # the last names no day: left alone, logged
        folder = state / "archive" / "decisions" / "agent=a" / f"date={day}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part-0.parquet")
    # pruning switched on by a reload: a pass runs at once with the new settings, not after the hour
    d.write_config({**d.config, "retention": {"check_interval": 0.2, "archive_max_days": 60}})
    d.signal(signal.SIGHUP)

    def pruned() -> dict[str, Any] | None:
        for line in d.log_tail(100_000).splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "pruned the archive":
                return json.loads(line)
        return None

    logged = wait_for(pruned, 30, "the archive to be pruned")
    assert logged["partitions"] == 1 and logged["oldest_kept"] == today and logged["level"] == "info"
    assert not (state / "archive" / "decisions" / "agent=a" / "date=2000-01-01").exists()
    assert (state / "archive" / "decisions" / "agent=a" / f"date={today}" / "part-0.parquet").exists()
    assert (state / "archive" / "decisions" / "agent=a" / "date=2026-02-30" / "part-0.parquet").exists()
    # each pass logs it and goes on: the retention task, and the daemon, live on
    wait_for(lambda: d.log_tail(100_000).count("an archive folder names no day") >= 2, 30, "another pruning pass")
    assert d.running and d.request(Flush()) is not None


def test_query_reads_the_store_itself_once_the_daemon_stops(daemon: DaemonProcess) -> None:
    send(daemon, experience("s", 9))
    daemon.stop()
    done = reflexd("query", "--config", str(daemon.config_path), "--json", "SELECT count(*) AS n FROM decisions")
    assert json.loads(done.stdout) == [{"n": 9}]
    assert "not running" in done.stderr and "read-only" in done.stderr
    # without a config naming the store, a daemon that cannot be reached is all there is to say
    gone = reflexd("query", "--socket", daemon.socket, "SELECT 1", code=1)
    assert "cannot reach reflexd" in gone.stderr

"""The fleet reads a host's Parquet archive and joins it exactly as the host's own snapshot does.

Real parts: the store writes and archives (``Store.archive``), pyarrow.dataset reads the archive,
an in-memory DuckDB runs the shared join (``reflexd.learning.join``); the reference is the store's
own snapshot of the same rows taken before they were archived. No Ray here.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from reflexd.config import parse_config
from reflexd.errors import FleetError
from reflexd.features import FeatureSpec
from reflexd.fleet.archive import open_archive, read_host
from reflexd.fleet.train import shards, split_host
from reflexd.learning.dataset import from_table, load_snapshot
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, Outcome

CONFIG = parse_config(
    """
rewards: {wait_window: 10, default: -0.25, aggregation: sum}
agents:
  slow:
    rewards: {wait_window: 100, default: 9.0, aggregation: max}
  "team/b c":
    rewards: {wait_window: 10, default: 0.5, aggregation: last}
"""
)
NOW = 10_000.0


def _decision(i: int, agent: str) -> Decision:
    return Decision(
        id=f"d{i}",
        agent=agent,
        context={"i": i, "naïve": "ü", "tier": ["pro", "free"][i % 2]},
        actions=["left", {"id": "right", "features": {"cost": i % 3}}],
        chosen=["left", "right"][i % 2],
        prob=0.5,
        ts=100.0 + i,
        slot=0 if i % 7 == 0 else None,
        slate=f"s{i}" if i % 7 == 0 else None,
    )


def _host(root: Path) -> Store:
    """A host's store with the cases the join decides: aggregations, per-agent rules, outcomes
    past the wait window, decisions without outcomes, an agent whose name DuckDB percent-encodes."""
    store = Store(root / "reflexd.duckdb")
    agents = ["fast", "slow", "team/b c"]
    for batch in range(6):
        decisions = [_decision(batch * 10 + k, agents[k % 3]) for k in range(10)]
        store.write(decisions, received_at=100.0 + batch * 20)
    for i in range(0, 60, 2):
        store.write([Outcome(decision_id=f"d{i}", reward=float(i % 5), id=f"o{i}a", ts=200.0 + i)], 105.0 + i * 2)
        store.write([Outcome(decision_id=f"d{i}", reward=1.5, id=f"o{i}b", ts=300.0 + i)], 108.0 + i * 2)
    for i in range(1, 60, 9):  # late: past a 10 s window, inside a 100 s one
        store.write([Outcome(decision_id=f"d{i}", reward=40.0, id=f"late{i}", ts=500.0)], 100.0 + (i // 10) * 20 + 50)
    return store


def _rows(table) -> dict[str, dict]:
    return {r["id"]: r for r in table.to_pylist()}


def test_an_archived_host_joins_as_its_snapshot_did(tmp_path: Path) -> None:
    store = _host(tmp_path / "state")
    info = store.snapshot(tmp_path / "before.parquet", now=NOW, config=CONFIG, max_rows=1000)
    assert info.rows == 60
    moved = store.archive(older_than=NOW, root=tmp_path / "state" / "archive", compression="zstd")
    assert moved["decisions"] == 60 and moved["outcomes"] > 60
    store.close()

    host = read_host(str(tmp_path / "state" / "archive"), CONFIG, now=NOW)
    before = pq.read_table(tmp_path / "before.parquet")
    assert host.table.column_names == before.column_names
    assert host.table.to_pylist() == before.to_pylist()  # same rows, same order, same rewards
    assert (host.decisions, host.table.num_rows) == (60, 60)
    rows = _rows(host.table)
    assert rows["d1"]["agent"] == "slow" and rows["d1"]["outcomes"] == 1  # its late outcome counts there
    # its second outcome came 12 s after it, past its agent's 10 s window
    assert (rows["d2"]["agent"], rows["d2"]["reward"], rows["d2"]["outcomes"]) == ("team/b c", 2.0, 1)
    assert rows["d3"]["reward"] == -0.25  # no outcome: the default

    # the state directory names the archive too, as does a file:// URI; newest max_rows, one agent
    again = read_host(str(tmp_path / "state"), CONFIG, now=NOW)
    assert again.table.equals(host.table)
    assert read_host((tmp_path / "state" / "archive").as_uri(), CONFIG, now=NOW).table.equals(host.table)
    newest = read_host(str(tmp_path / "state"), CONFIG, now=NOW, max_rows=7)
    assert newest.table.to_pylist() == host.table.to_pylist()[-7:]
    slow = read_host(str(tmp_path / "state"), CONFIG, now=NOW, agent="team/b c")
    assert slow.table.to_pylist() == [r for r in host.table.to_pylist() if r["agent"] == "team/b c"]
    assert slow.table.num_rows == 18 and slow.decisions == 18  # its partitions alone were read

    # hashed in memory as the trainer hashes the snapshot file
    spec = FeatureSpec()
    a, b = from_table(host.table, spec), load_snapshot(str(tmp_path / "before.parquet"), spec)
    assert a.ids == b.ids and (a.context == b.context).all() and (a.actions == b.actions).all()
    assert (a.reward == b.reward).all() and (a.chosen == b.chosen).all()


def test_the_holdout_is_each_hosts_newest_and_the_shards_deal_every_row_once(tmp_path: Path) -> None:
    store = _host(tmp_path / "state")
    store.archive(older_than=NOW, root=tmp_path / "state" / "archive", compression="snappy")
    store.close()
    table = read_host(str(tmp_path / "state"), CONFIG, now=NOW).table
    train, holdout = split_host(table, 0.2)
    assert (train.num_rows, holdout.num_rows) == (48, 12)
    assert min(holdout.column("received_at").to_pylist()) >= max(train.column("received_at").to_pylist())
    dealt = shards(train, 3)
    assert [s.num_rows for s in dealt] == [16, 16, 16]
    assert sorted(i for s in dealt for i in s.column("id").to_pylist()) == sorted(train.column("id").to_pylist())


def test_what_is_not_a_hosts_archive_is_named(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="no decisions/ folder"):
        open_archive(str(tmp_path))
    with pytest.raises(FleetError, match="cannot open this filesystem"):
        open_archive("nosuchscheme://bucket/archive")
    # an archive whose outcomes were never archived: every decision takes its default reward
    store = Store(tmp_path / "h" / "reflexd.duckdb")
    store.write([_decision(3, "fast")], received_at=100.0)
    store.archive(older_than=time.time(), root=tmp_path / "h" / "archive", compression="zstd")
    store.close()
    (row,) = read_host(str(tmp_path / "h"), CONFIG, now=NOW).table.to_pylist()
    assert (row["id"], row["reward"], row["outcomes"]) == ("d3", -0.25, 0)


DAY = 86400.0
MIDNIGHT = 1_700_006_400.0  # 2023-11-15 00:00 UTC


def _days_host(root: Path, days: int, per_day: int) -> Path:
    """A host's archive of ``days`` UTC days, ``per_day`` decisions a day (agents fast and slow), an
    outcome for every other one, and outcomes received across midnight, before and after their decision."""
    store = Store(root / "reflexd.duckdb")
    for d in range(days):
        at = MIDNIGHT + d * DAY + 3600
        store.write(
            [
                Decision(id=f"d{d}-{k}", agent=("fast", "slow")[k % 2], context={"k": k}, actions=["left", "right"],
                         chosen="left", prob=0.5, ts=at + k)
                for k in range(per_day)
            ],
            received_at=at,
        )
        store.write([Outcome(decision_id=f"d{d}-{k}", reward=float(k), id=f"o{d}-{k}", ts=at + k) for k in range(0, per_day, 2)], at + 5)
        # just before midnight; its outcome comes just after, on the next day
        store.write([Decision(id=f"late{d}", agent="fast", context={}, actions=["left", "right"], chosen="right", prob=0.5, ts=at)],
                    MIDNIGHT + (d + 1) * DAY - 2)
        store.write([Outcome(decision_id=f"late{d}", reward=7.0, id=f"ol{d}", ts=at)], MIDNIGHT + (d + 1) * DAY + 2)
        # an outcome received the evening before its decision (from another connection)
        store.write([Outcome(decision_id=f"early{d}", reward=3.0, id=f"oe{d}", ts=at)], MIDNIGHT + d * DAY - 3)
        store.write([Decision(id=f"early{d}", agent="fast", context={}, actions=["left", "right"], chosen="right", prob=0.5, ts=at)],
                    MIDNIGHT + d * DAY + 1)
    moved = store.archive(older_than=MIDNIGHT + (days + 1) * DAY, root=root / "archive", compression="zstd")
    store.close()
    assert moved["decisions"] == days * (per_day + 2)
    return root / "archive"


def test_only_the_newest_days_the_rows_need_are_read(tmp_path: Path) -> None:
    archive = str(_days_host(tmp_path / "h", days=6, per_day=10))
    now = MIDNIGHT + 30 * DAY
    whole = read_host(archive, CONFIG, now=now, max_rows=10_000)
    rows = whole.table.to_pylist()
    assert (whole.decisions, len(rows)) == (72, 72)
    by_id = {r["id"]: r for r in rows}
    assert by_id["late2"]["reward"] == 7.0 and by_id["early3"]["reward"] == 3.0  # across midnight, both ways

    # the newest 15: the newest day holds 12 decisions, so two days are read, not all six
    newest = read_host(archive, CONFIG, now=now, max_rows=15)
    assert newest.table.to_pylist() == rows[-15:]
    assert newest.decisions == 24
    assert newest.decisions < whole.decisions and newest.outcomes < whole.outcomes

    # decisions not yet matured (slow waits 100 s) do not count: the read goes a day further back
    fresh = MIDNIGHT + 6 * DAY - 2 + 50  # late5 is 50 s old: past fast's 10 s window
    young = read_host(archive, CONFIG, now=fresh, max_rows=1)
    assert young.table.to_pylist() == read_host(archive, CONFIG, now=fresh, max_rows=10_000).table.to_pylist()[-1:]

    # since: the days before it (less one) are not read, nor the decisions made before it
    since = MIDNIGHT + 3 * DAY
    recent = read_host(archive, CONFIG, now=now, since=since, max_rows=10_000)
    made = {f"d{d}-{k}": MIDNIGHT + d * DAY + 3600 + k for d in range(6) for k in range(10)}
    made |= {f"{kind}{d}": MIDNIGHT + d * DAY + 3600 for d in range(6) for kind in ("late", "early")}
    assert recent.table.to_pylist() == [r for r in rows if made[r["id"]] >= since]
    assert recent.decisions == 36
    # one agent, newest few: its partitions alone, its newest day first
    slow = read_host(archive, CONFIG, now=now, agent="slow", max_rows=4)
    assert slow.table.to_pylist() == [r for r in rows if r["agent"] == "slow"][-4:]
    assert slow.decisions == 5


def test_credentials_in_an_archive_uri_are_not_recorded() -> None:
    from reflexd.fleet.archive import public_path

    assert public_path("s3://AKIAXXX:s3cr3t@bucket/hosts/a?region=eu-west-1") == "s3://bucket/hosts/a?region=eu-west-1"
    assert public_path("gs://user:pw@bucket/a") == "gs://bucket/a"
    assert public_path("hdfs://alice@namenode:8020/a") == "hdfs://namenode:8020/a"
    # abfs names the container where a user would be: only its password goes
    assert public_path("abfss://archives:KEY==@acct.dfs.core.windows.net/a") == "abfss://archives@acct.dfs.core.windows.net/a"
    assert (
        public_path("abfs://acct.blob.core.windows.net/c/a?client_id=app&client_secret=shh&sig=abc%3D")
        == "abfs://acct.blob.core.windows.net/c/a?client_id=app&client_secret=***&sig=***"
    )
    assert public_path("s3://bucket/a?access_key=AK&secret_key=SK&session_token=T") == "s3://bucket/a?access_key=***&secret_key=***&session_token=***"
    for local in ("/srv/h@1/archive", "relative/dir", "file:///srv/h/archive"):
        assert public_path(local) == local


def test_a_hosts_rows_and_errors_name_it_without_credentials(tmp_path: Path) -> None:
    store = _host(tmp_path / "state")
    store.archive(older_than=NOW, root=tmp_path / "state" / "archive", compression="zstd")
    store.close()
    host = read_host(str(tmp_path / "state"), CONFIG, now=NOW)
    assert host.path == str(tmp_path / "state")
    # pyarrow quotes the URI in its errors: the message names it without them
    with pytest.raises(FleetError) as refused:
        open_archive("nosuchscheme://AKIAXXX:s3cr3t@bucket/a?secret_key=sk123")
    assert "s3cr3t" not in str(refused.value) and "AKIAXXX" not in str(refused.value) and "sk123" not in str(refused.value)
    assert str(refused.value).startswith("nosuchscheme://bucket/a?secret_key=***: pyarrow cannot open this filesystem")


def test_an_outcome_archived_after_its_decision_still_joins_it(tmp_path: Path) -> None:
    """Archived in a later pass than its decision, an outcome naming no agent is filed under '_'."""
    store = Store(tmp_path / "state" / "reflexd.duckdb")
    store.write([_decision(1, "fast"), _decision(2, "fast")], received_at=100.0)
    root = tmp_path / "state" / "archive"
    assert store.archive(older_than=101.0, root=root, compression="zstd")["decisions"] == 2
    store.write([Outcome(decision_id="d1", reward=7.0, id="o1", ts=104.0)], 105.0)  # its decision archived already
    assert store.archive(older_than=NOW, root=root, compression="zstd")["outcomes"] == 1
    store.close()
    assert [p.name for p in (root / "outcomes").iterdir()] == ["agent=_"]
    for agent in (None, "fast"):
        rows = _rows(read_host(str(root), CONFIG, now=NOW, agent=agent).table)
        assert (rows["d1"]["reward"], rows["d1"]["outcomes"]) == (7.0, 1) and rows["d2"]["reward"] == -0.25

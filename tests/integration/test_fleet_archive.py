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

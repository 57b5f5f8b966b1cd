"""The Parquet archive as other tools read it, its pruning, and the read-out snapshot beside it.

A real DuckDB store on a temporary directory; the archive read back by pyarrow, DuckDB and polars.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from reflexd.config import parse_config
from reflexd.errors import ConfigError
from reflexd.service.store import Store, export
from reflexd.service.store.retention import prune_archive
from reflexd.wire.protocol import Decision, Event, Outcome, Step

ROOT = Path(__file__).resolve().parents[2]
DAY = 86400.0
JSON_COLUMNS = {"decisions": ("context", "actions", "probs"), "steps": ("observation",), "events": ("data",)}


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "state" / "reflexd.duckdb") as s:
        yield s


def day_of_experience(store: Store, day: int, agent: str = "a", n: int = 1) -> None:
    """``n`` decisions (with an outcome each), a step and an event of ``agent``, received on ``day``."""
    events: list = []
    for i in range(n):
        did = f"{agent}-{day}-{i}"
        events += [
            Decision(
                id=did, agent=agent, context={"task": "code", "user": {"tier": "pro"}, "tags": ["x", "y"]},
                actions=["small", {"id": "large", "features": {"cost": 10}}], chosen="large", prob=0.25,
                probs=[0.75, 0.25], ts=day * DAY + i,
            ),
            Outcome(decision_id=did, reward=1.5, id=f"o-{did}"),
        ]
    events += [
        Step(agent=agent, episode="e1", index=7, observation={"pos": [1, 2]}, action="up", reward=0.5, id=f"s-{agent}-{day}"),
        Event(agent=agent, kind="error", data={"kind": "timeout"}, id=f"e-{agent}-{day}"),
    ]
    store.write(events, received_at=day * DAY + 3600)


# ---- read by pyarrow, DuckDB and polars ----------------------------------------------------------


def test_the_archive_reads_without_casts_in_pyarrow_duckdb_and_polars(store: Store, tmp_path: Path) -> None:
    day_of_experience(store, 3, agent="team/b c")
    root = tmp_path / "archive"
    assert store.archive(10 * DAY, root, "zstd") == {"outcomes": 1, "decisions": 1, "steps": 1, "events": 1}

    for table, json_columns in JSON_COLUMNS.items():
        # pyarrow: JSON columns are plain strings, not an extension or binary type
        schema = ds.dataset(root / table, format="parquet", partitioning="hive").schema
        for column in json_columns:
            assert schema.field(column).type == pa.string(), (table, column, schema.field(column).type)
        arrow = ds.dataset(root / table, format="parquet", partitioning="hive").to_table().to_pylist()
        # DuckDB: VARCHAR
        glob = f"{root / table}/**/*.parquet"
        described = duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{glob}', hive_partitioning = true)").fetchall()
        types = {row[0]: row[1] for row in described}
        assert all(types[c] == "VARCHAR" for c in json_columns), (table, types)
        # polars: String
        frame = pl.read_parquet(glob, hive_partitioning=True)
        assert all(frame.schema[c] == pl.String for c in json_columns), (table, frame.schema)
        assert frame["agent"].to_list() == ["team/b c"]  # the partition, decoded
        for column in json_columns:  # the text is the JSON that was sent
            assert json.loads(frame[column][0]) == json.loads(arrow[0][column])

    decisions = pl.read_parquet(f"{root}/decisions/**/*.parquet", hive_partitioning=True).row(0, named=True)
    assert json.loads(decisions["context"]) == {"task": "code", "user": {"tier": "pro"}, "tags": ["x", "y"]}
    assert json.loads(decisions["actions"]) == ["small", {"id": "large", "features": {"cost": 10}}]
    assert json.loads(decisions["probs"]) == [0.75, 0.25]
    # the step's position is named as the step message names it
    steps = pq.read_table(next((root / "steps").rglob("*.parquet")))
    assert "index" in steps.column_names and "idx" not in steps.column_names
    assert steps.column("index").type == pa.int32() and steps.column("index").to_pylist() == [7]
    assert json.loads(steps.column("observation")[0].as_py()) == {"pos": [1, 2]}


def documented_schema() -> dict[str, list[tuple[str, str]]]:
    """The archive's columns as docs/operations.md lists them: {table: [(column, Parquet type)]}."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### The Parquet archive", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    tables = {}
    for row in re.finditer(r"^\| `(\w+)` \| (.+) \|$", section, re.MULTILINE):
        columns = [re.match(r"`(\w+)` (\w+)", part.strip()) for part in row[2].split(",")]
        tables[row[1]] = [(m[1], m[2]) for m in columns if m]
    return tables


def test_the_archive_schema_is_what_the_docs_say(store: Store, tmp_path: Path) -> None:
    day_of_experience(store, 3)
    store.archive(10 * DAY, tmp_path / "archive", "zstd")
    documented = documented_schema()
    assert sorted(documented) == ["decisions", "events", "outcomes", "steps"]
    for table, columns in documented.items():
        [part] = (tmp_path / "archive" / table).rglob("*.parquet")
        written = pq.read_schema(part)
        assert [(f.name, str(f.type)) for f in written] == columns, table
        assert part.relative_to(tmp_path / "archive" / table).parts[:2] == ("agent=a", "date=1970-01-04")


# ---- pruning ---------------------------------------------------------------------------------


def archived_days(root: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for part in root.rglob("*.parquet"):
        table, agent, day = part.relative_to(root).parts[:3]
        found.setdefault(day[5:], set()).add(f"{table}/{agent[6:]}")
    return found


def test_pruning_by_age_deletes_whole_old_days_and_keeps_the_newest(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    for day in (1, 2, 3, 4):
        day_of_experience(store, day, agent="a")
        day_of_experience(store, day, agent="b")
    store.archive(10 * DAY, root, "zstd")
    staging = root / ".staging-left-by-a-crash"
    staging.mkdir()

    # now is day 6.5: days 1 and 2 hold only rows older than 3.5 days, day 3's last hours are younger
    pruned = store.prune_archive(root, now=6.5 * DAY, max_days=3.5, max_bytes=None)
    assert sorted(archived_days(root)) == ["1970-01-04", "1970-01-05"]
    assert pruned.partitions == 2 * 2 * 4  # two days, two agents, four tables
    assert pruned.files == pruned.partitions and pruned.bytes > 0 and pruned.oldest_kept == "1970-01-04"
    assert pruned.kept_bytes == sum(p.stat().st_size for p in root.rglob("*.parquet"))
    assert staging.is_dir()  # only day partitions are touched
    # the archive that is left still reads
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/decisions/**/*.parquet')").fetchall() == [(4,)]

    again = store.prune_archive(root, now=6.5 * DAY, max_days=3.5, max_bytes=None)
    assert again.partitions == 0 and again.oldest_kept == "1970-01-04"


def test_pruning_by_size_deletes_the_oldest_days_until_the_archive_fits(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    for day in (1, 2, 3, 4, 5):
        day_of_experience(store, day, n=20)
    store.archive(10 * DAY, root, "zstd")
    sizes = {}
    for part in root.rglob("*.parquet"):
        day = part.relative_to(root).parts[2][5:]
        sizes[day] = sizes.get(day, 0) + part.stat().st_size
    newest_two = sizes["1970-01-05"] + sizes["1970-01-06"]

    pruned = prune_archive(root, now=10 * DAY, max_days=None, max_bytes=newest_two + sizes["1970-01-04"] - 1)
    assert sorted(archived_days(root)) == ["1970-01-05", "1970-01-06"]
    assert pruned.kept_bytes == newest_two <= newest_two + sizes["1970-01-04"] - 1
    assert pruned.bytes == sizes["1970-01-02"] + sizes["1970-01-03"] + sizes["1970-01-04"]
    # agent folders a prune empties go too; tables keep their folder
    pruned = prune_archive(root, now=10 * DAY, max_days=None, max_bytes=1)
    assert pruned.oldest_kept is None and not list(root.rglob("*.parquet"))
    assert sorted(p.name for p in root.iterdir()) == ["decisions", "events", "outcomes", "steps"]
    assert not any(list((root / t).iterdir()) for t in ("decisions", "events", "outcomes", "steps"))


def test_without_limits_or_an_archive_pruning_deletes_nothing(store: Store, tmp_path: Path) -> None:
    assert prune_archive(tmp_path / "none", now=10 * DAY, max_days=1, max_bytes=1).partitions == 0
    day_of_experience(store, 1)
    store.archive(10 * DAY, tmp_path / "archive", "zstd")
    kept = prune_archive(tmp_path / "archive", now=1e9, max_days=None, max_bytes=None)
    assert kept.partitions == 0 and len(list((tmp_path / "archive").rglob("*.parquet"))) == 4


def test_pruning_settings_are_checked() -> None:
    retention = parse_config("retention: {days: 7, archive_max_days: 90, archive_max_mb: 2048}").retention
    assert (retention.archive_max_days, retention.archive_max_mb) == (90, 2048)
    default = parse_config("").retention
    assert default.archive_max_days is None and default.archive_max_mb is None
    with pytest.raises(ConfigError, match=r"retention.archive_max_days: must exceed retention.days \(30\)"):
        parse_config("retention: {archive_max_days: 30}")
    with pytest.raises(ConfigError, match="retention.archive_max_mb"):
        parse_config("retention: {archive_max_mb: 0}")
    with pytest.raises(ConfigError, match="retention.archive_max_days"):
        parse_config("retention: {archive_max_days: -1}")


# ---- read-out snapshots ----------------------------------------------------------------------


def test_a_read_out_snapshot_holds_each_row_once_with_the_archive_linked(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    for day in (1, 2, 30):
        day_of_experience(store, day, n=3)
    store.archive(10 * DAY, root, "zstd")
    store.record_model_event("v0001", "promoted", {"reason": "test"}, at=5.0)

    written = store.read_out(tmp_path / "snap", root)
    assert written.linked and written.rows["decisions"] == 3 and written.rows["models"] == 1
    # a folder per table, not its files: the reply does not grow with the archive
    assert written.archive == {t: str(tmp_path / "snap" / "archive" / t) for t in ("decisions", "outcomes", "steps", "events")}
    linked = sorted(Path(written.archive["decisions"]).rglob("*.parquet"))
    assert len(linked) == 2
    for path in linked:  # hard links: the same file as the archive's, no copy
        original = root / path.relative_to(tmp_path / "snap" / "archive")
        assert os.stat(path).st_ino == os.stat(original).st_ino
    files = f"{written.archive['decisions']}/agent=*/date=*/*.parquet"
    every = duckdb.sql(
        f"SELECT id FROM read_parquet('{written.tables['decisions']}') UNION ALL "
        f"SELECT id FROM read_parquet('{files}', hive_partitioning = true)"
    ).fetchall()
    assert sorted(i for (i,) in every) == sorted(f"a-{d}-{i}" for d in (1, 2, 30) for i in range(3))
    # the snapshot's columns are the archive's, agent included
    assert pq.read_schema(written.tables["steps"]).names[:4] == ["id", "agent", "episode", "index"]
    assert pq.read_schema(written.tables["decisions"]).field("context").type == pa.string()

    # pruning the archive afterwards leaves the snapshot's files readable
    prune_archive(root, now=100 * DAY, max_days=1, max_bytes=None)
    assert not list(root.rglob("*.parquet"))
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{files}')").fetchall() == [(6,)]


def test_a_snapshot_waits_for_no_archive_walk_under_the_stores_lock_and_misses_no_row(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the archive is linked, loads go on (the store's lock is free) but archiving waits: the
    rows it would move are in the snapshot's tables, and its files must not join the links."""
    root = tmp_path / "archive"
    for day in range(1, 6):
        day_of_experience(store, day, n=2)
    store.archive(3 * DAY, root, "zstd")  # days 1 and 2 archived, 3 to 5 in DuckDB
    link = export.link_archive
    archiver: list[threading.Thread] = []

    def link_while_others_load_and_archive(archive_root, dest):
        loader = threading.Thread(target=day_of_experience, args=(store, 9), kwargs={"n": 1})
        loader.start()
        loader.join(timeout=60)
        assert not loader.is_alive(), "a load waited for the archive walk"
        archiver.append(threading.Thread(target=store.archive, args=(5 * DAY, root, "zstd")))
        archiver[0].start()
        archiver[0].join(timeout=1)
        assert archiver[0].is_alive(), "archiving did not wait for the archive walk"
        return link(archive_root, dest)

    monkeypatch.setattr(export, "link_archive", link_while_others_load_and_archive)
    written = store.read_out(tmp_path / "snap", root)
    archiver[0].join(timeout=60)
    assert store.counts()["decisions"] == 2 + 1  # days 3 and 4 went to the archive after the walk
    ids = duckdb.sql(
        f"SELECT id FROM read_parquet('{written.tables['decisions']}') UNION ALL "
        f"SELECT id FROM read_parquet('{written.archive['decisions']}/agent=*/date=*/*.parquet')"
    ).fetchall()
    assert sorted(i for (i,) in ids) == sorted(f"a-{d}-{i}" for d in range(1, 6) for i in range(2))


def test_a_snapshot_of_an_archive_it_cannot_link_names_its_folders_and_reads_each_row_once(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reflexd.tools import readout

    root = tmp_path / "archive"
    for day in (1, 2, 30):
        day_of_experience(store, day, n=3)
    store.archive(10 * DAY, root, "zstd")

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    written = store.read_out(tmp_path / "snap", root)
    assert not written.linked and written.archive["decisions"] == str(root / "decisions")
    assert not (tmp_path / "snap" / "archive").exists()
    store.archive(40 * DAY, root, "zstd")  # day 30 joins the archive after the snapshot: in both now

    reply = type("Reply", (), {"tables": written.tables, "archive": written.archive, "linked": False,
                               "directory": str(tmp_path / "snap"), "taken_at": 0.0, "expires": 1e12, "rewards": {}})()
    with readout.from_snapshot(reply) as source:
        rows = source.con.execute("SELECT count(*), count(DISTINCT id) FROM decisions").fetchall()
    assert rows == [(9, 9)]


def test_a_date_folder_that_names_no_day_is_left_alone_by_pruning(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    day_of_experience(store, 3)
    store.archive(10 * DAY, root, "zstd")
    odd = root / "decisions" / "agent=a" / "date=2026-02-30"
    odd.mkdir(parents=True)
    (odd / "part-x.parquet").write_bytes(b"not written by reflexd")
    pruned = store.prune_archive(root, now=100 * DAY, max_days=1, max_bytes=None)
    assert pruned.partitions == 4 and odd.is_dir()
    assert not [p for p in root.rglob("*.parquet") if p.parent != odd]


def test_loads_go_on_while_a_snapshot_is_written_and_it_does_not_see_them(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    day_of_experience(store, 1, n=5)
    copy = export.copy_tables

    def copy_while_another_thread_loads(cur, dest):
        # the store's lock must be free while the tables are copied: a load from another thread finishes
        loader = threading.Thread(target=day_of_experience, args=(store, 2), kwargs={"n": 4})
        loader.start()
        loader.join(timeout=60)
        assert not loader.is_alive(), "a load waited for the snapshot"
        return copy(cur, dest)

    monkeypatch.setattr(export, "copy_tables", copy_while_another_thread_loads)
    written = store.read_out(tmp_path / "snap", None)
    assert written.rows["decisions"] == 5 and written.rows["steps"] == 1  # as of its start
    assert store.counts()["decisions"] == 9  # the load went in meanwhile

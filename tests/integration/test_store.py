"""The DuckDB store against real database files and real Parquet output."""

from __future__ import annotations

import json
import os
import resource
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import msgspec
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from reflexd.config import StoreConfig, parse_config
from reflexd.errors import StorageError
from reflexd.service import spool
from reflexd.service.spool import Spool
from reflexd.service.store import DeadLetter, SnapshotInfo, Store, WriteResult
from reflexd.wire.framing import decode_inbound
from reflexd.wire.protocol import Action, Decision, Event, Outcome, Step

DAY = 86400.0


def decision(id: str, agent: str = "a", **kw) -> Decision:
    kw.setdefault("context", {"x": 1})
    kw.setdefault("actions", ["left", "right"])
    kw.setdefault("chosen", "left")
    kw.setdefault("prob", 0.5)
    return Decision(id=id, agent=agent, **kw)


def query(path: Path, sql: str, params: list | None = None) -> list[tuple]:
    """Read the database file directly, as another process would after the store closed it."""
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "reflexd.duckdb"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db)
    yield s
    s.close()


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Make every write past ``nbytes`` in a file fail with EFBIG, as a full disk fails it."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def incompressible_context() -> dict:
    return {"blob": os.urandom(300_000).hex()}


# ---- schema, writes, dedupe ----------------------------------------------------------------


def test_new_store_has_every_table_empty(store: Store) -> None:
    assert store.counts() == {"decisions": 0, "outcomes": 0, "steps": 0, "events": 0, "dead_letters": 0}
    assert store.model_events() == []


def test_data_survives_close_and_reopen_and_dedupe_still_applies(db: Path) -> None:
    with Store(db) as s:
        s.write([decision("d1"), Outcome(decision_id="d1", reward=1.0, id="o1")], received_at=10.0)
    with Store(db) as s:
        assert s.counts()["decisions"] == 1
        assert s.counts()["outcomes"] == 1
        again = s.write([decision("d1"), Outcome(decision_id="d1", reward=1.0, id="o1")], received_at=20.0)
    assert again == WriteResult(inserted=0, duplicates=2)
    assert query(db, "SELECT id, received_at FROM decisions") == [("d1", 10.0)]


def test_the_store_settings_reach_duckdb(db: Path) -> None:
    with Store(db, StoreConfig(memory_limit_mb=300, threads=1)) as s:
        settings = dict(
            s._con.execute(
                "SELECT name, value FROM duckdb_settings() WHERE name IN "
                "('memory_limit', 'threads', 'temp_directory', 'allocator_background_threads')"
            ).fetchall()
        )
    assert settings == {
        "memory_limit": "300.0 MiB",
        "threads": "1",
        "temp_directory": f"{db}.tmp",
        "allocator_background_threads": "true",
    }


def test_a_full_spool_segment_loads_within_a_small_memory_limit(db: Path, tmp_path: Path) -> None:
    # DuckDB sets aside twice read_json's maximum_object_size up front: unsized, that is 4 GiB
    spool = Spool(tmp_path / "spool", segment_bytes=64 << 20)
    for line in range(40):
        spool.append([decision(f"d{line}-{i}", context={"text": "x" * 400, "i": i}) for i in range(100)], float(line))
    spool.close()
    (segment,) = spool.take()
    assert segment.stat().st_size > 2 << 20
    with Store(db, StoreConfig(memory_limit_mb=64)) as s:
        assert s.load(segment) == WriteResult(inserted=4000, duplicates=0, decisions=4000)


def test_batch_with_all_four_event_types_is_stored_field_by_field(store: Store, db: Path) -> None:
    events = [
        decision(
            "d1",
            agent="bot",
            context={"user": {"tier": "gold"}, "load": 0.7},
            actions=["fast", Action(id="slow", features={"cost": 2.5})],
            chosen="slow",
            prob=0.25,
            probs=[0.75, 0.25],
            model_version="v3",
            strategy="softmax",
            ts=9.5,
        ),
        Outcome(decision_id="d1", reward=-2.0, id="o1", agent="bot", ts=11.0),
        Step(agent="bot", episode="ep1", index=3, observation={"pos": [1, 2]}, action="up", reward=0.5, done=True,
             id="s1"),
        Event(agent="bot", kind="error", data={"msg": "timeout"}, id="e1"),
    ]
    result = store.write(events, received_at=12.0)
    assert result == WriteResult(inserted=4, duplicates=0, decisions=1, outcomes=1, steps=1, events=1)
    store.close()

    [d] = query(
        db,
        "SELECT id, agent, ts, received_at, context, actions, chosen, prob, probs, model_version, strategy "
        "FROM decisions",
    )
    assert d[:4] == ("d1", "bot", 9.5, 12.0)
    assert json.loads(d[4]) == {"user": {"tier": "gold"}, "load": 0.7}
    assert json.loads(d[5]) == ["fast", {"id": "slow", "features": {"cost": 2.5}}]
    assert d[6:8] == ("slow", 0.25)
    assert json.loads(d[8]) == [0.75, 0.25]
    assert d[9:] == ("v3", "softmax")
    assert query(db, "SELECT * FROM outcomes") == [("o1", "d1", "bot", -2.0, 11.0, 12.0)]
    [s] = query(db, "SELECT id, agent, episode, idx, observation, action, reward, done, ts, received_at FROM steps")
    assert s[:4] == ("s1", "bot", "ep1", 3) and json.loads(s[4]) == {"pos": [1, 2]}
    assert s[5:] == ("up", 0.5, True, 12.0, 12.0)
    [e] = query(db, "SELECT id, agent, kind, data, ts FROM events")
    assert e[:3] == ("e1", "bot", "error") and json.loads(e[3]) == {"msg": "timeout"} and e[4] == 12.0


def test_duplicates_within_a_batch_and_across_batches_are_stored_once(store: Store, db: Path) -> None:
    batch = [
        decision("d1", context={"n": 1}),
        decision("d1", context={"n": 2}),
        Outcome(decision_id="d1", reward=1.0, id="o1"),
        Step(agent="a", episode="e", index=0, observation={}, action="x", id="s1"),
        Event(agent="a", kind="k", id="e1"),
    ]
    first = store.write(batch, received_at=1.0)
    assert (first.inserted, first.duplicates, first.decisions) == (4, 1, 1)

    # The agent never saw the ack and sends everything again: nothing new is stored.
    resent = store.write(batch + [decision("d2")], received_at=2.0)
    assert resent == WriteResult(inserted=1, duplicates=5, decisions=1)
    assert store.counts() == {"decisions": 2, "outcomes": 1, "steps": 1, "events": 1, "dead_letters": 0}
    store.close()
    assert query(db, "SELECT received_at FROM decisions WHERE id = 'd1'") == [(1.0,)]


def test_events_without_id_or_ts_get_a_fresh_id_and_the_receive_time(store: Store, db: Path) -> None:
    same = Outcome(decision_id="d1", reward=1.0)
    result = store.write([same, same, Event(agent="a", kind="k"), Outcome(decision_id="d1", reward=2.0, ts=3.0)], 7.0)
    assert result.inserted == 4
    store.close()
    rows = query(db, "SELECT id, ts FROM outcomes ORDER BY reward, ts")
    ids = [r[0] for r in rows]
    assert len(set(ids)) == 3
    assert [r[1] for r in rows] == [7.0, 7.0, 3.0]
    # a second write of the same id-less events is new events, not a replay
    store2 = Store(db)
    assert store2.write([same], 8.0).inserted == 1
    store2.close()
    assert query(db, "SELECT ts FROM events") == [(7.0,)]


def test_json_columns_survive_nan_infinity_and_msgpack_only_values(store: Store, db: Path) -> None:
    data = {"ext": msgspec.msgpack.Ext(3, b"zz"), (1, 2): 1}
    frame = msgspec.msgpack.encode({"type": "event", "agent": "a", "kind": "k", "id": "e1", "data": data})
    event = decode_inbound(frame, "msgpack")
    nan_decision = decision("d1", context={"v": float("nan"), "w": float("inf")})
    assert store.write([event, nan_decision], 1.0).inserted == 2
    store.close()
    [(context,)] = query(db, "SELECT context FROM decisions")
    assert json.loads(context) == {"v": None, "w": None}
    [(data,)] = query(db, "SELECT data FROM events")
    assert set(json.loads(data)) == {"ext", "(1, 2)"}


def test_concurrent_writers_lose_nothing(store: Store) -> None:
    def writer(n: int) -> None:
        for b in range(20):
            store.write([decision(f"{n}-{b}-{i}") for i in range(10)], received_at=float(b))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.counts()["decisions"] == 800


# ---- failures --------------------------------------------------------------------------------


def test_failed_write_raises_storage_error_and_keeps_earlier_data(db: Path) -> None:
    store = Store(db)
    store.write([decision("kept"), Outcome(decision_id="kept", reward=1.0, id="o1")], 1.0)
    doomed = [decision("small"), decision("huge", context=incompressible_context())]
    with file_size_limit(64 * 1024), pytest.raises(StorageError) as err:
        store.write(doomed, 2.0)
    assert "batch of 2 events" in str(err.value)
    assert "File too large" in str(err.value)  # the OS's own words reach the operator

    # The whole batch was rolled back, and the store keeps working once the disk recovers.
    assert store.counts()["decisions"] == 1
    assert store.write(doomed, 3.0).inserted == 2
    store.close()
    assert sorted(query(db, "SELECT id FROM decisions")) == [("huge",), ("kept",), ("small",)]
    assert query(db, "SELECT id FROM outcomes") == [("o1",)]


def test_a_closed_store_raises_storage_error(store: Store) -> None:
    store.close()
    with pytest.raises(StorageError, match="loading spool segment .* failed"):
        store.write([decision("d1")], 1.0)


def test_dead_letters_keep_raw_bytes_reason_and_peer(store: Store, db: Path) -> None:
    raw = b"\x00\xff{not json"
    store.dead_letter(
        [
            DeadLetter(received_at=5.0, peer_uid=2**32 - 2, peer_pid=42, code="too_large", reason="big", raw=raw,
                       raw_size=2**32 - 1),
            DeadLetter(received_at=6.0, peer_uid=None, peer_pid=None, code="invalid", reason="no agent", raw=b"",
                       raw_size=0),
        ]
    )
    assert store.counts()["dead_letters"] == 2
    store.close()
    assert query(db, "SELECT * FROM dead_letters ORDER BY received_at") == [
        (5.0, 2**32 - 2, 42, "too_large", "big", raw, 2**32 - 1),
        (6.0, None, None, "invalid", "no agent", b"", 0),
    ]


# ---- maturity and snapshots ------------------------------------------------------------------

TWO_AGENTS = """
rewards: {wait_window: 10, default: 0.0, aggregation: sum}
agents:
  slow:
    rewards: {wait_window: 100, default: 9.0, aggregation: max}
"""


def test_matured_count_uses_each_agents_wait_window(store: Store) -> None:
    config = parse_config(TWO_AGENTS)
    store.write([decision("f1", agent="fast"), decision("s1", agent="slow")], received_at=100.0)
    store.write([decision("f2", agent="fast"), decision("s2", agent="slow")], received_at=120.0)

    assert store.matured_count(since=0.0, now=109.0, config=config) == 0
    assert store.matured_count(since=0.0, now=110.0, config=config) == 1  # f1, exactly at its window
    assert store.matured_count(since=0.0, now=150.0, config=config) == 2  # f1, f2
    assert store.matured_count(since=0.0, now=200.0, config=config) == 3  # + s1
    assert store.matured_count(since=100.0, now=1000.0, config=config) == 2  # f2, s2: after `since`


def test_matured_counts_counts_many_lines_at_once_as_each_alone(store: Store) -> None:
    config = parse_config(TWO_AGENTS)
    store.write([decision("f1", agent="fast"), decision("s1", agent="slow"), decision("o1", agent="other")], received_at=100.0)
    store.write([decision("f2", agent="fast"), decision("s2", agent="slow"), decision("o2", agent="other")], received_at=120.0)
    lines = [
        (0.0, ["fast"]), (100.0, ["fast"]), (0.0, ["slow", "other"]), (110.0, ["other", "slow"]), (0.0, None),
        (100.0, None), (0.0, []), (0.0, ["nobody"]),
    ]
    for now in (109.0, 130.0, 200.0, 1000.0):
        alone = [store.matured_count(since, now, config, agents) for since, agents in lines]
        assert store.matured_counts(lines, now, config) == alone
    assert store.matured_counts(lines, 1000.0, config) == [2, 1, 4, 2, 6, 3, 0, 0]
    assert store.matured_counts([], 1000.0, config) == []


SIX_OUTCOMES = [
    # received_at, id, reward, ts: same-batch outcomes are ordered by ts, not by id
    (101.0, "o-z", 2.0, 100.5),
    (101.0, "o-y", 7.0, 100.8),
    (105.0, "o-m", -1.0, 105.0),
    (110.0, "o-a", 0.5, 109.9),
    (110.0, "o-b", 3.0, 109.1),
    (110.5, "o-late", 100.0, 110.5),  # after the 10 s window: ignored
]


@pytest.mark.parametrize(
    "aggregation, expected",
    [("sum", 11.5), ("mean", 2.3), ("min", -1.0), ("max", 7.0), ("first", 2.0), ("last", 0.5)],
)
def test_snapshot_joins_rewards_with_each_aggregation(
    store: Store, tmp_path: Path, aggregation: str, expected: float
) -> None:
    config = parse_config(f"rewards: {{wait_window: 10, default: -0.25, aggregation: {aggregation}}}")
    store.write([decision("d1"), decision("lonely")], received_at=100.0)
    for received_at, oid, reward, ts in SIX_OUTCOMES:
        store.write([Outcome(decision_id="d1", reward=reward, id=oid, ts=ts)], received_at=received_at)

    info = store.snapshot(tmp_path / "snap.parquet", now=200.0, config=config, max_rows=100)
    assert info == SnapshotInfo(rows=2, window_start=100.0, window_end=100.0)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "snap.parquet").to_pylist()}
    assert rows["d1"]["reward"] == pytest.approx(expected)
    assert rows["d1"]["outcomes"] == 5
    assert (rows["lonely"]["reward"], rows["lonely"]["outcomes"]) == (-0.25, 0)


def test_snapshot_applies_agent_overrides_and_leaves_out_the_immature(store: Store, tmp_path: Path) -> None:
    config = parse_config(TWO_AGENTS)
    store.write([decision("f1", agent="fast"), decision("s1", agent="slow"), decision("s2", agent="slow")], 100.0)
    store.write([Outcome(decision_id="f1", reward=1.0), Outcome(decision_id="s1", reward=1.0)], 105.0)
    store.write([Outcome(decision_id="f1", reward=10.0), Outcome(decision_id="s1", reward=4.0)], 150.0)
    store.write([Outcome(decision_id="s1", reward=50.0)], 201.0)

    early = store.snapshot(tmp_path / "early.parquet", now=150.0, config=config, max_rows=100)
    assert early.rows == 1
    assert pq.read_table(tmp_path / "early.parquet").column("id").to_pylist() == ["f1"]

    store.snapshot(tmp_path / "late.parquet", now=250.0, config=config, max_rows=100)
    rewards = {r["id"]: (r["reward"], r["outcomes"]) for r in pq.read_table(tmp_path / "late.parquet").to_pylist()}
    assert rewards == {"f1": (1.0, 1), "s1": (4.0, 2), "s2": (9.0, 0)}


def test_a_decision_id_another_agent_holds_is_dead_lettered_not_counted_a_duplicate(store: Store, db: Path) -> None:
    assert store.write([decision("42", agent="alpha")], received_at=100.0).taken == 0
    # beta's own decision with alpha's id, in a later batch and twice within one
    later = store.write([decision("42", agent="beta")], received_at=101.0)
    assert (later.inserted, later.duplicates, later.taken) == (0, 0, 1)
    both = store.write([decision("7", agent="alpha"), decision("7", agent="beta"), decision("42", agent="alpha")], 102.0)
    assert (both.inserted, both.duplicates, both.taken) == (1, 1, 1)  # alpha's 7; alpha's 42 resent; beta's 7
    store.close()
    assert query(db, "SELECT id, agent FROM decisions ORDER BY id") == [("42", "alpha"), ("7", "alpha")]
    reasons = [r for (r,) in query(db, "SELECT reason FROM dead_letters WHERE code = 'id_taken' ORDER BY received_at")]
    assert reasons == [
        f'decision "{i}" of agent "beta" (chose "left") not stored: a decision of agent "alpha" (chose "left") has that id'
        " (an id names one decision, across agents)"
        for i in ("42", "7")
    ]


def test_a_decision_id_the_same_agent_used_for_another_choice_is_dead_lettered(store: Store, db: Path) -> None:
    store.write([decision("42", chosen="left")], received_at=100.0)
    again = store.write([decision("42", chosen="left"), decision("42", chosen="right")], received_at=101.0)
    assert (again.inserted, again.duplicates, again.taken) == (0, 1, 1)  # a resend, and another decision
    store.close()
    [(reason,)] = query(db, "SELECT reason FROM dead_letters WHERE code = 'id_taken'")
    assert reason.startswith('decision "42" of agent "a" (chose "right") not stored: a decision of agent "a" (chose "left")')


def test_a_segment_loaded_again_after_a_crash_adds_no_second_id_taken_letter(store: Store, tmp_path: Path, db: Path) -> None:
    store.write([decision("42", agent="alpha")], received_at=100.0)
    segment = tmp_path / f"again{spool.SUFFIX}"
    segment.write_bytes(spool.encode_line([decision("42", agent="beta"), decision("42", agent="beta")], 101.0, 0))
    first = store.load(segment)
    assert (first.taken, first.duplicates) == (1, 1)  # the repeat within the batch is a resend
    again = store.load(segment)
    assert (again.inserted, again.taken, again.duplicates) == (0, 0, 2)
    store.close()
    assert query(db, "SELECT count(*) FROM dead_letters WHERE code = 'id_taken'") == [(1,)]


@pytest.mark.parametrize("forgotten", ["beta", "alpha"])
def test_forgetting_either_agent_named_by_an_id_taken_letter_removes_it(store: Store, forgotten: str) -> None:
    store.write([decision("42", agent="alpha")], received_at=100.0)
    store.write([decision("42", agent="beta")], received_at=101.0)
    assert store.forget("alp", None)["dead_letters"] == 0  # a name within another's is not it
    assert store.forget(forgotten, None)["dead_letters"] == 1
    assert store.counts()["dead_letters"] == 0


def test_forgetting_an_agent_keeps_another_agents_outcome_that_names_its_decision(store: Store) -> None:
    store.write([decision("42", agent="alpha")], received_at=100.0)
    store.write([Outcome(decision_id="42", reward=1.0, id="mine"), Outcome(decision_id="42", reward=5.0, id="beta's", agent="beta")], 101.0)
    assert store.forget("alpha", None)["outcomes"] == 1  # its own, sent without an agent
    assert store.forget("beta", None)["outcomes"] == 1


def test_an_outcome_naming_another_agent_is_not_its_decisions_reward(store: Store, tmp_path: Path) -> None:
    config = parse_config("rewards: {wait_window: 10, default: 0.0, aggregation: sum}")
    store.write([decision("42", agent="alpha"), decision("43", agent="alpha")], received_at=100.0)
    store.write(
        [
            Outcome(decision_id="42", reward=5.0, agent="beta"),  # another agent's: joins nothing
            Outcome(decision_id="42", reward=1.0, agent="alpha"),
            Outcome(decision_id="43", reward=2.0),  # no agent named: the decision's
        ],
        received_at=101.0,
    )
    store.snapshot(tmp_path / "snap.parquet", now=200.0, config=config, max_rows=100)
    rewards = {r["id"]: (r["reward"], r["outcomes"]) for r in pq.read_table(tmp_path / "snap.parquet").to_pylist()}
    assert rewards == {"42": (1.0, 1), "43": (2.0, 1)}
    assert store.outcomes_without_decision(since=0.0) == 1


def test_snapshot_keeps_the_newest_rows_in_time_order_with_the_stated_columns(store: Store, tmp_path: Path) -> None:
    for i in range(1, 6):
        store.write([decision(f"d{i}", context={"i": i}, model_version=f"v{i}")], received_at=10.0 * i)
    dest = tmp_path / "snapshots" / "train.parquet"
    info = store.snapshot(dest, now=1000.0, config=parse_config(""), max_rows=3)
    assert info == SnapshotInfo(rows=3, window_start=30.0, window_end=50.0)
    assert not dest.with_name(dest.name + ".partial").exists()

    table = pq.read_table(dest)
    assert table.schema.names == [
        "id", "agent", "received_at", "ts", "context", "actions", "chosen", "prob", "reward", "model_version", "outcomes",
        "slot", "slate", "episode",
    ]
    assert [str(t) for t in table.schema.types] == [
        "string", "string", "double", "double", "string", "string", "string", "double", "double", "string", "int32",
        "int32", "string", "string",
    ]
    assert table.column("id").to_pylist() == ["d3", "d4", "d5"]
    first = table.to_pylist()[0]
    assert json.loads(first["context"]) == {"i": 3}
    assert json.loads(first["actions"]) == ["left", "right"]
    assert (first["chosen"], first["prob"], first["model_version"]) == ("left", 0.5, "v3")


def test_decisions_sent_together_keep_the_order_they_were_made_in(store: Store, tmp_path: Path) -> None:
    # one frame: one receipt time, ids in no particular order; the snapshot (and so the training
    # order and the holdout) follows the decisions' own times, the same on every run
    ids = ["f3", "a9", "z1", "c4", "m0"]
    store.write([decision(i, ts=100.0 + n) for n, i in enumerate(ids)], received_at=500.0)
    dest = tmp_path / "train.parquet"
    store.snapshot(dest, now=1000.0, config=parse_config(""), max_rows=4)
    assert pq.read_table(dest).column("id").to_pylist() == ids[1:]


def test_a_failed_snapshot_leaves_the_previous_file_whole(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "snap.parquet"
    store.write([decision("small")], received_at=1.0)
    store.snapshot(dest, now=100.0, config=parse_config(""), max_rows=10)
    store.write([decision("big", context=incompressible_context())], received_at=2.0)
    with file_size_limit(64 * 1024), pytest.raises(StorageError, match="training snapshot"):
        store.snapshot(dest, now=100.0, config=parse_config(""), max_rows=10)
    assert pq.read_table(dest).column("id").to_pylist() == ["small"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.parquet", "state"]


def test_empty_snapshot_reports_a_zero_window(store: Store, tmp_path: Path) -> None:
    info = store.snapshot(tmp_path / "s.parquet", now=1.0, config=parse_config(""), max_rows=10)
    assert info == SnapshotInfo(rows=0, window_start=0.0, window_end=0.0)
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 0


# ---- retention -------------------------------------------------------------------------------


def old_and_new_experience(store: Store) -> None:
    """Agents 'a' and 'team/b c' (a name that needs escaping) with rows on day 10 and day 40."""
    for day, tag in ((10, "old"), (40, "new")):
        store.write(
            [
                decision(f"{tag}-a", agent="a"),
                decision(f"{tag}-b", agent="team/b c"),
                Outcome(decision_id=f"{tag}-a", reward=1.0, id=f"{tag}-oa"),  # no agent: filed under a
                Step(agent="a", episode="e", index=0, observation={}, action="x", id=f"{tag}-s"),
                Event(agent="team/b c", kind="k", id=f"{tag}-e"),
            ],
            received_at=day * DAY + 3600.0,
        )


def read_archive(root: Path, table: str) -> list[tuple]:
    with duckdb.connect() as con:
        return con.execute(
            f"SELECT id, agent, CAST(date AS VARCHAR) FROM read_parquet('{root / table}/**/*.parquet', "
            "hive_partitioning = true) ORDER BY id"
        ).fetchall()


def test_archive_moves_old_rows_into_hive_partitions_and_keeps_new_ones(store: Store, tmp_path: Path) -> None:
    old_and_new_experience(store)
    root = tmp_path / "archive"
    moved = store.archive(older_than=20 * DAY, root=root, compression="zstd")
    assert moved == {"decisions": 2, "outcomes": 1, "steps": 1, "events": 1}
    assert store.counts() == {"decisions": 2, "outcomes": 1, "steps": 1, "events": 1, "dead_letters": 0}

    assert read_archive(root, "decisions") == [("old-a", "a", "1970-01-11"), ("old-b", "team/b c", "1970-01-11")]
    assert read_archive(root, "outcomes") == [("old-oa", "a", "1970-01-11")]
    assert read_archive(root, "steps") == [("old-s", "a", "1970-01-11")]
    assert read_archive(root, "events") == [("old-e", "team/b c", "1970-01-11")]
    assert (root / "decisions" / "agent=team%2Fb%20c" / "date=1970-01-11").is_dir()
    assert not list(root.glob(".staging-*"))

    # pyarrow reads the same partitions, decoding the escaped agent name.
    table = ds.dataset(root / "decisions", format="parquet", partitioning="hive").to_table()
    assert sorted(zip(table.column("id").to_pylist(), table.column("agent").to_pylist())) == [
        ("old-a", "a"), ("old-b", "team/b c")
    ]
    [part] = (root / "decisions" / "agent=a").rglob("part-*.parquet")
    assert pq.ParquetFile(part).metadata.row_group(0).column(0).compression == "ZSTD"


def test_a_second_archive_run_adds_files_beside_the_first(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    store.write([decision("d1")], received_at=DAY)
    store.archive(older_than=5 * DAY, root=root, compression="snappy")
    store.write([decision("d2")], received_at=DAY)
    assert store.archive(older_than=5 * DAY, root=root, compression="snappy")["decisions"] == 1
    assert [r[0] for r in read_archive(root, "decisions")] == ["d1", "d2"]
    assert len(list((root / "decisions").rglob("*.parquet"))) == 2


@pytest.mark.parametrize("compression, codec", [("gzip", "GZIP"), ("uncompressed", "UNCOMPRESSED")])
def test_archive_writes_the_configured_compression(store: Store, tmp_path: Path, compression: str, codec: str) -> None:
    store.write([decision("d1")], received_at=DAY)
    store.archive(older_than=5 * DAY, root=tmp_path / "archive", compression=compression)
    [part] = (tmp_path / "archive" / "decisions").rglob("*.parquet")
    assert pq.ParquetFile(part).metadata.row_group(0).column(0).compression == codec


def test_archive_rejects_an_unknown_compression(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="brotli"):
        store.archive(older_than=1.0, root=tmp_path, compression="brotli")


def test_a_failed_archive_copy_deletes_nothing_and_leaves_no_files(store: Store, tmp_path: Path) -> None:
    store.write([decision("big", context=incompressible_context())], received_at=DAY)
    root = tmp_path / "archive"
    with file_size_limit(64 * 1024), pytest.raises(StorageError, match="archiving decisions"):
        store.archive(older_than=5 * DAY, root=root, compression="zstd")
    assert store.counts()["decisions"] == 1
    assert not list(root.rglob("*.parquet")) and not list(root.glob(".staging-*"))

    assert store.archive(older_than=5 * DAY, root=root, compression="zstd")["decisions"] == 1
    assert read_archive(root, "decisions") == [("big", "a", "1970-01-02")]


class _FailingCommit:
    """The store's connection, whose next commit fails: before it takes effect (``through`` false,
    the transaction rolled back) or after (an error that hides a commit that went through)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, through: bool) -> None:
        self._con = con
        self._through = through

    def __getattr__(self, name: str):
        return getattr(self._con, name)

    def commit(self) -> None:
        if self._through:
            self._con.commit()
        else:
            self._con.rollback()
        raise duckdb.IOException("IO Error: could not write the write-ahead log (injected)")


def every_id(store: Store, root: Path, table: str = "decisions") -> list[str]:
    """The ids of ``table`` in the database and in the archive, with repeats."""
    with store._guard("reading") as con:
        live = [i for (i,) in con.execute(f"SELECT id FROM {table}").fetchall()]
    archived = [i for i, _, _ in read_archive(root, table)] if list((root / table).rglob("*.parquet")) else []
    return sorted(live + archived)


@pytest.mark.parametrize("through", [False, True], ids=["commit-failed", "commit-went-through"])
def test_a_failed_archiving_commit_leaves_each_row_in_one_place(store: Store, tmp_path: Path, through: bool) -> None:
    store.write([decision("old1"), decision("old2")], received_at=DAY)
    store.write([decision("new")], received_at=10 * DAY)
    root = tmp_path / "archive"
    real = store._con
    store._con = _FailingCommit(real, through)  # type: ignore[assignment]
    try:
        with pytest.raises(StorageError, match="archiving outcomes|archiving decisions"):
            store.archive(older_than=5 * DAY, root=root, compression="zstd")
    finally:
        store._con = real
    # no row is in the archive while it may still be in DuckDB; what the commit did is decided
    # by the record it leaves, at the next pass, snapshot or forget
    [staging] = list(root.glob(".staging-*"))
    assert [p.relative_to(staging).parts[0] for p in root.rglob("*.parquet")] == ["decisions"]
    snap = store.read_out(tmp_path / "snap", root)  # it finishes or undoes the pass first
    assert not list(root.glob(".staging-*"))
    assert every_id(store, root) == ["new", "old1", "old2"]
    assert snap.rows["decisions"] == (1 if through else 3)
    with store._guard("reading") as con:
        assert con.execute("SELECT count(*) FROM archive_passes").fetchone() == (0,)

    store.archive(older_than=5 * DAY, root=root, compression="zstd")
    assert every_id(store, root) == ["new", "old1", "old2"]
    assert read_archive(root, "decisions") == [("old1", "a", "1970-01-02"), ("old2", "a", "1970-01-02")]


def test_files_a_pass_could_not_move_into_place_are_published_by_the_next(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reflexd.service.store import retention

    store.write([decision("old")], received_at=DAY)
    root = tmp_path / "archive"
    replace = os.replace

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(retention.os, "replace", full_disk)
    with pytest.raises(StorageError, match="No space left"):
        store.archive(older_than=5 * DAY, root=root, compression="zstd")
    assert store.counts()["decisions"] == 0 and list(root.glob(".staging-*"))  # the rows wait in staging
    monkeypatch.setattr(retention.os, "replace", replace)
    assert store.archive(older_than=5 * DAY, root=root, compression="zstd")["decisions"] == 0
    assert read_archive(root, "decisions") == [("old", "a", "1970-01-02")] and not list(root.glob(".staging-*"))


def test_a_staging_folder_no_pass_recorded_is_deleted(store: Store, tmp_path: Path) -> None:
    """What a crash during a pass leaves (or an older version's): the rows are still in DuckDB."""
    store.write([decision("d1")], received_at=DAY)
    root = tmp_path / "archive"
    stale = root / ".staging-0123" / "decisions" / "agent=a" / "date=1970-01-02"
    stale.mkdir(parents=True)
    (stale / "part-x.parquet").write_bytes(b"half a file")
    assert store.archive(older_than=5 * DAY, root=root, compression="zstd")["decisions"] == 1
    assert not list(root.glob(".staging-*")) and read_archive(root, "decisions") == [("d1", "a", "1970-01-02")]


def test_forget_removes_an_agent_from_database_and_archive(store: Store, tmp_path: Path) -> None:
    old_and_new_experience(store)
    root = tmp_path / "archive"
    store.archive(older_than=20 * DAY, root=root, compression="zstd")

    removed = store.forget("a", archive_root=root)
    assert removed == {"outcomes": 1, "decisions": 1, "steps": 1, "events": 0, "dead_letters": 0, "insights": 0, "archive_partitions": 3}
    assert store.counts() == {"decisions": 1, "outcomes": 0, "steps": 0, "events": 1, "dead_letters": 0}
    assert not list(root.rglob("agent=a"))
    assert read_archive(root, "decisions") == [("old-b", "team/b c", "1970-01-11")]

    assert store.forget("team/b c", archive_root=root)["archive_partitions"] == 2
    assert store.counts()["decisions"] == 0
    assert not list(root.rglob("*.parquet"))


def test_forget_without_an_archive_touches_only_the_database(store: Store) -> None:
    store.write([decision("d1", agent="x"), decision("d2", agent="y")], 1.0)
    removed = store.forget("x", archive_root=None)
    assert removed == {"outcomes": 0, "decisions": 1, "steps": 0, "events": 0, "dead_letters": 0, "insights": 0}
    assert store.counts()["decisions"] == 1


def test_forget_removes_the_dead_letters_whose_raw_bytes_name_the_agent(store: Store) -> None:
    def letter(raw: bytes) -> DeadLetter:
        return DeadLetter(received_at=1.0, peer_uid=None, peer_pid=None, code="invalid", reason="r", raw=raw,
                          raw_size=len(raw))

    naming_x = [
        b'{"type": "decision", "agent" : "x", "context": {"cut sh',  # JSON, cut short
        b"\x92" + msgspec.msgpack.encode({"type": "event", "agent": "x", "kind": "k"}),  # msgpack
    ]
    others = [
        b'{"type": "decision", "agent": "y", "chosen": "x", "actions": ["x"]}',  # x only as an action
        msgspec.msgpack.encode({"agent": "xx"}),
        b"",  # raw bytes not kept
    ]
    store.dead_letter([letter(raw) for raw in naming_x + others])
    assert store.forget("x", archive_root=None)["dead_letters"] == 2
    with store._guard("reading") as con:
        left = sorted(raw for (raw,) in con.execute("SELECT raw FROM dead_letters").fetchall())
    assert left == sorted(others)


# ---- model events and status -----------------------------------------------------------------


def test_model_events_come_back_newest_first_with_their_detail(store: Store) -> None:
    store.record_model_event("v1", "trained", {"rows": 10}, at=1.0)
    store.record_model_event("v1", "promoted", {"gate": {"lower": 0.1}}, at=2.0)
    store.record_model_event("v2", "rejected", {"reason": "worse", "loss": float("inf")}, at=3.0)
    assert store.model_events(limit=2) == [
        {"at": 3.0, "version": "v2", "event": "rejected", "detail": {"reason": "worse", "loss": None}},
        {"at": 2.0, "version": "v1", "event": "promoted", "detail": {"gate": {"lower": 0.1}}},
    ]


def test_stats_report_file_sizes_and_row_counts(store: Store, db: Path) -> None:
    store.write([decision("d1"), Event(agent="a", kind="k")], 1.0)
    stats = store.stats()
    assert stats["path"] == str(db)
    assert stats["db_bytes"] == db.stat().st_size > 0
    wal = db.with_name(db.name + ".wal")
    assert stats["wal_bytes"] == (wal.stat().st_size if wal.exists() else 0)
    assert stats["rows"] == {"decisions": 1, "outcomes": 0, "steps": 0, "events": 1, "dead_letters": 0}

"""The ingest spool on its own: lines, segments, torn tails, and what JSON cannot hold."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import msgspec
import pytest

from reflexd.errors import StorageError
from reflexd.service import spool as spool_module
from reflexd.service.spool import Spool, encode_line, plain_json
from reflexd.service.store import Store
from reflexd.wire.protocol import Action, Decision, Event, Outcome, Step


def decision(i: int) -> Decision:
    return Decision(id=f"d{i}", agent="a", context={"i": i}, actions=["x", Action(id="y", features={"c": 1.5})], chosen="x", prob=0.5)


def test_a_line_is_one_json_object_with_every_type_grouped() -> None:
    events = [decision(1), Outcome(decision_id="d1", reward=2.0), Step(agent="a", episode="e", index=3, observation={}, action="x"), Event(agent="a", kind="k")]
    line = encode_line(events, 12.5, 7)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    doc = json.loads(line)
    assert doc["received_at"] == 12.5 and doc["line"] == 7
    assert [len(doc[k]) for k in ("decisions", "outcomes", "steps", "events")] == [1, 1, 1, 1]
    assert doc["decisions"][0]["actions"] == ["x", {"id": "y", "features": {"c": 1.5}}]
    with pytest.raises(TypeError, match="not dict"):
        encode_line([{"type": "decision"}], 1.0, 0)  # type: ignore[list-item]


def test_values_json_cannot_hold_are_kept_as_text_not_refused() -> None:
    ext = msgspec.msgpack.Ext(3, b"zz")
    event = Event(agent="a", kind="k", data={"ext": ext, (1, 2): 1, "deep": [[[1]]]})
    doc = json.loads(encode_line([event], 1.0, 0))
    data = doc["events"][0]["data"]
    assert data["ext"] == {"msgpack_ext": 3, "data": "eno="} and data["(1, 2)"] == 1 and data["deep"] == [[[1]]]
    assert json.loads(plain_json({1: float("nan"), "s": {b"k": object}})) == {"1": None, "s": {"b'k'": "<class 'object'>"}}


def test_segments_roll_over_at_their_size_and_take_hands_over_the_open_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", segment_bytes=1)  # every line fills a segment
    spool.append([decision(1)], 1.0)
    spool.append([decision(2)], 2.0)
    assert spool.segments == 2
    big = Spool(tmp_path / "big", segment_bytes=1 << 20)
    big.append([decision(3)], 3.0)
    assert big.segments == 1  # still open
    (only,) = big.take()
    assert big.take() == [only]  # handed over, not yet loaded
    big.loaded(only)
    assert big.segments == 0 and big.pending_bytes == 0 and not only.exists()
    names = [p.name for p in spool.take()]
    assert names == sorted(names) and len({n.split("-")[1] for n in names}) == 2  # ordered, and unique


def test_a_torn_last_line_is_cut_off_at_start_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append([decision(1)], 1.0)
    spool.close()
    (segment,) = spool.take()
    whole = segment.read_bytes()
    with open(segment, "ab") as f:
        f.write(encode_line([decision(2)], 2.0, 1)[:-9])  # a crash in the middle of an append
    again = Spool(tmp_path / "spool", 1 << 20)
    assert again.take() == [segment] and segment.read_bytes() == whole
    assert again.pending_bytes == len(whole)
    store = Store(tmp_path / "r.duckdb")
    assert store.load(segment).decisions == 1
    store.close()


def test_an_empty_leftover_segment_is_removed_and_strays_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    (root / "000000000001-0123456789ab.ndjson").write_bytes(b'{"received_at": 1')  # torn first line
    (root / "notes.txt").write_text("not a segment")
    spool = Spool(root, 1 << 20)
    assert spool.take() == [] and sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_a_failed_append_is_a_storage_error_and_leaves_no_partial_line(tmp_path: Path) -> None:
    """The file-size limit makes the write fail part-way, as a full disk would (Python ignores SIGXFSZ)."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append([decision(1)], 1.0)
    (segment,) = list((tmp_path / "spool").iterdir())
    size = segment.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))
    try:
        with pytest.raises(StorageError, match="appending 1 events to the ingest spool failed"):
            spool.append([decision(2)], 2.0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert segment.stat().st_size == size
    spool.append([decision(3)], 3.0)  # writes resume where the good lines end
    spool.close()
    assert [json.loads(line)["decisions"][0]["id"] for line in segment.read_bytes().splitlines()] == ["d1", "d3"]


def test_a_big_batch_is_split_into_lines_of_bounded_length(tmp_path: Path, monkeypatch) -> None:
    """DuckDB's reader holds a line whole (twice), so a batch is spread over lines of LINE_BYTES."""
    monkeypatch.setattr(spool_module, "LINE_BYTES", 64 << 10)
    spool = Spool(tmp_path / "spool", 1 << 30)
    events = [Event(agent="a", kind="k", data={"s": "x" * 1000}) for _ in range(2_000)]  # no ids: derived
    spool.append(events, 1.0)  # ~2 MiB
    spool.append(events[:10], 2.0)
    spool.close()
    (segment,) = spool.take()
    lines = segment.read_bytes().splitlines()
    assert len(lines) > 32 and max(map(len, lines)) <= 64 << 10
    assert [json.loads(line)["line"] for line in lines] == list(range(len(lines)))
    store = Store(tmp_path / "r.duckdb")
    assert store.load(segment).events == 2_010  # ids derived per line stay unique
    store.close()


def test_forget_removes_an_agents_events_from_the_rejected_lines_and_nothing_else(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    rejected = tmp_path / "spool" / "rejected"
    rejected.mkdir()

    def dec(i: str, agent: str) -> Decision:
        return Decision(id=i, agent=agent, context={}, actions=["x"], chosen="x", prob=1.0)

    mixed = encode_line(
        [dec("dx", "x"), dec("dy", "y"), Outcome(decision_id="dx", reward=1.0), Outcome(decision_id="dy", reward=0.0),
         Outcome(decision_id="elsewhere", agent="x", reward=1.0), Event(agent="x", kind="k"), Event(agent="y", kind="k")],
        1.0, 0,
    )
    only_x = encode_line([dec("dx2", "x"), Step(agent="x", episode="e", index=0, observation={}, action="x")], 2.0, 1)
    # damaged lines: one names x as its agent, the other names x only as an action (and a \r)
    unreadable_x = b'{"decisions": [{"agent": "x", "id": "d'
    unreadable = b'{"decisions": [{"agent": "y", "chosen": "x", "actions": ["x"], "id": "d\r'
    (rejected / "000000000001-aaaaaaaaaaaa.ndjson").write_bytes(mixed + unreadable_x + b"\n" + unreadable + b"\n")
    (rejected / "000000000002-bbbbbbbbbbbb.ndjson").write_bytes(only_x)
    stray = rejected / "notes.txt"  # not a segment's file: never read or rewritten
    stray.write_bytes(only_x)

    assert spool.forget("x") == 4 + 2 + 1
    assert not (rejected / "000000000002-bbbbbbbbbbbb.ndjson").exists()
    assert sorted(p.name for p in rejected.iterdir()) == ["000000000001-aaaaaaaaaaaa.ndjson", "notes.txt"]
    assert stray.read_bytes() == only_x
    kept = (rejected / "000000000001-aaaaaaaaaaaa.ndjson").read_bytes().split(b"\n")[:-1]
    assert kept[1] == unreadable and len(kept) == 2
    doc = json.loads(kept[0])
    assert doc["received_at"] == 1.0
    assert [d["id"] for d in doc["decisions"]] == ["dy"] and [o["decision_id"] for o in doc["outcomes"]] == ["dy"]
    assert [e["agent"] for e in doc["events"]] == ["y"] and doc["steps"] == []
    # forgetting again finds nothing, and another agent's lines were never touched
    assert spool.forget("x") == 0 and spool.forget("nobody") == 0
    assert (rejected / "000000000001-aaaaaaaaaaaa.ndjson").read_bytes().split(b"\n")[:-1] == kept
    spool.close()


def test_forget_with_nothing_ever_rejected_is_a_no_op(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    assert spool.forget("x") == 0 and not (tmp_path / "spool" / "rejected").exists()
    spool.close()


def test_forget_reads_lines_nested_too_deep_to_decode_as_damaged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    deep: dict = {}
    for _ in range(3000):
        deep = {"d": deep}
    line = encode_line([Event(agent="x", kind="k", data=deep), Event(agent="y", kind="k")], 1.0, 0)
    other = encode_line([Event(agent="y", kind="k", data=deep)], 2.0, 1)
    spool.rejected.mkdir()
    (spool.rejected / "000000000001-aaaaaaaaaaaa.ndjson").write_bytes(line + other)
    # the first line names x and cannot be told apart, so it goes whole; the second stays
    assert spool.forget("x") == 1
    assert (spool.rejected / "000000000001-aaaaaaaaaaaa.ndjson").read_bytes() == other
    spool.close()

"""Issue 18, data: what the ingest loader and the store do with damaged bytes, in-process.

A spool line with one damaged event loses only that event; a loaded segment waits in
spool/loaded/ until a checkpoint; a checkpoint that fails does not leave the store unusable; the
integrity check tells a sound database file from a damaged one.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import duckdb
import msgspec
import pytest

from reflexd.config import IngestConfig, StoreConfig
from reflexd.errors import RejectedData, StoreDamaged
from reflexd.service.ingest import Ingest
from reflexd.service.spool import Spool, encode_line, split_line
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, Outcome

N = 500
DAMAGED = 250


def decisions(n: int, start: int = 0) -> list[Decision]:
    return [
        Decision(id=f"d{i}", agent="a", context={"i": i, "s": "é" * (i % 7)}, actions=["x", "y"], chosen="x", prob=0.5)
        for i in range(start, start + n)
    ]


def event_span(line: bytes, marker: bytes) -> tuple[int, int]:
    """Where the event holding ``marker`` starts and ends in ``line``."""
    at = line.index(marker)
    start = line.rindex(b'{"type":', 0, at)
    return start, line.index(b'{"type":', at)


def spool_with(root: Path, line: bytes) -> Path:
    """A segment left by a crash, holding ``line``."""
    spool = Spool(root / "spool", 1 << 20)
    spool.append(decisions(1, start=10_000), 1.0)  # names the segment as the daemon would
    spool.close()
    (segment,) = spool.take()
    segment.write_bytes(line)
    return segment


def run_ingest(store: Store) -> Ingest:
    async def main() -> Ingest:
        ingest = Ingest(store, Spool(store.path.parent / "spool", 1 << 20), IngestConfig())
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ingest.run)
                await ingest.barrier(loaded=True)
                ingest.close()
        return ingest

    return anyio.run(main)


def stored_ids(store: Store, table: str = "decisions") -> set[str]:
    with store._guard("test") as con:
        return {r[0] for r in con.execute(f"SELECT id FROM {table}").fetchall()}


def letters(store: Store) -> list[tuple[str, str]]:
    with store._guard("test") as con:
        return con.execute("SELECT code, reason FROM dead_letters").fetchall()


# ---- item 4: a damaged spool line --------------------------------------------------------


def _quote(event: bytes) -> bytes:  # a structural quote: the event is no longer JSON
    at = event.index(b'"chosen"')
    return event[:at] + b"#" + event[at + 1 :]


def _key(event: bytes) -> bytes:  # a field name: JSON still, but no decision
    return event.replace(b'"chosen"', b'"chosem"')


def _utf8(event: bytes) -> bytes:  # a byte of text: no longer UTF-8
    at = event.index(b'"context"') + 12
    return event[:at] + b"\xff" + event[at + 1 :]


@pytest.mark.parametrize("damage", [_quote, _key, _utf8], ids=["quote", "field-name", "utf8"])
def test_one_damaged_event_costs_that_event_not_its_line(tmp_path: Path, damage) -> None:
    line = encode_line(decisions(N), 5.0, 0)
    start, end = event_span(line, b'"id":"d%d"' % DAMAGED)
    damaged = line[:start] + damage(line[start:end]) + line[end:]
    assert damaged != line and len(damaged) == len(line)
    segment = spool_with(tmp_path, damaged)
    store = Store(tmp_path / "r.duckdb")
    try:
        ingest = run_ingest(store)
        ids = stored_ids(store)
        assert ids == {f"d{i}" for i in range(N) if i != DAMAGED}
        assert ingest.counters.refused == 1 and ingest.counters.recovered == N - 1
        rejected = (tmp_path / "spool" / "rejected" / segment.name).read_bytes()
        assert rejected.count(b"\n") == 1 and b'"id":"d%d"' % DAMAGED in rejected
        assert b'"id":"d%d"' % (DAMAGED + 1) not in rejected  # only the damaged event is set aside
        ((code, reason),) = letters(store)
        assert code == "refused_by_store"
        assert f"1 events set aside in {tmp_path / 'spool' / 'rejected' / segment.name}" in reason
        assert f"the line's other {N - 1} events were loaded" in reason
    finally:
        store.close()


def test_any_flipped_bit_in_an_event_costs_at_most_that_event(tmp_path: Path) -> None:
    rng = random.Random(18)
    line = encode_line(decisions(N), 5.0, 0)
    start, end = event_span(line, b'"id":"d%d"' % DAMAGED)
    outcomes = {"loaded whole": 0, "set aside": 0}
    for trial in range(25):
        at = rng.randrange(start, end)
        damaged = line[:at] + bytes([line[at] ^ (1 << rng.randrange(8))]) + line[at + 1 :]
        root = tmp_path / f"t{trial}"
        spool_with(root, damaged)
        store = Store(root / "r.duckdb")
        try:
            ingest = run_ingest(store)
            c = ingest.counters
            others = {f"d{i}" for i in range(N) if i != DAMAGED}
            assert others <= stored_ids(store), f"byte {at - start} of the event: an intact event was lost"
            assert c.recovered + c.refused >= N - 1 and c.refused <= 1, (at - start, c)
            outcomes["set aside" if c.refused else "loaded whole"] += 1
        finally:
            store.close()
    assert outcomes["set aside"] > 0, outcomes


def test_events_sent_without_ids_keep_the_ids_the_whole_line_would_have_given_them(tmp_path: Path) -> None:
    outcomes = [Outcome(decision_id=f"d{i}", reward=float(i)) for i in range(100)]
    line = encode_line(decisions(10) + outcomes, 5.0, 3)
    start, end = event_span(line, b'"reward":40.0')
    damaged = line[:start] + line[start:end].replace(b'"reward"', b'#reward"') + line[end:]
    segment = spool_with(tmp_path, damaged)
    store = Store(tmp_path / "r.duckdb")
    try:
        run_ingest(store)
        expected = {f"{segment.stem}.3.{i}" for i in range(100) if i != 40}
        assert stored_ids(store, "outcomes") == expected
        # loading the same line again (a crash before its segment was set aside) adds nothing
        again = tmp_path / "again" / segment.name
        again.parent.mkdir()
        again.write_bytes(damaged)
        result, refused = store.load_each_line(again)
        assert (result.inserted, result.duplicates) == (0, 109) and refused[0].events == 1
    finally:
        store.close()


def test_events_the_store_refuses_one_by_one_are_found_by_halving(tmp_path: Path, monkeypatch) -> None:
    """Events that read well but that DuckDB refuses: the rest of the line loads around them."""
    store = Store(tmp_path / "r.duckdb")
    load = store.load

    def refusing(segment: Path):
        data = segment.read_bytes()
        if b'"id":"d7"' in data or b'"id":"d60"' in data:
            raise RejectedData("refused (simulated)")
        return load(segment)

    monkeypatch.setattr(store, "load", refusing)
    segment = tmp_path / "000000000001-0123456789ab.ndjson"
    segment.write_bytes(encode_line(decisions(100), 5.0, 0) + encode_line(decisions(10, start=100), 6.0, 1))
    try:
        result, refused = store.load_each_line(segment)
        assert result.inserted == 108 and stored_ids(store) == {f"d{i}" for i in range(110)} - {"d7", "d60"}
        (aside,) = refused
        assert (aside.events, aside.loaded, aside.reason) == (2, 98, "refused (simulated)")
        kept = msgspec.json.decode(aside.line)
        assert [d["id"] for d in kept["decisions"]] == ["d7", "d60"] and kept["received_at"] == 5.0
    finally:
        store.close()


def test_split_line_reads_every_intact_event_and_counts_the_damaged() -> None:
    line = encode_line(decisions(5), 1.0, 0)
    a, _ = event_span(line, b'"id":"d1"')
    b, _ = event_span(line, b'"id":"d3"')
    damaged = line[: a + 3] + b"\xff" + line[a + 4 : b + 3] + b"\xff" + line[b + 4 :]
    parts = split_line(damaged, "seg")
    assert parts is not None and parts.damaged_events == 2
    assert [raw.split(b'"id":"')[1][:2] for _, raw in parts.events] == [b"d0", b"d2", b"d4"]
    assert split_line(b"not a spool line\n", "seg") is None
    # unread, a line counts the events whose start can still be told
    assert Spool.events_in(damaged) == 3 and Spool.events_in(line) == 5 and Spool.events_in(b"garbage\n") == 1


# ---- item 1: loaded segments wait for a checkpoint ---------------------------------------


def test_loaded_segments_wait_in_loaded_until_a_checkpoint(tmp_path: Path) -> None:
    # long enough that no checkpoint can come between a load and the check after it on a slow machine
    store = Store(tmp_path / "r.duckdb", StoreConfig(checkpoint_interval=5.0))
    loaded = tmp_path / "spool" / "loaded"

    async def main() -> None:
        ingest = Ingest(store, Spool(tmp_path / "spool", 1 << 20), IngestConfig())
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ingest.run)
                await ingest.submit(decisions(100))
                await ingest.barrier(loaded=True)
                assert len(list(loaded.iterdir())) == 1  # committed, in the WAL only: kept
                while list(loaded.iterdir()):  # checkpointed after checkpoint_interval: deleted
                    await anyio.sleep(0.05)
                await ingest.submit(decisions(100, start=100))
                await ingest.barrier(loaded=True)
                assert len(list(loaded.iterdir())) == 1
                ingest.close()
        assert list(loaded.iterdir()) == []  # a clean stop checkpoints

    try:
        anyio.run(main)
        assert store.counts()["decisions"] == 200
    finally:
        store.close()


def test_segments_in_loaded_are_loaded_again_and_a_loss_is_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append(decisions(50), 1.0)
    spool.close()
    (segment,) = spool.take()
    (tmp_path / "spool" / "loaded").mkdir()
    kept = segment.rename(tmp_path / "spool" / "loaded" / segment.name)  # loaded, then a crash
    store = Store(tmp_path / "r.duckdb")
    try:
        store.write(decisions(20), 1.0)  # what the WAL still had
        ingest = run_ingest(store)
        assert ingest.counters.restored == 30 and ingest.counters.recovered == 0
        assert store.counts()["decisions"] == 50 and not kept.exists()
        assert run_ingest(store).counters.restored == 0  # nothing left to load again
    finally:
        store.close()


def test_a_failed_checkpoint_leaves_the_store_usable_once_the_disk_is(tmp_path: Path) -> None:
    """DuckDB invalidates a database whose checkpoint failed; the store opens it again."""
    code = textwrap.dedent(
        f"""
        import resource, signal, time
        from reflexd.errors import StorageError
        from reflexd.service.store import Store
        from reflexd.wire.protocol import Decision
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        ds = lambda a, n: [Decision(id=f"{{a}}{{i}}", agent="a", context={{"s": "x" * 200}}, actions=["x"], chosen="x", prob=1.0) for i in range(n)]
        store = Store({str(tmp_path / "r.duckdb")!r})
        store.checkpoint()
        store.write(ds("a", 20000), 1.0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            store.checkpoint()
            print("checkpoint succeeded")
        except StorageError as exc:
            print("failed:", exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        store.write(ds("b", 10), 2.0)
        store.checkpoint()
        print("rows", store.counts()["decisions"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "failed:" in proc.stdout and "rows 20010" in proc.stdout, proc.stdout


# ---- item 2: the integrity check ---------------------------------------------------------


def make_store(path: Path, n: int = 20_000) -> None:
    with Store(path) as store:
        for k in range(0, n, 5000):
            store.write(decisions(5000, start=k), 1.0)
            store.write([Outcome(decision_id=f"d{i}", reward=1.0, id=f"o{i}") for i in range(k, k + 5000)], 2.0)


def data_block(path: Path, table: str = "decisions", column: str = "context") -> int:
    """The file offset of a block holding ``table.column``'s data."""
    with duckdb.connect(str(path), read_only=True) as con:
        (block_size,) = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()
        (block,) = con.execute(
            f"SELECT min(block_id) FROM pragma_storage_info('{table}') WHERE column_name = ? AND block_id >= 0", [column]
        ).fetchone()
    return 3 * 4096 + block * block_size  # after the file's three 4 KiB headers


def test_a_sound_store_passes_and_reports_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "r.duckdb"
    make_store(db)
    assert Store.check_file(db)["decisions"] == 20_000
    assert Store.check_file(tmp_path / "absent.duckdb") is None
    with Store(db) as store:
        assert store.verify()["outcomes"] == 20_000


@pytest.mark.parametrize("damage", ["half", "flipped-data-block"])
def test_a_damaged_store_is_named_damaged_and_left_as_it_was(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "r.duckdb"
    make_store(db)
    with Store(db) as store:
        assert store.counts()["decisions"] == 20_000  # a count alone reads no column block
    if damage == "half":
        os.truncate(db, db.stat().st_size // 2)
    else:
        at = data_block(db) + 1000
        with open(db, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x10]))
    before = db.read_bytes()
    shutil.copy(db, tmp_path / "copy.duckdb")
    with pytest.raises(StoreDamaged) as caught:
        Store.check_file(db)
    assert caught.value.code == "store_damaged" and str(db) in str(caught.value)
    assert "mv " in str(caught.value) and "docs/operations.md" in str(caught.value)
    assert db.read_bytes() == before and not db.with_name(db.name + ".wal").exists()


def test_a_new_segment_sorts_after_those_still_waiting_in_loaded(tmp_path: Path) -> None:
    waiting = tmp_path / "spool" / "loaded"
    waiting.mkdir(parents=True)
    (waiting / "000000000009-0123456789ab.ndjson").write_bytes(encode_line([], 1.0, 0))
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append([Decision(id="d", agent="a", context={}, actions=["x"], chosen="x", prob=1.0)], 2.0)
    (new,) = spool.take()
    # before: numbering restarted below it, so a second crash restored them out of order
    assert new.name > "000000000009"

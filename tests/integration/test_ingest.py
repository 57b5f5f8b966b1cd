"""Ingest on its own: batching into a real Store, flush barriers, the queue bound, the scheduler's idle check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from reflexd.config import IngestConfig
from reflexd.errors import StorageError
from reflexd.service.ingest import Ingest
from reflexd.service.scheduler import cpu_idle
from reflexd.service.spool import Spool, encode_line
from reflexd.service.store import DeadLetter, Store
from reflexd.wire.protocol import Decision, Outcome


def decisions(start: int, n: int) -> list[Decision]:
    return [Decision(id=f"d{i}", agent="a", context={"i": i}, actions=["x", "y"], chosen="x", prob=0.5) for i in range(start, start + n)]


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "r.duckdb")
    yield s
    s.close()


def make_ingest(store: Store, **settings) -> Ingest:
    cfg = IngestConfig(**settings)
    return Ingest(store, Spool(store.path.parent / "spool", cfg.segment_bytes), cfg)


def test_a_barrier_returns_once_everything_before_it_is_stored(store: Store) -> None:
    async def main() -> None:
        ingest = make_ingest(store, batch_size=1000, flush_interval=0.05, queue_size=100_000)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest.run)
            for k in range(10):
                await ingest.submit(decisions(k * 300, 300))
            await ingest.barrier()
            # durable: in the spool, whether or not the store has it yet
            assert ingest.counters.queued == 0
            assert ingest.counters.spooled + ingest.counters.stored == 3000
            await ingest.barrier(loaded=True)
            assert store.counts()["decisions"] == 3000
            assert ingest.counters.stored == 3000 and ingest.backlog == 0
            assert ingest.spool.pending_bytes == 0 and ingest.spool.segments == 0
            await ingest.submit(decisions(0, 300))  # a resend
            await ingest.barrier(loaded=True)
            assert ingest.counters.duplicates == 300
            ingest.close()

    anyio.run(main)


def test_submit_waits_while_the_queue_is_full(store: Store) -> None:
    async def main() -> None:
        ingest = make_ingest(store, batch_size=100, flush_interval=0.01, queue_size=500)
        await ingest.submit(decisions(0, 400))
        blocked = anyio.Event()
        done = anyio.Event()

        async def second() -> None:
            blocked.set()
            await ingest.submit(decisions(400, 400))  # 800 > 500: waits for the writer
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await blocked.wait()
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set() and ingest.counters.queued == 400
            assert not ingest.offer(decisions(900, 200))  # the daemon's own decisions never wait
            assert ingest.counters.unlogged == 200
            tg.start_soon(ingest.run)
            with anyio.fail_after(30):
                await done.wait()
            await ingest.barrier()
            ingest.close()
        assert store.counts()["decisions"] == 800  # closing loads everything

    anyio.run(main)


def test_appends_wait_while_the_spool_is_full_and_the_store_behind(store: Store, monkeypatch) -> None:
    """A store that cannot keep up stops the spool at spool_bytes; the queue then pushes back."""
    loads: list[int] = []
    real_load = store.load
    release = threading.Event()

    def slow_load(segment):
        release.wait(60)
        loads.append(1)
        return real_load(segment)

    monkeypatch.setattr(store, "load", slow_load)

    async def main() -> None:
        ingest = make_ingest(store, batch_size=100, flush_interval=0.01, queue_size=300, spool_bytes=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest.run)
            await ingest.submit(decisions(0, 100))
            await ingest.barrier()  # the first batch is spooled: the spool is now over its bound
            for k in range(1, 4):
                await ingest.submit(decisions(k * 100, 100))
            with anyio.move_on_after(0.5):
                await ingest.submit(decisions(400, 100))  # the queue is full: waits
            assert ingest.counters.queued == 300 and ingest.counters.spooled == 100
            release.set()
            await ingest.barrier(loaded=True)
            assert store.counts()["decisions"] == 400 and ingest.backlog == 0
            ingest.close()

    anyio.run(main)
    assert loads


def test_a_restart_loads_what_the_spool_kept_exactly_once(store: Store) -> None:
    """Segments left by a crash are loaded at start-up; loading one twice adds nothing."""
    spool = Spool(store.path.parent / "spool", 1 << 20)
    idless = [Outcome(decision_id="d1", reward=1.0), Outcome(decision_id="d1", reward=1.0)]
    spool.append(decisions(0, 50) + idless, 1.0)
    spool.append(decisions(50, 50), 2.0)
    spool.close()
    (segment,) = spool.take()
    copy = segment.read_bytes()

    async def recover() -> Ingest:
        ingest = make_ingest(store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest.run)
            await ingest.barrier(loaded=True)
            assert store.counts()["decisions"] == 100  # leftovers count as loaded before anything new
            ingest.close()
        return ingest

    ingest = anyio.run(recover)
    assert ingest.counters.recovered == 102 and ingest.spool.segments == 0
    assert store.counts()["decisions"] == 100 and store.counts()["outcomes"] == 2
    segment.write_bytes(copy)  # as if the crash came after the load, before the file was removed
    ingest = anyio.run(recover)
    assert ingest.counters.recovered == 0
    assert store.counts()["decisions"] == 100 and store.counts()["outcomes"] == 2


def test_idle_check_compares_load_per_core() -> None:
    per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    assert cpu_idle(per_core + 1000.0)
    assert not cpu_idle(0.0) or per_core < 0.0


def test_logs_are_json_off_a_terminal_and_columns_on_one() -> None:
    code = (
        "from reflexd import log; log.configure('info', '{fmt}'); "
        "log.get('t').info('hello', answer=42)"
    )
    as_json = subprocess.run([sys.executable, "-c", code.format(fmt="auto")], capture_output=True, text=True, check=True)
    record = json.loads(as_json.stderr.strip().splitlines()[-1])
    assert record["event"] == "hello" and record["answer"] == 42 and record["level"] == "info"
    console = subprocess.run([sys.executable, "-c", code.format(fmt="console")], capture_output=True, text=True, check=True)
    assert "hello" in console.stderr and "answer" in console.stderr and not console.stderr.lstrip().startswith("{")
    assert "\x1b[" not in console.stderr  # asked for in a file (here a pipe), the columns carry no colour codes


def test_the_trainer_lowers_its_own_priority() -> None:
    code = (
        "import os; from reflexd.worker import lower_priority; lower_priority();"
        "print(os.nice(0), os.sched_getscheduler(0) == os.SCHED_IDLE)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["19", "True"]


def test_closing_while_the_store_fails_leaves_acknowledged_events_in_the_spool(store: Store, monkeypatch) -> None:
    def failing_load(segment):
        raise StorageError("disk full (simulated)")

    async def stop_while_failing() -> Ingest:
        ingest = make_ingest(store)
        monkeypatch.setattr(store, "load", failing_load)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest.run)
            await ingest.submit(decisions(0, 200))
            await ingest.barrier()  # acknowledged: in the spool
            ingest.close()  # must return although the store never succeeds
        return ingest

    ingest = anyio.run(stop_while_failing)
    assert ingest.storage_error == "disk full (simulated)" and ingest.spool.pending_bytes > 0
    monkeypatch.undo()

    async def restart() -> None:
        again = make_ingest(store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(again.run)
            await again.barrier(loaded=True)
            again.close()
        assert again.counters.recovered == 200

    anyio.run(restart)
    assert store.counts()["decisions"] == 200


def test_a_line_the_store_refuses_is_set_aside_and_the_rest_loads(store: Store) -> None:
    """A damaged spool line (here: a decision without an agent) must not stop ingest for good."""
    spool = Spool(store.path.parent / "spool", 1 << 20)
    spool.append(decisions(0, 10), 1.0)
    spool.close()
    (segment,) = spool.take()
    bad = b'{"received_at":2.0,"line":1,"decisions":[{"id":"bad","agent":null,"context":{},"actions":["x"],"chosen":"x","prob":1.0}]}\n'
    with open(segment, "ab") as f:
        f.write(bad)
    good = encode_line(decisions(10, 5), 3.0, 2)
    with open(segment, "ab") as f:
        f.write(good)

    async def main() -> Ingest:
        ingest = make_ingest(store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest.run)
            await ingest.barrier(loaded=True)
            ingest.close()
        return ingest

    ingest = anyio.run(main)
    assert store.counts()["decisions"] == 15 and ingest.counters.refused == 1
    rejected = store.path.parent / "spool" / "rejected" / segment.name
    assert rejected.read_bytes() == bad and not segment.exists()
    assert store.counts()["dead_letters"] == 1  # naming the reason and where the line is kept


def test_dead_letters_are_written_counted_and_loading_carries_on(store: Store) -> None:
    letter = DeadLetter(received_at=1.0, peer_uid=0, peer_pid=1, code="malformed", reason="r", raw=b"x", raw_size=1)

    async def main() -> Ingest:
        ingest = make_ingest(store)
        with anyio.fail_after(60):  # a loader that died would leave the barrier waiting
            await _dead_letter_rounds(ingest)
        return ingest

    async def _dead_letter_rounds(ingest: Ingest) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest.run)
            await ingest.submit(decisions(0, 5), [letter, letter])
            await ingest.barrier(loaded=True)
            assert ingest.counters.dead_letters == 2 and ingest.backlog == 0
            await ingest.submit(decisions(5, 5))  # the loader is still at work afterwards
            await ingest.barrier(loaded=True)
            assert store.counts()["decisions"] == 10
            ingest.close()

    anyio.run(main)
    assert store.counts()["dead_letters"] == 2


def test_closing_while_the_spool_is_full_and_the_store_failing_does_not_hang(store: Store, monkeypatch) -> None:
    def failing_load(segment):
        raise StorageError("disk full (simulated)")

    monkeypatch.setattr(store, "load", failing_load)

    async def main() -> Ingest:
        ingest = make_ingest(store, batch_size=100, flush_interval=0.01, spool_bytes=1)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ingest.run)
                await ingest.submit(decisions(0, 100))
                await ingest.barrier()  # spooled: the spool is now past its bound, and never drains
                await ingest.submit(decisions(100, 100))  # the writer waits for room that never comes
                await anyio.wait_all_tasks_blocked()
                ingest.close()
        return ingest

    ingest = anyio.run(main)
    assert ingest.spool.pending_bytes > 0  # what was acknowledged stays for the next start

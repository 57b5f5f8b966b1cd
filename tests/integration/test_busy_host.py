"""On a host that is never idle, a due run still starts, after trainer.max_idle_wait (issue 19).

The load average is the one fake here (``busy``, ``idle``): a real one cannot be set on demand; the
scheduler's monotonic clock is stepped by hand.
The store is a real DuckDB file holding real matured experiences.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest

from reflexd.config import Config, parse_config
from reflexd.registry import Registry
from reflexd.service import scheduler as scheduler_module
from reflexd.service.scheduler import Scheduler
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, Outcome


def _config(tmp_path: Path, **trainer: object) -> Config:
    return parse_config(
        msgspec.json.encode(
            {
                "state_dir": str(tmp_path / "state"),
                "rewards": {"wait_window": 0.0},
                "trainer": {"idle_load": 0.8, "min_new_examples": 1000, **trainer},
            }
        )
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state" / "reflexd.duckdb")
    long_ago = time.time() - 3600
    events: list[Decision | Outcome] = []
    for i in range(40):
        events.append(Decision(id=f"d{i}", agent="a", context={"x": i % 3}, actions=["l", "r"], chosen="l", prob=0.5, ts=long_ago))
        events.append(Outcome(decision_id=f"d{i}", reward=1.0, ts=long_ago))
    s.write(events, long_ago)
    yield s
    s.close()


@pytest.fixture
def idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake: an idle host, whatever the machine running the tests is doing."""
    monkeypatch.setattr(scheduler_module, "cpu_load", lambda: 0.0)


@pytest.fixture
def busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake: a 1-minute load average of 3 per core, far above trainer.idle_load."""
    monkeypatch.setattr(scheduler_module, "cpu_load", lambda: 3.0)


def _scheduler(config: Config, store: Store) -> Scheduler:
    # _due reads only the settings and the store; the other collaborators are never reached
    return Scheduler(lambda: config, store, None, Registry(config.state_path / "models"), None, anyio.Lock())  # type: ignore[arg-type]


def test_a_due_run_waits_for_idle_cpu_then_starts_anyway(tmp_path: Path, store: Store, busy: None) -> None:
    config = _config(tmp_path, max_idle_wait=600)
    sched = _scheduler(config, store)
    clock = [0.0]
    sched._clock = lambda: clock[0]

    assert anyio.run(sched._due) is None
    waiting = sched.status.waiting
    assert waiting is not None and "waiting for idle CPU" in waiting and "load 3.00" in waiting
    assert "starts anyway in 600 s" in waiting and "trainer.max_idle_wait" in waiting

    clock[0] += 599
    assert anyio.run(sched._due) is None
    assert "starts anyway in 1 s" in sched.status.waiting

    clock[0] += 2
    reason = anyio.run(sched._due)
    assert reason is not None and "waited 601 s for idle CPU" in reason
    assert sched.status.waiting is None
    # the bound counts from when the run became due again, not from the first wait
    assert anyio.run(sched._due) is None and "starts anyway in 600 s" in sched.status.waiting


def test_max_idle_wait_zero_waits_for_idle_cpu_forever(tmp_path: Path, store: Store, busy: None) -> None:
    sched = _scheduler(_config(tmp_path, max_idle_wait=0), store)
    clock = [0.0]
    sched._clock = lambda: clock[0]
    for _ in range(3):
        assert anyio.run(sched._due) is None
        assert sched.status.waiting.startswith("waiting for idle CPU") and "starts anyway" not in sched.status.waiting
        clock[0] += 10**6


def test_without_enough_new_experience_the_wait_is_for_data_not_cpu(tmp_path: Path, store: Store, busy: None) -> None:
    sched = _scheduler(_config(tmp_path, max_idle_wait=1), store)
    sched.status.trained_on = 40
    sched.status.cutoff = time.time()
    assert anyio.run(sched._due) is None
    assert "new matured experiences" in sched.status.waiting


def test_a_due_run_waiting_for_another_run_says_so(tmp_path: Path, store: Store) -> None:
    """Every line's runs, extractions and the behaviour model's take turns on one lock: a line whose
    run is due while another holds it says it waits its turn, not nothing."""
    sched = _scheduler(_config(tmp_path), store)

    async def main() -> str | None:
        lock = sched._lock
        await lock.acquire()  # another line's run under way
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sched.train_once, "new experience")
                with anyio.fail_after(30):
                    while sched.status.waiting is None:
                        await anyio.sleep(0.01)
                said = sched.status.waiting
                tg.cancel_scope.cancel()
        finally:
            lock.release()
        return said

    said = anyio.run(main)
    assert said is not None and said.startswith("due (new experience), waiting its turn: runs take turns")


def test_one_check_counts_every_lines_experience_and_each_due_line_trains_in_turn(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_module, "cpu_load", lambda: 0.0)
    long_ago = time.time() - 3600
    store.write(
        [Decision(id=f"b{i}", agent="b", context={"x": 1}, actions=["l", "r"], chosen="r", prob=0.5, ts=long_ago) for i in range(40)],
        long_ago,
    )
    config = _config(tmp_path, check_interval=0.05)
    lines = {}
    for name, agents in [("a", ["a"]), ("b", ["b"]), ("c", ["c"]), ("late", ["a"])]:
        sched = Scheduler(lambda: config, store, None, Registry(tmp_path / name), None, anyio.Lock(), agents=lambda a=agents: a, line=name)  # type: ignore[arg-type]
        if name != "late":  # its model not loaded yet: not checked
            sched.start_from(None)
        lines[name] = sched
    counted: list[list[tuple[float, list[str] | None]]] = []
    real_counts = store.matured_counts
    monkeypatch.setattr(store, "matured_counts", lambda wanted, *rest: counted.append(list(wanted)) or real_counts(wanted, *rest))
    trained: list[tuple[str, str, str | None]] = []

    async def main() -> None:
        done = anyio.Event()
        for sched in lines.values():
            async def train_once(reason: str, sched: Scheduler = sched) -> dict:
                # what the others' status said while this one ran
                trained.append((sched.line, reason, lines["b"].status.waiting if sched.line == "a" else None))
                if len(trained) == 2:
                    done.set()
                return {}
            sched.train_once = train_once  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler_module.schedule, lambda: list(lines.values()), store, lambda: config)
            with anyio.fail_after(60):
                await done.wait()
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert counted[0] == [(0.0, ["a"]), (0.0, ["b"]), (0.0, ["c"])]  # one query for the three started lines
    assert [(line, reason) for line, reason, _ in trained] == [("a", "new experience"), ("b", "new experience")]
    assert trained[0][2].startswith("due (new experience), waiting its turn")
    assert "0 new matured experiences" in lines["c"].status.waiting


def test_a_line_whose_check_or_run_fails_costs_that_line_alone(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "cpu_load", lambda: 0.0)
    config = _config(tmp_path, check_interval=0.05)
    lines = [
        Scheduler(lambda: config, store, None, Registry(tmp_path / name), None, anyio.Lock(), agents=lambda: ["a"], line=name)  # type: ignore[arg-type]
        for name in ("broken", "failing", "fine")
    ]
    for sched in lines:
        sched.start_from(None)
    trained: list[str] = []

    def broken(new: int) -> str | None:
        raise RuntimeError("a bug in the check")

    lines[0].due_given = broken  # type: ignore[method-assign]

    async def main() -> None:
        done = anyio.Event()

        async def fails(reason: str) -> dict:
            trained.append("failing")
            raise OSError("cannot make the run's folder")

        async def works(reason: str) -> dict:
            trained.append("fine")
            if trained.count("fine") == 2:  # a second pass came: the loop outlived both failures
                done.set()
            return {}

        lines[1].train_once = fails  # type: ignore[method-assign]
        lines[2].train_once = works  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler_module.schedule, lambda: lines, store, lambda: config)
            with anyio.fail_after(60):
                await done.wait()
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert trained[:4] == ["failing", "fine", "failing", "fine"]


def test_a_rollback_by_hand_holds_automatic_runs_until_a_promotion_even_across_a_restart(
    tmp_path: Path, store: Store, idle: None
) -> None:
    config = _config(tmp_path)
    sched = _scheduler(config, store)
    reason = anyio.run(sched._due)
    assert reason is not None  # due: 40 new experiences
    sched.hold("rolled back by hand from v0002 to v0001")
    assert anyio.run(sched.train_once, reason) == {} and sched.status.runs == 0  # found due before the hold
    assert anyio.run(sched._due) is None
    assert sched.status.waiting.startswith("held: rolled back by hand from v0002 to v0001; automatic runs wait")
    again = _scheduler(config, store)  # a restart finds it in the line's registry folder
    again.recall_hold()
    assert again.held == "rolled back by hand from v0002 to v0001" and anyio.run(again._due) is None
    again.release()
    assert anyio.run(again._due) is not None
    later = _scheduler(config, store)
    later.recall_hold()
    assert later.held is None


def test_a_due_run_that_a_run_asked_for_meanwhile_made_stale_does_not_run(tmp_path: Path, store: Store, idle: None) -> None:
    sched = _scheduler(_config(tmp_path), store)
    reason = anyio.run(sched._due)
    assert reason == "new experience"
    sched.status.cutoff = time.time()  # a run asked for by hand trained on those experiences meanwhile
    assert anyio.run(sched.train_once, reason) == {} and sched.status.runs == 0

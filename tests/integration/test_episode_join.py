"""The reward join's episode-return credit (rewards.episode_return) on a real DuckDB store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from reflexd.config import parse_config
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, EpisodeEnd, Event, Outcome


def decision(id: str, ts: float, episode: str | None = "e1", agent: str = "a", version: str | None = None) -> Decision:
    return Decision(
        id=id, agent=agent, context={"x": 1}, actions=["l", "r"], chosen="l", prob=0.5, ts=ts, episode=episode,
        model_version=version,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state" / "reflexd.duckdb")
    yield s
    s.close()


def joined(store: Store, tmp_path: Path, config_text: str, now: float, **window) -> dict[str, tuple[float, int]]:
    dest = tmp_path / f"snap-{now}.parquet"
    store.snapshot(dest, now=now, config=parse_config(config_text), max_rows=1000, **window)
    return {r["id"]: (r["reward"], r["outcomes"]) for r in pq.read_table(dest).to_pylist()}


EPISODIC = "rewards: {wait_window: 10, default: 0.0, episode_return: true, discount: 0.5, episode_timeout: 100}"


def _three_steps(store: Store, end: float | None = 8.0, *, ended: bool = True) -> None:
    # written out of order, in one batch: the return follows ts, not arrival
    store.write([decision("d3", 3.0), decision("d1", 1.0), decision("d2", 2.0)], received_at=100.0)
    store.write(
        [Outcome(decision_id="d1", reward=1.0), Outcome(decision_id="d2", reward=2.0), Outcome(decision_id="d2", reward=2.0)],
        received_at=101.0,
    )
    if ended:
        store.write([EpisodeEnd(agent="a", episode="e1", reward=end, id="end-e1")], received_at=102.0)


def test_discounted_return_to_the_episodes_end(store: Store, tmp_path: Path) -> None:
    _three_steps(store)
    rows = joined(store, tmp_path, EPISODIC, now=200.0)
    # own rewards 1, 4 (two outcomes summed), 0; the end's 8 on the last decision; gamma 0.5
    assert rows["d3"] == (pytest.approx(8.0), 0)
    assert rows["d2"] == (pytest.approx(4.0 + 0.5 * 8.0), 2)
    assert rows["d1"] == (pytest.approx(1.0 + 0.5 * 4.0 + 0.25 * 8.0), 1)


def test_an_end_without_a_reward_adds_nothing(store: Store, tmp_path: Path) -> None:
    _three_steps(store, end=None)
    rows = joined(store, tmp_path, EPISODIC.replace("discount: 0.5", "discount: 1.0"), now=200.0)
    assert {k: v[0] for k, v in rows.items()} == {"d1": 5.0, "d2": 4.0, "d3": 0.0}


def test_the_end_is_stored_as_an_event(store: Store) -> None:
    _three_steps(store)
    with store._lock:
        (kind, data) = store._con.execute("SELECT kind, CAST(data AS VARCHAR) FROM events WHERE id = 'end-e1'").fetchone()
    assert kind == "episode_end" and data == '{"episode":"e1","reward":8.0}'


def test_an_episode_matures_when_it_ends_or_times_out(store: Store, tmp_path: Path) -> None:
    _three_steps(store, ended=False)
    # the wait window has passed, but the episode has neither ended nor timed out
    assert joined(store, tmp_path, EPISODIC, now=150.0) == {}
    assert store.matured_count(since=0.0, now=150.0, config=parse_config(EPISODIC)) == 0
    # timed out (100 s after its last decision): the default (-3 here) is its final reward
    rows = joined(store, tmp_path, EPISODIC.replace("default: 0.0", "default: -3.0"), now=200.0)
    assert rows["d3"][0] == pytest.approx(-3.0 + -3.0)  # no outcome of its own (default) + the timeout's default
    assert rows["d2"][0] == pytest.approx(4.0 + 0.5 * -6.0)
    # an end that comes: matured at once (its last decision's wait window having passed)
    store.write([EpisodeEnd(agent="a", episode="e1", reward=8.0)], received_at=120.0)
    assert store.matured_count(since=0.0, now=150.0, config=parse_config(EPISODIC)) == 3
    # but not before the last decision's wait window has passed
    assert store.matured_count(since=0.0, now=105.0, config=parse_config(EPISODIC)) == 0


def test_decisions_without_episodes_and_agents_without_the_setting_are_joined_as_before(
    store: Store, tmp_path: Path
) -> None:
    config = EPISODIC + "\nagents:\n  plain:\n    rewards: {default: -1.0, episode_return: false}\n"
    store.write(
        [
            decision("lone", 1.0, episode=None),
            decision("p1", 1.0, agent="plain"),  # an episode, but its agent credits decisions alone
            decision("p2", 2.0, agent="plain"),
        ],
        received_at=100.0,
    )
    store.write([Outcome(decision_id="lone", reward=2.5), Outcome(decision_id="p2", reward=7.0)], received_at=101.0)
    store.write([EpisodeEnd(agent="plain", episode="e1", reward=100.0)], received_at=102.0)
    rows = joined(store, tmp_path, config, now=200.0)
    assert rows == {"lone": (2.5, 1), "p1": (-1.0, 0), "p2": (7.0, 1)}
    # and the same data with the setting off everywhere: per-decision rewards, matured by the wait window
    plain = "rewards: {wait_window: 10, default: -1.0}"
    assert joined(store, tmp_path, plain, now=111.0) == {"lone": (2.5, 1), "p1": (-1.0, 0), "p2": (7.0, 1)}


def test_a_per_agent_override_turns_it_on(store: Store, tmp_path: Path) -> None:
    config = (
        "rewards: {wait_window: 10, default: 0.0}\n"
        "agents:\n  a:\n    rewards: {wait_window: 10, default: 0.0, episode_return: true}\n"
    )
    _three_steps(store)
    store.write([decision("b1", 1.0, agent="b"), decision("b2", 2.0, agent="b")], received_at=100.0)
    store.write([EpisodeEnd(agent="b", episode="e1", reward=8.0)], received_at=102.0)
    rows = joined(store, tmp_path, config, now=200.0)
    assert {k: v[0] for k, v in rows.items()} == {"d1": 13.0, "d2": 12.0, "d3": 8.0, "b1": 0.0, "b2": 0.0}


def test_the_whole_episode_counts_in_a_window_and_episodes_are_kept_apart(store: Store, tmp_path: Path) -> None:
    _three_steps(store)
    # another agent's episode of the same id, and another episode of the same agent
    store.write([decision("x1", 1.0, agent="other"), decision("y1", 1.5, episode="e2")], received_at=100.0)
    store.write(
        [EpisodeEnd(agent="other", episode="e1", reward=50.0), EpisodeEnd(agent="a", episode="e2", reward=-1.0)],
        received_at=102.0,
    )
    store.write([Event(agent="a", kind="note", data={"episode": "e1", "reward": 99})], received_at=102.0)
    everything = joined(store, tmp_path, EPISODIC, now=200.0)
    assert everything["x1"][0] == pytest.approx(50.0)
    assert everything["y1"][0] == pytest.approx(-1.0)
    assert everything["d1"][0] == pytest.approx(5.0)
    # a window holding d1 alone (ts < 1.2) still credits it with the later decisions' rewards
    window = joined(store, tmp_path, EPISODIC, now=200.0, agent="a", until=1.2)
    assert window == {"d1": (pytest.approx(5.0), 1)}


def test_live_rewards_see_episode_returns(store: Store) -> None:
    store.write([decision("v1", 1.0, version="v0001"), decision("v2", 2.0, version="v0002")], received_at=100.0)
    store.write([Outcome(decision_id="v1", reward=1.0)], received_at=101.0)
    store.write([EpisodeEnd(agent="a", episode="e1", reward=4.0)], received_at=102.0)
    stats = store.live_rewards(["v0001", "v0002"], now=200.0, config=parse_config(EPISODIC))
    assert stats["v0001"].mean == pytest.approx(1.0 + 0.5 * 4.0)
    assert stats["v0002"].mean == pytest.approx(4.0)


def test_the_fleet_joins_an_archived_host_s_episodes_as_its_snapshot_did(tmp_path: Path) -> None:
    from reflexd.fleet.archive import read_host

    config = parse_config(EPISODIC)
    state = tmp_path / "host"
    store = Store(state / "reflexd.duckdb")
    _three_steps(store)
    store.write([decision("y1", 1.5, episode="e2"), decision("lone", 1.0, episode=None)], received_at=100.0)
    store.write([EpisodeEnd(agent="a", episode="e2", reward=-1.0)], received_at=102.0)  # e1's end: in _three_steps
    store.write([Outcome(decision_id="lone", reward=0.5)], received_at=101.0)
    store.snapshot(tmp_path / "before.parquet", now=1000.0, config=config, max_rows=100)
    moved = store.archive(older_than=1000.0, root=state / "archive", compression="zstd")
    assert moved["events"] == 2
    store.close()
    host = read_host(str(state / "archive"), config, now=1000.0)
    before = pq.read_table(tmp_path / "before.parquet").to_pylist()
    assert host.table.to_pylist() == before
    assert {r["id"]: r["reward"] for r in before} == pytest.approx(
        {"d1": 1.0 + 0.5 * 4.0 + 0.25 * 8.0, "d2": 8.0, "d3": 8.0, "y1": -1.0, "lone": 0.5}
    )

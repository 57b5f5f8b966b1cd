"""``reflexd.Policy`` against a real daemon: buffering, resend after restarts, overflow, models."""

from __future__ import annotations

import time

import duckdb
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client import Policy
from reflexd.config import ExplorationConfig

pytestmark = pytest.mark.e2e


def stored_ids(d: DaemonProcess) -> list[str]:
    d.stop()
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        return [r[0] for r in con.execute("select id from decisions").fetchall()]


def test_events_logged_while_the_daemon_is_down_arrive_once_it_starts(daemon_factory) -> None:
    d = daemon_factory()
    d.stop()
    with Policy("a", socket=d.socket, state_dir=d.state_dir) as policy:
        ids = [policy.decide({"i": i}, ["x", "y"]).id for i in range(300)]
        assert not policy.flush(timeout=0.5)  # nobody to acknowledge yet
        assert policy.stats()["connected"] is False
        d.start()
        assert policy.flush(timeout=60), policy.stats()
        assert policy.stats()["reconnects"] >= 1
    assert sorted(stored_ids(d)) == sorted(ids)


def test_a_killed_daemon_loses_nothing_acknowledged_and_stores_resends_once(daemon_factory) -> None:
    d = daemon_factory()
    sent: list[str] = []
    with Policy("a", socket=d.socket, state_dir=d.state_dir) as policy:
        for cycle in range(3):
            sent += [policy.decide({"c": cycle, "i": i}, ["x", "y"]).id for i in range(2000)]
            d.kill()
            sent += [policy.decide({"c": cycle, "after": i}, ["x", "y"]).id for i in range(500)]
            d.start()
        assert policy.flush(timeout=120), policy.stats()
        stats = policy.stats()
    ids = stored_ids(d)
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == set(sent), f"{len(set(sent) - set(ids))} acknowledged events missing"
    assert stats["dropped"] == 0 and stats["settled"] == stats["enqueued"] == len(sent)


def test_a_full_buffer_drops_and_counts_without_blocking_the_agent(daemon_factory) -> None:
    d = daemon_factory()
    d.stop()
    policy = Policy("a", socket=d.socket, state_dir=d.state_dir, buffer_size=100)
    try:
        started = time.monotonic()
        for i in range(1000):
            policy.decide({"i": i}, ["x", "y"])
        assert time.monotonic() - started < 30  # generous: the point is that it returns at all
        stats = policy.stats()
        assert stats["dropped"] == 900 and stats["enqueued"] == 100
        d.start()
        assert policy.flush(timeout=60)
        status = d.loaded_status()
    finally:
        policy.close()
    # the overflow was reported to the daemon and shows in its status
    assert status.ingest["client_dropped"] == 900
    assert status.ingest["stored_decisions"] == 100


def test_no_model_means_the_default_action_with_exploration(daemon: DaemonProcess) -> None:
    explore = ExplorationConfig(default_action="safe", epsilon=0.1, epsilon_min=0.0)
    with Policy("a", socket=daemon.socket, state_dir=daemon.state_dir, exploration=explore, seed=1) as policy:
        choices = [policy.decide({}, ["risky", "safe", "other"]) for _ in range(3000)]
    assert all(c.model_version is None and c.strategy == "default" for c in choices)
    safe = [c for c in choices if c.action == "safe"]
    assert safe[0].prob == pytest.approx(0.9 + 0.1 / 3)
    assert 0.9 < len(safe) / len(choices) < 0.97
    wait_for(lambda: daemon.status().ingest["stored"] == 3000, 30, "all decisions stored")


def test_actions_given_as_plain_mappings_are_logged(daemon: DaemonProcess) -> None:
    actions = [{"id": "fast", "features": {"cost": 1}}, {"id": "slow", "features": {"cost": 5}}]
    with Policy("a", socket=daemon.socket, state_dir=daemon.state_dir, seed=2) as policy:
        choice = policy.decide({"x": 1}, actions)
        assert choice.action in {"fast", "slow"}
        assert policy.flush(timeout=60)
    assert daemon.loaded_status().ingest["stored_decisions"] == 1

"""``reflexd.Policy`` against a real daemon: buffering, resend after restarts, overflow, models."""

from __future__ import annotations

import enum
import json
import re
import threading
import time
from decimal import Decimal

import duckdb
import msgspec
import numpy as np
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy
from reflexd.config import ExplorationConfig
from reflexd.errors import DaemonUnavailable
from reflexd.wire.framing import MSGPACK, decode_inbound, encode_frame
from reflexd.wire.protocol import Decision, Step


def stored_ids(d: DaemonProcess) -> list[str]:
    d.stop()
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        return [r[0] for r in con.execute("select id from decisions").fetchall()]


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_no_model_means_the_default_action_with_exploration(daemon: DaemonProcess) -> None:
    explore = ExplorationConfig(default_action="safe", epsilon=0.1, epsilon_min=0.0)
    with Policy("a", socket=daemon.socket, state_dir=daemon.state_dir, exploration=explore, seed=1) as policy:
        choices = [policy.decide({}, ["risky", "safe", "other"]) for _ in range(3000)]
    assert all(c.model_version is None and c.strategy == "default" for c in choices)
    safe = [c for c in choices if c.action == "safe"]
    assert safe[0].prob == pytest.approx(0.9 + 0.1 / 3)
    assert 0.9 < len(safe) / len(choices) < 0.97
    wait_for(lambda: daemon.status().ingest["stored"] == 3000, 30, "all decisions stored")


@pytest.mark.e2e
def test_actions_given_as_plain_mappings_are_logged(daemon: DaemonProcess) -> None:
    actions = [{"id": "fast", "features": {"cost": 1}}, {"id": "slow", "features": {"cost": 5}}]
    with Policy("a", socket=daemon.socket, state_dir=daemon.state_dir, seed=2) as policy:
        choice = policy.decide({"x": 1}, actions)
        assert choice.action in {"fast", "slow"}
        assert policy.flush(timeout=60)
    assert daemon.loaded_status().ingest["stored_decisions"] == 1


CONTEXT = {"task": "code", "tokens": 812, "pro": True, "user": {"langs": ["en", "de"], "age": None}}
ACTIONS = ["small", {"id": "large", "features": {"cost": 10, "tools": True}}]


def test_decision_frames_are_the_protocol_decision_byte_for_byte(tmp_path) -> None:
    explore = ExplorationConfig(default_action="large", epsilon=0.2)
    policy = Policy("a", socket=tmp_path / "nobody.sock", state_dir=tmp_path, exploration=explore, seed=3)
    policy._sender.stop()  # the frames stay in the buffer, where they can be read back
    try:
        choices = [policy.decide(CONTEXT, ACTIONS) for _ in range(20)] + [policy.decide({}, ["only"], decision_id="mine")]
        frames = list(policy._sender._frames)
    finally:
        policy.close(timeout=0)
    assert len(frames) == len(choices) and {c.action for c in choices[:20]} == {"small", "large"}
    for choice, frame, context, actions in zip(choices, frames, [CONTEXT] * 20 + [{}], [ACTIONS] * 20 + [["only"]]):
        decoded = decode_inbound(frame[4:], MSGPACK)  # what the daemon reads: valid, and this choice
        assert isinstance(decoded, Decision) and (decoded.id, decoded.chosen, decoded.prob) == (choice.id, choice.action, choice.prob)
        assert abs(decoded.ts - time.time()) < 60
        # the validated protocol message with the same timestamp encodes to the very same bytes
        assert frame == encode_frame(msgspec.structs.replace(choice.event("a", context, actions), ts=decoded.ts), MSGPACK)
    assert choices[-1].id == "mine" and choices[-1].prob == 1.0


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda p: p.decide({}, ["", "a"]), ValueError, "action id '' has 0 characters"),
        (lambda p: p.decide({}, [{"id": "x", "features": [1, 2]}, "a"]), TypeError, "action 'x': features must be a dict"),
        (lambda p: p.decide({1: 2}, ["a"]), TypeError, "context keys must be str; 1 is int"),
        (lambda p: p.decide({}, ["a"], decision_id=5), TypeError, "decision_id must be a str, not int"),
        (lambda p: p.reward("d", None), TypeError, "value must be a number, not NoneType"),
        (lambda p: p.reward("d", "1"), TypeError, "value must be a number, not str"),
        (lambda p: p.event("", None), ValueError, "kind must be 1 to 256 characters"),
        (lambda p: p.event(3, None), TypeError, "kind must be a str, not int"),
        (lambda p: p.step("ep", -1, {}, "a"), ValueError, "index must be the step's position"),
        (lambda p: p.step("ep", 0, [], "a"), TypeError, "observation must be a dict"),
        (lambda p: p.decide_slate({}, ["a", "b"], "2"), TypeError, "slots must be an int, not str"),
        (lambda p: p.decide_slate({}, ["a", "b"], True), TypeError, "slots must be an int, not bool"),
        (lambda p: p.evaluate("live"), TypeError, "policies must be a list of policy names, as in ['live']"),
        (lambda p: p.evaluate(["live"], since="yesterday"), TypeError, "since must be epoch seconds"),
        (lambda p: p.insights(since="x"), TypeError, "since must be epoch seconds"),
        (lambda p: p.decide({}, ["a"], episode=""), ValueError, "episode must be 1 to 256 characters"),
        (lambda p: p.end_episode("x" * 300), ValueError, "episode must be 1 to 256 characters, not 300"),
        (lambda p: p.reward("", 1.0), ValueError, "decision_id must be 1 to 256 characters, not 0"),
        (lambda p: p.step("e" * 255, 0, {}, "a"), ValueError, "with ':0' the step's id would be over 256"),
        (lambda p: p.decide({}, [{"id": 5}]), TypeError, "action id 5 must be a str, not int"),
        (lambda p: p.decide({}, [{"id": "a", "cost": 1}]), TypeError, "action 'a': unknown key(s) ['cost']"),
        (lambda p: p.decide({"since": object()}, ["a"]), TypeError, "context 'since': a object is not a value the store can keep"),
        (lambda p: p.decide({"n": 10**30}, ["a"]), OverflowError, "this decision cannot be sent: can't serialize ints"),
    ],
)
def test_what_the_daemon_would_refuse_is_refused_at_the_call(tmp_path, call, error, words) -> None:
    with Policy("a", socket=tmp_path / "nobody.sock", state_dir=tmp_path) as policy:
        with pytest.raises(error, match=re.escape(words)):
            call(policy)
        assert policy.stats()["enqueued"] == 0


def test_numpys_numbers_and_str_subclasses_are_what_they_stand_for(tmp_path) -> None:
    class Agent(enum.StrEnum):
        ROUTER = "router"

    policy = Policy(Agent.ROUTER, socket=tmp_path / "nobody.sock", state_dir=tmp_path, buffer_size=np.int64(100))
    assert policy.agent == "router" and type(policy.agent) is str
    choice = policy.decide({Agent.ROUTER: 1, np.str_("u"): 2}, ["x", "y"])
    policy.reward(choice.id, np.float32(0.5))
    policy.reward(choice.id, Decimal("0.25"))
    policy.step("ep", np.int64(3), {}, "", reward=np.float64(1.0), done=np.bool_(True))  # a traced step's action may be ""
    policy.decide_slate({}, ["x", "y"], np.int64(2))
    assert policy.stats()["enqueued"] == 6
    with pytest.raises(DaemonUnavailable):  # past the checks: the times were taken as numbers
        policy.evaluate(["live"], since=np.float64(1.0), timeout=1)
    assert policy.close(timeout=0) is False  # no daemon took them


@pytest.mark.parametrize(
    ("kw", "error", "words"),
    [
        ({"agent": ""}, ValueError, "agent must be 1 to 256 characters"),
        ({"agent": 5}, TypeError, "agent must be a str, not int"),
        ({"buffer_size": 0}, ValueError, "buffer_size must be an int of at least 1"),
        ({"send_interval": 0}, ValueError, "send_interval must be a number of seconds above 0"),
        ({"refresh_interval": -1}, ValueError, "refresh_interval must be a number of seconds above 0"),
        ({"online": True}, TypeError, "online must be a reflexd.config.OnlineConfig, not bool"),
        ({"seed": "x"}, TypeError, "seed must be an int or None, not str"),
    ],
)
def test_a_policys_settings_are_refused_at_construction(tmp_path, kw, error, words) -> None:
    args = {"agent": "a", **kw}
    with pytest.raises(error, match=re.escape(words)):
        Policy(args.pop("agent"), socket=tmp_path / "nobody.sock", state_dir=tmp_path, **args)


def test_a_models_folder_that_is_not_there_is_said(tmp_path) -> None:
    with Policy("a", socket=tmp_path / "nobody.sock", state_dir=tmp_path / "typo") as policy:
        assert policy.stats()["model_error"] == f"no models folder at {tmp_path / 'typo' / 'models'} (is state_dir right?)"
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="afile is not a directory"):
        Policy("a", socket=tmp_path / "nobody.sock", state_dir=tmp_path / "afile")
    (tmp_path / "models").mkdir()
    with Policy("a", socket=tmp_path / "nobody.sock", state_dir=tmp_path) as policy:
        assert policy.stats()["model_error"] is None


def test_a_closed_policy_refuses_to_log_and_close_says_what_was_not_delivered(tmp_path) -> None:
    policy = Policy("a", socket=tmp_path / "nobody.sock", state_dir=tmp_path)
    choice = policy.decide({}, ["x", "y"])
    assert policy.close(timeout=0.5) is False  # no daemon: the decision never reached one
    assert policy.close() is False  # closing again changes nothing
    with pytest.raises(RuntimeError, match="this Policy is closed"):
        policy.reward(choice.id, 1.0)
    with pytest.raises(RuntimeError, match="this Policy is closed"):
        policy.decide({}, ["x", "y"])


@pytest.mark.e2e
def test_the_daemon_stores_each_decision_as_it_was_made(daemon: DaemonProcess) -> None:
    with Policy("a", socket=daemon.socket, state_dir=daemon.state_dir, seed=4) as policy:
        choices = {c.id: c for c in (policy.decide({**CONTEXT, "i": i}, ACTIONS) for i in range(50))}
        assert policy.flush(timeout=60), policy.stats()
    daemon.stop()
    with duckdb.connect(str(daemon.state_dir / "reflexd.duckdb"), read_only=True) as con:
        rows = con.execute("select id, agent, context, actions, chosen, prob, probs, model_version, strategy from decisions").fetchall()
    assert len(rows) == 50
    for id_, agent, context, actions, chosen, prob, probs, version, strategy in rows:
        c = choices[id_]
        assert (agent, chosen, prob, json.loads(probs), version, strategy) == ("a", c.action, c.prob, c.probs, None, "default")
        assert json.loads(context) == {**CONTEXT, "i": json.loads(context)["i"]}
        assert json.loads(actions) == ACTIONS


@pytest.mark.e2e
def test_the_sender_wakes_once_per_send_interval_however_often_the_agent_decides(daemon: DaemonProcess) -> None:
    # Each wake-up of the sender can hold up a decision (the GIL), so it must not follow the
    # agent's pace, nor the daemon's acks: an agent deciding every 2 ms gets one flush per interval.
    interval = 0.05
    pace = threading.Event()  # never set: its wait is the agent's time between decisions
    with Policy("a", socket=daemon.socket, state_dir=daemon.state_dir, send_interval=interval) as policy:
        started = time.monotonic()
        for i in range(250):
            policy.decide({"i": i}, ["x", "y"])
            pace.wait(0.002)
        elapsed = time.monotonic() - started
        cycles = policy._sender._flush_seq
        assert policy.flush(timeout=60), policy.stats()
    assert 1 <= cycles <= elapsed / interval + 1, (cycles, elapsed)
    wait_for(lambda: daemon.status().ingest["stored"] == 250, 60, "all decisions stored")


@pytest.mark.e2e
def test_flush_ships_at_once_whatever_the_send_interval(daemon: DaemonProcess) -> None:
    with Policy("a", socket=daemon.socket, state_dir=daemon.state_dir, send_interval=3600) as policy:
        for i in range(10):
            policy.decide({"i": i}, ["x", "y"])
        assert policy.flush(timeout=30), policy.stats()
        assert policy.stats()["settled"] == 10


@pytest.mark.e2e
def test_a_flood_of_refused_events_neither_wedges_the_sender_nor_the_daemon(daemon: DaemonProcess) -> None:
    """Each refused frame is answered with an error; thousands of those must not fill both sockets."""
    with Policy("a", socket=daemon.socket, state_dir=daemon.state_dir, send_interval=3600) as policy:
        for i in range(20_000):  # past the stored column's range: refused (by the daemon: Policy.step refuses it too)
            policy._sender.enqueue(Step(id=f"ep:{i}", agent="a", episode="ep", index=2**40 + i, observation={"x": 1}, action="a"))
        policy.step("ep", 1, {"x": 1}, "a")  # one the daemon takes
        assert policy.flush(timeout=120)
        stats = policy.stats()
    assert stats["rejected"] == 20_000 and stats["settled"] == 20_001
    status = daemon.loaded_status()
    assert status.ingest["stored_steps"] == 1 and status.ingest["dead_letters"] == 20_000

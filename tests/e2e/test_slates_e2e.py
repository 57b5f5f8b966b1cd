"""Slates end to end: ``Policy.decide_slate`` and ``reflexd import --format obd`` through a real
daemon into its store, and the slate estimators on what it stored, against known truth."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import DaemonProcess
from reflexd.client.policy import Policy
from reflexd.config import ExplorationConfig, load_config
from reflexd.deciding import exploring
from reflexd.learning import slates
from reflexd.service.store import Store
from reflexd.wire.framing import MSGPACK, decode_inbound, encode_frame
from reflexd.wire.protocol import Action, Decision

pytestmark = pytest.mark.e2e

ITEMS = ["a", "b", "c", "d"]
# the chance a user clicks each item at each slot (one reward per slot, independent of the others)
CLICK = {"a": [0.30, 0.20, 0.10], "b": [0.50, 0.40, 0.30], "c": [0.20, 0.15, 0.10], "d": [0.60, 0.45, 0.35]}
EXPLORE = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.5, epsilon_min=0.5, decay=0.0, default_action="a")


def test_slot_frames_are_protocol_decisions_over_the_actions_left(tmp_path) -> None:
    policy = Policy("shop", socket=tmp_path / "nobody.sock", state_dir=tmp_path, exploration=EXPLORE, seed=1)
    policy._sender.stop()  # the frames stay in the buffer, where they can be read back
    actions = ["a", {"id": "b", "features": {"price": 3}}, "c", "d"]
    try:
        choices = policy.decide_slate({"user": 1}, actions, 3, slate_id="page-1")
        frames = list(policy._sender._frames)
    finally:
        policy.close(timeout=0)
    left = list(actions)
    for choice, frame in zip(choices, frames, strict=True):
        decoded = decode_inbound(frame[4:], MSGPACK)  # what the daemon reads: valid, and this slot
        assert isinstance(decoded, Decision) and (decoded.slot, decoded.slate) == (choice.slot, "page-1")
        assert decoded.actions == [msgspec.convert(a, Action) if isinstance(a, dict) else a for a in left]
        assert frame == encode_frame(msgspec.structs.replace(choice.event("shop", {"user": 1}, left), ts=decoded.ts), MSGPACK)
        left = [a for a in left if (a if isinstance(a, str) else a["id"]) != choice.action]


def test_decide_slate_logs_slots_whose_propensities_recover_a_rankings_true_value(daemon_factory, tmp_path) -> None:
    d = daemon_factory({"rewards": {"wait_window": 60}})
    rng, n = random.Random(11), 4000
    with Policy("shop", socket=d.socket, state_dir=d.state_dir, exploration=EXPLORE, seed=12) as policy:
        logged = {}
        for i in range(n):
            choices = policy.decide_slate({"user": i % 7}, ITEMS, slots=3)
            for c in choices:
                reward = float(rng.random() < CLICK[c.action][c.slot])
                policy.reward(c.id, reward)
                logged[c.id] = (c, reward)
        assert policy.flush(timeout=120), policy.stats()
        assert policy.stats()["rejected"] == 0
    d.stop()

    # what the daemon stored: each slot a decision over the actions left, with its slot and slate
    with duckdb.connect(str(d.state_dir / "reflexd.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT id, actions, chosen, prob, probs, slot, slate FROM decisions").fetchall()
    assert len(rows) == 3 * n
    for id_, actions, chosen, prob, probs, slot, slate in rows:
        c, _ = logged[id_]
        assert (chosen, prob, json.loads(probs), slot, slate) == (c.action, c.prob, c.probs, c.slot, c.slate)
        assert len(json.loads(actions)) == 4 - slot and chosen in json.loads(actions)

    # the training snapshot: one row per slot, each with its own joined reward
    with Store(d.state_dir / "reflexd.duckdb") as store:
        store.snapshot(tmp_path / "snap.parquet", now=time.time() + 120, config=load_config(d.config_path), max_rows=10**6)
    snap = pq.read_table(tmp_path / "snap.parquet").to_pydict()
    assert len(snap["id"]) == 3 * n
    assert all(snap["reward"][k] == logged[i][1] for k, i in enumerate(snap["id"]))

    slate, slot = np.array(snap["slate"]), np.array(snap["slot"])
    chosen, prob, reward = np.array(snap["chosen"]), np.array(snap["prob"]), np.array(snap["reward"])
    ranking = ["c", "b", "a"]  # the target: always this ranking
    truth = sum(CLICK[item][k] for k, item in enumerate(ranking))
    hit = np.array([ranking[k] == item for k, item in zip(slot, chosen)])
    # the target's propensities: its slot, the slots up to it, or the whole slate as ranked
    prefix = np.array([hit[(slate == s) & (slot <= k)].all() for s, k in zip(slate, slot)])
    whole = np.array([hit[slate == s].all() for s in slate])
    # the logging policy's marginal at each slot, from the exploration the client applied
    marginals = slates.slot_marginals(
        lambda left: exploring.default_distribution(EXPLORE, len(left), left.index(0) if 0 in left else None),
        len(ITEMS), 3,
    )
    marginal = marginals[slot, [ITEMS.index(item) for item in chosen]]
    estimates = {
        "sips": slates.standard_ips(slate, slot, reward, slates.joint_pscores(slate, slot, prob), whole * 1.0),
        "rips": slates.reward_interaction_ips(slate, slot, reward, slates.cascade_pscores(slate, slot, prob), prefix * 1.0),
        "iips": slates.independent_ips(slate, slot, reward, marginal, hit * 1.0),
    }
    for name, e in estimates.items():
        assert abs(e.value - truth) < 4 * e.stderr, (name, e, truth)
    # the logging policy itself, on its own log: its mean reward per slate, exactly
    joint = slates.joint_pscores(slate, slot, prob)
    assert slates.standard_ips(slate, slot, reward, joint, joint).value == pytest.approx(reward.sum() / n, abs=1e-12)


OBD = """\
,timestamp,item_id,position,click,propensity_score,user_feature_0,user-item_affinity_0
0,2019-11-24 00:03:13.442536+00:00,0,1,1,0.25,u1,0.0
1,2019-11-24 00:03:13.442536+00:00,2,2,1,0.25,u1,0.0
2,2019-11-24 00:03:13.442536+00:00,1,3,0,0.25,u1,0.0
3,2019-11-24 00:05:39.519963+00:00,0,1,0,0.5,u2,1.0
4,2019-11-24 00:05:39.519963+00:00,1,2,1,0.125,u2,1.0
5,2019-11-24 00:05:39.519963+00:00,3,3,1,0.2,u2,1.0
6,2019-11-24 00:07:02.000001+00:00,3,1,1,0.25,u3,0.5
7,2019-11-24 00:07:02.000001+00:00,1,2,1,0.4,u3,0.5
8,2019-11-24 00:07:02.000001+00:00,2,4,1,0.25,u3,0.5
"""


def reflexd(d: DaemonProcess, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "reflexd", *args, "--socket", d.socket, "--json"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr + d.log_tail()
    return json.loads(done.stdout)


def test_an_open_bandit_dataset_csv_imports_as_slates_and_evaluates(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "all.csv"
    path.write_text(OBD)
    first = reflexd(daemon, "import", str(path), "--agent", "zozo")
    assert (first["format"], first["decisions"], first["outcomes"], first["imported"]) == ("obd", 9, 9, 18)
    again = reflexd(daemon, "import", str(path), "--format", "obd", "--agent", "zozo")
    assert (again["imported"], again["duplicates"]) == (0, 18)
    daemon.stop()

    with duckdb.connect(str(daemon.state_dir / "reflexd.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT d.slate, d.slot, d.chosen, d.prob, o.reward, d.actions FROM decisions d"
            " JOIN outcomes o ON o.decision_id = d.id ORDER BY d.ts, d.slot"
        ).fetchall()
    assert [(slot, chosen, prob, reward) for _, slot, chosen, prob, reward, _ in rows] == [
        (0, "0", 0.25, 1.0), (1, "2", 0.25, 1.0), (2, "1", 0.25, 0.0),
        (0, "0", 0.5, 0.0), (1, "1", 0.125, 1.0), (2, "3", 0.2, 1.0),
        (0, "3", 0.25, 1.0), (1, "1", 0.4, 1.0), (3, "2", 0.25, 1.0),
    ]
    assert [len({r[0] for r in rows[i : i + 3]}) for i in (0, 3, 6)] == [1, 1, 1] and len({r[0] for r in rows}) == 3
    assert json.loads(rows[0][5]) == ["0", "1", "2", "3"]

    # OBD's propensity is the item's marginal at its position: independent IPS of the ranking 0, 1, 2
    slate, slot, chosen, prob, reward = (np.array(c) for c in list(zip(*rows))[:5])
    target = np.array([k < 3 and item == str(k) for k, item in zip(slot, chosen)]) * 1.0
    got = slates.independent_ips(slate, slot, reward, prob, target)
    # by hand, OBP's formula: the rows showing item k at slot k are (slot 0, "0", 0.25, click 1),
    # (0, "0", 0.5, 0), (1, "1", 0.125, 1) and (1, "1", 0.4, 1), over 3 slates
    assert got.value == pytest.approx((1 / 0.25 + 0 / 0.5 + 1 / 0.125 + 1 / 0.4) / 3, abs=1e-12)


def test_a_slate_decided_over_the_socket_is_logged_one_decision_per_slot(daemon: DaemonProcess) -> None:
    from reflexd.wire.connection import Connection
    from reflexd.wire.protocol import Decide, DecidedSlate, Flush

    actions = ["a", "b", "c", "d"]
    with Connection(daemon.socket) as conn:
        conn.send([Decide(agent="feed", context={"user": "u1"}, actions=actions, slots=3, req=7), Flush(req=8, loaded=True)])
        slate = conn.receive()
        conn.receive()
    assert isinstance(slate, DecidedSlate) and slate.req == 7 and [s.slot for s in slate.slots] == [0, 1, 2]
    chosen = [s.action for s in slate.slots]
    assert len(set(chosen)) == 3 and set(chosen) <= set(actions)
    # no model: uniform over the actions left at each slot
    assert [s.prob for s in slate.slots] == pytest.approx([1 / 4, 1 / 3, 1 / 2])
    cli = Path(sys.executable).parent / "reflexd"
    done = subprocess.run(
        [str(cli), "decide", "--socket", daemon.socket, "--agent", "feed", "--actions", "a,b", "--slots", "2", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [s["slot"] for s in json.loads(done.stdout)["slots"]] == [0, 1]
    plain = subprocess.run(
        [str(cli), "decide", "--socket", daemon.socket, "--agent", "feed", "--actions", "a,b", "--slots", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert plain.returncode == 0, plain.stderr
    first, *slots = plain.stdout.strip().splitlines()
    assert first.startswith("slate ") and [line.split()[:2] for line in slots] == [["slot", "0:"], ["slot", "1:"]]
    assert {line.split()[2] for line in slots} == {"a", "b"} and "prob 0.5" in slots[0] and "prob 1" in slots[1]
    daemon.stop()
    with duckdb.connect(str(daemon.state_dir / "reflexd.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT slot, chosen, prob, actions::VARCHAR FROM decisions WHERE slate = ? ORDER BY slot", [slate.slate]
        ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [(s.slot, s.action) for s in slate.slots]
    # each slot's decision offers the actions the slots before it left
    assert [len(json.loads(r[3])) for r in rows] == [4, 3, 2]
    assert chosen[0] not in json.loads(rows[1][3])

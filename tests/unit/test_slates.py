"""Slates (rank k of n actions): slot decisions on the wire, in the store, from the client's
chooser, from an Open Bandit Dataset CSV, and Open Bandit Pipeline's slate estimators."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import duckdb
import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from reflexd.config import ExplorationConfig, parse_config
from reflexd.deciding import exploring
from reflexd.deciding.choosing import Chooser
from reflexd.learning import slates
from reflexd.learning.ope import z_score
from reflexd.service.store import Store
from reflexd.service.store.db import SCHEMA
from reflexd.tools.importer import Record, Rejected, detect_format, parse, parse_obd
from reflexd.wire.protocol import Decision, Outcome

# ---- the protocol ---------------------------------------------------------------------------

_decode = msgspec.json.Decoder(Decision).decode
SLOT = {"type": "decision", "id": "d", "agent": "a", "context": {}, "actions": ["x", "y"], "chosen": "y", "prob": 0.5}


def test_a_slot_decision_names_its_position_and_slate() -> None:
    d = _decode(msgspec.json.encode({**SLOT, "slot": 2, "slate": "s1"}))
    assert (d.slot, d.slate) == (2, "s1")
    assert _decode(msgspec.json.encode(d)) == d
    plain = _decode(msgspec.json.encode(SLOT))
    assert (plain.slot, plain.slate) == (None, None)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"slot": 0}, "slot and slate go together"),
        ({"slate": "s1"}, "slot and slate go together"),
        ({"slot": -1, "slate": "s1"}, "slot must be a position counted from 0, not -1"),
        ({"slot": 2**31, "slate": "s1"}, "slot must be a position counted from 0"),
        ({"slot": 0, "slate": ""}, "Expected `str` of length >= 1 - at `$.slate`"),
        ({"slot": 1.5, "slate": "s1"}, "Expected `int | null`, got `float` - at `$.slot`"),
    ],
)
def test_slot_and_slate_are_checked_with_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message.replace("$", r"\$").replace("|", r"\|")):
        _decode(msgspec.json.encode({**SLOT, **fields}))


# ---- the store ------------------------------------------------------------------------------

OLD_DECISIONS = """
CREATE TABLE decisions (
    id VARCHAR PRIMARY KEY,
    agent VARCHAR NOT NULL,
    ts DOUBLE NOT NULL,
    received_at DOUBLE NOT NULL,
    context JSON NOT NULL,
    actions JSON NOT NULL,
    chosen VARCHAR NOT NULL,
    prob DOUBLE NOT NULL,
    probs JSON,
    model_version VARCHAR,
    strategy VARCHAR
);
"""


def slate_of(slate: str, chosen: list[str], probs: list[float], actions: list[str]) -> list[Decision]:
    left, out = list(actions), []
    for slot, (action, p) in enumerate(zip(chosen, probs)):
        out.append(Decision(id=f"{slate}-{slot}", agent="a", context={"u": 1}, actions=list(left), chosen=action,
                            prob=p, slot=slot, slate=slate, ts=100.0))
        left.remove(action)
    return out


def test_slots_survive_spool_store_snapshot_and_archive(tmp_path: Path) -> None:
    with Store(tmp_path / "r.duckdb") as store:
        # Store.write goes through a spool segment, as the daemon's ingest does
        store.write(slate_of("s1", ["b", "a"], [0.5, 0.25], ["a", "b", "c"]), received_at=100.0)
        store.write([Decision(id="plain", agent="a", context={}, actions=["a"], chosen="a", prob=1.0)], 100.0)
        store.write([Outcome(decision_id="s1-0", reward=1.0, id="o0"), Outcome(decision_id="s1-1", reward=0.5, id="o1")], 101.0)
        store.snapshot(tmp_path / "snap.parquet", now=1000.0, config=parse_config(""), max_rows=10)
        rows = {r["id"]: r for r in pq.read_table(tmp_path / "snap.parquet").to_pylist()}
        # the reward join treats each slot as a decision
        assert {i: (r["slot"], r["slate"], r["reward"], r["prob"]) for i, r in rows.items()} == {
            "s1-0": (0, "s1", 1.0, 0.5), "s1-1": (1, "s1", 0.5, 0.25), "plain": (None, None, 0.0, 1.0)
        }
        moved = store.archive(older_than=500.0, root=tmp_path / "archive", compression="zstd")
        assert moved["decisions"] == 3
    with duckdb.connect() as con:
        archived = con.execute(
            f"SELECT id, slot, slate FROM read_parquet('{tmp_path}/archive/decisions/**/*.parquet') ORDER BY id"
        ).fetchall()
    assert archived == [("plain", None, None), ("s1-0", 0, "s1"), ("s1-1", 1, "s1")]


def test_a_database_made_before_slates_gains_the_columns_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(OLD_DECISIONS)
        con.execute(SCHEMA)  # the other tables; the old decisions table is left as it is
        con.execute("INSERT INTO decisions VALUES ('old', 'a', 1, 1, '{}', '[\"x\"]', 'x', 1.0, NULL, NULL, NULL)")
    spooled_before = tmp_path / "000000000001-0123456789ab.ndjson"  # a segment an older version spooled
    spooled_before.write_text(
        '{"received_at":2.0,"line":0,"decisions":[{"type":"decision","id":"spooled","agent":"a","context":{},'
        '"actions":["x"],"chosen":"x","prob":1.0}],"outcomes":[],"steps":[],"events":[]}\n'
    )
    for _ in range(2):  # opening again changes nothing
        with Store(path) as store:
            store.load(spooled_before)
            store.write(slate_of("s", ["y"], [0.5], ["x", "y"]), received_at=3.0)
            store.snapshot(tmp_path / "snap.parquet", now=100.0, config=parse_config(""), max_rows=10)
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT id, slot, slate FROM decisions ORDER BY id").fetchall() == [
            ("old", None, None), ("s-0", 0, "s"), ("spooled", None, None)
        ]
    assert pq.read_table(tmp_path / "snap.parquet").column("slot").to_pylist() == [None, None, 0]


# ---- the client's chooser -------------------------------------------------------------------


class FakeScorer:
    version = "v0001"
    manifest = None

    def __init__(self, scores: list[float], fail: bool = False) -> None:
        self.scores, self.fail = np.array(scores), fail

    def score(self, context, actions):
        if self.fail:
            raise RuntimeError("broken model")
        assert len(actions) == len(self.scores)  # every action is scored once, for all the slots
        return self.scores, np.zeros_like(self.scores)


class FakeSource:
    def __init__(self, scorer: FakeScorer | None) -> None:
        self.scorer, self.error = scorer, None


SOFTMAX = ExplorationConfig(strategy="softmax", temperature=1.0, epsilon_min=0.0)
SCORES = [2.0, 1.0, 0.0, -1.0]
ACTIONS = ["a", {"id": "b", "features": {"cost": 2}}, "c", "d"]


def softmax_left(left: list[int]) -> list[float]:
    e = [math.exp(SCORES[i] - max(SCORES[j] for j in left)) for i in left]
    return [x / sum(e) for x in e]


def test_each_slot_is_drawn_from_what_is_left_with_its_exact_probability() -> None:
    chooser = Chooser(FakeSource(FakeScorer(SCORES)), lambda agent, manifest: SOFTMAX, seed=1)
    n, counts = 20000, Counter()
    for _ in range(n):
        slate = chooser.choose_slate("a", {}, ACTIONS, 3)
        assert [c.slot for c in slate] == [0, 1, 2] and len({c.slate for c in slate}) == 1
        assert len({c.id for c in slate}) == 3 and len({c.action for c in slate}) == 3
        left = [0, 1, 2, 3]
        for c in slate:
            expected = softmax_left(left)
            assert c.probs == pytest.approx(expected, abs=1e-12)
            assert c.prob == c.probs[left.index(c.index)] and ["a", "b", "c", "d"][c.index] == c.action
            assert (c.model_version, c.strategy) == ("v0001", "softmax")
            left.remove(c.index)
            counts[c.slot, c.index] += 1
    truth = slates.slot_marginals(softmax_left, 4, 3)  # known truth, computed apart from the sampler
    for (slot, index), seen in counts.items():
        p = truth[slot, index]
        assert abs(seen / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), (slot, index, seen / n, p)


def test_a_slate_takes_a_given_id_and_refuses_impossible_requests() -> None:
    chooser = Chooser(None, lambda agent, manifest: ExplorationConfig(), seed=2)
    slate = chooser.choose_slate("a", {}, ["x", "y"], 2, slate_id="page-7")
    assert [c.slate for c in slate] == ["page-7", "page-7"] and slate[1].prob == 1.0 and slate[1].probs == [1.0]
    with pytest.raises(ValueError, match=r"slots must be from 1 to the number of actions \(2\), not 3"):
        chooser.choose_slate("a", {}, ["x", "y"], 3)
    with pytest.raises(ValueError, match="slots must be from 1"):
        chooser.choose_slate("a", {}, ["x", "y"], 0)
    with pytest.raises(ValueError, match="distinct ids"):
        chooser.choose_slate("a", {}, ["x", "x"], 1)


def test_without_a_working_model_each_slot_follows_the_default_policy() -> None:
    source = FakeSource(FakeScorer(SCORES, fail=True))
    explore = ExplorationConfig(epsilon=0.4, epsilon_min=0.4, default_action="c")
    slate = Chooser(source, lambda agent, manifest: explore, seed=3).choose_slate("a", {}, ACTIONS, 4)
    assert {(c.strategy, c.model_version) for c in slate} == {("default", None)}
    assert "broken model" in source.error
    left = [0, 1, 2, 3]
    for c in slate:
        default = left.index(2) if 2 in left else None
        assert c.probs == exploring.default_distribution(explore, len(left), default)
        left.remove(c.index)


# ---- Open Bandit Dataset CSV ----------------------------------------------------------------

OBD_HEADER = ",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,user-item_affinity_0\n"
OBD_ROWS = [
    "0,2019-11-24 00:03:13.442536+00:00,3,1,0,0.25,1e5a,bb,0.0",
    "1,2019-11-24 00:03:13.442536+00:00,1,2,1,0.25,1e5a,bb,0.0",
    "2,2019-11-24 00:03:13.442536+00:00,0,3,1,0.25,1e5a,bb,0.0",
    "3,2019-11-24 00:05:39.519963+00:00,2,1,1,0.5,cc,dd,2.5",
    "4,2019-11-24 00:05:39.519963+00:00,0,2,0,0.125,cc,dd,2.5",
    "5,2019-11-24 00:05:39.519963+00:00,3,2,0,0.3,cc,dd,2.5",  # position 2 again: refused
    "6,yesterday,1,1,0,0.25,ee,ff,0.0",
    "7,2019-11-24 00:06:00+00:00,1,0,0,0.25,ee,ff,0.0",  # OBD counts positions from 1
    "8,2019-11-24 00:07:00+00:00,1,1,0,0,ee,ff,0.0",
    "9,2019-11-24 00:08:00+00:00,1,9,0,0.25,ee,ff,0.0",  # a slot past the campaign's 4 items
    "10,2019-11-24 00:09:00+00:00,1,1,2,0.25,ee,ff,0.0",  # OBD's clicks are 0 or 1
]


def obd_file(path: Path, rows: list[str] = OBD_ROWS) -> Path:
    path.write_text(OBD_HEADER + "\n".join(rows) + "\n")
    return path


def test_an_obd_csv_becomes_slot_decisions_with_their_clicks(tmp_path: Path) -> None:
    path = obd_file(tmp_path / "men.csv")
    assert detect_format(path) == "obd"
    items = list(parse(path, agent="zozo"))
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert [(r.line, r.reason) for r in rejected] == [
        (7, "position 2 of this impression is logged twice"),
        (8, "Timestamp 'yesterday' is not an ISO-8601 time"),
        (9, "position must be an integer from 1, not '0'"),
        (10, "propensity_score must be in (0, 1], not '0': off-policy evaluation divides by it"),
        (11, "position 9 is beyond the campaign's 4 items"),
        (12, "click must be 0 or 1, not '2'"),
    ]
    records = [i.message for i in items if isinstance(i, Record)]
    decisions = [m for m in records if isinstance(m, Decision)]
    outcomes = {m.decision_id: m for m in records if isinstance(m, Outcome)}
    assert [(d.slot, d.chosen, d.prob) for d in decisions] == [
        (0, "3", 0.25), (1, "1", 0.25), (2, "0", 0.25), (0, "2", 0.5), (1, "0", 0.125)
    ]
    # the rows of one impression (timestamp and user) share a slate; ids are the slate and the slot
    assert len({d.slate for d in decisions[:3]}) == 1 and decisions[3].slate != decisions[0].slate
    assert [d.id for d in decisions[:2]] == [f"{decisions[0].slate}-0", f"{decisions[0].slate}-1"]
    first = decisions[0]
    assert first.actions == ["0", "1", "2", "3"]  # every item of the campaign, at every position
    assert (first.agent, first.strategy, first.probs) == ("zozo", "imported:obd", None)
    assert first.context == {"user_feature_0": "1e5a", "user_feature_1": "bb", "user-item_affinity_0": 0.0}
    assert first.ts == 1574553793.442536
    assert [outcomes[d.id].reward for d in decisions] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert outcomes[first.id].id == first.id + ":click"
    # stable ids: a second read gives the same events
    assert [i for i in parse_obd(path, agent="zozo") if isinstance(i, Record)] == [
        i for i in items if isinstance(i, Record)
    ]


def test_an_obd_file_without_its_columns_is_refused(tmp_path: Path) -> None:
    from reflexd.errors import ImportFileError

    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ImportFileError, match="no column timestamp, item_id, position, click, propensity_score"):
        list(parse(path, "obd"))


# ---- the estimators -------------------------------------------------------------------------

# A hand-made log of three slates (the third shows two slots), rows out of order. Per slot: the
# logging policy's probability given the slots before it, the target's, each policy's marginal
# probability of the action at that slot, and the reward.
LOG = [
    # slate, slot, prob, target_prob, marginal, target_marginal, reward
    ("s2", 1, 0.5, 0.2, 0.25, 0.5, 1.0),
    ("s1", 0, 0.5, 0.8, 0.2, 0.4, 1.0),
    ("s3", 1, 0.25, 0.5, 0.2, 0.1, 1.0),
    ("s1", 1, 0.4, 0.5, 0.3, 0.0, 0.0),
    ("s2", 0, 0.25, 0.1, 0.5, 0.5, 0.0),
    ("s1", 2, 0.5, 1.0, 0.25, 0.5, 1.0),
    ("s3", 0, 0.5, 0.6, 0.1, 0.3, 1.0),
    ("s2", 2, 1.0, 1.0, 0.4, 0.2, 1.0),
]
slate_ids, slot_ids, prob, target_prob, marginal, target_marginal, reward = (np.array(c) for c in zip(*LOG))

# OBP's formula: V = sum over logged slots of reward * target_pscore / pscore, over the 3 slates.
# joint (standard IPS): s1 0.5*0.4*0.5 = 0.1 → 0.8*0.5*1 = 0.4, weight 4; s2 0.25*0.5*1 = 0.125 →
# 0.1*0.2*1 = 0.02, weight 0.16; s3 0.5*0.25 = 0.125 → 0.6*0.5 = 0.3, weight 2.4
SIPS_TERMS = [4 * (1 + 0 + 1), 0.16 * (0 + 1 + 1), 2.4 * (1 + 1)]
# cascade (reward-interaction IPS): s1 weights 0.8/0.5, 0.4/0.2, 0.4/0.1; s2 0.1/0.25, 0.02/0.125,
# 0.02/0.125; s3 0.6/0.5, 0.3/0.125
RIPS_TERMS = [1.6 * 1 + 2 * 0 + 4 * 1, 0.4 * 0 + 0.16 * 1 + 0.16 * 1, 1.2 * 1 + 2.4 * 1]
# marginal (independent IPS): s1 0.4/0.2 + 0 + 0.5/0.25; s2 0 + 0.5/0.25 + 0.2/0.4; s3 0.3/0.1 + 0.1/0.2
IIPS_TERMS = [2 + 0 + 2, 0 + 2 + 0.5, 3 + 0.5]


def test_joint_and_cascade_propensities_multiply_the_slots_probabilities() -> None:
    joint = slates.joint_pscores(slate_ids, slot_ids, prob)
    cascade = slates.cascade_pscores(slate_ids, slot_ids, prob)
    expected = {
        ("s1", 0): (0.1, 0.5), ("s1", 1): (0.1, 0.2), ("s1", 2): (0.1, 0.1),
        ("s2", 0): (0.125, 0.25), ("s2", 1): (0.125, 0.125), ("s2", 2): (0.125, 0.125),
        ("s3", 0): (0.125, 0.5), ("s3", 1): (0.125, 0.125),
    }
    for s, k, j, c in zip(slate_ids, slot_ids, joint, cascade):
        assert (j, c) == pytest.approx(expected[s, int(k)], abs=1e-15)


@pytest.mark.parametrize(
    "estimator, pscores, terms",
    [
        (slates.standard_ips, slates.joint_pscores, SIPS_TERMS),
        (slates.reward_interaction_ips, slates.cascade_pscores, RIPS_TERMS),
        (slates.independent_ips, None, IIPS_TERMS),
    ],
)
def test_slate_estimators_reproduce_obps_formulas_on_a_hand_made_log(estimator, pscores, terms) -> None:
    if pscores is None:
        pscore, target = marginal, target_marginal
    else:
        pscore, target = pscores(slate_ids, slot_ids, prob), pscores(slate_ids, slot_ids, target_prob)
    got = estimator(slate_ids, slot_ids, reward, pscore, target, confidence=0.9)
    value = sum(terms) / 3
    stderr = float(np.std(terms, ddof=1)) / math.sqrt(3)
    assert got.value == pytest.approx(value, abs=1e-12)
    assert got.stderr == pytest.approx(stderr, abs=1e-12)
    assert got.upper - got.value == pytest.approx(z_score(0.9) * stderr, abs=1e-12)
    assert slates.SLATE_ESTIMATORS[{"standard_ips": "sips", "reward_interaction_ips": "rips", "independent_ips": "iips"}[
        estimator.__name__]](slate_ids, slot_ids, reward, pscore, target) == pytest.approx(terms, abs=1e-12)


def test_the_same_values_as_open_bandit_pipeline_itself() -> None:
    ope = pytest.importorskip("obp.ope")
    ids = np.unique(slate_ids, return_inverse=True)[1].reshape(-1)  # OBP takes integer slate ids
    joint = (slates.joint_pscores(slate_ids, slot_ids, prob), slates.joint_pscores(slate_ids, slot_ids, target_prob))
    cascade = (slates.cascade_pscores(slate_ids, slot_ids, prob), slates.cascade_pscores(slate_ids, slot_ids, target_prob))
    common = {"slate_id": ids, "reward": reward, "position": slot_ids}
    theirs = {
        "sips": ope.SlateStandardIPS(len_list=3).estimate_policy_value(
            **common, pscore=joint[0], evaluation_policy_pscore=joint[1]),
        "iips": ope.SlateIndependentIPS(len_list=3).estimate_policy_value(
            **common, pscore_item_position=marginal, evaluation_policy_pscore_item_position=target_marginal),
        "rips": ope.SlateRewardInteractionIPS(len_list=3).estimate_policy_value(
            **common, pscore_cascade=cascade[0], evaluation_policy_pscore_cascade=cascade[1]),
    }
    ours = {
        "sips": slates.standard_ips(slate_ids, slot_ids, reward, *joint).value,
        "iips": slates.independent_ips(slate_ids, slot_ids, reward, marginal, target_marginal).value,
        "rips": slates.reward_interaction_ips(slate_ids, slot_ids, reward, *cascade).value,
    }
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours == pytest.approx({"sips": sum(SIPS_TERMS) / 3, "iips": sum(IIPS_TERMS) / 3, "rips": sum(RIPS_TERMS) / 3})


def test_the_estimators_refuse_what_obp_refuses() -> None:
    joint = slates.joint_pscores(slate_ids, slot_ids, prob)
    with pytest.raises(ValueError, match="slot 1 of slate 's1' is logged more than once"):
        slates.independent_ips(["s1", "s1"], [1, 1], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="one value per slate"):
        slates.standard_ips(slate_ids, slot_ids, reward, prob, joint)
    with pytest.raises(ValueError, match="must not increase down a slate"):
        slates.reward_interaction_ips(slate_ids, slot_ids, reward, joint, np.where(slot_ids == 2, 1.0, 0.5))
    with pytest.raises(ValueError, match=r"every pscore must be in \(0, 1\]"):
        slates.independent_ips(slate_ids, slot_ids, reward, np.where(slot_ids == 0, 0.0, 0.5), target_marginal)
    with pytest.raises(ValueError, match=r"every target_pscore must be in \[0, 1\]"):
        slates.independent_ips(slate_ids, slot_ids, reward, marginal, target_marginal + 1)
    with pytest.raises(ValueError, match="non-negative integers"):
        slates.independent_ips(slate_ids, slot_ids - 1, reward, marginal, target_marginal)
    with pytest.raises(ValueError, match="one entry per slot"):
        slates.independent_ips(slate_ids, slot_ids, reward[:-1], marginal, target_marginal)


def test_slot_marginals_of_a_sequential_policy() -> None:
    uniform = slates.slot_marginals(lambda left: [1 / len(left)] * len(left), 5, 3)
    assert uniform == pytest.approx(np.full((3, 5), 0.2), abs=1e-15)
    # Plackett-Luce on weights (.5, .3, .2): P(a at slot 1) = sum over b != a of p_b * p_a / (1 - p_b)
    w = [0.5, 0.3, 0.2]
    pl = slates.slot_marginals(lambda left: [w[i] / sum(w[j] for j in left) for i in left], 3, 2)
    second = [sum(w[b] * w[a] / (1 - w[b]) for b in range(3) if b != a) for a in range(3)]
    assert pl == pytest.approx(np.array([w, second]), abs=1e-15)
    assert pl.sum(axis=1) == pytest.approx([1.0, 1.0])


def test_an_on_policy_log_estimates_its_own_mean_slate_reward() -> None:
    rng = random.Random(0)
    rows = [(s, k, rng.random(), float(rng.random() < 0.3)) for s in range(50) for k in range(3)]
    s, k, p, r = (np.array(c) for c in zip(*rows))
    joint = slates.joint_pscores(s, k, p)
    assert slates.standard_ips(s, k, r, joint, joint).value == pytest.approx(r.sum() / 50, abs=1e-12)

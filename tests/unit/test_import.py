"""``reflexd import``: parsing reflexd NDJSON and VW DSJSON logs, stable ids, and a first model from them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy
from reflexd.tools import importer
from reflexd.tools.importer import (
    Record,
    Rejected,
    detect_format,
    parse,
    parse_dsjson,
    parse_ndjson,
    parse_timestamp,
)
from reflexd.wire.protocol import Decision, ModelsRequest, Outcome


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def records(items):
    return [i for i in items if isinstance(i, Record)]


def rejected(items):
    return {r.line: r.reason for r in items if isinstance(r, Rejected)}


# ---- reflexd NDJSON ----------------------------------------------------------------------


def ndjson_sample(path: Path) -> Path:
    return write_lines(
        path,
        [
            {"type": "outcome", "decision_id": "d2", "reward": 0.5, "ts": 12.0},  # before its decision
            {"type": "decision", "id": "d1", "agent": "bot", "context": {"task": "code"},
             "actions": ["a", {"id": "b", "features": {"cost": 2}}], "chosen": "b", "prob": 0.4, "ts": 10.0},
            "{not json",
            {"type": "decision", "id": "d2", "agent": "bot", "context": {}, "actions": ["a"], "chosen": "a",
             "prob": 1.0, "ts": 11.0},
            {"type": "step", "agent": "bot", "episode": "e", "index": 0, "observation": {}, "action": "a"},
            "",
            {"type": "decision", "id": "d3", "agent": "bot", "context": {}, "actions": ["a"], "chosen": "a", "prob": 0},
            {"type": "outcome", "decision_id": "d1", "reward": 1.0, "id": "o1"},
            {"type": "outcome", "decision_id": "d1", "reward": 1.0},
            {"type": "outcome", "decision_id": "d1", "reward": 1.0},  # same bytes again: a second outcome
            {"type": "outcome", "decision_id": "elsewhere", "reward": -1.0},
            "[1, 2]",
        ],
    )


def test_ndjson_decisions_come_with_their_outcomes_and_bad_lines_are_named(tmp_path):
    path = ndjson_sample(tmp_path / "log.ndjson")
    items = list(parse_ndjson(path))
    got = [(r.line, type(r.message).__name__, getattr(r.message, "id", None)) for r in records(items)]
    assert [g[:2] for g in got] == [
        (2, "Decision"), (8, "Outcome"), (9, "Outcome"), (10, "Outcome"),
        (4, "Decision"), (1, "Outcome"),
        (11, "Outcome"),
    ]
    by_line = {r.line: r.message for r in records(items)}
    assert by_line[2].ts == 10.0 and by_line[2].prob == 0.4 and by_line[2].agent == "bot"
    assert by_line[8].id == "o1"
    # generated outcome ids: distinct for repeated lines, and stable
    assert by_line[9].id.startswith("o-") and by_line[9].id != by_line[10].id
    bad = rejected(items)
    assert sorted(bad) == [3, 5, 7, 12]
    assert "not valid JSON" in bad[3]
    assert "expected a decision or an outcome, got type 'step'" in bad[5]
    assert "invalid decision" in bad[7] and "prob" in bad[7]
    assert str([r for r in items if isinstance(r, Rejected) and r.line == 5][0]).startswith(f"{path}:5: ")


def test_ndjson_agent_override_and_stable_ids(tmp_path):
    path = ndjson_sample(tmp_path / "log.ndjson")
    first = [r.message for r in records(parse_ndjson(path, agent="other"))]
    again = [r.message for r in records(parse_ndjson(path, agent="other"))]
    assert first == again
    assert {m.agent for m in first} == {"other"}


# ---- VW DSJSON ---------------------------------------------------------------------------


def dsjson_line(event_id, chosen, prob, cost, speeds, ranking=None, probs=None, ts="2024-03-01T12:00:00.1234567Z", **extra):
    multi = [{"id": f"t{i + 1}", "speed": s} for i, s in enumerate(speeds)]
    ranking = ranking or [chosen + 1] + [i + 1 for i in range(len(speeds)) if i != chosen]
    line = {
        "_label_cost": cost, "_label_probability": prob, "_label_Action": chosen + 1, "_labelIndex": chosen,
        "o": [{"v": -cost, "EventId": event_id, "ActionTaken": False}],
        "Timestamp": ts, "Version": "1", "EventId": event_id,
        "a": ranking, "c": {"user": {"urgent": True}, "_multi": multi},
        "p": probs or [prob] + [(1 - prob) / (len(speeds) - 1)] * (len(speeds) - 1),
        "VWState": {"m": "abc/def"},
    }
    line.update(extra)
    return line


def test_dsjson_lines_become_decisions_with_outcomes(tmp_path):
    path = write_lines(
        tmp_path / "log.dsjson",
        [
            dsjson_line("e1", 1, 0.8, -1.0, ["fast", "slow", "medium"], ranking=[2, 3, 1], probs=[0.8, 0.15, 0.05]),
            "not json at all",
            dsjson_line("e2", 0, 0.0, 0.0, ["fast", "slow"]),
            dsjson_line("e3", 5, 0.5, 0.0, ["fast", "slow"]),
            dsjson_line("e4", 0, 0.5, 0.0, ["fast", "slow"], ranking=[2, 1]),
            {k: v for k, v in dsjson_line("e5", 0, 0.5, 0.0, ["fast", "slow"]).items() if k != "_label_probability"},
            dsjson_line("e6", 0, 0.5, 0.0, ["fast", "slow"], _skipLearn=True),
            dsjson_line("e7", 0, 0.5, 0.0, ["fast", "slow"], ts="yesterday"),
            {"RewardValue": 2.0, "EnqueuedTimeUtc": "2024-03-01T12:00:05Z", "EventId": "e1"},
            {"Version": "1", "c": {"x": 1, "_multi": [{"f": 1}, {"f": 2}]}, "_labelIndex": 1,
             "_label_probability": 0.5, "_label_cost": 2},
        ],
    )
    items = list(parse_dsjson(path))
    recs = records(items)
    decision, outcome = recs[0].message, recs[1].message
    assert isinstance(decision, Decision) and isinstance(outcome, Outcome)
    assert decision.id == "e1" and decision.agent == "imported" and decision.strategy == "imported:dsjson"
    assert decision.context == {"user": {"urgent": True}}
    assert [msgspec.to_builtins(a) for a in decision.actions] == [
        {"id": "t1", "features": {"speed": "fast"}},
        {"id": "t2", "features": {"speed": "slow"}},
        {"id": "t3", "features": {"speed": "medium"}},
    ]
    assert decision.chosen == "t2" and decision.prob == 0.8
    assert decision.probs == [0.05, 0.8, 0.15]  # p is in the order of a; probs in the order of _multi
    assert decision.ts == pytest.approx(parse_timestamp("2024-03-01T12:00:00.123456+00:00"))
    assert outcome.decision_id == "e1" and outcome.reward == 1.0 and outcome.ts == decision.ts  # reward = -cost
    late = recs[2].message
    assert isinstance(late, Outcome) and late.decision_id == "e1" and late.reward == 2.0 and recs[2].line == 9
    last = recs[3].message  # no EventId, no ids on the actions: stable generated ids
    assert last.id.startswith("dsjson-") and [a.id for a in last.actions] == ["action-1", "action-2"]
    assert last.chosen == "action-2" and last.ts is None and recs[4].message.reward == -2.0

    bad = rejected(items)
    assert sorted(bad) == [2, 3, 4, 5, 6, 7, 8]
    assert "not valid JSON" in bad[2]
    assert "_label_probability must be in (0, 1]" in bad[3]
    assert "outside the 2 actions" in bad[4] or "outside 1..2" in bad[4]
    assert "disagree" in bad[5]
    assert "no _label_probability" in bad[6]
    assert "_skipLearn" in bad[7]
    assert "Timestamp 'yesterday'" in bad[8]


def test_the_check_pass_of_an_estimating_import_takes_a_decision_with_probs_and_no_prob():
    # the pass that only tells lines apart stands a prob in; the estimate then replaces both
    line = b'{"type":"decision","id":"d","agent":"a","context":{},"actions":["x","y"],"chosen":"x","probs":[0.5,0.5]}'
    assert importer._ndjson_event(line, None, estimate=object(), checking=True).chosen == "x"


def test_a_dsjson_p_that_disagrees_with_label_probability_is_left_out_and_the_event_kept(tmp_path):
    path = write_lines(tmp_path / "log.dsjson", [dsjson_line("e1", 0, 0.5, 0.0, ["fast", "slow"], probs=[0.9, 0.1])])
    (decision, _) = [r.message for r in records(parse_dsjson(path))]
    assert decision.prob == 0.5 and decision.probs is None  # VW learns from _label_probability alone


def test_dsjson_ids_are_stable_and_the_format_is_detected(tmp_path):
    lines = [dsjson_line(f"e{i}", i % 2, 0.5, -1.0, ["fast", "slow"]) for i in range(3)]
    lines.append({"c": {"_multi": [{"f": 1}]}, "_labelIndex": 0, "_label_probability": 1, "_label_cost": 0})
    path = write_lines(tmp_path / "log.json", lines)
    assert detect_format(path) == "dsjson"
    assert detect_format(ndjson_sample(tmp_path / "n.json")) == "ndjson"
    first = [r.message for r in records(parse(path, agent="a"))]
    assert first == [r.message for r in records(parse(path, agent="a"))]
    assert len({m.id for m in first}) == len(first) == 8


# ---- end to end: import a logged dataset, train a first model, decide with it --------------

BEST = {True: "fast", False: "slow"}
SPEEDS = ["fast", "medium", "slow"]


def logged_dataset(n, seed):
    """Logged by an epsilon-greedy policy (epsilon 0.5) that prefers the medium tool: propensities exact."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        urgent = rng.random() < 0.5
        speeds = rng.sample(SPEEDS, 3)
        greedy = speeds.index("medium")
        probs = [0.5 / 3 + (0.5 if j == greedy else 0.0) for j in range(3)]
        chosen = rng.choices(range(3), weights=probs)[0]
        reward = float(rng.random() < (0.8 if speeds[chosen] == BEST[urgent] else 0.2))
        ranking = [chosen + 1] + [j + 1 for j in range(3) if j != chosen]
        lines.append(
            {
                "_label_cost": -reward, "_label_probability": probs[chosen], "_labelIndex": chosen,
                "_label_Action": chosen + 1, "EventId": f"ev-{seed}-{i}",
                "Timestamp": f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.0000000Z",
                "a": ranking, "p": [probs[j - 1] for j in ranking],
                "c": {"task": {"urgent": urgent}, "_multi": [{"id": f"tool{j}", "speed": s} for j, s in enumerate(speeds)]},
            }
        )
    return lines


def cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflexd", *args, "--socket", d.socket], capture_output=True, text=True, timeout=600
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_imported_log_trains_a_first_model_that_the_gate_promotes(daemon_factory, tmp_path):
    d = daemon_factory({"rewards": {"wait_window": 0.2}, "trainer": {"epochs": 10}, "gate": {"min_holdout": 50}})
    lines = logged_dataset(2000, seed=1)
    lines.insert(7, "{broken")
    path = write_lines(tmp_path / "logged.dsjson", lines)

    done = cli(d, "import", str(path), "--agent", "router", "--batch", "300")
    assert done.returncode == 0, done.stderr + d.log()
    assert "sent 2000 decisions and 2000 outcomes" in done.stdout and "imported 4000" in done.stdout
    assert f"rejected {path}:8: not valid JSON" in done.stdout
    assert "importing dsjson" in done.stderr  # the progress bar

    again = cli(d, "import", str(path), "--format", "dsjson", "--agent", "router")
    assert again.returncode == 0, again.stderr
    assert "imported 0, duplicates (already stored) 4000" in again.stdout
    assert d.status().experience["decisions"] == 2000

    time.sleep(0.5)  # the wait window, so every decision has matured
    trained = cli(d, "train", "--now")
    assert trained.returncode == 0, trained.stderr + d.log()
    assert trained.stdout.startswith("promoted v0001"), trained.stdout

    manifest = d.request(ModelsRequest()).models[0]
    gate = manifest["gate"]
    assert gate["passed"] is True and gate["baseline"] == "logged policy"
    assert gate["holdout_rows"] >= 300 and gate["candidate_value"] > gate["baseline_value"] + 0.15, gate
    print("gate:", gate["reason"])

    rng = random.Random(5)
    hits = n = 0
    with Policy("router", socket=d.socket, state_dir=d.state_dir, seed=3) as policy:
        wait_for(lambda: policy.model_version, 60, "the imported model to reach the client")
        for _ in range(400):
            urgent = rng.random() < 0.5
            speeds = rng.sample(SPEEDS, 3)
            actions = [{"id": f"tool{j}", "features": {"speed": s}} for j, s in enumerate(speeds)]
            choice = policy.decide({"task": {"urgent": urgent}}, actions)
            hits += speeds[choice.index] == BEST[urgent]
            n += 1
    assert hits / n > 0.8, hits / n

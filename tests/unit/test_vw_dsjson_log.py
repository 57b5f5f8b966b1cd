"""A DSJSON log Vowpal Wabbit's decision service wrote (tests/data/vw/, from VW's own repository)
imports: every line becomes a decision and its outcome, probabilities and costs intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reflexd.tools.importer import Record, Rejected, detect_format, parse, parse_timestamp
from reflexd.wire.protocol import Decision, Outcome

LOG = Path(__file__).resolve().parents[1] / "data" / "vw" / "dsjson_cb_part1.json"


def lines() -> list[dict]:
    return [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]


def test_the_log_is_the_one_vw_wrote() -> None:
    logged = lines()
    assert len(logged) == 12
    assert all(len(line["c"]["_multi"]) == 4 and "_label_cost" in line and "VWState" in line for line in logged)


def test_every_line_imports_as_a_decision_and_its_outcome() -> None:
    assert detect_format(LOG) == "dsjson"  # a .json file, told by its first line
    items = list(parse(LOG, agent="coffee"))
    assert [i for i in items if isinstance(i, Rejected)] == []
    decisions = [i.message for i in items if isinstance(i, Record) and isinstance(i.message, Decision)]
    outcomes = [i.message for i in items if isinstance(i, Record) and isinstance(i.message, Outcome)]
    assert len(decisions) == len(outcomes) == 12

    for line, decision, outcome in zip(lines(), decisions, outcomes):
        names = [item["i"]["id"] for item in line["c"]["_multi"]]  # the decision service's action ids
        assert decision.id == line["EventId"] and decision.agent == "coffee"
        assert [a.id for a in decision.actions] == names == ["Cappucino", "Cold brew", "Iced mocha", "Latte"]
        # the chosen action: _labelIndex from 0, _label_Action from 1, a[0] from 1 all agree
        assert decision.chosen == names[line["_labelIndex"]] == names[line["_label_Action"] - 1] == names[line["a"][0] - 1]
        assert decision.prob == pytest.approx(line["_label_probability"], abs=0) and 0 < decision.prob <= 1
        # p is given in the order of a: each action gets its own probability back
        assert decision.probs == [line["p"][line["a"].index(k + 1)] for k in range(4)]
        assert decision.probs[names.index(decision.chosen)] == pytest.approx(decision.prob, rel=1e-6)
        assert decision.context == {"FromUrl": line["c"]["FromUrl"]}
        assert decision.ts == parse_timestamp(line["Timestamp"])
        # a cost is a negative reward: -1.0 (a click) is reward 1, -0.0 reward 0
        assert outcome.decision_id == decision.id and outcome.reward == -line["_label_cost"]
        assert outcome.reward == line["o"][0]["v"]
    assert sorted({o.reward for o in outcomes}) == [0.0, 1.0]
    assert {d.prob for d in decisions} == {0.05000000074505806, 0.8500000238418579}

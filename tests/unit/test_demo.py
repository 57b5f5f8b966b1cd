"""The demo's world is exact, and ``reflexd demo`` runs end to end on a short budget."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from reflexd.tools.demo import (
    AGENTS,
    RULES_SHOWN,
    STRATEGIES,
    Record,
    World,
    first_adaptation,
    report,
    rules_report,
    windows,
)


def test_the_world_has_no_single_best_strategy() -> None:
    world = World(1)
    contexts = [world.context() for _ in range(3000)]
    best = {max(STRATEGIES, key=lambda a: world.expected(c, a)) for c in contexts}
    assert len(best) >= 3  # the best choice depends on the context: there is something to learn
    for c in contexts[:100]:
        assert world.best(c) == max(world.expected(c, a) for a in STRATEGIES)


def test_windows_cover_every_decision_once() -> None:
    rec = Record(rewards=[1.0] * 10 + [0.0] * 15, regrets=[0.0] * 25, versions=[None] * 10 + ["v0001"] * 15)
    rows = windows(rec, n=5)
    assert rows[0]["from"] == 1 and rows[-1]["to"] == 25
    assert sum(r["to"] - r["from"] + 1 for r in rows) == 25
    assert rows[0]["models"] == "none" and rows[-1]["models"] == "v0001"


def test_first_adaptation_is_the_first_window_clearly_above_the_default_policy() -> None:
    world = World(2)
    contexts = [world.context() for _ in range(1000)]
    assert all(min(world.expected(c, a) for a in STRATEGIES) <= world.uniform(c) <= world.best(c) for c in contexts)
    noise = [(-1) ** i * 0.3 for i in range(1000)]
    assert first_adaptation(noise) is None  # no better than the default on average
    better = [g + (0.2 if i >= 400 else 0.0) for i, g in enumerate(noise)]
    # windows start every 50 decisions; 251–450 is the first with enough better ones to be sure
    assert first_adaptation(better) == 251


def test_the_agents_of_the_multi_agent_demo_want_different_things() -> None:
    """Each agent has its own actions, and where they share actions they often disagree on the best."""
    worlds = [World(3, strategies, weights) for _, strategies, weights in AGENTS]
    assert [len(w.actions) for w in worlds] == [5, 3, 3]
    contexts = [worlds[0].context() for _ in range(2000)]
    shared = ("small-model",)
    for w in worlds:
        assert all(a["id"] in w.strategies for a in w.actions) and set(shared) <= set(w.strategies)
    best = [[max(w.strategies, key=lambda a, c=c, w=w: w.expected(c, a)) for c in contexts] for w in worlds]
    assert best[1] != best[2] and len(set(best[1])) >= 2 and len(set(best[2])) >= 2


@pytest.mark.e2e
def test_the_multi_agent_demo_reports_each_agent(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "reflexd", "demo", "--agents", "3", "--decisions", "1500", "--rate", "2000", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report = (out / "report.txt").read_text()
    for name, strategies, _ in AGENTS:
        line = next(line for line in report.splitlines() if line.startswith(name))
        assert line.split()[1:3] == [str(len(strategies)), "500"], line
    assert "daemon: 3000 events stored" in report, report


@pytest.mark.e2e
def test_the_demo_command_runs_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "reflexd", "demo", "--decisions", "1500", "--rate", "2000", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # too short a run for a model, maybe even for a first adaptation (exit 1 says so); everything else must work
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report = (out / "report.txt").read_text()
    assert "mean regret" in report and "decide latency in-process" in report
    # the online head adapts long before 1,500 decisions, with no model needed
    assert "first adaptation: decisions " in report, report
    # every decision and its outcome, counted once they are in the store, not while still spooled
    assert "daemon: 3000 events stored" in report, report
    assert (out / "learning-curve.png").stat().st_size > 10_000
    assert (out / "daemon.log").exists()


def test_the_demo_checks_each_published_rule_against_the_worlds_true_lift() -> None:
    from reflexd.tools.demo import holds, true_lift

    world = World(4)
    chat = {"feature": "task", "op": "==", "value": "chat"}
    rule = {"action": "small-model", "baseline": "large+tools", "when": [chat]}
    assert true_lift(world, rule) > 0  # on chat the small model is nearly as good and far cheaper
    assert true_lift(world, {**rule, "when": [{"feature": "task", "op": "in", "value": ["math", "search"]}]}) < 0
    assert true_lift(world, {**rule, "when": [{"feature": "difficulty", "op": ">", "value": 2.0}]}) is None
    assert true_lift(world, {**rule, "action": "no-such-action"}) is None
    assert holds([chat, {"feature": "difficulty", "op": "<=", "value": 0.5}], {"task": "chat", "difficulty": 0.2})
    assert not holds([chat], {"difficulty": 0.2})  # a missing feature matches no condition
    before = world.rng.getstate()
    true_lift(world, rule)
    assert world.rng.getstate() == before  # the world's own stream is left as it was



@pytest.mark.parametrize("published", [1, 4, RULES_SHOWN, RULES_SHOWN + 3])
def test_the_rules_report_shows_as_many_rules_as_it_says(published: int) -> None:
    world = World(4)
    chat = [{"feature": "task", "op": "==", "value": "chat"}]
    rules = [
        {"status": "published", "text": f"rule {i}", "action": "small-model", "baseline": "large+tools",
         "when": chat, "lift": 0.1 + i / 100}
        for i in range(published)
    ]
    found = SimpleNamespace(rules=rules + [{**rules[0], "status": "candidate", "text": "a candidate"}],
                            run={"experiences": 9000})
    text = rules_report(found, world)
    listed = [line for line in text.splitlines() if line.startswith("  rule ")]
    assert len(listed) == min(published, RULES_SHOWN), text
    last = text.splitlines()[-1]
    assert last.startswith(f"rules published: {published}"), text
    assert (f"{RULES_SHOWN} shown of {published}" in last) == (published > RULES_SHOWN), text
    assert "a candidate" not in text

@pytest.mark.e2e
def test_the_traces_demo_runs_an_agent_that_reports_only_through_its_traces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "reflexd", "demo", "--traces", "--decisions", "400", "--rate", "6000", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    # too short a run for a model to be promoted (exit 1 says so); the traces must all arrive
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report = (out / "report-traces.txt").read_text()
    assert "400 episodes" in report and "the agent sent no reward itself" in report, report
    assert "before any model" in report


def test_the_report_says_how_many_first_models_lost_to_the_online_head() -> None:
    rng = random.Random(0)
    rec = Record(
        rewards=[rng.random() for _ in range(400)], regrets=[0.1] * 400, versions=[None] * 400,
        latencies_us=[50.0] * 400, gains=[0.0] * 400,
    )
    trainer = {"runs": 4, "promoted": 0, "rejected": 4, "unconfirmed": 2}
    status = SimpleNamespace(ingest={"stored": 800}, trainer=trainer)
    assert report(rec, status).endswith(
        "0 promoted, 4 rejected (2 of them passed on their holdout, then lost to the online head on the decisions made during their run)"
    )
    assert report(rec, SimpleNamespace(ingest={"stored": 800}, trainer={**trainer, "unconfirmed": 0})).endswith("4 rejected")

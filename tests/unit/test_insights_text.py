"""``reflexd insights`` as text: what the findings say, not how they are stored, and what is left out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from reflexd.config import Config
from reflexd.service.insights import Extractor
from reflexd.service.store.findings import Run
from reflexd.tools.cli import build_parser
from reflexd.tools.insights import SHOWN, render
from reflexd.wire.protocol import Insights, InsightsRequest

AT = 1_796_000_000.0
RUN = {"id": "20261206T080000-abcd1234", "at": AT, "window_start": AT - 86400, "window_end": AT, "experiences": 5000}


def anomaly(i: int) -> dict[str, Any]:
    return {
        "kind": "reward_change", "agent": "router", "at": AT - i, "size": -0.17,
        "summary": f"router's reward fell by 0.17 from 0.539 to 0.369 ({i})",
        "evidence": {"before": 0.5393089634451678, "before_ci": [0.53, 0.55], "threshold_sd": 50.48},
    }


def test_an_anomaly_reads_as_its_summary_with_its_time_and_agent_not_its_evidence() -> None:
    text = "\n".join(render(Insights(run=RUN, anomalies=[anomaly(0)])))
    assert "reward_change  router: router's reward fell by 0.17 from 0.539 to 0.369" in text, text
    assert "evidence" not in text and "threshold_sd" not in text and "0.5393" not in text, text


def test_the_runs_notes_are_shown() -> None:
    notes = ["context drift for router: no training window of a live model was given", "router: user.id left out"]
    text = render(Insights(run={**RUN, "notes": notes}))
    assert "notes      2" in text and "  " + notes[0] in text and "  " + notes[1] in text, text


def test_a_trend_reads_with_its_times_as_dates_and_its_value_as_the_newest_windows() -> None:
    trend = {
        "agent": "router", "action": "large", "metric": "dr_value", "start": AT - 86400, "end": AT, "value": 0.43,
        "ci": [0.39, 0.47], "count": 812, "direction": "declining", "since": AT - 3600, "change": -0.21,
        "change_ci": [-0.3, -0.1], "points": [],
    }
    text = "\n".join(render(Insights(run=RUN, trends=[trend])))
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(AT - 3600))
    assert f"  agent router  action large  declining since {since} by -0.21: newest window 0.43 [0.39, 0.47] on 812 decisions" in text, text
    assert "e+09" not in text, text


def test_notes_under_an_agent_say_they_are_the_whole_runs() -> None:
    reply = Insights(run={**RUN, "notes": ["context drift for other: none"]}, summary={"agent": "router"})
    assert "notes      1 (the run's, about every agent)" in render(reply)
    assert "notes      1" in render(Insights(run={**RUN, "notes": ["x"]}))


def test_what_is_not_shown_is_counted_and_all_shows_it() -> None:
    rules = [{"status": "published", "text": f"rule {i}", "first_seen": AT} for i in range(SHOWN + 2)]
    reply = Insights(run=RUN, rules=rules, anomalies=[anomaly(i) for i in range(16)], patterns=[{"agent": "router"}])
    text = render(reply)
    assert sum("reward_change" in line for line in text) == SHOWN
    assert any("6 more anomalies" in line and "--all" in line for line in text), text
    assert any("2 more published rules" in line for line in text), text
    assert not any("more patterns" in line for line in text), text  # all of them are there
    every = render(reply, None)
    assert sum("reward_change" in line for line in every) == 16
    assert sum(line.startswith("  rule ") for line in every) == SHOWN + 2
    assert not any(" more " in line for line in every), every
    assert build_parser().parse_args(["insights", "--all"]).all


def test_a_run_on_fewer_decisions_than_min_support_says_why_it_found_nothing() -> None:
    small = {**RUN, "experiences": 4}
    text = "\n".join(render(Insights(run={**small, "min_support": 300}, summary={"min_support": 200})))
    assert "4 experiences" in text and "insights.min_support = 300" in text, text  # the run's own setting
    older = "\n".join(render(Insights(run=small, summary={"min_support": 200})))  # a run that kept none
    assert "insights.min_support = 200" in older, older
    enough = "\n".join(render(Insights(run={**RUN, "min_support": 200})))
    assert "min_support" not in enough, enough


def test_an_agent_with_nothing_stored_is_named() -> None:
    text = "\n".join(render(Insights(run=RUN, summary={"agent": "nobody", "agent_has_decisions": False})))
    assert "no decision of agent 'nobody' is in the store" in text, text
    known = "\n".join(render(Insights(run=RUN, summary={"agent": "router", "agent_has_decisions": True})))
    assert "is in the store" not in known, known


class _Store:
    def __init__(self) -> None:
        self.run = Run(id=RUN["id"], at=AT, window_start=None, window_end=None, experiences=4, summary={"notes": []})

    def latest_insights(self, agent: str | None) -> tuple[Run, dict[str, list[dict[str, Any]]]]:
        return self.run, {"rules": [], "patterns": [], "anomalies": [], "trends": []}

    def agents(self) -> list[str]:
        return ["router"]


@pytest.mark.parametrize("agent, stored", [("nobody", False), ("router", True), (None, None)])
def test_the_reply_says_whether_the_agent_asked_about_has_decisions_and_the_min_support(
    agent: str | None, stored: bool | None, tmp_path: Path
) -> None:
    config = Config(state_dir=str(tmp_path))
    extractor = Extractor(lambda: config, _Store(), None, list, anyio.Lock())  # type: ignore[arg-type]
    reply = anyio.run(extractor.answer, InsightsRequest(agent=agent))
    assert reply.summary["min_support"] == config.insights.min_support
    assert reply.summary.get("agent") == agent and reply.summary.get("agent_has_decisions") is stored


class _Trouble(_Store):
    promoted: list[str] = []

    def model_events(self, limit: int = 50) -> list[dict[str, Any]]:
        return [{"version": v, "at": 1.0, "event": "promoted"} for v in self.promoted]

    def trouble_times(self, since: float) -> tuple[list[float], dict[str, list[float]]]:
        return [], {}


def test_each_lines_live_model_gives_its_own_agents_the_training_window_drift_is_measured_from(tmp_path: Path) -> None:
    """With a model line per agent (the default scope) each agent's drift is measured from its own
    line's live model; the reward model's folder is given only where one line scores every agent."""
    from linear_models import linear_model
    from reflexd.features import FeatureSpec
    from reflexd.manifest import GateResult
    from reflexd.registry import Registry

    spec, model = FeatureSpec(64, 64, 0), tmp_path / "model.onnx"
    model.write_bytes(linear_model(spec, {"x": 0.0}))
    config = Config(state_dir=str(tmp_path))

    gate = GateResult(
        passed=True, reason="passed", estimator="dr", baseline="logged policy", candidate_value=0.6, baseline_value=0.5,
        difference=0.1, lower=0.05, upper=0.15, confidence=0.8, margin=0.0, holdout_rows=40,
    )
    store = _Trouble()
    store.promoted = []

    def line(name: str, window: tuple[float, float] | None) -> Registry:
        registry = Registry(tmp_path / name, tmp_path)
        if window is not None:
            fields = {"parent": None, "created": 1.0, "learner": "mlp", "features": spec, "exploration": config.exploration,
                      "training": {"window_start": window[0], "window_end": window[1]}, "gate": gate}
            version = registry.add(model, fields).version
            registry.promote(version)
            store.promoted.append(version)
        return registry

    lines = [(line("left", (10.0, 20.0)), ["left"]), (line("crew", (30.0, 40.0)), ["a", "b"]), (line("none", None), ["c"])]
    extractor = Extractor(lambda: config, store, None, lambda: lines, anyio.Lock())  # type: ignore[arg-type]
    inputs, model_dir = extractor._inputs(100.0)
    assert inputs.training_windows == {"left": [10.0, 20.0], "a": [30.0, 40.0], "b": [30.0, 40.0]}
    # a model is held to its gate's prediction on its own agent's rewards (a group's: every agent's)
    assert [(m.version, m.agent) for m in inputs.models] == [(lines[0][0].current(), "left"), (lines[1][0].current(), None)]
    assert model_dir is None  # several lines: no one model scores every agent's decisions
    shared = [(line("shared", (5.0, 6.0)), None)]
    extractor = Extractor(lambda: config, _Trouble(), None, lambda: shared, anyio.Lock())  # type: ignore[arg-type]
    inputs, model_dir = extractor._inputs(100.0)
    assert inputs.training_windows == {"": [5.0, 6.0]} and model_dir == tmp_path / "shared" / shared[0][0].current()

"""The behaviour model through the daemon: a simulated tool-using agent's steps sent over the
socket, a model trained by the daemon in its subprocess once enough episodes ended, published in
``models/behaviour/``, and run in-process by ``EpisodeWatch`` with its state carried between steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import wait_for
from reflexd.client.watch import EpisodeWatch
from reflexd.learning.agentsim import POLICY, TOOLS, ToolAgent
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Decision, Flush, InsightsRequest, Outcome, Step

pytestmark = pytest.mark.e2e
SMALL = {"min_new_episodes": 60, "hidden": 16, "layers": 1, "epochs": 10, "min_episodes": 20}


def test_the_daemon_trains_and_publishes_a_behaviour_model_the_client_runs(daemon_factory, tmp_path) -> None:
    d = daemon_factory({"behaviour": SMALL})
    agent = ToolAgent(seed=3, agent="tools")
    with Connection(d.socket) as conn:
        for e in range(80):
            ep = agent.episode(f"e{e}")
            conn.send([
                Step(agent="tools", episode=ep.episode, index=i, observation=obs, action=action, reward=reward,
                     done=ep.done and i == len(ep.actions) - 1, id=f"{ep.episode}:{i}")
                for i, (obs, action, reward) in enumerate(zip(ep.observations, ep.actions, ep.rewards))
            ] + [Flush(req=e)])
            conn.receive()
    # the registry says live as the run publishes, its summary comes once the run returns: wait for both
    status = wait_for(lambda: (s := d.status()).behaviour["live"] and s.behaviour["last_run"] and s, 180,
                      "a published behaviour model and its run's summary")
    run = status.behaviour["last_run"]
    assert run["outcome"] == "published" and run["episodes"] >= 60
    assert run["calibration"]["brier"] is not None

    assert EpisodeWatch(d.state_dir / "models").precision == "int8"  # the run published its int8 graph too
    # the float graph, so that what the client expects is the importer's estimate to 1e-5
    watch = EpisodeWatch(d.state_dir / "models", full_precision=True)
    first = watch.step("live-1", {"task": "math", "ready": False, "failures": 0}, "calculator")
    assert first is not None and first.version == status.behaviour["live"]
    # what the model expects next on a math task puts the calculator first, as the agent's policy does
    expected = watch.expect("live-2", {"task": "math", "ready": False, "failures": 0})  # a new episode's first step
    assert expected is not None
    best = max(TOOLS, key=lambda t: expected.get(t, 0.0))
    assert best == TOOLS[POLICY["math"].index(max(POLICY["math"]))]

    # a log without probabilities, imported with the behaviour model's estimates
    log = tmp_path / "unlogged.ndjson"
    obs = {"task": "math", "ready": False, "failures": 0}
    log.write_text("".join(
        json.dumps({"type": "decision", "id": f"u{i}", "agent": "tools", "context": obs, "actions": list(TOOLS),
                    "chosen": "calculator"}) + "\n" for i in range(5)
    ))
    run = [sys.executable, "-m", "reflexd", "import", str(log), "--format", "ndjson", "--socket", d.socket, "--json"]
    refused = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1  # without the flag, a decision needs its prob
    done = subprocess.run(run + ["--estimate-propensities", "--models", str(d.state_dir / "models")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["decisions"] == 5, done.stderr
    d.request(Flush(loaded=True))
    rows = subprocess.run(
        [sys.executable, "-m", "reflexd", "query", "--socket", d.socket, "--json",
         "SELECT prob, strategy FROM decisions WHERE id LIKE 'u%'"], capture_output=True, text=True, timeout=120,
    )
    found = json.loads(rows.stdout)
    assert len(found) == 5 and all(r["strategy"] == f"estimated:behaviour {status.behaviour['live']}" for r in found)
    # the model's own probability of the calculator, among the tools offered: what the client expects
    offered = {t: expected.get(t, 0.0) for t in TOOLS}
    estimate = offered["calculator"] / sum(offered.values())
    assert all(r["prob"] == pytest.approx(estimate, abs=1e-5) for r in found), (found, estimate)
    # a model this small, on 80 episodes, is rough; it still puts the agent's favourite above chance
    # (its accuracy at size, against the true propensities: docs/results/2026-12-06-behaviour.md)
    assert estimate > 1 / len(TOOLS)


def test_insights_report_the_unusual_trajectories_among_the_steps(daemon_factory) -> None:
    """Loops and repeated failing calls planted among ordinary episodes come back as anomalies of
    kind unusual_trajectory (before any behaviour model: those need none)."""
    d = daemon_factory({"behaviour": {"enabled": False}, "rewards": {"wait_window": 0.2}})
    agent = ToolAgent(seed=5, agent="tools")
    kinds = ["normal"] * 30 + ["loop", "failures"]
    with Connection(d.socket) as conn:
        for e, kind in enumerate(kinds):
            ep = agent.episode(f"{kind}-{e}", kind=kind)
            conn.send([
                Step(agent="tools", episode=ep.episode, index=i, observation=obs, action=action, reward=reward,
                     done=ep.done and i == len(ep.actions) - 1, id=f"{ep.episode}:{i}")
                for i, (obs, action, reward) in enumerate(zip(ep.observations, ep.actions, ep.rewards))
            ])
        # an extraction needs decisions to read; a few, with their outcomes
        conn.send([Decision(id=f"d{i}", agent="tools", context={"task": "math"}, actions=["a", "b"], chosen="a", prob=0.5)
                   for i in range(20)] + [Outcome(decision_id=f"d{i}", reward=1.0) for i in range(20)] + [Flush(req=1, loaded=True)])
        conn.receive()
    wait_for(lambda: d.status().experience["new_since_training"] >= 20, 60, "the decisions to mature")
    found = d.request(InsightsRequest(agent="tools", now=True), timeout=300)
    unusual = [a for a in found.anomalies if a["kind"] == "unusual_trajectory"]
    flagged = {a["evidence"]["episode"] for a in unusual}
    assert {"loop-30", "failures-31"} <= flagged, unusual
    # ordinary episodes may fail a call a few times by chance, but none of them loops
    assert {a["evidence"]["episode"] for a in unusual if a["evidence"]["pattern"] == "loop"} == {"loop-30"}
